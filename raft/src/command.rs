//! The closed set of state changes: every write in the cluster is one [`Command`].
//!
//! A command is data only. Ids and timestamps are chosen by the proposer (the API handler or a
//! controller) before the command enters the log, so that `apply` is a pure function of the
//! state and the command.

use serde::{Deserialize, Serialize};

use crate::model::{
    ApiKey, AuditEntry, ClusterSecrets, DesiredState, Member, Millis, NodeId, NodeRecord,
    NodeState, NodeTraits, Operation, OperationState, Quota, Role, Tenant, User, Vm, VmState,
};
use crate::placement::{NodeCapacity, PlacementEntry, PlacementOutcome};

/// What a client (or a controller) asks the replicated state machine to do.
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
pub struct Request {
    /// When the proposer made the request; the only clock `apply` ever sees.
    pub at: Millis,
    /// Who asked (user id, or `node:<id>` for controllers). Recorded in the audit log.
    pub actor: String,
    /// When set, a retry with the same key returns the first outcome instead of applying twice.
    pub idempotency_key: Option<String>,
    pub command: Command,
}

impl Request {
    pub fn new(at: Millis, actor: impl Into<String>, command: Command) -> Self {
        Self {
            at,
            actor: actor.into(),
            idempotency_key: None,
            command,
        }
    }
}

impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.command.name())
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
pub enum Command {
    /// Does nothing; used to probe that the log accepts writes.
    Noop,
    /// Written once by the first node: the cluster's identity, CA and the admin account.
    InitCluster {
        secrets: ClusterSecrets,
        admin: User,
    },
    /// Admits a node. The id is allocated here, deterministically, so every replica agrees.
    RegisterNode {
        member: Member,
    },
    /// Marks a node removed; it may not come back under the same id.
    RemoveNode {
        id: NodeId,
    },
    SetNodeState {
        id: NodeId,
        state: NodeState,
    },
    SetNodeSchedulable {
        id: NodeId,
        schedulable: bool,
    },
    /// Adds a JWT signing key in front; keeps at most `keep` keys.
    RotateJwtKey {
        key: Vec<u8>,
        keep: u32,
    },
    CreateTenant {
        tenant: Tenant,
    },
    UpdateTenantQuota {
        id: String,
        quota: Quota,
        expected_version: Option<u64>,
    },
    DeleteTenant {
        id: String,
        expected_version: Option<u64>,
    },
    CreateUser {
        user: User,
    },
    UpdateUser {
        id: String,
        password_hash: Option<String>,
        role: Option<Role>,
        expected_version: Option<u64>,
    },
    DeleteUser {
        id: String,
    },
    /// Creates a VM and the operation that tracks its creation. The tenant's quota is checked
    /// and its usage updated here, so concurrent creates can never overshoot.
    CreateVm {
        vm: Vm,
        operation: Operation,
    },
    /// Changes what the VM should be doing (start, stop, reboot is stop+start by the agent).
    SetVmDesired {
        id: String,
        desired: DesiredState,
        operation: Operation,
        expected_version: Option<u64>,
    },
    /// Marks a VM for deletion; its quota is released now, the record once the agent confirms.
    DeleteVm {
        id: String,
        operation: Operation,
        expected_version: Option<u64>,
    },
    /// Places (or re-places) a VM on a node and bumps its epoch (fencing token).
    PlaceVm {
        id: String,
        node: Option<NodeId>,
        expected_version: Option<u64>,
    },
    /// What an agent observed of a VM it runs. Ignored when the epoch is stale.
    ReportVm {
        id: String,
        node: NodeId,
        epoch: u64,
        state: VmState,
        error: Option<String>,
    },
    /// The agent removed a deleted VM everywhere; the record goes away.
    PurgeVm {
        id: String,
        epoch: u64,
    },
    FinishOperation {
        id: String,
        state: OperationState,
        error: Option<String>,
    },
    /// Records an event that changed nothing else (for example a failed login).
    Audit {
        entry: AuditEntry,
    },
    /// Stores a new API key (its secret's hash only). Refused when the owner is gone.
    CreateApiKey {
        key: ApiKey,
    },
    /// Revokes an API key on every node at once.
    RevokeApiKey {
        id: String,
    },
    /// Refuses a JWT id from now on; `expires_at` (seconds) is the token's own expiry.
    RevokeToken {
        jti: String,
        expires_at: u64,
    },
    /// Starts (or restarts, while unconfirmed) TOTP enrolment with a new secret.
    EnrollTotp {
        user_id: String,
        secret: Vec<u8>,
    },
    /// Confirms enrolment with the time step of a code the API verified.
    ConfirmTotp {
        user_id: String,
        step: u64,
    },
    /// Records the use of a TOTP step at login; refused if that step (or a later one) was used.
    UseTotpStep {
        user_id: String,
        step: u64,
    },
    /// An administrator requires (or stops requiring) TOTP for a user.
    SetRequireTotp {
        user_id: String,
        require: bool,
    },
    /// Starts the upload of an image whose bytes will arrive on `image.upload_node`.
    CreateImage {
        image: crate::image::Image,
    },
    /// `node` holds verified bytes of image `id` (the finished upload, or a fetched copy).
    ImageStored {
        id: String,
        node: NodeId,
    },
    DeleteImage {
        id: String,
    },
    /// The leader's liveness controller: the VM's node is down, so its state is unknown.
    /// Ignored (refused as stale) unless the VM is still on `node` at `epoch`.
    MarkVmUnknown {
        id: String,
        node: NodeId,
        epoch: u64,
        reason: String,
    },
    /// A node states its release, the command types it understands and whether it is a
    /// witness. New command types are proposed only once every voter advertises them.
    AdvertiseNode {
        id: NodeId,
        traits: NodeTraits,
    },
    /// Starts a migration of a running VM (by a user, or by the leader draining a node). The
    /// source is the VM's node at apply time; one migration per VM at a time.
    RequestMigration {
        migration: crate::migration::Migration,
        operation: Operation,
    },
    /// Moves a migration from phase `from` to the next phase (a compare-and-set on the phase, so
    /// a stale controller or agent cannot move it twice). Reaching `Done` switches the VM's
    /// owner to the target and bumps its epoch; `Done` and `RolledBack` finish the operation.
    AdvanceMigration {
        id: String,
        from: crate::migration::MigrationPhase,
        to: crate::migration::PhaseChange,
    },
    /// A node's agent reports what its host can hold (at start and when it changes).
    ReportNodeCapacity {
        id: NodeId,
        capacity: NodeCapacity,
    },
    /// The leader's scheduler commits many placements at once. Each entry is checked on its
    /// own (compare-and-set on the VM's version) and bumps the VM's epoch; a stale entry is
    /// refused without failing the others. Every entry's explanation is stored under `p/`.
    PlaceBatch {
        placements: Vec<PlacementEntry>,
    },
    /// Names this site, once, at `--init` (see [`crate::federation`]).
    InitSite {
        site: crate::federation::SiteIdentity,
    },
    /// Stores a one-time federation token (its hash) that lets another site link to this one.
    CreateFederationToken {
        token: crate::federation::FederationToken,
    },
    /// Links (or re-links) a peer site. On the side that issued the token, `token` holds its
    /// id and the sha256 of the secret presented, and the token is consumed in the same entry.
    LinkSite {
        link: crate::federation::SiteLink,
        token: Option<(String, String)>,
    },
    /// Unlinks a peer site; `catalog_keys` are its catalog entries as the proposer read them.
    UnlinkSite {
        site: String,
        catalog_keys: Vec<String>,
    },
    /// Commits one pull of a peer's change feed, from index `from` (compare-and-set) to `to`.
    /// With `reset`, the pull restarted from zero and `stale_keys` are removed first.
    ApplyCatalog {
        site: String,
        from: u64,
        to: u64,
        head: u64,
        latency_ms: u64,
        reset: bool,
        stale_keys: Vec<String>,
        changes: Vec<crate::federation::CatalogChange>,
    },
    /// Records that pulling from a peer failed (kept until the next success).
    SiteSyncFailed {
        site: String,
        error: String,
    },
    /// Starts moving a VM to another site (source side, see [`crate::site_move`]): records the
    /// move and locks the VM against other actions until the move settles.
    RequestSiteMove {
        site_move: crate::site_move::SiteMove,
        operation: Operation,
    },
    /// Moves a site move from phase `from` to the next (a compare-and-set on the phase).
    AdvanceSiteMove {
        id: String,
        from: crate::site_move::MovePhase,
        to: crate::site_move::MoveChange,
    },
    /// Target side: begins importing a VM from another site, reserving its quota and name.
    BeginSiteImport {
        import: crate::site_move::SiteImport,
    },
    /// Target side: the import ends (the VM is created with its id, or the import aborted).
    SettleSiteImport {
        id: String,
        vm_id: String,
        to: crate::site_move::ImportSettle,
    },
}

impl Command {
    /// A stable, short name for metrics, logs and audit.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Noop => "noop",
            Command::InitCluster { .. } => "cluster.init",
            Command::RegisterNode { .. } => "node.register",
            Command::RemoveNode { .. } => "node.remove",
            Command::SetNodeState { .. } => "node.set_state",
            Command::SetNodeSchedulable { .. } => "node.set_schedulable",
            Command::RotateJwtKey { .. } => "cluster.rotate_jwt_key",
            Command::CreateTenant { .. } => "tenant.create",
            Command::UpdateTenantQuota { .. } => "tenant.update",
            Command::DeleteTenant { .. } => "tenant.delete",
            Command::CreateUser { .. } => "user.create",
            Command::UpdateUser { .. } => "user.update",
            Command::DeleteUser { .. } => "user.delete",
            Command::CreateVm { .. } => "vm.create",
            Command::SetVmDesired { .. } => "vm.set_desired",
            Command::DeleteVm { .. } => "vm.delete",
            Command::PlaceVm { .. } => "vm.place",
            Command::ReportVm { .. } => "vm.report",
            Command::PurgeVm { .. } => "vm.purge",
            Command::FinishOperation { .. } => "operation.finish",
            Command::Audit { .. } => "audit",
            Command::CreateApiKey { .. } => "api_key.create",
            Command::RevokeApiKey { .. } => "api_key.revoke",
            Command::RevokeToken { .. } => "auth.logout",
            Command::EnrollTotp { .. } => "user.totp_enroll",
            Command::ConfirmTotp { .. } => "user.totp_confirm",
            Command::UseTotpStep { .. } => "user.totp_use",
            Command::SetRequireTotp { .. } => "user.require_totp",
            Command::CreateImage { .. } => "image.create",
            Command::ImageStored { .. } => "image.stored",
            Command::DeleteImage { .. } => "image.delete",
            Command::MarkVmUnknown { .. } => "vm.mark_unknown",
            Command::AdvertiseNode { .. } => "node.advertise",
            Command::RequestMigration { .. } => "vm.migrate",
            Command::AdvanceMigration { .. } => "vm.migration_phase",
            Command::ReportNodeCapacity { .. } => "node.report_capacity",
            Command::PlaceBatch { .. } => "vm.place_batch",
            Command::InitSite { .. } => "site.init",
            Command::CreateFederationToken { .. } => "site.token_create",
            Command::LinkSite { .. } => "site.link",
            Command::UnlinkSite { .. } => "site.unlink",
            Command::ApplyCatalog { .. } => "site.catalog",
            Command::SiteSyncFailed { .. } => "site.sync_failed",
            Command::RequestSiteMove { .. } => "site.move_request",
            Command::AdvanceSiteMove { .. } => "site.move_advance",
            Command::BeginSiteImport { .. } => "site.import_begin",
            Command::SettleSiteImport { .. } => "site.import_settle",
        }
    }
}

/// Command types every node understood before nodes advertised their features: a node that
/// has advertised nothing is taken to understand exactly these.
pub const BASELINE_COMMANDS: &[&str] = &[
    "noop",
    "cluster.init",
    "node.register",
    "node.remove",
    "node.set_state",
    "node.set_schedulable",
    "cluster.rotate_jwt_key",
    "tenant.create",
    "tenant.update",
    "tenant.delete",
    "user.create",
    "user.update",
    "user.delete",
    "vm.create",
    "vm.set_desired",
    "vm.delete",
    "vm.place",
    "vm.report",
    "vm.purge",
    "operation.finish",
    "audit",
    "api_key.create",
    "api_key.revoke",
    "auth.logout",
    "user.totp_enroll",
    "user.totp_confirm",
    "user.totp_use",
    "user.require_totp",
];

/// Command types added since the baseline. A new `Command` variant adds its name here, so
/// that nodes advertise it and the write path proposes it only once every voter has it.
pub const ADDED_COMMANDS: &[&str] = &[
    "node.advertise",
    "site.init",
    "site.token_create",
    "site.link",
    "site.unlink",
    "site.catalog",
    "site.sync_failed",
    "site.move_request",
    "site.move_advance",
    "site.import_begin",
    "site.import_settle",
];

/// Every command type this build understands: what the node advertises.
pub fn known_commands() -> Vec<&'static str> {
    let mut all: Vec<&'static str> = BASELINE_COMMANDS
        .iter()
        .chain(ADDED_COMMANDS)
        .copied()
        .collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// Why `apply` refused a command. Refusals are deterministic: every replica refuses alike,
/// and the refusal is the committed outcome of that log entry.
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
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    NotFound,
    AlreadyExists,
    VersionMismatch,
    QuotaExceeded,
    StaleEpoch,
    NotEmpty,
    Invalid,
    AlreadyInitialized,
}

impl RejectCode {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::NotFound => "not_found",
            RejectCode::AlreadyExists => "already_exists",
            RejectCode::VersionMismatch => "version_mismatch",
            RejectCode::QuotaExceeded => "quota_exceeded",
            RejectCode::StaleEpoch => "stale_epoch",
            RejectCode::NotEmpty => "not_empty",
            RejectCode::Invalid => "invalid",
            RejectCode::AlreadyInitialized => "already_initialized",
        }
    }
}

/// The outcome of applying one log entry.
// Responses live briefly (one per applied entry); boxing the node record would only add an
// allocation to every node change.
#[allow(clippy::large_enum_variant)]
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
pub enum Response {
    /// Applied; nothing to return. Also the response to blank and membership entries.
    Ok,
    Node(NodeRecord),
    Tenant(Tenant),
    User(User),
    Vm {
        vm: Vm,
        operation: Option<Operation>,
    },
    Operation(Operation),
    Rejected {
        code: RejectCode,
        message: String,
    },
    ApiKey(ApiKey),
    Image(crate::image::Image),
    /// The outcome of each entry of a `PlaceBatch`, in order.
    Placements(Vec<PlacementOutcome>),
}
