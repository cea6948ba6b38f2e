//! Cross-site moves of a VM, as replicated state: a saga recorded in both sites' logs.
//!
//! Each site is its own Raft cluster, so a move is two records in two logs, tied by the move id:
//!
//! ```text
//! source site: Requested -> Stopping -> Copying -> Committing -> Done
//!              Requested | Stopping | Copying  --failure, link down too long--> RolledBack
//! target site:                 Importing (begun during Copying) -> Imported | Aborted
//! ```
//!
//! The decision point is the source's `Committing`: before it the move may roll back (the
//! source tells the target to abort), after it the move only goes forward (the source tells the
//! target to import, retrying until it hears `Imported`, then removes its copy). The two
//! messages are exclusive because `Committing` and `RolledBack` are compare-and-sets on the same
//! phase, so the target never sees both, whatever the delays and whichever leader sends them.
//! An abort that reaches the target before the import was begun leaves a tombstone, so a
//! delayed begin cannot resurrect it.
//!
//! The target checks everything that could make the import fail (tenant known there, quota,
//! name and id free, node present) when the import is begun, and reserves the quota and the
//! name then; `Imported` therefore cannot be refused, which is what makes `Committing` safe.
//!
//! Invariant: the VM is live (a record that is neither being deleted nor handed off) at exactly
//! one site whenever no move is between `Committing` and `Imported`, and at most one site in
//! that window (see the interleaving test below).
//!
//! While a move is active the VM is locked: start, stop, delete, migrate and placement are
//! refused (409) at the source, and the target has no VM record until `Imported`.
//!
//! Keys (all under `f/m/`):
//! - `f/m/s/<move id>`: a [`SiteMove`] (source side);
//! - `f/m/t/<move id>`: a [`SiteImport`] (target side);
//! - `f/m/v/<vm id>`: the active move of a VM at this site (value: the move id).

use serde::{Deserialize, Serialize};

use crate::apply::{get, new_operation, put, reject, ApplyError, StateTx};
use crate::command::{Command, RejectCode, Response};
use crate::keys;
use crate::model::{
    DesiredState, Millis, NodeId, NodeRecord, Operation, OperationState, Vm, VmState,
};

pub const MOVE_PREFIX: &[u8] = b"f/m/s/";
pub const IMPORT_PREFIX: &[u8] = b"f/m/t/";
pub const ACTIVE_PREFIX: &[u8] = b"f/m/v/";

pub fn move_key(id: &str) -> Vec<u8> {
    [MOVE_PREFIX, id.as_bytes()].concat()
}
pub fn import_key(id: &str) -> Vec<u8> {
    [IMPORT_PREFIX, id.as_bytes()].concat()
}
pub fn active_key(vm_id: &str) -> Vec<u8> {
    [ACTIVE_PREFIX, vm_id.as_bytes()].concat()
}

/// Names of the site-move commands (see [`crate::command::ADDED_COMMANDS`]).
pub const COMMANDS: [&str; 4] = [
    "site.move_request",
    "site.move_advance",
    "site.import_begin",
    "site.import_settle",
];

/// The operation kind of a move (finished by the saga itself, not by an agent).
pub const OPERATION_KIND: &str = "vm.move";

/// The phase of a move at its source site.
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
pub enum MovePhase {
    Requested,
    Stopping,
    Copying,
    Committing,
    Done,
    RolledBack,
}

impl MovePhase {
    pub fn is_terminal(self) -> bool {
        matches!(self, MovePhase::Done | MovePhase::RolledBack)
    }

    /// Whether the VM at the source has been handed to the target (the move only goes forward).
    pub fn handed_off(self) -> bool {
        matches!(self, MovePhase::Committing | MovePhase::Done)
    }
}

/// The size and sha256 of the VM's disk, as the source node measured it once the VM stopped.
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
pub struct DiskDigest {
    pub size: u64,
    /// Hex sha256 over the whole file.
    pub sha256: String,
}

/// One move, as its source site records it. Its id is the id of the operation that tracks it.
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
pub struct SiteMove {
    pub id: String,
    pub vm_id: String,
    pub tenant: String,
    pub source_site: String,
    pub target_site: String,
    pub phase: MovePhase,
    /// What the VM was asked to do before the move: restored on rollback, carried to the
    /// target on commit. Set by `apply` from the VM.
    pub previous_desired: DesiredState,
    /// The source node holding the disk (set at `Copying`).
    pub source_node: Option<NodeId>,
    /// The disk's size and checksum (set at `Copying`; `None` for a VM that has no disk).
    pub disk: Option<DiskDigest>,
    /// The target site's node that received the disk (set at `Committing`).
    pub target_node: Option<NodeId>,
    /// Why the move rolled back.
    pub reason: Option<String>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// A phase change of a move, with what that phase records.
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
pub enum MoveChange {
    /// The VM is asked to stop (its desired state becomes `stopped`).
    Stopping,
    /// The VM is stopped on `source_node`, whose disk is `disk`; the copy may begin.
    Copying {
        source_node: Option<NodeId>,
        disk: Option<DiskDigest>,
    },
    /// The target holds a verified copy on `target_node`: from here the move only goes forward.
    Committing {
        target_node: NodeId,
    },
    /// The target imported the VM: the source's copy goes away.
    Done,
    RolledBack {
        reason: String,
    },
}

impl MoveChange {
    pub fn phase(&self) -> MovePhase {
        match self {
            MoveChange::Stopping => MovePhase::Stopping,
            MoveChange::Copying { .. } => MovePhase::Copying,
            MoveChange::Committing { .. } => MovePhase::Committing,
            MoveChange::Done => MovePhase::Done,
            MoveChange::RolledBack { .. } => MovePhase::RolledBack,
        }
    }
}

fn allowed(from: MovePhase, to: MovePhase) -> bool {
    use MovePhase as P;
    matches!(
        (from, to),
        (P::Requested, P::Stopping)
            | (P::Stopping, P::Copying)
            | (P::Copying, P::Committing)
            | (P::Committing, P::Done)
            // Once committing, the target may already have imported: going back would leave
            // the VM at two sites.
            | (P::Requested | P::Stopping | P::Copying, P::RolledBack)
    )
}

/// The phase of an import at the target site.
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
pub enum ImportPhase {
    Importing,
    Imported,
    Aborted,
}

/// One import, as the target site records it (same id as the move).
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
pub struct SiteImport {
    pub id: String,
    pub vm_id: String,
    /// The VM as the source had it; created with this id at `Imported`. `None` in the
    /// tombstone of an import aborted before it was begun.
    pub vm: Option<Vm>,
    pub source_site: String,
    /// The node of this site that receives the disk and will run the VM.
    pub node: NodeId,
    pub disk: Option<DiskDigest>,
    pub phase: ImportPhase,
    pub reason: Option<String>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// How an import ends.
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
pub enum ImportSettle {
    Imported,
    Aborted { reason: String },
}

/// The active move of VM `vm_id` at this site, if any (source or target side).
pub fn active_move(tx: &dyn StateTx, vm_id: &str) -> Result<Option<String>, ApplyError> {
    get::<String>(tx, &active_key(vm_id))
}

/// Refuses, as a conflict, the commands that would act on a VM a move holds.
pub(crate) fn refuse_if_moving(
    tx: &dyn StateTx,
    command: &Command,
) -> Result<Option<Response>, ApplyError> {
    let id = match command {
        Command::SetVmDesired { id, .. }
        | Command::DeleteVm { id, .. }
        | Command::PlaceVm { id, .. } => id.as_str(),
        Command::RequestMigration { migration, .. } => migration.vm_id.as_str(),
        _ => return Ok(None),
    };
    Ok(active_move(tx, id)?.map(|m| {
        reject(
            RejectCode::AlreadyExists,
            format!("VM {id} is moving to another site (move {m}); try again once it settles"),
        )
    }))
}

/// Whether a placement batch entry may place this VM (not while it moves).
pub(crate) fn is_moving(tx: &dyn StateTx, vm_id: &str) -> Result<bool, ApplyError> {
    Ok(active_move(tx, vm_id)?.is_some())
}

/// Applies the site-move commands; `None` for every other command.
pub(crate) fn apply(
    tx: &dyn StateTx,
    command: &Command,
    at: Millis,
) -> Result<Option<Response>, ApplyError> {
    let response = match command {
        Command::RequestSiteMove {
            site_move,
            operation,
        } => request(tx, site_move, operation, at)?,
        Command::AdvanceSiteMove { id, from, to } => advance(tx, id, *from, to, at)?,
        Command::BeginSiteImport { import } => begin_import(tx, import, at)?,
        Command::SettleSiteImport { id, vm_id, to } => settle_import(tx, id, vm_id, to, at)?,
        _ => return Ok(None),
    };
    Ok(Some(response))
}

fn request(
    tx: &dyn StateTx,
    m: &SiteMove,
    operation: &Operation,
    at: Millis,
) -> Result<Response, ApplyError> {
    if m.id.is_empty() || m.id != operation.id {
        return Ok(reject(
            RejectCode::Invalid,
            "a move's id is its operation's id",
        ));
    }
    if m.source_site == m.target_site {
        return Ok(reject(
            RejectCode::Invalid,
            "the VM is already at that site",
        ));
    }
    if tx
        .get(&crate::federation::link_key(&m.target_site))?
        .is_none()
    {
        return Ok(reject(
            RejectCode::NotFound,
            format!("site {} is not linked", m.target_site),
        ));
    }
    let Some(vm) = get::<Vm>(tx, &keys::vm(&m.vm_id))? else {
        return Ok(reject(
            RejectCode::NotFound,
            format!("vm {} not found", m.vm_id),
        ));
    };
    if vm.state == VmState::Deleting {
        return Ok(reject(RejectCode::Invalid, "the VM is being deleted"));
    }
    if let Some(active) = active_move(tx, &vm.id)? {
        return Ok(reject(
            RejectCode::AlreadyExists,
            format!("the VM is already moving (move {active})"),
        ));
    }
    if let Some(active) = get::<String>(tx, &keys::active_migration(&vm.id))? {
        return Ok(reject(
            RejectCode::AlreadyExists,
            format!("the VM is migrating (operation {active})"),
        ));
    }
    if tx.get(&move_key(&m.id))?.is_some() {
        return Ok(reject(RejectCode::AlreadyExists, "move id is taken"));
    }
    let op = new_operation(tx, operation, at)?;
    let record = SiteMove {
        tenant: vm.tenant.clone(),
        phase: MovePhase::Requested,
        previous_desired: vm.desired_state,
        source_node: None,
        disk: None,
        target_node: None,
        reason: None,
        created_at: at,
        updated_at: at,
        ..m.clone()
    };
    put(tx, &move_key(&record.id), &record)?;
    put(tx, &active_key(&vm.id), &record.id)?;
    Ok(Response::Vm {
        vm,
        operation: Some(op),
    })
}

fn advance(
    tx: &dyn StateTx,
    id: &str,
    from: MovePhase,
    to: &MoveChange,
    at: Millis,
) -> Result<Response, ApplyError> {
    let Some(mut m) = get::<SiteMove>(tx, &move_key(id))? else {
        return Ok(reject(RejectCode::NotFound, format!("move {id} not found")));
    };
    if m.phase != from {
        return Ok(reject(
            RejectCode::VersionMismatch,
            format!("move is {:?}, not {from:?}", m.phase),
        ));
    }
    if !allowed(from, to.phase()) {
        return Ok(reject(
            RejectCode::Invalid,
            format!("a move does not go from {from:?} to {:?}", to.phase()),
        ));
    }
    let vm = get::<Vm>(tx, &keys::vm(&m.vm_id))?;
    match to {
        MoveChange::Stopping => {
            let Some(mut vm) = vm else {
                return Ok(reject(RejectCode::NotFound, "the VM is gone"));
            };
            if vm.desired_state != DesiredState::Stopped {
                vm.desired_state = DesiredState::Stopped;
                vm.updated_at = at;
                vm.version += 1;
                put(tx, &keys::vm(&vm.id), &vm)?;
            }
        }
        MoveChange::Copying { source_node, disk } => {
            // The disk is copied only from a guest that is off, on the node named.
            let stopped = vm.as_ref().is_some_and(|v| {
                v.node == *source_node
                    && (v.node.is_none() || v.state == VmState::Stopped)
                    && v.desired_state == DesiredState::Stopped
            });
            if !stopped {
                return Ok(reject(
                    RejectCode::StaleEpoch,
                    "the VM is not stopped on that node",
                ));
            }
            m.source_node = *source_node;
            m.disk = disk.clone();
        }
        MoveChange::Committing { target_node } => m.target_node = Some(*target_node),
        MoveChange::Done => {
            if let Some(vm) = vm {
                hand_off(tx, vm, at)?;
            }
            finish_operation(tx, &m.id, OperationState::Succeeded, None, at)?;
        }
        MoveChange::RolledBack { reason } => {
            if let Some(mut vm) = vm {
                if vm.state != VmState::Deleting && vm.desired_state != m.previous_desired {
                    vm.desired_state = m.previous_desired;
                    vm.updated_at = at;
                    vm.version += 1;
                    put(tx, &keys::vm(&vm.id), &vm)?;
                }
            }
            m.reason = Some(reason.clone());
            finish_operation(tx, &m.id, OperationState::Failed, Some(reason.clone()), at)?;
        }
    }
    m.phase = to.phase();
    m.updated_at = at;
    if m.phase.is_terminal() {
        tx.remove(&active_key(&m.vm_id))?;
    }
    put(tx, &move_key(id), &m)?;
    Ok(Response::Ok)
}

/// The source's copy of a moved VM goes away: at once if it was never placed, otherwise through
/// the delete path, so the node's agent removes the domain and the disk, then purges it.
fn hand_off(tx: &dyn StateTx, mut vm: Vm, at: Millis) -> Result<(), ApplyError> {
    if vm.state != VmState::Deleting {
        crate::apply::release_usage(tx, &vm)?;
    }
    if vm.node.is_none() {
        tx.remove(&keys::vm(&vm.id))?;
        tx.remove(&keys::vm_name(&vm.tenant, &vm.name))?;
        tx.remove(&keys::placement(&vm.id))?;
        return Ok(());
    }
    vm.state = VmState::Deleting;
    vm.desired_state = DesiredState::Stopped;
    vm.updated_at = at;
    vm.version += 1;
    put(tx, &keys::vm(&vm.id), &vm)
}

fn finish_operation(
    tx: &dyn StateTx,
    id: &str,
    state: OperationState,
    error: Option<String>,
    at: Millis,
) -> Result<(), ApplyError> {
    if let Some(mut op) = get::<Operation>(tx, &keys::operation(id))? {
        op.state = state;
        op.error = error;
        op.updated_at = at;
        put(tx, &keys::operation(id), &op)?;
    }
    Ok(())
}

fn exceeds(limit: Option<u64>, used: u64, add: u64) -> bool {
    limit.is_some_and(|l| used.saturating_add(add) > l)
}

fn begin_import(tx: &dyn StateTx, imp: &SiteImport, at: Millis) -> Result<Response, ApplyError> {
    if let Some(existing) = get::<SiteImport>(tx, &import_key(&imp.id))? {
        // A retried begin (a new source leader, a lost answer) finds the same import.
        if existing.phase == ImportPhase::Importing
            && existing.vm_id == imp.vm_id
            && existing.node == imp.node
            && existing.disk == imp.disk
        {
            return Ok(Response::Ok);
        }
        return Ok(reject(
            RejectCode::AlreadyExists,
            format!("import {} is {:?}", imp.id, existing.phase),
        ));
    }
    let Some(vm) = &imp.vm else {
        return Ok(reject(RejectCode::Invalid, "an import carries its VM"));
    };
    if vm.id != imp.vm_id || vm.id.is_empty() || vm.vcpus == 0 || vm.memory_mib == 0 {
        return Ok(reject(RejectCode::Invalid, "the import's VM is not valid"));
    }
    if tx.get(&keys::vm(&vm.id))?.is_some() || active_move(tx, &vm.id)?.is_some() {
        return Ok(reject(
            RejectCode::AlreadyExists,
            "a VM with this id already exists at this site",
        ));
    }
    match get::<NodeRecord>(tx, &keys::node(imp.node))? {
        Some(n) if !n.removed => {}
        _ => {
            return Ok(reject(
                RejectCode::NotFound,
                format!("node {} not found", imp.node),
            ))
        }
    }
    let Some((mut tenant, foreign)) = crate::federation::tenant_for_usage(tx, &vm.tenant)? else {
        return Ok(reject(
            RejectCode::NotFound,
            format!("tenant {} is not known at this site", vm.tenant),
        ));
    };
    if tx.get(&keys::vm_name(&vm.tenant, &vm.name))?.is_some() {
        return Ok(reject(
            RejectCode::AlreadyExists,
            format!("a VM named {:?} already exists in this tenant", vm.name),
        ));
    }
    let (q, u) = (&tenant.quota, &tenant.usage);
    if exceeds(q.max_vms, u.vms, 1)
        || exceeds(q.max_vcpus, u.vcpus, u64::from(vm.vcpus))
        || exceeds(q.max_memory_mib, u.memory_mib, vm.memory_mib)
        || exceeds(q.max_disk_gib, u.disk_gib, vm.disk_gib)
    {
        return Ok(reject(
            RejectCode::QuotaExceeded,
            format!("tenant {} would exceed its quota at this site", tenant.name),
        ));
    }
    // Reserve now what `Imported` will use, so that it cannot be refused later.
    tenant.usage.vms += 1;
    tenant.usage.vcpus += u64::from(vm.vcpus);
    tenant.usage.memory_mib += vm.memory_mib;
    tenant.usage.disk_gib += vm.disk_gib;
    if !foreign {
        tenant.version += 1;
        tenant.updated_at = at;
    }
    crate::federation::store_tenant_usage(tx, &tenant, foreign)?;
    put(tx, &keys::vm_name(&vm.tenant, &vm.name), &vm.id)?;
    put(tx, &active_key(&vm.id), &imp.id)?;
    let record = SiteImport {
        phase: ImportPhase::Importing,
        reason: None,
        created_at: at,
        updated_at: at,
        ..imp.clone()
    };
    put(tx, &import_key(&imp.id), &record)?;
    Ok(Response::Ok)
}

fn settle_import(
    tx: &dyn StateTx,
    id: &str,
    vm_id: &str,
    to: &ImportSettle,
    at: Millis,
) -> Result<Response, ApplyError> {
    let target = match to {
        ImportSettle::Imported => ImportPhase::Imported,
        ImportSettle::Aborted { .. } => ImportPhase::Aborted,
    };
    let Some(mut imp) = get::<SiteImport>(tx, &import_key(id))? else {
        return Ok(match to {
            ImportSettle::Imported => {
                reject(RejectCode::NotFound, format!("import {id} not found"))
            }
            ImportSettle::Aborted { reason } => {
                // A tombstone: a begin delayed past its abort must not start the import.
                let tomb = SiteImport {
                    id: id.to_string(),
                    vm_id: vm_id.to_string(),
                    vm: None,
                    source_site: String::new(),
                    node: 0,
                    disk: None,
                    phase: ImportPhase::Aborted,
                    reason: Some(reason.clone()),
                    created_at: at,
                    updated_at: at,
                };
                put(tx, &import_key(id), &tomb)?;
                Response::Ok
            }
        });
    };
    if imp.phase == target {
        // Settling twice the same way is a retry, not a conflict.
        return Ok(Response::Ok);
    }
    if imp.phase != ImportPhase::Importing {
        return Ok(reject(
            RejectCode::VersionMismatch,
            format!("import is {:?}", imp.phase),
        ));
    }
    let Some(vm) = imp.vm.clone() else {
        return Ok(reject(RejectCode::Invalid, "the import has no VM"));
    };
    match to {
        ImportSettle::Imported => {
            // Usage and name were reserved at begin; the VM arrives placed on the node that
            // holds its disk, at epoch 1, wanting what it wanted at the source.
            let mut placement = vm.placement.clone();
            // A node required at the source names nothing here.
            placement.node = None;
            let vm = Vm {
                placement,
                node: Some(imp.node),
                state: VmState::Scheduled,
                epoch: 1,
                created_at: at,
                updated_at: at,
                version: 1,
                ..vm
            };
            put(tx, &keys::vm(&vm.id), &vm)?;
        }
        ImportSettle::Aborted { reason } => {
            crate::apply::release_usage(tx, &vm)?;
            tx.remove(&keys::vm_name(&vm.tenant, &vm.name))?;
            imp.reason = Some(reason.clone());
        }
    }
    tx.remove(&active_key(&imp.vm_id))?;
    imp.phase = target;
    imp.updated_at = at;
    put(tx, &import_key(id), &imp)?;
    Ok(Response::Ok)
}

#[cfg(test)]
mod tests;
