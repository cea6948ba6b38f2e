//! The integration tests of the `raft` crate, in one binary so it links once.

mod fixtures;
mod store;
mod suite;
