//! The on-disk shapes of the store: our own rkyv mirrors of openraft's types.
//!
//! openraft's types may change between versions; these do not, and they go through
//! `crate::codec`, whose format byte lets a later build read what this one wrote. Membership
//! configurations are kept as JSON strings (openraft's serde form) because their shape is
//! openraft's to define and they are small and rare.

use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership, StoredMembership, Vote};

use super::StoreError;
use crate::command::Request;
use crate::model::Member;
use crate::{NodeId, TypeConfig};

/// A log id: the term and node of the leader that proposed the entry, and its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct StoredLogId {
    pub term: u64,
    pub leader_node_id: u64,
    pub index: u64,
}

impl From<&LogId<NodeId>> for StoredLogId {
    fn from(id: &LogId<NodeId>) -> Self {
        StoredLogId {
            term: id.leader_id.term,
            leader_node_id: id.leader_id.node_id,
            index: id.index,
        }
    }
}

impl From<StoredLogId> for LogId<NodeId> {
    fn from(id: StoredLogId) -> Self {
        LogId::new(CommittedLeaderId::new(id.term, id.leader_node_id), id.index)
    }
}

/// A vote: who this node voted for in which term, and whether that leader is established.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct StoredVote {
    pub term: u64,
    pub node_id: u64,
    pub committed: bool,
}

impl From<&Vote<NodeId>> for StoredVote {
    fn from(v: &Vote<NodeId>) -> Self {
        StoredVote {
            term: v.leader_id.term,
            node_id: v.leader_id.node_id,
            committed: v.committed,
        }
    }
}

impl From<StoredVote> for Vote<NodeId> {
    fn from(v: StoredVote) -> Self {
        if v.committed {
            Vote::new_committed(v.term, v.node_id)
        } else {
            Vote::new(v.term, v.node_id)
        }
    }
}

/// What a log entry carries.
// Values of this type live only while one entry is encoded or decoded; boxing the request
// would cost an allocation per entry to save stack space nobody holds on to.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) enum StoredPayload {
    Blank,
    Normal(Request),
    /// serde_json of `openraft::Membership<NodeId, Member>`.
    Membership(String),
}

/// One entry of the Raft log as stored in the `log` tree.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct StoredEntry {
    pub term: u64,
    pub leader_node_id: u64,
    pub index: u64,
    pub payload: StoredPayload,
}

impl StoredEntry {
    pub fn from_entry(entry: &Entry<TypeConfig>) -> Result<Self, StoreError> {
        let payload = match &entry.payload {
            EntryPayload::Blank => StoredPayload::Blank,
            EntryPayload::Normal(req) => StoredPayload::Normal(req.clone()),
            EntryPayload::Membership(m) => StoredPayload::Membership(serde_json::to_string(m)?),
        };
        let id = StoredLogId::from(&entry.log_id);
        Ok(StoredEntry {
            term: id.term,
            leader_node_id: id.leader_node_id,
            index: id.index,
            payload,
        })
    }

    pub fn log_id(&self) -> LogId<NodeId> {
        StoredLogId {
            term: self.term,
            leader_node_id: self.leader_node_id,
            index: self.index,
        }
        .into()
    }

    pub fn into_entry(self) -> Result<Entry<TypeConfig>, StoreError> {
        let log_id = self.log_id();
        let payload = match self.payload {
            StoredPayload::Blank => EntryPayload::Blank,
            StoredPayload::Normal(req) => EntryPayload::Normal(req),
            StoredPayload::Membership(json) => {
                let m: Membership<NodeId, Member> = serde_json::from_str(&json)?;
                EntryPayload::Membership(m)
            }
        };
        Ok(Entry { log_id, payload })
    }
}

/// The metadata of the current snapshot, kept in `meta` next to its bytes.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct StoredSnapshotMeta {
    pub snapshot_id: String,
    pub last_log_id: Option<StoredLogId>,
    /// serde_json of `openraft::StoredMembership<NodeId, Member>`.
    pub last_membership: String,
}

/// The content of a snapshot: what is sent to a follower and kept as the current snapshot.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct SnapshotFile {
    /// serde_json of `Option<openraft::LogId<NodeId>>`.
    pub last_log_id: String,
    /// serde_json of `openraft::StoredMembership<NodeId, Member>`.
    pub last_membership: String,
    /// Every replicated key and value of the state tree, in key order.
    pub pairs: Vec<(Vec<u8>, Vec<u8>)>,
}

pub(crate) fn membership_to_json(
    m: &StoredMembership<NodeId, Member>,
) -> Result<String, StoreError> {
    Ok(serde_json::to_string(m)?)
}

pub(crate) fn membership_from_json(
    json: &str,
) -> Result<StoredMembership<NodeId, Member>, StoreError> {
    Ok(serde_json::from_str(json)?)
}

/// The key of log entry `index` in the `log` tree.
pub(crate) fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;
    use crate::command::Command;
    use std::collections::BTreeSet;

    #[test]
    fn entries_round_trip_through_the_codec() {
        let log_id = LogId::new(CommittedLeaderId::new(3, 2), 17);
        let members = Membership::new(vec![BTreeSet::from([1u64, 2])], None);
        let entries: Vec<Entry<TypeConfig>> = vec![
            Entry {
                log_id,
                payload: EntryPayload::Blank,
            },
            Entry {
                log_id,
                payload: EntryPayload::Normal(Request::new(9, "u", Command::Noop)),
            },
            Entry {
                log_id,
                payload: EntryPayload::Membership(members),
            },
        ];
        for entry in entries {
            let stored = StoredEntry::from_entry(&entry).unwrap();
            let bytes = codec::encode(&stored).unwrap();
            let back: StoredEntry = codec::decode(&bytes).unwrap();
            let back = back.into_entry().unwrap();
            assert_eq!(back.log_id, entry.log_id);
            assert_eq!(
                format!("{:?}", back.payload),
                format!("{:?}", entry.payload)
            );
        }
    }

    #[test]
    fn votes_keep_their_committed_flag() {
        for v in [Vote::new(4, 1u64), Vote::new_committed(5, 2u64)] {
            let back: Vote<NodeId> = StoredVote::from(&v).into();
            assert_eq!(back, v);
        }
    }

    #[test]
    fn log_keys_sort_by_index() {
        assert!(log_key(255) < log_key(256));
        assert!(log_key(u64::MAX - 1) < log_key(u64::MAX));
    }
}
