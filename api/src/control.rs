//! The `ControlPlane` trait: everything the API needs from the cluster, and nothing more.
//!
//! The node crate implements it over Raft, the sled replica and the QUIC transport; router
//! tests implement it over an in-memory state. Reads return raw stored bytes (decoded with
//! `raft::codec` by the API) so the trait stays narrow and storage-agnostic.

use async_trait::async_trait;
use raft::{Member, NodeId, Request, Response};
use serde::{Deserialize, Serialize};

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Reflects every write acknowledged before the read began (read index via the leader).
    #[default]
    Linearizable,
    /// Whatever this node's replica holds now; may lag behind the leader.
    Stale,
}

/// Why the cluster could not serve a call. The API maps each to a status and a stable code.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("no leader is known right now; retry shortly")]
    NoLeader,
    #[error("the cluster did not answer in time")]
    Timeout,
    #[error("this node is not the leader; the leader serves at {leader_api:?}")]
    NotLeader { leader_api: Option<String> },
    #[error("join refused: {0}")]
    JoinRefused(String),
    #[error("internal cluster failure: {0}")]
    Internal(String),
    #[error("{0}")]
    Invalid(String),
    #[error("not supported here: {0}")]
    Unsupported(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MemberRole {
    Voter,
    Learner,
    Witness,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MemberStatus {
    pub id: NodeId,
    pub name: String,
    pub role: MemberRole,
    pub api_addr: String,
    pub peer_addr: String,
    /// up | suspect | down, as seen from the leader (or from this node when it is the leader).
    pub state: String,
    /// Last log index the leader knows this member has (None when unknown here).
    pub matched_index: Option<u64>,
    /// Last applied index, known exactly only for the answering node.
    pub last_applied: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClusterStatus {
    pub cluster_id: String,
    pub node_id: NodeId,
    pub node_name: String,
    pub leader: Option<NodeId>,
    pub leader_name: Option<String>,
    pub term: u64,
    pub commit_index: u64,
    pub last_applied: u64,
    pub last_log_index: u64,
    pub members: Vec<MemberStatus>,
}

/// What a node sends to be admitted: its join secret, a CSR and how to reach it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JoinRequest {
    /// The full join token; its secret is checked against the cluster's stored hash.
    pub token: String,
    pub csr_pem: String,
    #[schema(value_type = crate::openapi::schemas::Member)]
    pub member: Member,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JoinResponse {
    pub node_id: NodeId,
    pub cluster_id: String,
    pub ca_cert_pem: String,
    pub cert_pem: String,
}

/// The bytes of a VM's serial console as they arrive; ends when the console closes.
pub type ConsoleStream = futures::stream::BoxStream<'static, Result<Vec<u8>, std::io::Error>>;

#[async_trait]
pub trait ControlPlane: Send + Sync + 'static {
    /// Proposes a request through Raft (forwarded to the leader when needed) and returns the
    /// log index it was committed at with the outcome of `apply`.
    async fn write(&self, req: Request) -> Result<(u64, Response), ClusterError>;

    /// Waits (bounded) until every reachable member has applied `index`; used when access is
    /// taken away, so no node still honours it once the caller is told. A single replica has
    /// nothing to wait for.
    async fn wait_all_applied(&self, index: u64) {
        let _ = index;
    }

    /// Waits until this node's replica may serve a read of the given consistency.
    async fn read_barrier(&self, consistency: Consistency) -> Result<(), ClusterError>;

    /// One value of the replicated key space, as stored.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ClusterError>;

    /// Values whose key starts with `prefix`, strictly after `after`, at most `limit`.
    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<raft::store::RawRows, ClusterError>;

    async fn status(&self) -> Result<ClusterStatus, ClusterError>;

    /// Admits a new node (on the leader; others answer `NotLeader`).
    async fn join(&self, req: JoinRequest) -> Result<JoinResponse, ClusterError>;

    /// The live serial console of a VM, from whichever node runs it.
    async fn console(&self, vm_id: &str) -> Result<ConsoleStream, ClusterError>;

    /// Member of a cluster with a known leader, and state applied up to the commit point seen.
    fn ready(&self) -> bool;

    /// The node's own Prometheus text (Raft metrics), appended to the API's.
    fn metrics_text(&self) -> String;

    /// Runs the scheduler on the leader's view without changing anything: where would these
    /// VMs go, or where would a drained node's VMs go.
    async fn simulate(
        &self,
        req: crate::scheduler::SimulateRequest,
    ) -> Result<crate::scheduler::SimulateResult, ClusterError> {
        let _ = req;
        Err(ClusterError::Unsupported(
            "this control plane has no scheduler".into(),
        ))
    }

    /// Every request applied on this node from now on, in log order (the event stream's feed).
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<raft::store::Applied>;
}
