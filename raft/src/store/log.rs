//! The Raft log and vote: openraft's `RaftLogStorage` and `RaftLogReader` over sled.
//!
//! Durability is the point of this file: an append is acknowledged to openraft (through its
//! callback) only after sled has flushed it to disk, and a vote or committed log id is flushed
//! before the call returns. A node that acknowledged an entry to the leader therefore still has
//! it after a crash, which is what makes a majority acknowledgement mean "committed".

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    Entry, ErrorSubject, ErrorVerb, LogId, LogState, RaftLogReader, StorageError, Vote,
};

use super::encoding::{log_key, StoredEntry, StoredLogId, StoredVote};
use super::{meta_keys, storage_error, Inner, StoreError};
use crate::codec;
use crate::{NodeId, TypeConfig};

/// The log half of the store. Cloning it is cheap; clones share the database.
#[derive(Debug, Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

impl LogStore {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        LogStore { inner }
    }

    fn read_meta_log_id(&self, key: &[u8]) -> Result<Option<LogId<NodeId>>, StoreError> {
        match self.inner.meta.get(key)? {
            Some(bytes) => Ok(Some(codec::decode::<StoredLogId>(&bytes)?.into())),
            None => Ok(None),
        }
    }

    fn entries_in(
        &self,
        range: impl RangeBounds<u64>,
    ) -> Result<Vec<Entry<TypeConfig>>, StoreError> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => match i.checked_add(1) {
                Some(i) => i,
                None => return Ok(Vec::new()),
            },
            Bound::Unbounded => 0,
        };
        // The end as an exclusive bound; `None` means "to the end of the log".
        let end = match range.end_bound() {
            Bound::Included(&i) => i.checked_add(1),
            Bound::Excluded(&i) => Some(i),
            Bound::Unbounded => None,
        };
        let iter = match end {
            Some(end) if end <= start => return Ok(Vec::new()),
            Some(end) => self.inner.log.range(log_key(start)..log_key(end)),
            None => self.inner.log.range(log_key(start)..),
        };
        let mut out = Vec::new();
        for item in iter {
            let (_, value) = item?;
            out.push(codec::decode::<StoredEntry>(&value)?.into_entry()?);
        }
        Ok(out)
    }

    fn last_log_id(&self) -> Result<Option<LogId<NodeId>>, StoreError> {
        match self.inner.log.last()? {
            Some((_, value)) => Ok(Some(codec::decode::<StoredEntry>(&value)?.log_id())),
            None => Ok(None),
        }
    }

    fn write_entries(
        &self,
        entries: impl IntoIterator<Item = Entry<TypeConfig>>,
    ) -> Result<(), StoreError> {
        // One batch: a crash leaves either all of these entries or none of them.
        let mut batch = sled::Batch::default();
        for entry in entries {
            let stored = StoredEntry::from_entry(&entry)?;
            batch.insert(&log_key(stored.index), codec::encode(&stored)?);
        }
        self.inner.log.apply_batch(batch)?;
        Ok(())
    }

    /// Removes log entries whose index is in `range`, in one atomic batch.
    fn remove_entries(&self, range: impl RangeBounds<[u8; 8]>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for key in self.inner.log.range(range).keys() {
            batch.remove(key?);
        }
        self.inner.log.apply_batch(batch)?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        self.entries_in(range)
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Read, e))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let state = || -> Result<LogState<TypeConfig>, StoreError> {
            let last_purged_log_id = self.read_meta_log_id(meta_keys::LAST_PURGED)?;
            let last_log_id = self.last_log_id()?.or(last_purged_log_id);
            Ok(LogState {
                last_purged_log_id,
                last_log_id,
            })
        };
        state().map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Read, e))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let save = async {
            let bytes = codec::encode(&StoredVote::from(vote))?;
            self.inner.meta.insert(meta_keys::VOTE, bytes)?;
            // A vote forgotten in a crash could let this node vote twice in one term.
            self.inner.flush().await
        };
        save.await
            .map_err(|e| storage_error(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        let read = || -> Result<Option<Vote<NodeId>>, StoreError> {
            match self.inner.meta.get(meta_keys::VOTE)? {
                Some(bytes) => Ok(Some(codec::decode::<StoredVote>(&bytes)?.into())),
                None => Ok(None),
            }
        };
        read().map_err(|e| storage_error(ErrorSubject::Vote, ErrorVerb::Read, e))
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        let save = async {
            match committed {
                Some(id) => {
                    let bytes = codec::encode(&StoredLogId::from(&id))?;
                    self.inner.meta.insert(meta_keys::COMMITTED, bytes)?;
                }
                None => {
                    self.inner.meta.remove(meta_keys::COMMITTED)?;
                }
            }
            // No flush of its own: the committed index only shortens recovery (openraft learns
            // it again from a quorum), so it rides along with the next append's flush instead
            // of costing a second fsync per commit.
            Ok::<(), StoreError>(())
        };
        save.await
            .map_err(|e| storage_error(ErrorSubject::Store, ErrorVerb::Write, e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        self.read_meta_log_id(meta_keys::COMMITTED)
            .map_err(|e| storage_error(ErrorSubject::Store, ErrorVerb::Read, e))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let write = |e| storage_error(ErrorSubject::Logs, ErrorVerb::Write, e);
        let timer = self.inner.append_seconds.start_timer();
        if let Err(e) = self.write_entries(entries) {
            callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
            return Err(write(e));
        }
        // openraft reports the entries as persisted (and may count this node's acknowledgement
        // towards commit) as soon as the callback runs, so it must wait for the flush.
        match self.inner.flush().await {
            Ok(()) => {
                timer.observe_duration();
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let truncate = async {
            self.remove_entries(log_key(log_id.index)..)?;
            // Conflicting entries must not come back after a crash and be acknowledged again.
            self.inner.flush().await
        };
        truncate
            .await
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let purge = async {
            let bytes = codec::encode(&StoredLogId::from(&log_id))?;
            self.inner.meta.insert(meta_keys::LAST_PURGED, bytes)?;
            // openraft purges only entries already applied (and in a snapshot), but the applied
            // state may still sit in sled's cache. Flushing here makes that state and the new
            // purge mark durable before the entries that could rebuild it are gone.
            self.inner.flush().await?;
            self.remove_entries(..=log_key(log_id.index))
        };
        purge
            .await
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn blank(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 0), index),
            payload: EntryPayload::Blank,
        }
    }

    #[test]
    fn ranges_follow_rust_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let log = store.log_store();
        log.write_entries((0..10).map(blank)).unwrap();
        let idx = |v: Vec<Entry<TypeConfig>>| v.iter().map(|e| e.log_id.index).collect::<Vec<_>>();
        assert_eq!(idx(log.entries_in(3..5).unwrap()), vec![3, 4]);
        assert_eq!(idx(log.entries_in(3..=5).unwrap()), vec![3, 4, 5]);
        assert_eq!(idx(log.entries_in(8..).unwrap()), vec![8, 9]);
        assert_eq!(idx(log.entries_in(..2).unwrap()), vec![0, 1]);
        assert!(log.entries_in(5..5).unwrap().is_empty());
        assert!(log
            .entries_in((Bound::Included(6), Bound::Excluded(2)))
            .unwrap()
            .is_empty());
        assert_eq!(idx(log.entries_in(9..=u64::MAX).unwrap()), vec![9]);
        let excluded = (Bound::Excluded(u64::MAX), Bound::Unbounded);
        assert!(log.entries_in(excluded).unwrap().is_empty());
    }
}
