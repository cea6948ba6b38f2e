//! The integration tests of the `raft` crate, in one binary so it links once.

mod fixtures;
mod single_node;
mod store;
mod suite;
