//! Whole-state operations outside Raft's normal flow: a consistent export of the replicated
//! key space (backups), and the offline re-seeding of a stopped node's store as the only voter
//! of a new configuration (restoring a backup into a new cluster, quorum-loss recovery).
//!
//! A seeded store looks exactly like one whose log was compacted into a snapshot at the seed's
//! log id: the state, a matching current snapshot (so joiners receive it), an empty log purged
//! up to that id, and a vote of the seed's term, so the node elects itself in a later term.

use std::collections::{BTreeMap, BTreeSet};

use openraft::{LogId, Membership, SnapshotMeta, StoredMembership};

use super::encoding::{membership_to_json, SnapshotFile, StoredEntry, StoredLogId, StoredVote};
use super::state_machine::{
    apply_entry, read_last_applied, read_membership, save_current_snapshot,
};
use super::{meta_keys, state_keys, Inner, RawRows, StateReader, Store, StoreError};
use crate::codec;
use crate::model::Member;
use crate::NodeId;

/// A consistent copy of the replicated key space, as of one applied log index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateExport {
    pub last_applied_index: u64,
    pub last_applied_term: u64,
    /// Every replicated key and its stored value, in key order (internal keys excluded).
    pub pairs: RawRows,
}

fn export_blocking(inner: &Inner) -> Result<StateExport, StoreError> {
    let last = read_last_applied(&inner.state)?;
    let mut pairs = Vec::new();
    for item in inner.state.iter() {
        let (k, v) = item?;
        if !state_keys::is_internal(&k) {
            pairs.push((k.to_vec(), v.to_vec()));
        }
    }
    Ok(StateExport {
        last_applied_index: last.map(|l| l.index).unwrap_or(0),
        last_applied_term: last.map(|l| l.term).unwrap_or(0),
        pairs,
    })
}

impl StateReader {
    /// A consistent copy of the state: taken under the lock that apply and snapshot building
    /// hold, so no entry is half in it.
    pub async fn export(&self) -> Result<StateExport, StoreError> {
        let guard = self.inner.state_lock.clone().lock_owned().await;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            export_blocking(&inner)
        })
        .await?
    }
}

impl Store {
    /// Offline only (Raft not running on this store): applies every log entry after the last
    /// applied one. A node that lost its quorum may hold entries the old majority committed
    /// without it learning so; a new sole voter would commit them anyway, so recovery keeps
    /// them. Returns the new last applied index.
    pub fn apply_log_tail(&self) -> Result<u64, StoreError> {
        let inner = &self.inner;
        let mut last = read_last_applied(&inner.state)?
            .map(|l| l.index)
            .unwrap_or(0);
        for item in inner.log.iter() {
            let (_, value) = item?;
            let stored: StoredEntry = codec::decode(&value)?;
            if stored.index <= last {
                continue;
            }
            let entry = stored.into_entry()?;
            apply_entry(&inner.state, &entry)?;
            last = entry.log_id.index;
        }
        Ok(last)
    }

    /// The highest term this store has seen, in its vote or its log.
    pub fn last_term(&self) -> Result<u64, StoreError> {
        let inner = &self.inner;
        let vote = match inner.meta.get(meta_keys::VOTE)? {
            Some(bytes) => codec::decode::<StoredVote>(&bytes)?.term,
            None => 0,
        };
        let log = match inner.log.last()? {
            Some((_, v)) => codec::decode::<StoredEntry>(&v)?.term,
            None => 0,
        };
        let applied = read_last_applied(&inner.state)?
            .map(|l| l.term)
            .unwrap_or(0);
        Ok(vote.max(log).max(applied))
    }

    /// The voters of the last membership this store applied, with their addresses.
    pub fn voters(&self) -> Result<Vec<(NodeId, Member)>, StoreError> {
        let m = read_membership(&self.inner.state)?;
        let voters: BTreeSet<NodeId> = m.membership().voter_ids().collect();
        Ok(m.membership()
            .nodes()
            .filter(|(id, _)| voters.contains(id))
            .map(|(id, n)| (*id, n.clone()))
            .collect())
    }

    /// Offline only: replaces the whole store with `pairs` as the state at log id
    /// (`term`, `id`, `index`), with node `id` as the only voter.
    pub fn seed(
        &self,
        pairs: RawRows,
        term: u64,
        index: u64,
        id: NodeId,
        member: Member,
    ) -> Result<(), StoreError> {
        let inner = &self.inner;
        let stored_id = StoredLogId {
            term,
            leader_node_id: id,
            index,
        };
        let log_id: LogId<NodeId> = stored_id.into();
        let mut nodes = BTreeMap::new();
        nodes.insert(id, member);
        let mut voters = BTreeSet::new();
        voters.insert(id);
        let membership = StoredMembership::new(Some(log_id), Membership::new(vec![voters], nodes));

        let mut batch = sled::Batch::default();
        for key in inner.state.iter().keys() {
            batch.remove(key?);
        }
        for (k, v) in &pairs {
            batch.insert(k.as_slice(), v.as_slice());
        }
        batch.insert(state_keys::LAST_APPLIED, codec::encode(&stored_id)?);
        batch.insert(
            state_keys::MEMBERSHIP,
            codec::encode(&membership_to_json(&membership)?)?,
        );
        inner.state.apply_batch(batch)?;

        let file = SnapshotFile {
            last_log_id: serde_json::to_string(&Some(log_id))?,
            last_membership: membership_to_json(&membership)?,
            pairs,
        };
        let data = codec::encode(&file)?;
        let meta = SnapshotMeta {
            last_log_id: Some(log_id),
            last_membership: membership,
            snapshot_id: format!("seed-{term}-{id}-{index}"),
        };
        save_current_snapshot(inner, &meta, &data)?;

        inner.log.clear()?;
        let mut batch = sled::Batch::default();
        batch.insert(meta_keys::LAST_PURGED, codec::encode(&stored_id)?);
        batch.insert(meta_keys::COMMITTED, codec::encode(&stored_id)?);
        batch.insert(
            meta_keys::VOTE,
            codec::encode(&StoredVote {
                term,
                node_id: id,
                committed: false,
            })?,
        );
        inner.meta.apply_batch(batch)?;
        inner.db.flush()?;
        inner.publish_applied(index);
        Ok(())
    }
}
