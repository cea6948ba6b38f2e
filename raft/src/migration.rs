//! Migrations of VMs between nodes, as replicated state: the record of each migration, its
//! phases, and how `apply` moves it from one phase to the next.
//!
//! Phases, each committed before anyone acts on it, so a new leader finds where the previous one
//! stopped:
//!
//! ```text
//! Requested --leader picks a target--> TargetChosen --leader says go--> Migrating
//!   --source agent moved the guest--> Switching --leader switches owner, epoch+1--> Done
//! any phase before Switching --failure, refusal, undrain--> RolledBack
//! ```
//!
//! While a migration is `Migrating` or `Switching` the agents leave the VM to the migration:
//! the source does not restart a guest that left, the target does not remove the guest that
//! arrived before the owner switch. `Done` places the VM on the target with the epoch the
//! migrated domain was defined with on arrival (source epoch + 1).

use serde::{Deserialize, Serialize};

use crate::apply::{get, new_operation, put, reject, ApplyError, StateTx};
use crate::command::{RejectCode, Response};
use crate::keys;
use crate::model::{
    DesiredState, Millis, NodeId, NodeRecord, Operation, OperationState, Vm, VmState,
};

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
pub enum MigrationPhase {
    Requested,
    TargetChosen,
    Migrating,
    Switching,
    Done,
    RolledBack,
}

impl MigrationPhase {
    pub fn is_terminal(self) -> bool {
        matches!(self, MigrationPhase::Done | MigrationPhase::RolledBack)
    }

    /// Whether the guest may be in flight between the hosts: agents keep their hands off.
    pub fn in_flight(self) -> bool {
        matches!(self, MigrationPhase::Migrating | MigrationPhase::Switching)
    }
}

/// How the guest moved: `live` is libvirt's live migration (real hypervisors); `handoff` is
/// the stand-in for hypervisors that cannot migrate (libvirt's test driver): the target defines
/// the domain paused, the source destroys its copy, then the target resumes.
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
pub enum MigrationMode {
    Live,
    Handoff,
}

/// One migration. Its id is the id of the operation that tracks it.
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
pub struct Migration {
    pub id: String,
    pub vm_id: String,
    pub tenant: String,
    /// Set by `apply` from the VM's placement.
    pub source: NodeId,
    /// The node asked for, if any; otherwise the leader chooses.
    pub requested_target: Option<NodeId>,
    pub target: Option<NodeId>,
    pub phase: MigrationPhase,
    pub mode: Option<MigrationMode>,
    /// `user` or `drain`.
    pub reason: String,
    /// The VM's epoch when the migration was requested; the switch issues `source_epoch + 1`.
    pub source_epoch: u64,
    /// Bandwidth cap for the live transfer, MiB/s.
    pub bandwidth_mib_s: Option<u64>,
    pub total_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub bytes: Option<u64>,
    pub error: Option<String>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// The phase a migration moves to, with what that phase records.
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
pub enum PhaseChange {
    TargetChosen {
        target: NodeId,
    },
    Migrating,
    Switching {
        mode: MigrationMode,
        total_ms: u64,
        downtime_ms: Option<u64>,
        bytes: u64,
    },
    Done,
    RolledBack {
        error: String,
    },
}

impl PhaseChange {
    pub fn phase(&self) -> MigrationPhase {
        match self {
            PhaseChange::TargetChosen { .. } => MigrationPhase::TargetChosen,
            PhaseChange::Migrating => MigrationPhase::Migrating,
            PhaseChange::Switching { .. } => MigrationPhase::Switching,
            PhaseChange::Done => MigrationPhase::Done,
            PhaseChange::RolledBack { .. } => MigrationPhase::RolledBack,
        }
    }
}

fn allowed(from: MigrationPhase, to: MigrationPhase) -> bool {
    use MigrationPhase as P;
    matches!(
        (from, to),
        (P::Requested, P::TargetChosen)
            | (P::TargetChosen, P::Migrating)
            | (P::Migrating, P::Switching)
            | (P::Switching, P::Done)
            // Once the guest runs on the target (Switching), going back would be a lie.
            | (P::Requested | P::TargetChosen | P::Migrating, P::RolledBack)
    )
}

/// Whether VM `vm_id` has a migration whose guest may be between hosts.
pub(crate) fn in_flight(tx: &dyn StateTx, vm_id: &str) -> Result<bool, ApplyError> {
    let Some(id) = get::<String>(tx, &keys::active_migration(vm_id))? else {
        return Ok(false);
    };
    Ok(get::<Migration>(tx, &keys::migration(&id))?.is_some_and(|m| m.phase.in_flight()))
}

fn usable_target(tx: &dyn StateTx, id: NodeId) -> Result<bool, ApplyError> {
    Ok(matches!(get::<NodeRecord>(tx, &keys::node(id))?, Some(n) if !n.removed))
}

pub(crate) fn apply_request(
    tx: &dyn StateTx,
    migration: &Migration,
    operation: &Operation,
    at: Millis,
) -> Result<Response, ApplyError> {
    let Some(vm) = get::<Vm>(tx, &keys::vm(&migration.vm_id))? else {
        return Ok(reject(
            RejectCode::NotFound,
            format!("vm {} not found", migration.vm_id),
        ));
    };
    if migration.id.is_empty() || migration.id != operation.id {
        return Ok(reject(
            RejectCode::Invalid,
            "a migration's id is its operation's id",
        ));
    }
    let Some(source) = vm.node else {
        return Ok(reject(
            RejectCode::Invalid,
            "the VM is not placed on a node",
        ));
    };
    if vm.state != VmState::Running || vm.desired_state != DesiredState::Running {
        return Ok(reject(
            RejectCode::Invalid,
            format!(
                "only a running VM migrates live; this one is {:?}",
                vm.state
            ),
        ));
    }
    if let Some(active) = get::<String>(tx, &keys::active_migration(&vm.id))? {
        return Ok(reject(
            RejectCode::AlreadyExists,
            format!("the VM is already migrating (operation {active})"),
        ));
    }
    if let Some(t) = migration.requested_target {
        if t == source {
            return Ok(reject(
                RejectCode::Invalid,
                "the VM already runs on that node",
            ));
        }
        if !usable_target(tx, t)? {
            return Ok(reject(RejectCode::NotFound, format!("node {t} not found")));
        }
    }
    let op = new_operation(tx, operation, at)?;
    let m = Migration {
        tenant: vm.tenant.clone(),
        source,
        target: None,
        phase: MigrationPhase::Requested,
        mode: None,
        source_epoch: vm.epoch,
        total_ms: None,
        downtime_ms: None,
        bytes: None,
        error: None,
        created_at: at,
        updated_at: at,
        ..migration.clone()
    };
    put(tx, &keys::migration(&m.id), &m)?;
    put(tx, &keys::active_migration(&vm.id), &m.id)?;
    Ok(Response::Vm {
        vm,
        operation: Some(op),
    })
}

pub(crate) fn apply_advance(
    tx: &dyn StateTx,
    id: &str,
    from: MigrationPhase,
    to: &PhaseChange,
    at: Millis,
) -> Result<Response, ApplyError> {
    let Some(mut m) = get::<Migration>(tx, &keys::migration(id))? else {
        return Ok(reject(
            RejectCode::NotFound,
            format!("migration {id} not found"),
        ));
    };
    if m.phase != from {
        return Ok(reject(
            RejectCode::VersionMismatch,
            format!("migration is {:?}, not {from:?}", m.phase),
        ));
    }
    if !allowed(from, to.phase()) {
        return Ok(reject(
            RejectCode::Invalid,
            format!("a migration does not go from {from:?} to {:?}", to.phase()),
        ));
    }
    let mut vm = get::<Vm>(tx, &keys::vm(&m.vm_id))?;
    match to {
        PhaseChange::TargetChosen { target } => {
            if *target == m.source || !usable_target(tx, *target)? {
                return Ok(reject(
                    RejectCode::Invalid,
                    format!("node {target} cannot be the target"),
                ));
            }
            m.target = Some(*target);
        }
        PhaseChange::Migrating => {
            // The guest must still be where and what it was when the migration was asked for.
            match &mut vm {
                Some(v)
                    if v.epoch == m.source_epoch
                        && v.node == Some(m.source)
                        && v.state != VmState::Deleting =>
                {
                    v.state = VmState::Migrating;
                    v.updated_at = at;
                    v.version += 1;
                    put(tx, &keys::vm(&v.id), v)?;
                }
                _ => {
                    return Ok(reject(
                        RejectCode::StaleEpoch,
                        "the VM was moved, changed or deleted since the migration was asked for",
                    ))
                }
            }
        }
        PhaseChange::Switching {
            mode,
            total_ms,
            downtime_ms,
            bytes,
        } => {
            m.mode = Some(*mode);
            m.total_ms = Some(*total_ms);
            m.downtime_ms = *downtime_ms;
            m.bytes = Some(*bytes);
        }
        PhaseChange::Done => {
            let Some(target) = m.target else {
                return Ok(reject(RejectCode::Invalid, "no target was chosen"));
            };
            if let Some(v) = &mut vm {
                if v.epoch == m.source_epoch && v.node == Some(m.source) {
                    v.node = Some(target);
                    v.epoch = m.source_epoch + 1;
                    // A delete that came in meanwhile is carried out by the new owner.
                    if v.state != VmState::Deleting {
                        v.state = VmState::Running;
                    }
                    v.updated_at = at;
                    v.version += 1;
                    put(tx, &keys::vm(&v.id), v)?;
                }
            }
            finish(tx, &m, OperationState::Succeeded, None, at)?;
        }
        PhaseChange::RolledBack { error } => {
            if let Some(v) = &mut vm {
                // The guest never left the source; the source agent reports its real state.
                if v.state == VmState::Migrating && v.epoch == m.source_epoch {
                    v.state = VmState::Running;
                    v.updated_at = at;
                    v.version += 1;
                    put(tx, &keys::vm(&v.id), v)?;
                }
            }
            m.error = Some(error.clone());
            finish(tx, &m, OperationState::Failed, Some(error.clone()), at)?;
        }
    }
    m.phase = to.phase();
    m.updated_at = at;
    if m.phase.is_terminal() {
        tx.remove(&keys::active_migration(&m.vm_id))?;
    }
    put(tx, &keys::migration(id), &m)?;
    Ok(Response::Ok)
}

fn finish(
    tx: &dyn StateTx,
    m: &Migration,
    state: OperationState,
    error: Option<String>,
    at: Millis,
) -> Result<(), ApplyError> {
    if let Some(mut op) = get::<Operation>(tx, &keys::operation(&m.id))? {
        op.state = state;
        op.error = error;
        op.updated_at = at;
        put(tx, &keys::operation(&m.id), &op)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::apply::{apply, MemState};
    use crate::command::{Command, Request};

    fn run(s: &MemState, at: u64, c: Command) -> Response {
        apply(s, &Request::new(at, "t", c), at).unwrap()
    }

    fn setup() -> (MemState, Vm) {
        let s = MemState::default();
        for id in [1u64, 2] {
            let rec = NodeRecord {
                id,
                member: Default::default(),
                state: crate::model::NodeState::Up,
                schedulable: true,
                labels: Default::default(),
                joined_at: 0,
                updated_at: 0,
                removed: false,
                capacity: None,
            };
            put(&s, &keys::node(id), &rec).unwrap();
        }
        let vm = Vm {
            id: "vm1".into(),
            name: "vm1".into(),
            tenant: "t".into(),
            vcpus: 1,
            memory_mib: 128,
            disk_gib: 0,
            image: None,
            labels: Default::default(),
            node: Some(1),
            desired_state: DesiredState::Running,
            state: VmState::Running,
            ha: false,
            anti_affinity_group: None,
            placement: Default::default(),
            epoch: 3,
            created_at: 0,
            updated_at: 0,
            version: 7,
        };
        put(&s, &keys::vm("vm1"), &vm).unwrap();
        (s, vm)
    }

    fn request(target: Option<NodeId>) -> Command {
        let migration = Migration {
            id: "op1".into(),
            vm_id: "vm1".into(),
            tenant: String::new(),
            source: 0,
            requested_target: target,
            target: None,
            phase: MigrationPhase::Done,
            mode: None,
            reason: "user".into(),
            source_epoch: 0,
            bandwidth_mib_s: None,
            total_ms: None,
            downtime_ms: None,
            bytes: None,
            error: None,
            created_at: 0,
            updated_at: 0,
        };
        let operation = Operation {
            id: "op1".into(),
            kind: "vm.migrate".into(),
            tenant: "t".into(),
            target: "vm/vm1".into(),
            state: OperationState::Pending,
            error: None,
            created_at: 0,
            updated_at: 0,
        };
        Command::RequestMigration {
            migration,
            operation,
        }
    }

    fn advance(from: MigrationPhase, to: PhaseChange) -> Command {
        Command::AdvanceMigration {
            id: "op1".into(),
            from,
            to,
        }
    }

    fn mig(s: &MemState) -> Migration {
        get(s, &keys::migration("op1")).unwrap().unwrap()
    }

    #[test]
    fn a_migration_walks_its_phases_and_switches_the_owner() {
        use MigrationPhase as P;
        let (s, _) = setup();
        assert!(matches!(run(&s, 1, request(Some(2))), Response::Vm { .. }));
        let m = mig(&s);
        assert_eq!((m.phase, m.source, m.source_epoch), (P::Requested, 1, 3));
        // A second request while one is in progress is refused.
        assert!(matches!(
            run(&s, 2, request(None)),
            Response::Rejected {
                code: RejectCode::AlreadyExists,
                ..
            }
        ));
        assert_eq!(
            run(
                &s,
                3,
                advance(P::Requested, PhaseChange::TargetChosen { target: 2 })
            ),
            Response::Ok
        );
        // A stale controller repeating the step is refused by the compare-and-set.
        assert!(matches!(
            run(
                &s,
                4,
                advance(P::Requested, PhaseChange::TargetChosen { target: 2 })
            ),
            Response::Rejected {
                code: RejectCode::VersionMismatch,
                ..
            }
        ));
        run(&s, 5, advance(P::TargetChosen, PhaseChange::Migrating));
        let vm: Vm = get(&s, &keys::vm("vm1")).unwrap().unwrap();
        assert_eq!(
            (vm.state, vm.node, vm.epoch),
            (VmState::Migrating, Some(1), 3)
        );
        // Nothing else may re-place the VM while its guest is between hosts.
        let place = Command::PlaceVm {
            id: "vm1".into(),
            node: Some(2),
            expected_version: None,
        };
        assert!(matches!(
            run(&s, 5, place),
            Response::Rejected {
                code: RejectCode::Invalid,
                ..
            }
        ));
        // Switching cannot be rolled back: the guest already runs on the target.
        run(
            &s,
            6,
            advance(
                P::Migrating,
                PhaseChange::Switching {
                    mode: MigrationMode::Live,
                    total_ms: 900,
                    downtime_ms: Some(40),
                    bytes: 1 << 20,
                },
            ),
        );
        assert!(matches!(
            run(
                &s,
                7,
                advance(P::Switching, PhaseChange::RolledBack { error: "x".into() })
            ),
            Response::Rejected {
                code: RejectCode::Invalid,
                ..
            }
        ));
        run(&s, 8, advance(P::Switching, PhaseChange::Done));
        let vm: Vm = get(&s, &keys::vm("vm1")).unwrap().unwrap();
        assert_eq!(
            (vm.state, vm.node, vm.epoch),
            (VmState::Running, Some(2), 4)
        );
        let op: Operation = get(&s, &keys::operation("op1")).unwrap().unwrap();
        assert_eq!(op.state, OperationState::Succeeded);
        assert!(s.get(&keys::active_migration("vm1")).unwrap().is_none());
        assert_eq!(mig(&s).downtime_ms, Some(40));
    }

    #[test]
    fn a_rollback_leaves_the_vm_on_its_source_and_fails_the_operation() {
        use MigrationPhase as P;
        let (s, _) = setup();
        run(&s, 1, request(None));
        run(
            &s,
            2,
            advance(P::Requested, PhaseChange::TargetChosen { target: 2 }),
        );
        run(&s, 3, advance(P::TargetChosen, PhaseChange::Migrating));
        run(
            &s,
            4,
            advance(
                P::Migrating,
                PhaseChange::RolledBack {
                    error: "tunnel closed".into(),
                },
            ),
        );
        let vm: Vm = get(&s, &keys::vm("vm1")).unwrap().unwrap();
        assert_eq!(
            (vm.state, vm.node, vm.epoch),
            (VmState::Running, Some(1), 3)
        );
        let op: Operation = get(&s, &keys::operation("op1")).unwrap().unwrap();
        assert_eq!(op.state, OperationState::Failed);
        assert_eq!(op.error.as_deref(), Some("tunnel closed"));
        // The VM can be migrated again.
        assert!(s.get(&keys::active_migration("vm1")).unwrap().is_none());
    }

    #[test]
    fn requests_for_vms_that_cannot_move_are_refused() {
        let (s, mut vm) = setup();
        assert!(matches!(
            run(&s, 1, request(Some(1))),
            Response::Rejected {
                code: RejectCode::Invalid,
                ..
            }
        ));
        assert!(matches!(
            run(&s, 1, request(Some(9))),
            Response::Rejected {
                code: RejectCode::NotFound,
                ..
            }
        ));
        vm.state = VmState::Stopped;
        put(&s, &keys::vm("vm1"), &vm).unwrap();
        assert!(matches!(
            run(&s, 1, request(None)),
            Response::Rejected {
                code: RejectCode::Invalid,
                ..
            }
        ));
    }
}
