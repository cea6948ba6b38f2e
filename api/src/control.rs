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
    /// A node needed for the answer (the one hosting a VM, holding an image) cannot serve it now.
    #[error("{0}")]
    Unavailable(String),
    /// A rolling upgrade is not finished: some member cannot apply this command type yet.
    #[error("command type {command:?} is not understood by every voter yet: {}", blockers.join("; "))]
    FeatureUnavailable {
        command: String,
        blockers: Vec<String>,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("not supported here: {0}")]
    Unsupported(String),
}

/// What one member advertises, as seen in the replicated state.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MemberFeatures {
    pub id: NodeId,
    pub name: String,
    pub role: MemberRole,
    /// up | suspect | down.
    pub state: String,
    /// The member's release, or None when it has not advertised one (a baseline node).
    pub release: Option<String>,
    /// Command types this node's build understands that the member does not advertise.
    pub missing: Vec<String>,
}

/// `GET /api/v1/cluster/upgrade-check`: what stands in the way of proposing new command types
/// or of restarting a member for an upgrade.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UpgradeReport {
    /// The answering node's release.
    pub release: String,
    pub members: Vec<MemberFeatures>,
    /// Human-readable reasons; empty when nothing blocks.
    pub blockers: Vec<String>,
    /// Command types refused cluster-wide until the blockers are gone.
    pub gated_commands: Vec<String>,
    pub ok: bool,
}

/// A consistent, checksummed copy of the replicated state (see `raft::backup`).
#[derive(Debug, Clone)]
pub struct BackupBlob {
    pub bytes: Vec<u8>,
    pub sha256: String,
    pub last_applied_index: u64,
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

/// One point of a VM's statistics series, sampled on the node that runs it. Counters are
/// cumulative since the domain started; rates are over the interval since the previous sample
/// (absent for the first sample and right after a counter reset, e.g. a restart).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmSample {
    /// When the sample was taken, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// How many raw samples this point stands for: 1 for recent ones, more for older points
    /// downsampled (rates averaged, counters and gauges as of the last one).
    #[serde(default)]
    pub merged: u32,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub max_memory_bytes: u64,
    pub cpu_time_ns: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    /// CPU time used per wall time, in percent of one host CPU (100 = one CPU busy).
    pub cpu_percent: Option<f64>,
    pub disk_read_bytes_per_sec: Option<f64>,
    pub disk_write_bytes_per_sec: Option<f64>,
    pub net_rx_bytes_per_sec: Option<f64>,
    pub net_tx_bytes_per_sec: Option<f64>,
}

/// The recent statistics of one VM, from the node that hosts it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmMetrics {
    pub vm_id: String,
    /// The node that sampled the series.
    pub node: NodeId,
    /// The sampling interval of that node.
    pub interval_ms: u64,
    /// Oldest first; only samples taken after `since` when it was given.
    pub samples: Vec<VmSample>,
}

/// Why the bytes of an image upload were not taken.
#[derive(Debug, thiserror::Error)]
pub enum ImageBytesError {
    /// Chunks must arrive in order; the client resumes at `expected`.
    #[error("the upload is at byte {expected}, the chunk starts at byte {got}")]
    OffsetMismatch { expected: u64, got: u64 },
    /// The whole upload was discarded: resuming cannot repair wrong bytes.
    #[error(
        "the uploaded bytes have sha256 {actual}, expected {expected}; the upload was discarded"
    )]
    ChecksumMismatch { expected: String, actual: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
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

    /// The statistics series of a VM from whichever node hosts it, samples after `since_ms`.
    /// The caller has already checked the VM exists and is visible to the client.
    async fn vm_metrics(
        &self,
        vm_id: &str,
        since_ms: Option<u64>,
    ) -> Result<VmMetrics, ClusterError> {
        let _ = (vm_id, since_ms);
        Err(ClusterError::Unavailable(
            "this control plane keeps no VM statistics".into(),
        ))
    }

    /// How many bytes of `image`'s upload are stored on its upload node (where to resume).
    async fn image_upload_offset(
        &self,
        image: &raft::image::Image,
    ) -> Result<u64, ImageBytesError> {
        let _ = image;
        Err(ClusterError::Unavailable("this control plane stores no images".into()).into())
    }

    /// Appends a chunk at `offset` to `image`'s upload on its upload node; returns the new
    /// offset once the chunk is durable there.
    async fn image_write_chunk(
        &self,
        image: &raft::image::Image,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<u64, ImageBytesError> {
        let _ = (image, offset, data);
        Err(ClusterError::Unavailable("this control plane stores no images".into()).into())
    }

    /// Verifies the complete upload against `image.sha256` on its upload node and installs
    /// it in that node's image store (a mismatch discards it).
    async fn image_finish_upload(&self, image: &raft::image::Image) -> Result<(), ImageBytesError> {
        let _ = image;
        Err(ClusterError::Unavailable("this control plane stores no images".into()).into())
    }

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

    /// A consistent backup of the replicated state, as of a linearizable read point.
    async fn backup(&self) -> Result<BackupBlob, ClusterError> {
        Err(ClusterError::Internal(
            "backups are not supported here".into(),
        ))
    }

    /// The features each member advertises and what blocks an upgrade.
    async fn upgrade_check(&self) -> Result<UpgradeReport, ClusterError> {
        Err(ClusterError::Internal(
            "upgrade checks are not supported here".into(),
        ))
    }

    /// Links this site to the site that issued `token`, reachable at `addrs` (its federation
    /// endpoints): exchanges and pins CA certificates, and commits the link on both sides.
    async fn link_site(
        &self,
        token: &str,
        addrs: Vec<String>,
    ) -> Result<raft::federation::SiteLink, ClusterError> {
        let _ = (token, addrs);
        Err(ClusterError::Unsupported(
            "this control plane has no federation".into(),
        ))
    }

    /// Makes a REST call at linked site `site` on behalf of a user, over the site link.
    async fn forward_to_site(
        &self,
        site: &str,
        call: ForwardedCall,
    ) -> Result<ForwardedReply, ClusterError> {
        let _ = (site, call);
        Err(ClusterError::Unsupported(
            "this control plane has no federation".into(),
        ))
    }

    /// Starts moving VM `vm_id` to the linked site `target_site` (its name or id) for `actor`.
    /// Answers like [`ControlPlane::write`]: the committed outcome of the request, which is
    /// `Response::Vm` with the move's operation (kind `vm.move`, finished when the move is
    /// done or rolled back), or a refusal (404 unknown VM or site, 409 already moving).
    /// The caller has already checked the VM exists and the client may act on it.
    async fn move_vm(
        &self,
        vm_id: &str,
        target_site: &str,
        actor: &str,
    ) -> Result<(u64, Response), ClusterError> {
        let _ = (vm_id, target_site, actor);
        Err(ClusterError::Unsupported(
            "this control plane cannot move VMs between sites".into(),
        ))
    }

    /// The federation endpoints (`HOST:PORT`) of this site's nodes, for a link token.
    fn federation_addrs(&self) -> Vec<String> {
        Vec::new()
    }
}

/// A REST call forwarded to another site: `path_and_query` starts with `/api/v1/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardedCall {
    pub method: String,
    pub path_and_query: String,
    pub body: Vec<u8>,
    /// The user the call is made for; the receiving site knows it (its own user or one
    /// replicated from its home site) and applies that user's role and tenant.
    pub user_id: String,
    pub idempotency_key: Option<String>,
    pub if_match: Option<String>,
}

/// The answer of a forwarded call, passed back to the client as it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardedReply {
    pub status: u16,
    pub content_type: Option<String>,
    pub etag: Option<String>,
    pub body: Vec<u8>,
}
