//! Tests of the site-move saga: every transition on its own, then every interleaving of the two
//! sites' steps, failures, stale controllers and delayed or repeated messages that a bounded
//! search reaches, checking that the VM is live at exactly one site.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};

use super::*;
use crate::apply::{apply, MemState};
use crate::command::Request;
use crate::federation::{CatalogChange, CatalogObject, SiteIdentity, SiteLink};
use crate::model::{Member, Tenant, Usage};

const SRC: &str = "ssssss";
const TGT: &str = "tttttt";
const VM: &str = "ssssss-vm1";
const TENANT: &str = "ssssss-t";
const MOVE: &str = "ssssss-move1";

fn run(st: &MemState, cmd: Command) -> Response {
    // A fixed index and time: the exploration below compares states, not histories.
    apply(st, &Request::new(10, "node:1", cmd), 1).unwrap()
}

fn ok(r: Response) {
    assert!(
        matches!(
            r,
            Response::Ok | Response::Vm { .. } | Response::Node(_) | Response::Tenant(_)
        ),
        "{r:?}"
    );
}

fn rejected(r: &Response) -> Option<RejectCode> {
    match r {
        Response::Rejected { code, .. } => Some(*code),
        _ => None,
    }
}

fn link(id: &str, name: &str) -> Command {
    Command::LinkSite {
        link: SiteLink {
            site: SiteIdentity {
                id: id.into(),
                name: name.into(),
            },
            ca_cert_pem: "ca".into(),
            addrs: vec!["127.0.0.1:1".into()],
            created_at: 0,
            updated_at: 0,
        },
        token: None,
    }
}

fn tenant(max_vms: Option<u64>) -> Tenant {
    Tenant {
        id: TENANT.into(),
        name: "acme".into(),
        quota: crate::model::Quota {
            max_vms,
            ..Default::default()
        },
        usage: Default::default(),
        created_at: 0,
        updated_at: 0,
        version: 0,
    }
}

fn op(id: &str, kind: &str) -> Operation {
    Operation {
        id: id.into(),
        kind: kind.into(),
        tenant: TENANT.into(),
        target: format!("vm/{VM}"),
        state: OperationState::Pending,
        error: None,
        created_at: 0,
        updated_at: 0,
    }
}

fn register(st: &MemState, name: &str) {
    ok(run(
        st,
        Command::RegisterNode {
            member: Member {
                name: name.into(),
                api_addr: "a".into(),
                peer_addr: "p".into(),
            },
        },
    ));
}

fn vm_record() -> Vm {
    Vm {
        id: VM.into(),
        name: "web".into(),
        tenant: TENANT.into(),
        vcpus: 1,
        memory_mib: 128,
        disk_gib: 1,
        image: None,
        labels: Default::default(),
        node: Some(1),
        desired_state: DesiredState::Running,
        state: VmState::Pending,
        ha: false,
        anti_affinity_group: None,
        epoch: 0,
        created_at: 0,
        updated_at: 0,
        version: 0,
        placement: Default::default(),
    }
}

/// The source site: linked to the target, node 1 running the VM at epoch 1.
fn source() -> MemState {
    let st = MemState::default();
    ok(run(&st, link(TGT, "edge")));
    register(&st, "s1");
    ok(run(
        &st,
        Command::CreateTenant {
            tenant: tenant(None),
        },
    ));
    ok(run(
        &st,
        Command::CreateVm {
            vm: vm_record(),
            operation: op("create", "vm.create"),
        },
    ));
    ok(run(&st, report(VmState::Running)));
    st
}

fn report(state: VmState) -> Command {
    Command::ReportVm {
        id: VM.into(),
        node: 1,
        epoch: 1,
        state,
        error: None,
    }
}

/// The target site: linked to the source, knows the tenant from the source's catalog.
fn target(max_vms: Option<u64>) -> MemState {
    let st = MemState::default();
    ok(run(&st, link(SRC, "hq")));
    register(&st, "t1");
    ok(run(
        &st,
        Command::ApplyCatalog {
            site: SRC.into(),
            from: 0,
            to: 5,
            head: 5,
            latency_ms: 1,
            reset: false,
            stale_keys: vec![],
            changes: vec![CatalogChange {
                key: format!("t/{TENANT}"),
                object: Some(CatalogObject::Tenant(tenant(max_vms))),
            }],
        },
    ));
    st
}

fn request() -> Command {
    Command::RequestSiteMove {
        site_move: SiteMove {
            id: MOVE.into(),
            vm_id: VM.into(),
            tenant: String::new(),
            source_site: SRC.into(),
            target_site: TGT.into(),
            phase: MovePhase::Requested,
            previous_desired: DesiredState::Stopped,
            source_node: None,
            disk: None,
            target_node: None,
            reason: None,
            created_at: 0,
            updated_at: 0,
        },
        operation: op(MOVE, OPERATION_KIND),
    }
}

fn advance(from: MovePhase, to: MoveChange) -> Command {
    Command::AdvanceSiteMove {
        id: MOVE.into(),
        from,
        to,
    }
}

fn digest() -> DiskDigest {
    DiskDigest {
        size: 1 << 30,
        sha256: "ab".repeat(32),
    }
}

fn copying() -> MoveChange {
    MoveChange::Copying {
        source_node: Some(1),
        disk: Some(digest()),
    }
}

/// What the source controller sends the target to begin the import.
fn begin(src: &MemState) -> Command {
    let m = move_at(src).unwrap();
    let mut vm: Vm = get(src, &keys::vm(VM)).unwrap().unwrap();
    vm.desired_state = m.previous_desired;
    Command::BeginSiteImport {
        import: SiteImport {
            id: MOVE.into(),
            vm_id: VM.into(),
            vm: Some(vm),
            source_site: SRC.into(),
            node: 1,
            disk: m.disk,
            phase: ImportPhase::Importing,
            reason: None,
            created_at: 0,
            updated_at: 0,
        },
    }
}

fn settle(to: ImportSettle) -> Command {
    Command::SettleSiteImport {
        id: MOVE.into(),
        vm_id: VM.into(),
        to,
    }
}

fn move_at(st: &MemState) -> Option<SiteMove> {
    get(st, &move_key(MOVE)).unwrap()
}
fn import_at(st: &MemState) -> Option<SiteImport> {
    get(st, &import_key(MOVE)).unwrap()
}
fn vm_at(st: &MemState) -> Option<Vm> {
    get(st, &keys::vm(VM)).unwrap()
}
fn foreign_usage(st: &MemState) -> Usage {
    get(st, &crate::federation::foreign_usage_key(TENANT))
        .unwrap()
        .unwrap_or_default()
}

#[test]
fn a_requested_move_locks_the_vm_against_other_actions() {
    let src = source();
    ok(run(&src, request()));
    let locked = [
        Command::SetVmDesired {
            id: VM.into(),
            desired: DesiredState::Stopped,
            operation: op("o2", "vm.stop"),
            expected_version: None,
        },
        Command::DeleteVm {
            id: VM.into(),
            operation: op("o3", "vm.delete"),
            expected_version: None,
        },
        Command::PlaceVm {
            id: VM.into(),
            node: Some(1),
            expected_version: None,
        },
        Command::RequestMigration {
            migration: crate::migration::Migration {
                id: "o4".into(),
                vm_id: VM.into(),
                tenant: TENANT.into(),
                source: 1,
                requested_target: None,
                target: None,
                phase: crate::migration::MigrationPhase::Requested,
                mode: None,
                reason: "user".into(),
                source_epoch: 1,
                bandwidth_mib_s: None,
                total_ms: None,
                downtime_ms: None,
                bytes: None,
                error: None,
                created_at: 0,
                updated_at: 0,
            },
            operation: op("o4", "vm.migrate"),
        },
        request(),
    ];
    for cmd in locked {
        let name = cmd.name();
        assert_eq!(
            rejected(&run(&src, cmd)),
            Some(RejectCode::AlreadyExists),
            "{name} must be refused while the VM moves"
        );
    }
    let batch = Command::PlaceBatch {
        placements: vec![crate::placement::PlacementEntry {
            vm: VM.into(),
            node: Some(1),
            expected_version: vm_at(&src).unwrap().version,
            explanation: Default::default(),
        }],
    };
    let Response::Placements(out) = run(&src, batch) else {
        panic!("not a batch outcome")
    };
    assert!(matches!(
        out[0],
        crate::placement::PlacementOutcome::Refused {
            code: RejectCode::AlreadyExists,
            ..
        }
    ));
    // The agent still reports what it sees.
    ok(run(&src, report(VmState::Running)));
    let m = move_at(&src).unwrap();
    assert_eq!(m.previous_desired, DesiredState::Running);
    assert_eq!(m.tenant, TENANT);
}

#[test]
fn a_move_needs_a_linked_target_and_a_vm_that_is_not_moving_or_being_deleted() {
    let src = source();
    let mut unlinked = request();
    if let Command::RequestSiteMove { site_move, .. } = &mut unlinked {
        site_move.target_site = "zzzzzz".into();
    }
    assert_eq!(rejected(&run(&src, unlinked)), Some(RejectCode::NotFound));
    let mut same = request();
    if let Command::RequestSiteMove { site_move, .. } = &mut same {
        site_move.target_site = SRC.into();
    }
    assert_eq!(rejected(&run(&src, same)), Some(RejectCode::Invalid));
    ok(run(
        &src,
        Command::DeleteVm {
            id: VM.into(),
            operation: op("del", "vm.delete"),
            expected_version: None,
        },
    ));
    assert_eq!(rejected(&run(&src, request())), Some(RejectCode::Invalid));
}

#[test]
fn each_source_transition_is_a_compare_and_set_on_the_phase() {
    let src = source();
    ok(run(&src, request()));
    // Skipping a phase, or moving from a phase the move is not in, is refused.
    assert_eq!(
        rejected(&run(&src, advance(MovePhase::Requested, copying()))),
        Some(RejectCode::Invalid)
    );
    assert_eq!(
        rejected(&run(&src, advance(MovePhase::Stopping, copying()))),
        Some(RejectCode::VersionMismatch)
    );
    ok(run(
        &src,
        advance(MovePhase::Requested, MoveChange::Stopping),
    ));
    assert_eq!(vm_at(&src).unwrap().desired_state, DesiredState::Stopped);
    // A second controller repeating the step loses the compare-and-set.
    assert_eq!(
        rejected(&run(
            &src,
            advance(MovePhase::Requested, MoveChange::Stopping)
        )),
        Some(RejectCode::VersionMismatch)
    );
    // The disk is copied only once the guest is off on the node named.
    assert_eq!(
        rejected(&run(&src, advance(MovePhase::Stopping, copying()))),
        Some(RejectCode::StaleEpoch)
    );
    ok(run(&src, report(VmState::Stopped)));
    let elsewhere = MoveChange::Copying {
        source_node: Some(2),
        disk: None,
    };
    assert_eq!(
        rejected(&run(&src, advance(MovePhase::Stopping, elsewhere))),
        Some(RejectCode::StaleEpoch)
    );
    ok(run(&src, advance(MovePhase::Stopping, copying())));
    assert_eq!(move_at(&src).unwrap().disk, Some(digest()));
    ok(run(
        &src,
        advance(
            MovePhase::Copying,
            MoveChange::Committing { target_node: 1 },
        ),
    ));
    // Past the decision point there is no way back.
    assert_eq!(
        rejected(&run(
            &src,
            advance(
                MovePhase::Committing,
                MoveChange::RolledBack {
                    reason: "late".into()
                }
            )
        )),
        Some(RejectCode::Invalid)
    );
    ok(run(&src, advance(MovePhase::Committing, MoveChange::Done)));
    // The source's copy goes through the delete path: the agent removes domain and disk.
    let vm = vm_at(&src).unwrap();
    assert_eq!(vm.state, VmState::Deleting);
    let t: Tenant = get(&src, &keys::tenant(TENANT)).unwrap().unwrap();
    assert_eq!(t.usage.vms, 0, "the quota is released at the source");
    assert_eq!(active_move(&src, VM).unwrap(), None);
    let op: Operation = get(&src, &keys::operation(MOVE)).unwrap().unwrap();
    assert_eq!(op.state, OperationState::Succeeded);
    // Once its agent purged it, nothing of the VM is left at the source.
    ok(run(
        &src,
        Command::PurgeVm {
            id: VM.into(),
            epoch: vm.epoch,
        },
    ));
    assert_eq!(vm_at(&src), None);
    assert_eq!(
        get::<String>(&src, &keys::vm_name(TENANT, "web")).unwrap(),
        None
    );
}

#[test]
fn a_rollback_restores_what_the_vm_wanted_and_unlocks_it() {
    let src = source();
    ok(run(&src, request()));
    ok(run(
        &src,
        advance(MovePhase::Requested, MoveChange::Stopping),
    ));
    ok(run(&src, report(VmState::Stopped)));
    ok(run(&src, advance(MovePhase::Stopping, copying())));
    ok(run(
        &src,
        advance(
            MovePhase::Copying,
            MoveChange::RolledBack {
                reason: "link down for 60 s".into(),
            },
        ),
    ));
    let vm = vm_at(&src).unwrap();
    assert_eq!(vm.desired_state, DesiredState::Running);
    assert_eq!(active_move(&src, VM).unwrap(), None);
    let m = move_at(&src).unwrap();
    assert_eq!(m.phase, MovePhase::RolledBack);
    assert_eq!(m.reason.as_deref(), Some("link down for 60 s"));
    let finished: Operation = get(&src, &keys::operation(MOVE)).unwrap().unwrap();
    assert_eq!(finished.state, OperationState::Failed);
    // Unlocked: the VM takes actions again.
    assert!(rejected(&run(
        &src,
        Command::SetVmDesired {
            id: VM.into(),
            desired: DesiredState::Stopped,
            operation: op("o9", "vm.stop"),
            expected_version: None,
        }
    ))
    .is_none());
}

#[test]
fn an_unplaced_vm_leaves_the_source_at_once() {
    let src = MemState::default();
    ok(run(&src, link(TGT, "edge")));
    ok(run(
        &src,
        Command::CreateTenant {
            tenant: tenant(None),
        },
    ));
    let mut vm = vm_record();
    vm.node = None;
    ok(run(
        &src,
        Command::CreateVm {
            vm,
            operation: op("create", "vm.create"),
        },
    ));
    ok(run(&src, request()));
    ok(run(
        &src,
        advance(MovePhase::Requested, MoveChange::Stopping),
    ));
    ok(run(
        &src,
        advance(
            MovePhase::Stopping,
            MoveChange::Copying {
                source_node: None,
                disk: None,
            },
        ),
    ));
    ok(run(
        &src,
        advance(
            MovePhase::Copying,
            MoveChange::Committing { target_node: 1 },
        ),
    ));
    ok(run(&src, advance(MovePhase::Committing, MoveChange::Done)));
    assert_eq!(vm_at(&src), None);
}

/// The source advanced to `Copying`, ready to begin the import.
fn copying_source() -> MemState {
    let src = source();
    ok(run(&src, request()));
    ok(run(
        &src,
        advance(MovePhase::Requested, MoveChange::Stopping),
    ));
    ok(run(&src, report(VmState::Stopped)));
    ok(run(&src, advance(MovePhase::Stopping, copying())));
    src
}

#[test]
fn the_target_checks_and_reserves_everything_at_begin_so_import_cannot_fail() {
    let src = copying_source();
    // A tenant the target does not know is refused.
    let unknown = MemState::default();
    register(&unknown, "t1");
    assert_eq!(
        rejected(&run(&unknown, begin(&src))),
        Some(RejectCode::NotFound)
    );
    // A full quota is refused.
    let full = target(Some(0));
    assert_eq!(
        rejected(&run(&full, begin(&src))),
        Some(RejectCode::QuotaExceeded)
    );
    let tgt = target(Some(1));
    ok(run(&tgt, begin(&src)));
    assert_eq!(foreign_usage(&tgt).vms, 1, "the quota is reserved at begin");
    assert_eq!(vm_at(&tgt), None, "no VM exists before the import settles");
    // A retried begin is the same import.
    ok(run(&tgt, begin(&src)));
    assert_eq!(foreign_usage(&tgt).vms, 1);
    ok(run(&tgt, settle(ImportSettle::Imported)));
    let vm = vm_at(&tgt).unwrap();
    assert_eq!(vm.id, VM, "the VM keeps its id");
    assert_eq!(
        (vm.node, vm.epoch, vm.state, vm.desired_state),
        (Some(1), 1, VmState::Scheduled, DesiredState::Running)
    );
    assert_eq!(foreign_usage(&tgt).vms, 1);
    assert_eq!(active_move(&tgt, VM).unwrap(), None);
    // Settling again the same way is a retry; the other way is refused.
    ok(run(&tgt, settle(ImportSettle::Imported)));
    assert_eq!(
        rejected(&run(
            &tgt,
            settle(ImportSettle::Aborted {
                reason: "late".into()
            })
        )),
        Some(RejectCode::VersionMismatch)
    );
    // A begin arriving now (a stale controller) does not start a second import.
    assert_eq!(
        rejected(&run(&tgt, begin(&src))),
        Some(RejectCode::AlreadyExists)
    );
}

#[test]
fn an_abort_releases_the_reservation_and_outlives_a_delayed_begin() {
    let src = copying_source();
    let tgt = target(None);
    ok(run(&tgt, begin(&src)));
    ok(run(
        &tgt,
        settle(ImportSettle::Aborted {
            reason: "rolled back".into(),
        }),
    ));
    assert_eq!(foreign_usage(&tgt), Usage::default());
    assert_eq!(
        get::<String>(&tgt, &keys::vm_name(TENANT, "web")).unwrap(),
        None
    );
    assert_eq!(active_move(&tgt, VM).unwrap(), None);

    // An abort that overtakes its begin leaves a tombstone.
    let tgt = target(None);
    ok(run(
        &tgt,
        settle(ImportSettle::Aborted {
            reason: "rolled back".into(),
        }),
    ));
    assert_eq!(
        rejected(&run(&tgt, begin(&src))),
        Some(RejectCode::AlreadyExists)
    );
    assert_eq!(foreign_usage(&tgt), Usage::default());
    assert_eq!(
        rejected(&run(&tgt, settle(ImportSettle::Imported))),
        Some(RejectCode::VersionMismatch)
    );
}

// ---- Interleavings ------------------------------------------------------------------------

/// A message from the source's controller to the target site, in flight.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Msg {
    Begin,
    Commit,
    Abort,
}

#[derive(Clone)]
struct World {
    src: BTreeMap<Vec<u8>, Vec<u8>>,
    tgt: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Messages sent and not yet delivered (each may also be delivered again, once).
    in_flight: Vec<Msg>,
    redelivered: Vec<Msg>,
    /// Source commands already issued, which a stale controller may issue again.
    issued: Vec<Command>,
    replayed: usize,
    failures: usize,
    /// The begin as the controller sent it (a delayed copy carries what it carried then).
    begin: Option<Command>,
}

fn mem(map: &BTreeMap<Vec<u8>, Vec<u8>>) -> MemState {
    MemState {
        map: std::cell::RefCell::new(map.clone()),
    }
}

/// The state that matters: everything but the audit log and the change feed, which record
/// the path taken rather than where it led.
fn fingerprint(w: &World) -> Vec<u8> {
    let strip = |m: &BTreeMap<Vec<u8>, Vec<u8>>| -> Vec<(Vec<u8>, Vec<u8>)> {
        m.iter()
            .filter(|(k, _)| {
                !k.starts_with(b"a/") && !k.starts_with(b"f/x") && k.as_slice() != keys::AUDIT_HEAD
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let mut in_flight = w.in_flight.clone();
    in_flight.sort();
    let mut redelivered = w.redelivered.clone();
    redelivered.sort();
    format!(
        "{:?}|{:?}|{:?}|{:?}|{}|{}|{}",
        strip(&w.src),
        strip(&w.tgt),
        in_flight.iter().map(msg_name).collect::<Vec<_>>(),
        redelivered.iter().map(msg_name).collect::<Vec<_>>(),
        w.issued.len(),
        w.replayed,
        w.failures,
    )
    .into_bytes()
}

fn msg_name(m: &Msg) -> &'static str {
    match m {
        Msg::Begin => "begin",
        Msg::Commit => "commit",
        Msg::Abort => "abort",
    }
}

impl World {
    fn new() -> World {
        World {
            src: source().map.into_inner(),
            tgt: target(None).map.into_inner(),
            in_flight: vec![],
            redelivered: vec![],
            issued: vec![],
            replayed: 0,
            failures: 0,
            begin: None,
        }
    }

    fn on_src(&mut self, cmd: Command) -> Response {
        let st = mem(&self.src);
        let r = run(&st, cmd.clone());
        self.src = st.map.into_inner();
        if matches!(cmd, Command::AdvanceSiteMove { .. }) {
            self.issued.push(cmd);
        }
        r
    }

    fn on_tgt(&mut self, msg: &Msg) {
        let cmd = match msg {
            Msg::Begin => self
                .begin
                .clone()
                .expect("a begin is sent before it arrives"),
            Msg::Commit => settle(ImportSettle::Imported),
            Msg::Abort => settle(ImportSettle::Aborted {
                reason: "rolled back".into(),
            }),
        };
        let st = mem(&self.tgt);
        run(&st, cmd);
        self.tgt = st.map.into_inner();
    }

    fn send(&mut self, msg: Msg) {
        if msg == Msg::Begin && self.begin.is_none() {
            self.begin = Some(begin(&mem(&self.src)));
        }
        if !self.in_flight.contains(&msg) {
            self.in_flight.push(msg);
        }
    }

    /// One step of an honest controller (any leader: it decides from committed state only).
    /// Returns false when it has nothing to do.
    fn controller_step(&mut self) -> bool {
        let src = mem(&self.src);
        let tgt = mem(&self.tgt);
        let Some(m) = move_at(&src) else {
            self.on_src(request());
            return true;
        };
        let imp = import_at(&tgt).map(|i| i.phase);
        match m.phase {
            MovePhase::Requested => {
                self.on_src(advance(MovePhase::Requested, MoveChange::Stopping));
            }
            MovePhase::Stopping => {
                let vm = vm_at(&src).unwrap();
                if vm.state == VmState::Stopped {
                    self.on_src(advance(MovePhase::Stopping, copying()));
                } else {
                    // The agent stops the guest and reports it.
                    self.on_src(report(VmState::Stopped));
                }
            }
            MovePhase::Copying => match imp {
                // The controller asks the target, which answers from its committed state.
                Some(ImportPhase::Importing) => {
                    self.on_src(advance(
                        MovePhase::Copying,
                        MoveChange::Committing { target_node: 1 },
                    ));
                }
                Some(_) => {
                    // The target refuses the import (a tombstone cannot exist before the
                    // source rolled back, so this is unreachable; roll back to be safe).
                    self.on_src(advance(
                        MovePhase::Copying,
                        MoveChange::RolledBack {
                            reason: "target refused".into(),
                        },
                    ));
                }
                None if self.in_flight.contains(&Msg::Begin) => return false,
                None => self.send(Msg::Begin),
            },
            MovePhase::Committing => match imp {
                Some(ImportPhase::Imported) => {
                    self.on_src(advance(MovePhase::Committing, MoveChange::Done));
                }
                _ if self.in_flight.contains(&Msg::Commit) => return false,
                _ => self.send(Msg::Commit),
            },
            MovePhase::RolledBack => {
                if matches!(imp, Some(ImportPhase::Aborted)) || self.in_flight.contains(&Msg::Abort)
                {
                    return false;
                }
                self.send(Msg::Abort);
            }
            MovePhase::Done => return false,
        }
        true
    }

    /// Every next world: the controller's step, a failure that rolls back, a message
    /// delivered (or delivered again), a stale controller repeating an earlier command.
    fn successors(&self) -> Vec<World> {
        let mut out = Vec::new();
        let mut w = self.clone();
        if w.controller_step() {
            out.push(w);
        }
        if self.failures == 0 {
            if let Some(m) = move_at(&mem(&self.src)) {
                let mut w = self.clone();
                let r = w.on_src(advance(
                    m.phase,
                    MoveChange::RolledBack {
                        reason: "link down too long".into(),
                    },
                ));
                w.failures += 1;
                if rejected(&r).is_none() {
                    out.push(w);
                }
            }
        }
        for i in 0..self.in_flight.len() {
            let mut w = self.clone();
            let msg = w.in_flight.remove(i);
            w.on_tgt(&msg);
            w.redelivered.push(msg);
            out.push(w);
        }
        for i in 0..self.redelivered.len() {
            let mut w = self.clone();
            let msg = w.redelivered.remove(i);
            w.on_tgt(&msg);
            out.push(w);
        }
        if self.replayed == 0 {
            for cmd in &self.issued {
                let mut w = self.clone();
                w.on_src(cmd.clone());
                w.replayed += 1;
                out.push(w);
            }
        }
        out
    }

    /// Runs the honest controller and delivers every message until nothing changes.
    fn settle(&self) -> World {
        let mut w = self.clone();
        for _ in 0..100 {
            let mut progressed = w.controller_step();
            while let Some(msg) = w.in_flight.pop() {
                w.on_tgt(&msg);
                progressed = true;
            }
            // Late duplicates arrive too.
            while let Some(msg) = w.redelivered.pop() {
                w.on_tgt(&msg);
            }
            if !progressed {
                return w;
            }
        }
        panic!("the saga did not settle");
    }
}

/// How many sites hold the VM live, and whether the move is inside its commit window.
fn live_sites(w: &World) -> (usize, bool) {
    let src = mem(&w.src);
    let tgt = mem(&w.tgt);
    let phase = move_at(&src).map(|m| m.phase);
    let at_source = vm_at(&src).is_some_and(|v| v.state != VmState::Deleting)
        && !phase.is_some_and(MovePhase::handed_off);
    let at_target = vm_at(&tgt).is_some();
    let window = phase == Some(MovePhase::Committing)
        && import_at(&tgt).map(|i| i.phase) != Some(ImportPhase::Imported);
    (usize::from(at_source) + usize::from(at_target), window)
}

fn check_settled(w: &World) {
    let src = mem(&w.src);
    let tgt = mem(&w.tgt);
    let m = move_at(&src).unwrap();
    assert!(m.phase.is_terminal(), "settled at {:?}", m.phase);
    assert_eq!(active_move(&src, VM).unwrap(), None);
    assert_eq!(active_move(&tgt, VM).unwrap(), None);
    match m.phase {
        MovePhase::Done => {
            let vm = vm_at(&tgt).unwrap();
            assert_eq!(vm.id, VM);
            assert_eq!(vm.desired_state, DesiredState::Running);
            assert_eq!(foreign_usage(&tgt).vms, 1);
            assert!(vm_at(&src).is_none_or(|v| v.state == VmState::Deleting));
        }
        _ => {
            assert_eq!(vm_at(&tgt), None);
            assert_eq!(
                foreign_usage(&tgt),
                Usage::default(),
                "no leaked reservation"
            );
            assert_eq!(
                get::<String>(&tgt, &keys::vm_name(TENANT, "web")).unwrap(),
                None
            );
            let vm = vm_at(&src).unwrap();
            assert_eq!(vm.desired_state, DesiredState::Running, "restored");
        }
    }
}

#[test]
fn in_every_interleaving_the_vm_is_live_at_exactly_one_site() {
    let mut seen = HashSet::new();
    let mut stack = vec![World::new()];
    let (mut explored, mut done, mut rolled_back) = (0usize, 0usize, 0usize);
    while let Some(w) = stack.pop() {
        if !seen.insert(fingerprint(&w)) {
            continue;
        }
        explored += 1;
        let (live, window) = live_sites(&w);
        assert!(live <= 1, "the VM is live at two sites");
        if !window {
            assert_eq!(live, 1, "the VM is live nowhere outside the commit window");
        }
        // Whatever happened so far, honest controllers and delivered messages finish it.
        let settled = w.settle();
        check_settled(&settled);
        assert_eq!(live_sites(&settled), (1, false));
        match move_at(&mem(&settled.src)).map(|m| m.phase) {
            Some(MovePhase::Done) => done += 1,
            _ => rolled_back += 1,
        }
        stack.extend(w.successors());
    }
    println!("explored {explored} states: {done} settle done, {rolled_back} roll back");
    assert!(explored > 50, "the search explored only {explored} states");
    assert!(done > 0 && rolled_back > 0);
}
