//! The simulated disk of one node: openraft's log store and state machine in memory, with the
//! product's flush points, so that a simulated crash loses exactly what a power cut would.
//!
//! Every write goes to a *volatile* copy and is queued as unflushed; a flush replays the queue
//! onto the *durable* copy. A crash throws the volatile copy and the queue away and restarts
//! from the durable copy. The flush points mirror `raft::store` (sled): a vote, an append and a
//! truncation are flushed before openraft is told they are done; the committed log id and applied
//! entries are not flushed on their own (they ride along with the next flush); purging flushes
//! the purge marker first and removes the entries afterwards; snapshots are flushed once built
//! or installed. An append whose entries were acknowledged but not flushed would be lost here,
//! which is the class of bug this store exists to expose ([`Durability::AckBeforeFlush`]).
//!
//! Entries are applied with the product's own [`raft::apply::apply`] over a [`StateTx`] overlay;
//! each apply reports its effects to the [`Observer`], which checks the invariants.
//!
//! Each handle belongs to one incarnation of its node; after a crash the old incarnation's
//! handles fail every call, so tasks of a dead Raft can never write to the restarted node's disk.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, LogState, RaftLogReader,
    RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
    Vote,
};
use raft::apply::{ApplyError, StateTx};
use raft::{Member, NodeId, Response, TypeConfig};

use super::observer::{AppliedEntry, Observer};

type Membership = StoredMembership<NodeId, Member>;

/// How the simulated disk honours flushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// As the product's store: appends are flushed before openraft hears they are done.
    Faithful,
    /// A deliberately broken store that acknowledges appends before flushing them; used to show
    /// that the simulation catches the loss of acknowledged log entries.
    AckBeforeFlush,
}

/// Everything one node keeps on its disk.
#[derive(Debug, Clone, Default)]
pub struct Disk {
    pub log: BTreeMap<u64, Entry<TypeConfig>>,
    pub vote: Option<Vote<NodeId>>,
    pub committed: Option<LogId<NodeId>>,
    pub last_purged: Option<LogId<NodeId>>,
    pub state: BTreeMap<Vec<u8>, Vec<u8>>,
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: Membership,
    pub snapshot: Option<(SnapshotMeta<NodeId, Member>, Vec<u8>)>,
}

/// One write to the disk, kept until flushed.
#[derive(Debug, Clone)]
enum Write {
    Entry(Box<Entry<TypeConfig>>),
    TruncateFrom(u64),
    RemoveUpTo(u64),
    Vote(Vote<NodeId>),
    Committed(Option<LogId<NodeId>>),
    Purged(LogId<NodeId>),
    Apply {
        effects: Vec<(Vec<u8>, Option<Vec<u8>>)>,
        last_applied: LogId<NodeId>,
        membership: Option<Membership>,
    },
    InstallState {
        pairs: Pairs,
        meta: SnapshotMeta<NodeId, Member>,
    },
    Snapshot {
        meta: SnapshotMeta<NodeId, Member>,
        data: Vec<u8>,
    },
}

impl Disk {
    fn write(&mut self, w: &Write) {
        match w {
            Write::Entry(e) => {
                self.log.insert(e.log_id.index, (**e).clone());
            }
            Write::TruncateFrom(i) => {
                self.log.split_off(i);
            }
            Write::RemoveUpTo(i) => {
                self.log = self.log.split_off(&(i.saturating_add(1)));
            }
            Write::Vote(v) => self.vote = Some(*v),
            Write::Committed(c) => self.committed = *c,
            Write::Purged(id) => self.last_purged = Some(*id),
            Write::Apply {
                effects,
                last_applied,
                membership,
            } => {
                for (k, v) in effects {
                    match v {
                        Some(v) => self.state.insert(k.clone(), v.clone()),
                        None => self.state.remove(k),
                    };
                }
                self.last_applied = Some(*last_applied);
                if let Some(m) = membership {
                    self.membership = m.clone();
                }
            }
            Write::InstallState { pairs, meta } => {
                self.state = pairs.iter().cloned().collect();
                self.last_applied = meta.last_log_id;
                self.membership = meta.last_membership.clone();
            }
            Write::Snapshot { meta, data } => self.snapshot = Some((meta.clone(), data.clone())),
        }
    }

    /// The sha256 of the replicated key space, as the product computes state digests.
    pub fn digest(&self) -> String {
        raft::store::digest_of(self.state.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))
    }
}

/// The disk of one node across its incarnations.
#[derive(Debug, Default)]
pub struct DiskState {
    pub volatile: Disk,
    durable: Disk,
    unflushed: Vec<Write>,
    /// Bumped by every crash; handles of older incarnations are dead.
    pub incarnation: u64,
}

impl DiskState {
    fn write(&mut self, w: Write) {
        self.volatile.write(&w);
        self.unflushed.push(w);
    }

    fn flush(&mut self) {
        for w in self.unflushed.drain(..) {
            self.durable.write(&w);
        }
    }

    /// A power cut: everything not flushed is gone. Returns how many writes were lost.
    pub fn crash(&mut self) -> usize {
        let lost = self.unflushed.len();
        self.unflushed.clear();
        self.volatile = self.durable.clone();
        self.incarnation += 1;
        lost
    }
}

/// The shared handle on one node's disk.
pub type SharedDisk = Arc<Mutex<DiskState>>;

/// Locks a disk; a poisoned lock (a panicking test) still yields the data.
pub fn lock(disk: &SharedDisk) -> MutexGuard<'_, DiskState> {
    disk.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why a simulated storage call failed.
#[derive(Debug, thiserror::Error)]
pub enum SimStoreError {
    #[error("node {node} crashed; incarnation {incarnation} is gone")]
    Crashed { node: NodeId, incarnation: u64 },
    #[error("apply failed")]
    Apply(#[from] ApplyError),
    #[error("snapshot data is truncated")]
    Snapshot,
}

/// openraft's view of one incarnation of a node's disk (log and state machine).
#[derive(Clone)]
pub struct SimStore {
    node: NodeId,
    incarnation: u64,
    disk: SharedDisk,
    observer: Arc<Observer>,
    durability: Durability,
}

impl Debug for SimStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SimStore(n{} #{})", self.node, self.incarnation)
    }
}

fn storage_error(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: SimStoreError,
) -> StorageError<NodeId> {
    StorageIOError::new(subject, verb, AnyError::new(&e)).into()
}

/// The overlay `apply` writes into: reads see earlier writes of the same entry.
struct Overlay<'a> {
    base: &'a BTreeMap<Vec<u8>, Vec<u8>>,
    writes: RefCell<BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
}

impl StateTx for Overlay<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ApplyError> {
        if let Some(v) = self.writes.borrow().get(key) {
            return Ok(v.clone());
        }
        Ok(self.base.get(key).cloned())
    }
    fn put(&self, key: &[u8], value: Vec<u8>) -> Result<(), ApplyError> {
        self.writes.borrow_mut().insert(key.to_vec(), Some(value));
        Ok(())
    }
    fn remove(&self, key: &[u8]) -> Result<(), ApplyError> {
        self.writes.borrow_mut().insert(key.to_vec(), None);
        Ok(())
    }
}

/// The snapshot payload: the replicated key space as length-prefixed keys and values.
fn encode_pairs(state: &BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in state {
        for part in [k, v] {
            out.extend_from_slice(&(part.len() as u64).to_be_bytes());
            out.extend_from_slice(part);
        }
    }
    out
}

/// Keys and values of the replicated key space, in key order.
type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

fn decode_pairs(mut data: &[u8]) -> Result<Pairs, SimStoreError> {
    let take = |data: &mut &[u8]| -> Result<Vec<u8>, SimStoreError> {
        let (len, rest) = data
            .split_first_chunk::<8>()
            .ok_or(SimStoreError::Snapshot)?;
        let len = usize::try_from(u64::from_be_bytes(*len)).map_err(|_| SimStoreError::Snapshot)?;
        if rest.len() < len {
            return Err(SimStoreError::Snapshot);
        }
        let (part, rest) = rest.split_at(len);
        *data = rest;
        Ok(part.to_vec())
    };
    let mut pairs = Vec::new();
    while !data.is_empty() {
        let k = take(&mut data)?;
        let v = take(&mut data)?;
        pairs.push((k, v));
    }
    Ok(pairs)
}

impl SimStore {
    /// A handle for the current incarnation of `disk`.
    pub fn new(
        node: NodeId,
        disk: SharedDisk,
        observer: Arc<Observer>,
        durability: Durability,
    ) -> Self {
        let incarnation = lock(&disk).incarnation;
        Self {
            node,
            incarnation,
            disk,
            observer,
            durability,
        }
    }

    /// The disk, if this incarnation is still alive.
    fn live(&self) -> Result<MutexGuard<'_, DiskState>, SimStoreError> {
        let guard = lock(&self.disk);
        if guard.incarnation != self.incarnation {
            return Err(SimStoreError::Crashed {
                node: self.node,
                incarnation: self.incarnation,
            });
        }
        Ok(guard)
    }

    fn apply_one(&self, entry: &Entry<TypeConfig>) -> Result<Response, SimStoreError> {
        let mut disk = self.live()?;
        let (response, effects) = match &entry.payload {
            EntryPayload::Normal(req) => {
                let overlay = Overlay {
                    base: &disk.volatile.state,
                    writes: RefCell::new(BTreeMap::new()),
                };
                let response = raft::apply::apply(&overlay, req, entry.log_id.index)?;
                (
                    response,
                    overlay.writes.into_inner().into_iter().collect::<Vec<_>>(),
                )
            }
            EntryPayload::Blank | EntryPayload::Membership(_) => (Response::Ok, Vec::new()),
        };
        let membership = match &entry.payload {
            EntryPayload::Membership(m) => Some(Membership::new(Some(entry.log_id), m.clone())),
            _ => None,
        };
        self.observer.applied(
            self.node,
            &AppliedEntry {
                entry,
                response: &response,
                effects: &effects,
            },
        );
        disk.write(Write::Apply {
            effects,
            last_applied: entry.log_id,
            membership,
        });
        Ok(response)
    }

    fn build_snapshot_now(&self) -> Result<Snapshot<TypeConfig>, SimStoreError> {
        let mut disk = self.live()?;
        let v = &disk.volatile;
        let data = encode_pairs(&v.state);
        let snapshot_id = match &v.last_applied {
            Some(id) => format!(
                "{}-{}-{}",
                id.leader_id.term, id.leader_id.node_id, id.index
            ),
            None => "none".to_string(),
        };
        let meta = SnapshotMeta {
            last_log_id: v.last_applied,
            last_membership: v.membership.clone(),
            snapshot_id,
        };
        disk.write(Write::Snapshot {
            meta: meta.clone(),
            data: data.clone(),
        });
        disk.flush();
        self.observer.event(format_args!(
            "n{} snapshot built at {:?}",
            self.node,
            meta.last_log_id.map(|l| l.index)
        ));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftLogReader<TypeConfig> for SimStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let disk = self
            .live()
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Read, e))?;
        Ok(disk
            .volatile
            .log
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for SimStore {
    type LogReader = SimStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let disk = self
            .live()
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Read, e))?;
        let last_purged_log_id = disk.volatile.last_purged;
        let last_log_id = disk
            .volatile
            .log
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut disk = self
            .live()
            .map_err(|e| storage_error(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        disk.write(Write::Vote(*vote));
        disk.flush();
        drop(disk);
        self.observer.vote_saved(self.node, vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        let disk = self
            .live()
            .map_err(|e| storage_error(ErrorSubject::Vote, ErrorVerb::Read, e))?;
        Ok(disk.volatile.vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        let mut disk = self
            .live()
            .map_err(|e| storage_error(ErrorSubject::Store, ErrorVerb::Write, e))?;
        // Not flushed on its own, as in the product: it rides along with the next flush.
        disk.write(Write::Committed(committed));
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        let disk = self
            .live()
            .map_err(|e| storage_error(ErrorSubject::Store, ErrorVerb::Read, e))?;
        Ok(disk.volatile.committed)
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
        let mut disk = match self.live() {
            Ok(d) => d,
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                return Err(storage_error(ErrorSubject::Logs, ErrorVerb::Write, e));
            }
        };
        for entry in entries {
            disk.write(Write::Entry(Box::new(entry)));
        }
        match self.durability {
            Durability::Faithful => disk.flush(),
            // The bug under demonstration: the entries stay unflushed until some later flush.
            Durability::AckBeforeFlush => {}
        }
        drop(disk);
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut disk = self
            .live()
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        let removed: Vec<LogId<NodeId>> = disk
            .volatile
            .log
            .range(log_id.index..)
            .map(|(_, e)| e.log_id)
            .collect();
        disk.write(Write::TruncateFrom(log_id.index));
        disk.flush();
        drop(disk);
        self.observer.truncated(self.node, &removed);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut disk = self
            .live()
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        disk.write(Write::Purged(log_id));
        disk.flush();
        disk.write(Write::RemoveUpTo(log_id.index));
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SimStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        self.build_snapshot_now()
            .map_err(|e| storage_error(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))
    }
}

impl RaftStateMachine<TypeConfig> for SimStore {
    type SnapshotBuilder = SimStore;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        let disk = self
            .live()
            .map_err(|e| storage_error(ErrorSubject::StateMachine, ErrorVerb::Read, e))?;
        Ok((disk.volatile.last_applied, disk.volatile.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        for entry in entries {
            let response = self.apply_one(&entry).map_err(|e| {
                storage_error(ErrorSubject::Apply(entry.log_id), ErrorVerb::Write, e)
            })?;
            out.push(response);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
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
        let install = || -> Result<(), SimStoreError> {
            let pairs = decode_pairs(snapshot.get_ref())?;
            let mut disk = self.live()?;
            disk.write(Write::InstallState {
                pairs,
                meta: meta.clone(),
            });
            disk.write(Write::Snapshot {
                meta: meta.clone(),
                data: snapshot.get_ref().clone(),
            });
            disk.flush();
            Ok(())
        };
        install().map_err(|e| {
            storage_error(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
                e,
            )
        })?;
        self.observer.event(format_args!(
            "n{} installed snapshot at {:?}",
            self.node,
            meta.last_log_id.map(|l| l.index)
        ));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let disk = self
            .live()
            .map_err(|e| storage_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))?;
        Ok(disk
            .volatile
            .snapshot
            .as_ref()
            .map(|(meta, data)| Snapshot {
                meta: meta.clone(),
                snapshot: Box::new(Cursor::new(data.clone())),
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn blank(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 0), index),
            payload: EntryPayload::Blank,
        }
    }

    #[test]
    fn a_crash_keeps_flushed_writes_and_drops_the_rest() {
        let mut disk = DiskState::default();
        disk.write(Write::Entry(Box::new(blank(1))));
        disk.flush();
        disk.write(Write::Entry(Box::new(blank(2))));
        disk.write(Write::Committed(Some(blank(2).log_id)));
        assert_eq!(disk.volatile.log.len(), 2);
        assert_eq!(disk.crash(), 2);
        assert_eq!(
            disk.volatile.log.keys().copied().collect::<Vec<_>>(),
            vec![1]
        );
        assert_eq!(disk.volatile.committed, None);
        assert_eq!(disk.incarnation, 1);
    }

    #[test]
    fn truncate_and_purge_cut_the_log_where_openraft_asks() {
        let mut disk = Disk::default();
        for i in 1..=6 {
            disk.write(&Write::Entry(Box::new(blank(i))));
        }
        disk.write(&Write::TruncateFrom(5));
        disk.write(&Write::RemoveUpTo(2));
        assert_eq!(disk.log.keys().copied().collect::<Vec<_>>(), vec![3, 4]);
    }

    #[test]
    fn snapshot_pairs_round_trip() {
        let state: BTreeMap<Vec<u8>, Vec<u8>> =
            [(b"a".to_vec(), vec![]), (b"bc".to_vec(), b"xyz".to_vec())].into();
        let back = decode_pairs(&encode_pairs(&state)).unwrap();
        assert_eq!(back.into_iter().collect::<BTreeMap<_, _>>(), state);
        assert!(decode_pairs(&[0, 0, 0, 0, 0, 0, 0, 9, 1]).is_err());
    }
}
