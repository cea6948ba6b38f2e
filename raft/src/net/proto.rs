//! The wire messages between nodes (prost) and their field-by-field mapping to openraft types.
//!
//! One RPC is one [`RpcRequest`] answered by one [`RpcResponse`]. Application data inside Raft
//! entries travels as `codec` bytes (the same versioned encoding the store writes), membership
//! configurations as JSON (openraft's own serde form, which is small and rarely sent).
//! Tags are never reused: a field that goes away keeps its number reserved.

use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{
    CommittedLeaderId, Entry, EntryPayload, LeaderId, LogId, Membership, SnapshotMeta,
    StoredMembership, Vote,
};

use crate::codec::{self, CodecError};
use crate::{Member, NodeId, TypeConfig};

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("message field {0} is missing")]
    Missing(&'static str),
    #[error("entry data cannot be decoded")]
    Codec(#[from] CodecError),
    #[error("membership cannot be decoded")]
    Json(#[from] serde_json::Error),
    #[error("message cannot be decoded")]
    Decode(#[from] prost::DecodeError),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PbVote {
    #[prost(uint64, tag = "1")]
    pub term: u64,
    #[prost(uint64, tag = "2")]
    pub node_id: u64,
    #[prost(bool, tag = "3")]
    pub committed: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PbLogId {
    #[prost(uint64, tag = "1")]
    pub term: u64,
    #[prost(uint64, tag = "2")]
    pub node_id: u64,
    #[prost(uint64, tag = "3")]
    pub index: u64,
}

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct PbEmpty {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PbEntry {
    #[prost(message, optional, tag = "1")]
    pub log_id: Option<PbLogId>,
    #[prost(oneof = "pb_entry::Payload", tags = "2, 3, 4")]
    pub payload: Option<pb_entry::Payload>,
}

pub mod pb_entry {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "2")]
        Blank(super::PbEmpty),
        /// `codec::encode(Request)`.
        #[prost(bytes, tag = "3")]
        Normal(Vec<u8>),
        /// serde_json of `Membership<NodeId, Member>`.
        #[prost(bytes, tag = "4")]
        Membership(Vec<u8>),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PbAppendEntriesRequest {
    #[prost(message, optional, tag = "1")]
    pub vote: Option<PbVote>,
    #[prost(message, optional, tag = "2")]
    pub prev_log_id: Option<PbLogId>,
    #[prost(message, repeated, tag = "3")]
    pub entries: Vec<PbEntry>,
    #[prost(message, optional, tag = "4")]
    pub leader_commit: Option<PbLogId>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PbPartialSuccess {
    #[prost(message, optional, tag = "1")]
    pub matching: Option<PbLogId>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PbAppendEntriesResponse {
    #[prost(oneof = "pb_append_entries_response::Result", tags = "1, 2, 3, 4")]
    pub result: Option<pb_append_entries_response::Result>,
}

pub mod pb_append_entries_response {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Result {
        #[prost(message, tag = "1")]
        Success(super::PbEmpty),
        #[prost(message, tag = "2")]
        PartialSuccess(super::PbPartialSuccess),
        #[prost(message, tag = "3")]
        Conflict(super::PbEmpty),
        #[prost(message, tag = "4")]
        HigherVote(super::PbVote),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PbVoteRequest {
    #[prost(message, optional, tag = "1")]
    pub vote: Option<PbVote>,
    #[prost(message, optional, tag = "2")]
    pub last_log_id: Option<PbLogId>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PbVoteResponse {
    #[prost(message, optional, tag = "1")]
    pub vote: Option<PbVote>,
    #[prost(bool, tag = "2")]
    pub vote_granted: bool,
    #[prost(message, optional, tag = "3")]
    pub last_log_id: Option<PbLogId>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PbSnapshotMeta {
    #[prost(message, optional, tag = "1")]
    pub last_log_id: Option<PbLogId>,
    #[prost(message, optional, tag = "2")]
    pub last_membership_log_id: Option<PbLogId>,
    /// serde_json of `Membership<NodeId, Member>`.
    #[prost(bytes, tag = "3")]
    pub last_membership: Vec<u8>,
    #[prost(string, tag = "4")]
    pub snapshot_id: String,
}

/// One chunk of a snapshot; `done` marks the last one.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PbInstallSnapshotRequest {
    #[prost(message, optional, tag = "1")]
    pub vote: Option<PbVote>,
    #[prost(message, optional, tag = "2")]
    pub meta: Option<PbSnapshotMeta>,
    #[prost(uint64, tag = "3")]
    pub offset: u64,
    #[prost(bytes, tag = "4")]
    pub data: Vec<u8>,
    #[prost(bool, tag = "5")]
    pub done: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PbInstallSnapshotResponse {
    #[prost(message, optional, tag = "1")]
    pub vote: Option<PbVote>,
}

/// A client write forwarded to the leader.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PbForwardRequest {
    /// `codec::encode(Request)`.
    #[prost(bytes, tag = "1")]
    pub request: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PbForwardResponse {
    #[prost(uint64, tag = "1")]
    pub log_index: u64,
    /// `codec::encode(Response)`.
    #[prost(bytes, tag = "2")]
    pub response: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct PbReadIndexRequest {}

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct PbReadIndexResponse {
    #[prost(uint64, tag = "1")]
    pub index: u64,
}

/// A node-level RPC that is not Raft (heartbeats, joins, ...), dispatched by `kind`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PbExtensionRequest {
    #[prost(string, tag = "1")]
    pub kind: String,
    #[prost(bytes, tag = "2")]
    pub body: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PbExtensionResponse {
    #[prost(bytes, tag = "1")]
    pub body: Vec<u8>,
}

/// Why the remote side did not answer the RPC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ErrorCode {
    Unspecified = 0,
    /// The node is not the leader; `leader_id` / `leader_addr` hint at the one it knows.
    NotLeader = 1,
    /// The remote Raft has stopped (storage failure, shutdown).
    Fatal = 2,
    /// The request could not be decoded.
    BadRequest = 3,
    /// The leader could not confirm its leadership with a quorum (retry later).
    QuorumNotEnough = 4,
    /// An openraft API error that has no code of its own; `raft_error` carries it as JSON.
    Raft = 5,
    /// No extension handler knows this `kind`.
    UnknownExtension = 6,
    /// The extension handler refused the request.
    ExtensionFailed = 7,
    /// The remote Raft had stopped before the request reached it: nothing was proposed.
    Stopped = 8,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PbError {
    #[prost(enumeration = "ErrorCode", tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(uint64, optional, tag = "3")]
    pub leader_id: Option<u64>,
    #[prost(string, optional, tag = "4")]
    pub leader_addr: Option<String>,
    /// serde_json of the openraft `RaftError`, so the caller can rebuild a `RemoteError`.
    #[prost(bytes, tag = "5")]
    pub raft_error: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcRequest {
    #[prost(oneof = "rpc_request::Kind", tags = "1, 2, 3, 4, 5, 6")]
    pub kind: Option<rpc_request::Kind>,
}

pub mod rpc_request {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "1")]
        AppendEntries(super::PbAppendEntriesRequest),
        #[prost(message, tag = "2")]
        Vote(super::PbVoteRequest),
        #[prost(message, tag = "3")]
        InstallSnapshot(super::PbInstallSnapshotRequest),
        #[prost(message, tag = "4")]
        Forward(super::PbForwardRequest),
        #[prost(message, tag = "5")]
        ReadIndex(super::PbReadIndexRequest),
        #[prost(message, tag = "6")]
        Extension(super::PbExtensionRequest),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcResponse {
    #[prost(oneof = "rpc_response::Kind", tags = "1, 2, 3, 4, 5, 6, 7")]
    pub kind: Option<rpc_response::Kind>,
}

pub mod rpc_response {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "1")]
        AppendEntries(super::PbAppendEntriesResponse),
        #[prost(message, tag = "2")]
        Vote(super::PbVoteResponse),
        #[prost(message, tag = "3")]
        InstallSnapshot(super::PbInstallSnapshotResponse),
        #[prost(message, tag = "4")]
        Forward(super::PbForwardResponse),
        #[prost(message, tag = "5")]
        ReadIndex(super::PbReadIndexResponse),
        #[prost(message, tag = "6")]
        Extension(super::PbExtensionResponse),
        #[prost(message, tag = "7")]
        Error(super::PbError),
    }
}

// ---- openraft <-> wire ----------------------------------------------------------------------

impl From<&Vote<NodeId>> for PbVote {
    fn from(v: &Vote<NodeId>) -> Self {
        PbVote {
            term: v.leader_id.term,
            node_id: v.leader_id.node_id,
            committed: v.committed,
        }
    }
}

impl From<&PbVote> for Vote<NodeId> {
    fn from(v: &PbVote) -> Self {
        Vote {
            leader_id: LeaderId::new(v.term, v.node_id),
            committed: v.committed,
        }
    }
}

fn vote_from(v: &Option<PbVote>) -> Result<Vote<NodeId>, ProtoError> {
    v.as_ref()
        .map(Vote::from)
        .ok_or(ProtoError::Missing("vote"))
}

impl From<&LogId<NodeId>> for PbLogId {
    fn from(l: &LogId<NodeId>) -> Self {
        PbLogId {
            term: l.leader_id.term,
            node_id: l.leader_id.node_id,
            index: l.index,
        }
    }
}

impl From<&PbLogId> for LogId<NodeId> {
    fn from(l: &PbLogId) -> Self {
        LogId::new(CommittedLeaderId::new(l.term, l.node_id), l.index)
    }
}

fn opt_log_id_to(l: &Option<LogId<NodeId>>) -> Option<PbLogId> {
    l.as_ref().map(PbLogId::from)
}

fn opt_log_id_from(l: &Option<PbLogId>) -> Option<LogId<NodeId>> {
    l.as_ref().map(LogId::from)
}

pub fn entry_to_pb(e: &Entry<TypeConfig>) -> Result<PbEntry, ProtoError> {
    let payload = match &e.payload {
        EntryPayload::Blank => pb_entry::Payload::Blank(PbEmpty {}),
        EntryPayload::Normal(req) => pb_entry::Payload::Normal(codec::encode(req)?),
        EntryPayload::Membership(m) => pb_entry::Payload::Membership(serde_json::to_vec(m)?),
    };
    Ok(PbEntry {
        log_id: Some(PbLogId::from(&e.log_id)),
        payload: Some(payload),
    })
}

pub fn entry_from_pb(e: &PbEntry) -> Result<Entry<TypeConfig>, ProtoError> {
    let log_id = e
        .log_id
        .as_ref()
        .map(LogId::from)
        .ok_or(ProtoError::Missing("entry.log_id"))?;
    let payload = match e
        .payload
        .as_ref()
        .ok_or(ProtoError::Missing("entry.payload"))?
    {
        pb_entry::Payload::Blank(_) => EntryPayload::Blank,
        pb_entry::Payload::Normal(b) => EntryPayload::Normal(codec::decode(b)?),
        pb_entry::Payload::Membership(b) => {
            EntryPayload::Membership(serde_json::from_slice::<Membership<NodeId, Member>>(b)?)
        }
    };
    Ok(Entry { log_id, payload })
}

pub fn append_request_to_pb(
    r: &AppendEntriesRequest<TypeConfig>,
) -> Result<PbAppendEntriesRequest, ProtoError> {
    Ok(PbAppendEntriesRequest {
        vote: Some(PbVote::from(&r.vote)),
        prev_log_id: opt_log_id_to(&r.prev_log_id),
        entries: r
            .entries
            .iter()
            .map(entry_to_pb)
            .collect::<Result<_, _>>()?,
        leader_commit: opt_log_id_to(&r.leader_commit),
    })
}

pub fn append_request_from_pb(
    r: &PbAppendEntriesRequest,
) -> Result<AppendEntriesRequest<TypeConfig>, ProtoError> {
    Ok(AppendEntriesRequest {
        vote: vote_from(&r.vote)?,
        prev_log_id: opt_log_id_from(&r.prev_log_id),
        entries: r
            .entries
            .iter()
            .map(entry_from_pb)
            .collect::<Result<_, _>>()?,
        leader_commit: opt_log_id_from(&r.leader_commit),
    })
}

pub fn append_response_to_pb(r: &AppendEntriesResponse<NodeId>) -> PbAppendEntriesResponse {
    use pb_append_entries_response::Result as R;
    let result = match r {
        AppendEntriesResponse::Success => R::Success(PbEmpty {}),
        AppendEntriesResponse::PartialSuccess(m) => R::PartialSuccess(PbPartialSuccess {
            matching: opt_log_id_to(m),
        }),
        AppendEntriesResponse::Conflict => R::Conflict(PbEmpty {}),
        AppendEntriesResponse::HigherVote(v) => R::HigherVote(PbVote::from(v)),
    };
    PbAppendEntriesResponse {
        result: Some(result),
    }
}

pub fn append_response_from_pb(
    r: &PbAppendEntriesResponse,
) -> Result<AppendEntriesResponse<NodeId>, ProtoError> {
    use pb_append_entries_response::Result as R;
    Ok(
        match r
            .result
            .as_ref()
            .ok_or(ProtoError::Missing("append_entries.result"))?
        {
            R::Success(_) => AppendEntriesResponse::Success,
            R::PartialSuccess(p) => {
                AppendEntriesResponse::PartialSuccess(opt_log_id_from(&p.matching))
            }
            R::Conflict(_) => AppendEntriesResponse::Conflict,
            R::HigherVote(v) => AppendEntriesResponse::HigherVote(Vote::from(v)),
        },
    )
}

pub fn vote_request_to_pb(r: &VoteRequest<NodeId>) -> PbVoteRequest {
    PbVoteRequest {
        vote: Some(PbVote::from(&r.vote)),
        last_log_id: opt_log_id_to(&r.last_log_id),
    }
}

pub fn vote_request_from_pb(r: &PbVoteRequest) -> Result<VoteRequest<NodeId>, ProtoError> {
    Ok(VoteRequest {
        vote: vote_from(&r.vote)?,
        last_log_id: opt_log_id_from(&r.last_log_id),
    })
}

pub fn vote_response_to_pb(r: &VoteResponse<NodeId>) -> PbVoteResponse {
    PbVoteResponse {
        vote: Some(PbVote::from(&r.vote)),
        vote_granted: r.vote_granted,
        last_log_id: opt_log_id_to(&r.last_log_id),
    }
}

pub fn vote_response_from_pb(r: &PbVoteResponse) -> Result<VoteResponse<NodeId>, ProtoError> {
    Ok(VoteResponse {
        vote: vote_from(&r.vote)?,
        vote_granted: r.vote_granted,
        last_log_id: opt_log_id_from(&r.last_log_id),
    })
}

pub fn snapshot_request_to_pb(
    r: &InstallSnapshotRequest<TypeConfig>,
) -> Result<PbInstallSnapshotRequest, ProtoError> {
    Ok(PbInstallSnapshotRequest {
        vote: Some(PbVote::from(&r.vote)),
        meta: Some(PbSnapshotMeta {
            last_log_id: opt_log_id_to(&r.meta.last_log_id),
            last_membership_log_id: opt_log_id_to(r.meta.last_membership.log_id()),
            last_membership: serde_json::to_vec(r.meta.last_membership.membership())?,
            snapshot_id: r.meta.snapshot_id.clone(),
        }),
        offset: r.offset,
        data: r.data.clone(),
        done: r.done,
    })
}

pub fn snapshot_request_from_pb(
    r: PbInstallSnapshotRequest,
) -> Result<InstallSnapshotRequest<TypeConfig>, ProtoError> {
    let meta = r.meta.ok_or(ProtoError::Missing("install_snapshot.meta"))?;
    let membership: Membership<NodeId, Member> = serde_json::from_slice(&meta.last_membership)?;
    Ok(InstallSnapshotRequest {
        vote: vote_from(&r.vote)?,
        meta: SnapshotMeta {
            last_log_id: opt_log_id_from(&meta.last_log_id),
            last_membership: StoredMembership::new(
                opt_log_id_from(&meta.last_membership_log_id),
                membership,
            ),
            snapshot_id: meta.snapshot_id,
        },
        offset: r.offset,
        data: r.data,
        done: r.done,
    })
}

pub fn snapshot_response_to_pb(r: &InstallSnapshotResponse<NodeId>) -> PbInstallSnapshotResponse {
    PbInstallSnapshotResponse {
        vote: Some(PbVote::from(&r.vote)),
    }
}

pub fn snapshot_response_from_pb(
    r: &PbInstallSnapshotResponse,
) -> Result<InstallSnapshotResponse<NodeId>, ProtoError> {
    Ok(InstallSnapshotResponse {
        vote: vote_from(&r.vote)?,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use prost::Message;

    use super::*;
    use crate::command::{Command, Request};

    fn member(name: &str) -> Member {
        Member {
            name: name.into(),
            api_addr: format!("{name}:8080"),
            peer_addr: format!("{name}:7000"),
        }
    }

    #[test]
    fn append_entries_round_trips_with_every_payload_kind() {
        let log_id = |t, n, i| LogId::new(CommittedLeaderId::new(t, n), i);
        let nodes: BTreeMap<NodeId, Member> = [(1, member("a")), (2, member("b"))].into();
        let membership = Membership::new(vec![BTreeSet::from([1u64, 2])], nodes);
        let req = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(log_id(2, 2, 9)),
            entries: vec![
                Entry {
                    log_id: log_id(3, 1, 10),
                    payload: EntryPayload::Blank,
                },
                Entry {
                    log_id: log_id(3, 1, 11),
                    payload: EntryPayload::Normal(Request::new(42, "u1", Command::Noop)),
                },
                Entry {
                    log_id: log_id(3, 1, 12),
                    payload: EntryPayload::Membership(membership),
                },
            ],
            leader_commit: Some(log_id(3, 1, 10)),
        };
        let pb = append_request_to_pb(&req).unwrap();
        let envelope = RpcRequest {
            kind: Some(rpc_request::Kind::AppendEntries(pb)),
        };
        let bytes = envelope.encode_to_vec();
        let back = RpcRequest::decode(bytes.as_slice()).unwrap();
        let Some(rpc_request::Kind::AppendEntries(pb)) = back.kind else {
            panic!("wrong kind");
        };
        let back = append_request_from_pb(&pb).unwrap();
        assert_eq!(back.vote, req.vote);
        assert_eq!(back.prev_log_id, req.prev_log_id);
        assert_eq!(back.leader_commit, req.leader_commit);
        assert_eq!(back.entries, req.entries);

        let empty = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new(1, 2),
            prev_log_id: None,
            entries: vec![],
            leader_commit: None,
        };
        let back = append_request_from_pb(&append_request_to_pb(&empty).unwrap()).unwrap();
        assert_eq!(back.vote, empty.vote);
        assert_eq!(back.prev_log_id, None);
        assert!(!back.vote.committed);
    }

    #[test]
    fn responses_round_trip() {
        for r in [
            AppendEntriesResponse::Success,
            AppendEntriesResponse::PartialSuccess(Some(LogId::new(
                CommittedLeaderId::new(1, 1),
                5,
            ))),
            AppendEntriesResponse::PartialSuccess(None),
            AppendEntriesResponse::Conflict,
            AppendEntriesResponse::HigherVote(Vote::new(9, 3)),
        ] {
            let bytes = append_response_to_pb(&r).encode_to_vec();
            let pb = PbAppendEntriesResponse::decode(bytes.as_slice()).unwrap();
            assert_eq!(append_response_from_pb(&pb).unwrap(), r);
        }
        let v = VoteResponse {
            vote: Vote::new(4, 2),
            vote_granted: true,
            last_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 7)),
        };
        assert_eq!(vote_response_from_pb(&vote_response_to_pb(&v)).unwrap(), v);
    }

    #[test]
    fn snapshot_chunk_round_trips() {
        let nodes: BTreeMap<NodeId, Member> = [(1, member("a"))].into();
        let req = InstallSnapshotRequest::<TypeConfig> {
            vote: Vote::new_committed(2, 1),
            meta: SnapshotMeta {
                last_log_id: Some(LogId::new(CommittedLeaderId::new(2, 1), 30)),
                last_membership: StoredMembership::new(
                    Some(LogId::new(CommittedLeaderId::new(1, 1), 1)),
                    Membership::new(vec![BTreeSet::from([1u64])], nodes),
                ),
                snapshot_id: "s-30".into(),
            },
            offset: 4096,
            data: vec![1, 2, 3],
            done: true,
        };
        let back = snapshot_request_from_pb(snapshot_request_to_pb(&req).unwrap()).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn missing_fields_are_errors_not_defaults() {
        assert!(matches!(
            append_request_from_pb(&PbAppendEntriesRequest::default()),
            Err(ProtoError::Missing("vote"))
        ));
        assert!(entry_from_pb(&PbEntry::default()).is_err());
    }
}
