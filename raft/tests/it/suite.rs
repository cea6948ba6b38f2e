//! openraft's storage conformance suite, run against the sled store.
//!
//! The suite drives every case through the public `RaftLogStorage` and `RaftStateMachine`
//! traits, each in a fresh store in its own temporary directory.

use openraft::testing::{StoreBuilder, Suite};
use openraft::{StorageError, StorageIOError};
use raft::store::{LogStore, StateMachine, Store};
use raft::{NodeId, TypeConfig};
use tempfile::TempDir;

/// Opens a store in a new temporary directory; the directory lives as long as the test case.
struct TempStores;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for TempStores {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
        let store = Store::open(dir.path()).map_err(|e| StorageIOError::write(&e))?;
        Ok((dir, store.log_store(), store.state_machine()))
    }
}

// The suite creates its own tokio runtime per case, so this is a plain test.
#[test]
fn openraft_storage_suite() {
    Suite::test_all(TempStores).unwrap();
}
