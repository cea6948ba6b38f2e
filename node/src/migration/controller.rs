//! The leader's migration controller: moves every migration through its phases (choose a target,
//! let the source go, switch the owner), starts migrations off drained nodes, cancels those an
//! undrain made pointless, and settles migrations whose source node died mid-way by asking the
//! target where the guest is. Every step is one compare-and-set command, so a new leader simply
//! continues from the committed phase.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use raft::migration::{Migration, MigrationMode, MigrationPhase, PhaseChange};
use raft::model::{
    DesiredState, NodeId, NodeRecord, NodeState, Operation, OperationState, Vm, VmState,
};
use raft::{Command, Request};
use tokio::sync::watch;

use super::executor::{ABORT, PROBE};
use super::{active, SharedEnv};

const TICK: Duration = Duration::from_millis(300);
/// A drain does not ask again for a VM whose last drain migration is younger than this, so a
/// VM that cannot move (no target) does not produce a stream of failed operations.
const DRAIN_RETRY: Duration = Duration::from_secs(15);

/// What the controller remembers between ticks (nothing of it is needed for correctness).
#[derive(Default)]
struct Memory {
    drain_requested: BTreeMap<String, std::time::Instant>,
}

/// The node a migration goes to when none was asked for: an up, schedulable node other than the
/// source, not holding a VM of the same anti-affinity group, with the fewest VMs (counting those
/// already migrating to it); ties go to the lowest id. One function, so the scheduler can take
/// over the choice.
pub fn choose_target(
    m: &Migration,
    vm: &Vm,
    nodes: &[NodeRecord],
    vms: &[Vm],
    migrations: &[Migration],
) -> Option<NodeId> {
    let mut load: BTreeMap<NodeId, usize> = BTreeMap::new();
    for v in vms {
        if let Some(n) = v.node {
            *load.entry(n).or_default() += 1;
        }
    }
    for o in migrations.iter().filter(|o| o.id != m.id) {
        if let Some(t) = o.target {
            *load.entry(t).or_default() += 1;
        }
    }
    let excluded: BTreeSet<NodeId> = match &vm.anti_affinity_group {
        Some(g) => vms
            .iter()
            .filter(|v| v.id != vm.id && v.anti_affinity_group.as_ref() == Some(g))
            .filter_map(|v| v.node)
            .collect(),
        None => BTreeSet::new(),
    };
    nodes
        .iter()
        .filter(|n| !n.removed && n.schedulable && n.state == NodeState::Up)
        .filter(|n| n.id != m.source && !excluded.contains(&n.id))
        .min_by_key(|n| (load.get(&n.id).copied().unwrap_or(0), n.id))
        .map(|n| n.id)
}

/// Runs while this process lives; acts only while this node leads.
pub async fn run(env: SharedEnv, raft: raft::Raft, mut shutdown: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut memory = Memory::default();
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => return,
        }
        if raft.metrics().borrow().current_leader != Some(env.me) {
            continue;
        }
        if let Err(e) = tick(&env, &mut memory).await {
            tracing::debug!(error = %e, "migration controller tick failed");
        }
    }
}

async fn propose(env: &SharedEnv, command: Command) -> Result<raft::Response, String> {
    let req = Request::new(api::now_ms(), format!("node:{}", env.me), command);
    env.cluster
        .write(req)
        .await
        .map(|(_, r)| r)
        .map_err(|e| e.to_string())
}

fn advance(m: &Migration, to: PhaseChange) -> Command {
    Command::AdvanceMigration {
        id: m.id.clone(),
        from: m.phase,
        to,
    }
}

async fn tick(env: &SharedEnv, memory: &mut Memory) -> Result<(), String> {
    let reader = &env.reader;
    let nodes = reader.nodes().map_err(|e| e.to_string())?;
    let vms = reader.vms().map_err(|e| e.to_string())?;
    let migrations = active(reader).map_err(|e| e.to_string())?;
    let node = |id: NodeId| nodes.iter().find(|n| n.id == id);
    let migrating_vms: BTreeSet<&str> = migrations.iter().map(|m| m.vm_id.as_str()).collect();

    // Drain: every running VM of an unschedulable node migrates away.
    for n in nodes.iter().filter(|n| !n.removed && !n.schedulable) {
        for vm in vms.iter().filter(|v| {
            v.node == Some(n.id)
                && v.state == VmState::Running
                && v.desired_state == DesiredState::Running
                && !migrating_vms.contains(v.id.as_str())
        }) {
            let recent = memory
                .drain_requested
                .get(&vm.id)
                .is_some_and(|t| t.elapsed() < DRAIN_RETRY);
            if recent {
                continue;
            }
            memory
                .drain_requested
                .insert(vm.id.clone(), std::time::Instant::now());
            let id = uuid::Uuid::new_v4().to_string();
            let cmd = Command::RequestMigration {
                migration: Migration {
                    id: id.clone(),
                    vm_id: vm.id.clone(),
                    tenant: vm.tenant.clone(),
                    source: n.id,
                    requested_target: None,
                    target: None,
                    phase: MigrationPhase::Requested,
                    mode: None,
                    reason: "drain".into(),
                    source_epoch: vm.epoch,
                    bandwidth_mib_s: None,
                    total_ms: None,
                    downtime_ms: None,
                    bytes: None,
                    error: None,
                    created_at: 0,
                    updated_at: 0,
                },
                operation: Operation {
                    id,
                    kind: "vm.migrate".into(),
                    tenant: vm.tenant.clone(),
                    target: format!("vm/{}", vm.id),
                    state: OperationState::Pending,
                    error: None,
                    created_at: 0,
                    updated_at: 0,
                },
            };
            tracing::info!(vm = %vm.id, node = n.id, "draining: migrating VM away");
            propose(env, cmd).await?;
        }
    }

    memory
        .drain_requested
        .retain(|_, t| t.elapsed() < DRAIN_RETRY);

    // One transfer at a time per source node: libvirt and the machine stay responsive and a
    // drain proceeds VM by VM.
    let mut busy: BTreeSet<NodeId> = migrations
        .iter()
        .filter(|m| m.phase.in_flight())
        .map(|m| m.source)
        .collect();
    for m in &migrations {
        let vm = vms.iter().find(|v| v.id == m.vm_id);
        match m.phase {
            MigrationPhase::Requested | MigrationPhase::TargetChosen => {
                let gone = match vm {
                    None => Some("the VM was deleted"),
                    Some(v) if v.node != Some(m.source) || v.epoch != m.source_epoch => {
                        Some("the VM was moved or changed meanwhile")
                    }
                    Some(v) if v.state == VmState::Deleting => Some("the VM is being deleted"),
                    Some(v) if v.desired_state != DesiredState::Running => {
                        Some("the VM is being stopped")
                    }
                    _ => None,
                };
                let undrained = m.reason == "drain"
                    && node(m.source).is_some_and(|n| n.schedulable && !n.removed);
                let cancel = gone.or(undrained.then_some("the node was undrained"));
                if let Some(why) = cancel {
                    propose(
                        env,
                        advance(m, PhaseChange::RolledBack { error: why.into() }),
                    )
                    .await?;
                    continue;
                }
                let Some(vm) = vm else { continue };
                if m.phase == MigrationPhase::Requested {
                    let target = m
                        .requested_target
                        .or_else(|| choose_target(m, vm, &nodes, &vms, &migrations));
                    let change = match target {
                        Some(target) => PhaseChange::TargetChosen { target },
                        None => PhaseChange::RolledBack {
                            error: "no other up and schedulable node can take the VM".into(),
                        },
                    };
                    propose(env, advance(m, change)).await?;
                } else if busy.insert(m.source) {
                    propose(env, advance(m, PhaseChange::Migrating)).await?;
                }
            }
            MigrationPhase::Switching => {
                propose(env, advance(m, PhaseChange::Done)).await?;
            }
            MigrationPhase::Migrating => {
                // The source agent drives this phase. Only when the source node died does the
                // leader settle it, by asking the target where the guest is.
                let source_dead =
                    node(m.source).is_none_or(|n| n.removed || n.state == NodeState::Down);
                if source_dead {
                    settle_orphan(env, m).await?;
                }
            }
            MigrationPhase::Done | MigrationPhase::RolledBack => {}
        }
    }
    Ok(())
}

/// A migration whose source died while `Migrating`: if the guest runs on the target the
/// migration completed (roll forward); otherwise it never left the source (roll back, removing
/// any paused copy the target holds).
async fn settle_orphan(env: &SharedEnv, m: &Migration) -> Result<(), String> {
    let Some(target) = m.target else {
        return Ok(());
    };
    let addr = env.peer_addr(target).await?;
    let answer = env
        .transport
        .call_extension(addr, PROBE, m.id.as_bytes().to_vec())
        .await
        .map_err(|e| format!("cannot probe node {target}: {e}"))?;
    let change = if answer == b"running" {
        PhaseChange::Switching {
            mode: if env.live {
                MigrationMode::Live
            } else {
                MigrationMode::Handoff
            },
            total_ms: 0,
            downtime_ms: None,
            bytes: 0,
        }
    } else {
        let _ = env
            .transport
            .call_extension(addr, ABORT, m.id.as_bytes().to_vec())
            .await;
        PhaseChange::RolledBack {
            error: format!("the source node {} went down mid-migration", m.source),
        }
    };
    tracing::warn!(vm = %m.vm_id, ?change, "settling a migration whose source died");
    propose(env, advance(m, change)).await.map(|_| ())
}
