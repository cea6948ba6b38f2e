//! The sled-backed Raft log and state machine (see store/mod.rs).
