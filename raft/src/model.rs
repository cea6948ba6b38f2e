//! The replicated model: the objects every node holds an identical copy of.
//!
//! These types are data only. They are stored with rkyv (see `codec`) and shown to clients as
//! JSON (serde), so both derive sets live here. Times are milliseconds since the Unix epoch,
//! chosen by the proposer before a command enters the log, never read inside `apply`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, chosen by whoever proposes a command.
pub type Millis = u64;

/// Raft node id. Allocated by the leader through [`crate::Command::RegisterNode`].
pub type NodeId = u64;

/// What openraft keeps for each member of the cluster: how to reach it.
#[derive(
    Debug,
    Clone,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct Member {
    /// Operator-chosen node name, unique in the cluster.
    pub name: String,
    /// `HOST:PORT` of the node's REST API.
    pub api_addr: String,
    /// `HOST:PORT` (UDP) of the node's QUIC endpoint.
    pub peer_addr: String,
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.peer_addr)
    }
}

/// Per-tenant limits. `None` means unlimited.
#[derive(
    Debug,
    Clone,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct Quota {
    pub max_vms: Option<u64>,
    pub max_vcpus: Option<u64>,
    pub max_memory_mib: Option<u64>,
    pub max_disk_gib: Option<u64>,
}

/// What a tenant currently uses; maintained by `apply` so quota checks are exact.
#[derive(
    Debug,
    Clone,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct Usage {
    pub vms: u64,
    pub vcpus: u64,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub quota: Quota,
    pub usage: Usage,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// Bumped on every change; the basis of ETags and compare-and-set.
    pub version: u64,
}

/// Roles, from the most to the least powerful.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The whole cluster, every tenant.
    Admin,
    /// Everything inside one tenant, users included.
    TenantAdmin,
    /// VMs inside one tenant.
    Operator,
    /// Read-only inside one tenant.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::TenantAdmin => "tenant-admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "admin" => Ok(Role::Admin),
            "tenant-admin" => Ok(Role::TenantAdmin),
            "operator" => Ok(Role::Operator),
            "viewer" => Ok(Role::Viewer),
            other => Err(format!(
                "unknown role {other:?} (admin, tenant-admin, operator, viewer)"
            )),
        }
    }
}

#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct User {
    pub id: String,
    pub username: String,
    /// PHC string (argon2id). Never serialised to clients: the API maps users to its own view.
    pub password_hash: String,
    /// Tenant id. The built-in admin belongs to the `system` tenant.
    pub tenant: String,
    pub role: Role,
    pub created_at: Millis,
    pub updated_at: Millis,
    pub version: u64,
}

/// The health of a node as the leader last committed it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Up,
    Suspect,
    Down,
}

#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct NodeRecord {
    pub id: NodeId,
    pub member: Member,
    pub state: NodeState,
    /// A drained node takes no new VMs.
    pub schedulable: bool,
    pub labels: BTreeMap<String, String>,
    pub joined_at: Millis,
    pub updated_at: Millis,
    /// Set when the node was removed from the cluster; a removed node may not rejoin with
    /// its old identity.
    pub removed: bool,
    /// What the node can hold, as its agent last reported; `None` until the first report.
    #[serde(default)]
    pub capacity: Option<crate::placement::NodeCapacity>,
}

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    Running,
    Stopped,
}

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Pending,
    Scheduled,
    Starting,
    Running,
    Stopping,
    Stopped,
    Migrating,
    Failed,
    Deleting,
    /// Its node is down: the cluster cannot know whether it still runs (non-HA VMs stay
    /// placed there; the node's agent reports the truth when it comes back).
    Unknown,
}

#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct Vm {
    pub id: String,
    pub name: String,
    pub tenant: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub image: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub node: Option<NodeId>,
    pub desired_state: DesiredState,
    pub state: VmState,
    pub ha: bool,
    pub anti_affinity_group: Option<String>,
    /// Fencing token: bumped by the leader on every placement; agents refuse older epochs.
    pub epoch: u64,
    pub created_at: Millis,
    pub updated_at: Millis,
    pub version: u64,
    /// Constraints on the node the scheduler picks (required node, selector, affinity).
    #[serde(default)]
    pub placement: crate::placement::PlacementConstraints,
}

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum OperationState {
    Pending,
    Running,
    Succeeded,
    Failed,
}

#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct Operation {
    pub id: String,
    pub kind: String,
    pub tenant: String,
    pub target: String,
    pub state: OperationState,
    pub error: Option<String>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// One entry of the audit log. `hash` chains it to the previous entry: sha256 over the
/// previous hash and this entry's fields, computed inside `apply`.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct AuditEntry {
    pub seq: u64,
    pub at: Millis,
    pub actor: String,
    pub tenant: String,
    pub action: String,
    pub target: String,
    pub result: String,
    pub prev_hash: String,
    pub hash: String,
}

/// Cluster-wide settings and secrets written once at `--init`.
///
/// The CA key lives in the replicated state so that whichever node leads can admit new nodes;
/// it never leaves the cluster and is never logged.
#[derive(
    Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct ClusterSecrets {
    pub cluster_id: String,
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    /// HS256 signing keys for JWTs, newest first; older keys still verify until they expire.
    pub jwt_keys: Vec<Vec<u8>>,
    /// sha256 (hex) of the join secret; the secret itself is only in the join token.
    pub join_secret_sha256: String,
    pub created_at: Millis,
}

impl std::fmt::Debug for ClusterSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSecrets")
            .field("cluster_id", &self.cluster_id)
            .field("ca_key_pem", &"<redacted>")
            .field("jwt_keys", &format_args!("<{} keys>", self.jwt_keys.len()))
            .finish()
    }
}

/// The tenant that owns cluster-level objects and the built-in admin.
pub const SYSTEM_TENANT: &str = "system";

/// A scoped, expiring, revocable credential for automation: `nck_<id>_<secret>`.
///
/// Only the sha256 of the secret is stored; the secret is shown once, at creation. The key acts
/// for its owner within the owner's tenant, with at most `role` (never more than the owner has
/// at the time of use).
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    /// User id of the creator; the key acts as this user.
    pub owner: String,
    pub tenant: String,
    pub role: Role,
    /// sha256 (hex) of the secret part.
    pub secret_sha256: String,
    pub created_at: Millis,
    pub expires_at: Option<Millis>,
    /// Set by revocation; a revoked key stays listed so its history is visible.
    pub revoked: bool,
}

/// Second-factor settings of one user, kept apart from [`User`] so that the stored encoding of
/// users does not change.
#[derive(
    Debug,
    Clone,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct UserSecurity {
    /// TOTP shared secret (raw bytes), present from enrolment on.
    pub totp_secret: Option<Vec<u8>>,
    /// Set once the user proved with a code that their authenticator holds the secret.
    pub totp_confirmed: bool,
    /// Set by an administrator: the user must use TOTP (and enrol at next login).
    pub require_totp: bool,
    /// The last TOTP time step accepted; a code is accepted at most once (RFC 6238 §5.2).
    pub totp_last_step: u64,
}

/// What a node says about itself: its release, the command types it understands (the feature
/// gates of rolling upgrades) and whether it is a witness (a vote-only member that runs no VMs).
/// Written by the node itself through [`crate::Command::AdvertiseNode`] when it starts.
#[derive(
    Debug,
    Clone,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct NodeTraits {
    /// The node's release (its binary's version).
    pub release: String,
    /// Names of the command types it can apply (`Command::name`), sorted.
    pub features: Vec<String>,
    pub witness: bool,
    /// The node's federation endpoint (`HOST:PORT`), which linked sites call.
    #[serde(default)]
    pub federation_addr: Option<String>,
}
