//! The state machine: openraft's `RaftStateMachine` over the `state` tree, and snapshots.
//!
//! Each committed entry is applied in its own sled transaction that also records the entry's
//! log id as last applied, so a crash leaves the state at an entry boundary that openraft knows
//! about and re-applies the rest from the log. A failure of the storage under `apply` aborts
//! the transaction and is reported to openraft as fatal: a replica that cannot apply an entry
//! must stop rather than diverge.
//!
//! Snapshots are a full copy of the replicated key space (see `encoding::SnapshotFile`). The
//! current snapshot is kept in the `meta` tree so it survives a restart and can be sent to a
//! lagging follower after the log it replaces was purged.

use std::cell::RefCell;
use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{
    Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StoredMembership,
};
use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};

use super::encoding::{
    membership_from_json, membership_to_json, SnapshotFile, StoredLogId, StoredSnapshotMeta,
};
use super::reader::Applied;
use super::{meta_keys, state_keys, storage_error, Inner, StoreError};
use crate::apply::{self, ApplyError, StateTx};
use crate::codec;
use crate::command::Response;
use crate::model::Member;
use crate::{NodeId, TypeConfig};

type Membership = StoredMembership<NodeId, Member>;

/// The state machine half of the store.
#[derive(Debug, Clone)]
pub struct StateMachine {
    inner: Arc<Inner>,
}

/// Builds a snapshot of the state machine; openraft runs it on its own task.
#[derive(Debug, Clone)]
pub struct SnapshotBuilder {
    inner: Arc<Inner>,
}

/// `apply`'s view of one sled transaction.
///
/// sled reports two kinds of failure inside a transaction: a conflict (the transaction must be
/// retried) and a storage error. `StateTx` can only carry an `ApplyError`, which would turn a
/// conflict into an abort, so the original error is kept here and handed back to sled, which
/// then retries or fails as it should.
struct SledTx<'a> {
    tree: &'a TransactionalTree,
    failure: RefCell<Option<UnabortableTransactionError>>,
}

impl SledTx<'_> {
    fn fail(&self, e: UnabortableTransactionError) -> ApplyError {
        let message = e.to_string();
        self.failure.replace(Some(e));
        ApplyError::Storage(message)
    }
}

impl StateTx for SledTx<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ApplyError> {
        match self.tree.get(key) {
            Ok(v) => Ok(v.map(|v| v.to_vec())),
            Err(e) => Err(self.fail(e)),
        }
    }
    fn put(&self, key: &[u8], value: Vec<u8>) -> Result<(), ApplyError> {
        match self.tree.insert(key, value) {
            Ok(_) => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }
    fn remove(&self, key: &[u8]) -> Result<(), ApplyError> {
        match self.tree.remove(key) {
            Ok(_) => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }
}

pub(crate) fn read_last_applied(state: &sled::Tree) -> Result<Option<StoredLogId>, StoreError> {
    match state.get(state_keys::LAST_APPLIED)? {
        Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
        None => Ok(None),
    }
}

pub(crate) fn read_membership(state: &sled::Tree) -> Result<Membership, StoreError> {
    match state.get(state_keys::MEMBERSHIP)? {
        Some(bytes) => membership_from_json(&codec::decode::<String>(&bytes)?),
        None => Ok(Membership::default()),
    }
}

/// Applies one entry in one sled transaction and returns its response.
pub(crate) fn apply_entry(
    state: &sled::Tree,
    entry: &Entry<TypeConfig>,
) -> Result<Response, StoreError> {
    let last_applied = codec::encode(&StoredLogId::from(&entry.log_id))?;
    let membership = match &entry.payload {
        EntryPayload::Membership(m) => {
            let stored = Membership::new(Some(entry.log_id), m.clone());
            Some(codec::encode(&membership_to_json(&stored)?)?)
        }
        _ => None,
    };
    let index = entry.log_id.index;
    let outcome = state.transaction(|tree| {
        let response = match &entry.payload {
            EntryPayload::Blank | EntryPayload::Membership(_) => Response::Ok,
            EntryPayload::Normal(req) => {
                let tx = SledTx {
                    tree,
                    failure: RefCell::new(None),
                };
                let result = apply::apply(&tx, req, index);
                if let Some(e) = tx.failure.take() {
                    return Err(e.into());
                }
                result.map_err(ConflictableTransactionError::Abort)?
            }
        };
        if let Some(m) = &membership {
            tree.insert(state_keys::MEMBERSHIP, m.clone())?;
        }
        tree.insert(state_keys::LAST_APPLIED, last_applied.clone())?;
        Ok(response)
    });
    match outcome {
        Ok(response) => Ok(response),
        Err(TransactionError::Abort(e)) => Err(e.into()),
        Err(TransactionError::Storage(e)) => Err(e.into()),
    }
}

impl StateMachine {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        StateMachine { inner }
    }

    fn current_snapshot(&self) -> Result<Option<Snapshot<TypeConfig>>, StoreError> {
        let meta = &self.inner.meta;
        let (Some(meta_bytes), Some(data)) = (
            meta.get(meta_keys::SNAPSHOT_META)?,
            meta.get(meta_keys::SNAPSHOT_DATA)?,
        ) else {
            return Ok(None);
        };
        let stored: StoredSnapshotMeta = codec::decode(&meta_bytes)?;
        Ok(Some(Snapshot {
            meta: SnapshotMeta {
                last_log_id: stored.last_log_id.map(Into::into),
                last_membership: membership_from_json(&stored.last_membership)?,
                snapshot_id: stored.snapshot_id,
            },
            snapshot: Box::new(Cursor::new(data.to_vec())),
        }))
    }
}

/// Records `meta` and `data` as the current snapshot, both in one batch.
pub(crate) fn save_current_snapshot(
    inner: &Inner,
    meta: &SnapshotMeta<NodeId, Member>,
    data: &[u8],
) -> Result<(), StoreError> {
    let stored = StoredSnapshotMeta {
        snapshot_id: meta.snapshot_id.clone(),
        last_log_id: meta.last_log_id.as_ref().map(StoredLogId::from),
        last_membership: membership_to_json(&meta.last_membership)?,
    };
    let mut batch = sled::Batch::default();
    batch.insert(meta_keys::SNAPSHOT_META, codec::encode(&stored)?);
    batch.insert(meta_keys::SNAPSHOT_DATA, data);
    inner.meta.apply_batch(batch)?;
    Ok(())
}

/// Scans the state into a snapshot and stores it as the current one. Runs under the state
/// lock on a blocking thread: the scan reads every key.
fn build_snapshot_blocking(inner: &Inner) -> Result<Snapshot<TypeConfig>, StoreError> {
    let last_log_id: Option<LogId<NodeId>> = read_last_applied(&inner.state)?.map(Into::into);
    let last_membership = read_membership(&inner.state)?;
    let mut pairs = Vec::new();
    for item in inner.state.iter() {
        let (k, v) = item?;
        if !state_keys::is_internal(&k) {
            pairs.push((k.to_vec(), v.to_vec()));
        }
    }
    let file = SnapshotFile {
        last_log_id: serde_json::to_string(&last_log_id)?,
        last_membership: membership_to_json(&last_membership)?,
        pairs,
    };
    let data = codec::encode(&file)?;
    // sled's id generator is monotonic across restarts, so ids never repeat on this node.
    let seq = inner.db.generate_id()?;
    let snapshot_id = match &last_log_id {
        Some(id) => format!(
            "{}-{}-{}-{seq}",
            id.leader_id.term, id.leader_id.node_id, id.index
        ),
        None => format!("none-{seq}"),
    };
    let meta = SnapshotMeta {
        last_log_id,
        last_membership,
        snapshot_id,
    };
    save_current_snapshot(inner, &meta, &data)?;
    Ok(Snapshot {
        meta,
        snapshot: Box::new(Cursor::new(data)),
    })
}

/// Replaces the whole state with the snapshot's content, atomically, and makes it current.
fn install_snapshot_blocking(
    inner: &Inner,
    meta: &SnapshotMeta<NodeId, Member>,
    data: &[u8],
) -> Result<(), StoreError> {
    let file: SnapshotFile = codec::decode(data)?;
    let in_meta = serde_json::to_string(&meta.last_log_id)?;
    // The bytes came over the network: check they are the snapshot the metadata describes.
    let in_file: Option<LogId<NodeId>> = serde_json::from_str(&file.last_log_id)?;
    if in_file != meta.last_log_id {
        return Err(StoreError::SnapshotMismatch {
            in_file: file.last_log_id,
            in_meta,
        });
    }
    let mut batch = sled::Batch::default();
    for key in inner.state.iter().keys() {
        batch.remove(key?);
    }
    // A later insert of the same key in a batch wins over the removal above.
    for (k, v) in file.pairs {
        batch.insert(k, v);
    }
    if let Some(id) = &meta.last_log_id {
        batch.insert(
            state_keys::LAST_APPLIED,
            codec::encode(&StoredLogId::from(id))?,
        );
    }
    batch.insert(
        state_keys::MEMBERSHIP,
        codec::encode(&membership_to_json(&meta.last_membership)?)?,
    );
    inner.state.apply_batch(batch)?;
    save_current_snapshot(inner, meta, data)
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let build = async {
            let guard = self.inner.state_lock.clone().lock_owned().await;
            let inner = self.inner.clone();
            let snapshot = tokio::task::spawn_blocking(move || {
                let _guard = guard;
                build_snapshot_blocking(&inner)
            })
            .await??;
            self.inner.flush().await?;
            Ok::<_, StoreError>(snapshot)
        };
        build
            .await
            .map_err(|e| storage_error(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        let read = || -> Result<_, StoreError> {
            let last = read_last_applied(&self.inner.state)?;
            let membership = read_membership(&self.inner.state)?;
            Ok((last.map(Into::into), membership))
        };
        read().map_err(|e| storage_error(ErrorSubject::StateMachine, ErrorVerb::Read, e))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let _guard = self.inner.state_lock.lock().await;
        let mut responses = Vec::new();
        for entry in entries {
            let response = apply_entry(&self.inner.state, &entry).map_err(|e| {
                storage_error(ErrorSubject::Apply(entry.log_id), ErrorVerb::Write, e)
            })?;
            let index = entry.log_id.index;
            if let EntryPayload::Normal(request) = entry.payload {
                // Nobody listening is not an error: the API subscribes only when a client
                // streams events.
                let _ = self.inner.events.send(Applied {
                    index,
                    request,
                    response: response.clone(),
                });
            }
            self.inner.publish_applied(index);
            responses.push(response);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            inner: self.inner.clone(),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let install = async {
            let guard = self.inner.state_lock.clone().lock_owned().await;
            let inner = self.inner.clone();
            let owned_meta = meta.clone();
            tokio::task::spawn_blocking(move || {
                let _guard = guard;
                install_snapshot_blocking(&inner, &owned_meta, snapshot.get_ref())
            })
            .await??;
            // Once this returns openraft may purge the log the snapshot replaces.
            self.inner.flush().await
        };
        install.await.map_err(|e| {
            storage_error(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
                e,
            )
        })?;
        let index = meta.last_log_id.map(|id| id.index).unwrap_or(0);
        self.inner.publish_applied(index);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        self.current_snapshot()
            .map_err(|e| storage_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))
    }
}
