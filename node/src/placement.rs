//! The leader's placement controller: finds VMs without a node (new VMs, and VMs the HA
//! controller took off a dead node), asks the [`crate::scheduler`] where they go, and commits
//! the decisions through Raft in batches (`Command::PlaceBatch`), each entry a compare-and-set
//! on the VM's version that bumps its epoch. Also the simulation behind
//! `POST /api/v1/scheduler/simulate`, which runs the same scheduler on the leader's replica
//! without committing anything.
//!
//! It runs on every node and acts only while that node leads. A VM that fits nowhere gets its
//! explanation stored once; it is tried again when the cluster changes (nodes, capacity, or
//! placed VMs), not on every tick.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use api::scheduler::{SimulateRequest, SimulateResult, SimulatedPlacement};
use raft::model::{NodeId, NodeRecord, Vm, VmState};
use raft::placement::{PlacementEntry, PlacementOutcome};
use raft::store::StateReader;
use raft::{Command, Request, Response};

use crate::control::NodeControl;
use crate::scheduler::{NodeLoad, NodeView, Policy, Scheduler, VmDemand};

/// Why a pass or a simulation failed.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("cannot read the replica: {0}")]
    Read(String),
    #[error("cannot commit placements: {0}")]
    Write(String),
    #[error("unexpected outcome of a placement batch: {0}")]
    Outcome(String),
    #[error("node {0} does not exist")]
    UnknownNode(String),
}

/// Settings of the controller.
#[derive(Debug, Clone, Copy)]
pub struct PlacementConfig {
    pub policy: Policy,
    /// Most placements per Raft entry.
    pub batch_size: usize,
    /// Passes happen at least this often, and at most this often when writes keep arriving.
    pub tick: Duration,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        PlacementConfig {
            policy: Policy::default(),
            batch_size: 500,
            tick: Duration::from_millis(250),
        }
    }
}

/// What the controller remembers between passes (leader only, in memory): VMs that fit
/// nowhere, with the cluster fingerprint under which that was decided.
#[derive(Debug, Default)]
pub struct Memory {
    unfit: HashMap<String, (u64, u64)>,
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassReport {
    pub placed: usize,
    pub unfit: usize,
    pub refused: usize,
}

/// The heartbeat loads known on this node: the leader's last heartbeat of each node (empty on
/// a follower, where the scheduler then weighs what the replicated state books on each node).
fn loads(ctl: &NodeControl) -> BTreeMap<NodeId, NodeLoad> {
    ctl.liveness
        .loads()
        .into_iter()
        .map(|(id, l)| {
            let load = NodeLoad {
                vcpus_used: l.vcpus_used,
                memory_used_mib: l.memory_used_mib,
                running_vms: u32::try_from(l.running_vms).unwrap_or(u32::MAX),
            };
            (id, load)
        })
        .collect()
}

/// Changes whenever something that could make an unfit VM fit changes.
fn fingerprint(nodes: &[NodeRecord], placed: &[(VmDemand, NodeId)]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for n in nodes {
        (n.id, n.schedulable, n.removed).hash(&mut h);
        format!("{:?}{:?}{:?}", n.state, n.capacity, n.labels).hash(&mut h);
    }
    placed.len().hash(&mut h);
    for (vm, node) in placed {
        (vm.vcpus, vm.memory_mib, vm.disk_gib, node).hash(&mut h);
    }
    h.finish()
}

/// A VM on its node.
type Placed = (VmDemand, NodeId);
/// A VM waiting for a node, with the version its placement must compare against.
type Waiting = (VmDemand, u64);

/// VMs split into those placed (with their node) and those waiting for one.
fn split(vms: &[Vm]) -> (Vec<Placed>, Vec<Waiting>) {
    let mut placed = Vec::new();
    let mut pending = Vec::new();
    for vm in vms {
        match vm.node {
            Some(n) => placed.push((VmDemand::from(vm), n)),
            None if vm.state != VmState::Deleting => pending.push((VmDemand::from(vm), vm.version)),
            None => {}
        }
    }
    (placed, pending)
}

/// One pass: place every pending VM that fits, in batches. Returns what it did.
pub async fn run_pass(
    ctl: &NodeControl,
    config: &PlacementConfig,
    memory: &mut Memory,
) -> Result<PassReport, PlacementError> {
    let read = |e: raft::store::StoreError| PlacementError::Read(e.to_string());
    let nodes = ctl.reader.nodes().map_err(read)?;
    let mut vms = ctl.reader.vms().map_err(read)?;
    // First come, first placed: a later VM never takes the room an earlier one was waiting for.
    vms.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    let (placed, pending) = split(&vms);
    let print = fingerprint(&nodes, &placed);
    let waiting: std::collections::HashSet<&str> =
        pending.iter().map(|(v, _)| v.id.as_str()).collect();
    memory
        .unfit
        .retain(|id, (_, p)| *p == print && waiting.contains(id.as_str()));
    let todo: Vec<(VmDemand, u64)> = pending
        .into_iter()
        .filter(|(vm, version)| memory.unfit.get(&vm.id).is_none_or(|(v, _)| v != version))
        .collect();
    let mut report = PassReport::default();
    if todo.is_empty() {
        return Ok(report);
    }
    let mut sched = Scheduler::new(
        nodes.iter().map(NodeView::from),
        &loads(ctl),
        placed.iter().map(|(v, n)| (v, *n)),
        config.policy,
    );
    let now = api::now_ms();
    for chunk in todo.chunks(config.batch_size.max(1)) {
        let placements: Vec<PlacementEntry> = chunk
            .iter()
            .map(|(vm, version)| {
                let mut d = sched.place(vm);
                d.explanation.at = now;
                PlacementEntry {
                    vm: d.vm,
                    node: d.node,
                    expected_version: *version,
                    explanation: d.explanation,
                }
            })
            .collect();
        let req = Request::new(
            now,
            format!("node:{}", ctl.id),
            Command::PlaceBatch { placements },
        );
        let (_, resp) = ctl
            .cluster
            .write(req)
            .await
            .map_err(|e| PlacementError::Write(e.to_string()))?;
        let Response::Placements(outcomes) = resp else {
            return Err(PlacementError::Outcome(format!("{resp:?}")));
        };
        for (o, (_, version)) in outcomes.iter().zip(chunk) {
            match o {
                PlacementOutcome::Placed { .. } => report.placed += 1,
                PlacementOutcome::NotPlaced { vm } => {
                    report.unfit += 1;
                    memory.unfit.insert(vm.clone(), (*version, print));
                }
                PlacementOutcome::Refused { vm, message, .. } => {
                    // Changed meanwhile; the next pass sees its new version.
                    report.refused += 1;
                    tracing::debug!(vm = %vm, %message, "placement refused");
                }
            }
        }
    }
    if report.placed + report.unfit > 0 {
        tracing::info!(
            placed = report.placed,
            unfit = report.unfit,
            refused = report.refused,
            "placement pass"
        );
    }
    Ok(report)
}

/// Runs until `shutdown` fires: a pass after each batch of applied writes (at most once per
/// tick) and at least once per tick, while this node leads.
pub async fn run(
    ctl: Arc<NodeControl>,
    config: PlacementConfig,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut applied = ctl.reader.applied_watch();
    let mut memory = Memory::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(config.tick) => {}
            r = applied.changed() => {
                if r.is_err() { return }
                // Let a burst of writes land before scanning.
                tokio::time::sleep(config.tick / 5).await;
            }
            _ = shutdown.changed() => return,
        }
        let leader = ctl.raft.metrics().borrow().current_leader;
        if leader != Some(ctl.id) {
            memory = Memory::default();
            continue;
        }
        if let Err(e) = run_pass(&ctl, &config, &mut memory).await {
            tracing::warn!(error = %e, "placement pass failed");
        }
    }
}

fn resolve(nodes: &[NodeRecord], name: &str) -> Option<NodeId> {
    nodes
        .iter()
        .filter(|n| !n.removed)
        .find(|n| n.member.name == name || n.id.to_string() == name)
        .map(|n| n.id)
}

/// What would happen, on this node's replica, without committing anything.
pub fn simulate(
    reader: &StateReader,
    policy: Policy,
    req: &SimulateRequest,
) -> Result<SimulateResult, PlacementError> {
    let read = |e: raft::store::StoreError| PlacementError::Read(e.to_string());
    let nodes = reader.nodes().map_err(read)?;
    let vms = reader.vms().map_err(read)?;
    simulate_on(&nodes, &vms, &BTreeMap::new(), policy, req)
}

/// The pure part of [`simulate`].
pub fn simulate_on(
    nodes: &[NodeRecord],
    vms: &[Vm],
    loads: &BTreeMap<NodeId, NodeLoad>,
    policy: Policy,
    req: &SimulateRequest,
) -> Result<SimulateResult, PlacementError> {
    let names: BTreeMap<NodeId, String> = nodes
        .iter()
        .map(|n| (n.id, n.member.name.clone()))
        .collect();
    let (mut placed, _) = split(vms);
    let mut views: Vec<NodeView> = nodes.iter().map(NodeView::from).collect();
    let mut moving: Vec<(VmDemand, Option<NodeId>)> = Vec::new();
    match req {
        SimulateRequest::Create { vms: new } => {
            for (i, spec) in new.iter().enumerate() {
                let node = match &spec.node {
                    Some(name) => Some(
                        resolve(nodes, name)
                            .ok_or_else(|| PlacementError::UnknownNode(name.clone()))?,
                    ),
                    None => None,
                };
                let demand = VmDemand {
                    id: spec
                        .name
                        .clone()
                        .unwrap_or_else(|| format!("new-{}", i + 1)),
                    tenant: spec.tenant.clone().unwrap_or_default(),
                    vcpus: spec.vcpus,
                    memory_mib: spec.memory_mib,
                    disk_gib: spec.disk_gib.unwrap_or(0),
                    constraints: raft::placement::PlacementConstraints {
                        node,
                        node_selector: spec.node_selector.clone().unwrap_or_default(),
                        affinity_group: spec.affinity_group.clone(),
                    },
                    anti_affinity_group: spec.anti_affinity_group.clone(),
                };
                moving.push((demand, None));
            }
        }
        SimulateRequest::Drain { node } => {
            let id =
                resolve(nodes, node).ok_or_else(|| PlacementError::UnknownNode(node.clone()))?;
            for v in views.iter_mut().filter(|v| v.id == id) {
                v.schedulable = false;
            }
            let (stay, go): (Vec<_>, Vec<_>) = placed.into_iter().partition(|(_, n)| *n != id);
            placed = stay;
            // A VM pinned to the drained node keeps its pin: it can go nowhere else, and its
            // explanation says so (required node elsewhere, the node itself drained).
            moving.extend(go.into_iter().map(|(vm, from)| (vm, Some(from))));
        }
    }
    let mut sched = Scheduler::new(views, loads, placed.iter().map(|(v, n)| (v, *n)), policy);
    let mut result = SimulateResult::default();
    for (vm, from) in &moving {
        let d = sched.place(vm);
        let name = |n: Option<NodeId>| n.and_then(|n| names.get(&n).cloned());
        let entry = SimulatedPlacement {
            vm: vm.id.clone(),
            from: *from,
            from_name: name(*from),
            to: d.node,
            to_name: name(d.node),
            explanation: api::scheduler::explanation_view(&d.explanation, &names),
        };
        if d.node.is_some() {
            result.placed.push(entry);
        } else {
            result.unplaced.push(entry);
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::scheduler::SimulatedVm;
    use raft::model::{DesiredState, Member, NodeState};
    use raft::placement::NodeCapacity;

    fn node(id: NodeId) -> NodeRecord {
        NodeRecord {
            id,
            member: Member {
                name: format!("n{id}"),
                api_addr: String::new(),
                peer_addr: String::new(),
            },
            state: NodeState::Up,
            schedulable: true,
            labels: Default::default(),
            joined_at: 0,
            updated_at: 0,
            removed: false,
            capacity: Some(NodeCapacity {
                vcpus: 4,
                memory_mib: 4096,
                disk_gib: None,
            }),
        }
    }

    fn vm(id: &str, node: Option<NodeId>, pin: Option<NodeId>) -> Vm {
        Vm {
            id: id.into(),
            name: id.into(),
            tenant: "t".into(),
            vcpus: 1,
            memory_mib: 512,
            disk_gib: 0,
            image: None,
            labels: Default::default(),
            node,
            desired_state: DesiredState::Running,
            state: VmState::Running,
            ha: false,
            anti_affinity_group: None,
            epoch: 1,
            created_at: 0,
            updated_at: 0,
            version: 1,
            placement: raft::placement::PlacementConstraints {
                node: pin,
                ..Default::default()
            },
        }
    }

    #[test]
    fn a_drain_moves_what_can_move_and_reports_what_cannot() {
        let nodes = [node(1), node(2), node(3)];
        let vms = [
            vm("a", Some(1), None),
            vm("b", Some(1), Some(1)),
            vm("c", Some(2), None),
        ];
        let req = SimulateRequest::Drain { node: "n1".into() };
        let r = simulate_on(&nodes, &vms, &BTreeMap::new(), Policy::default(), &req).unwrap();
        assert_eq!(r.placed.len(), 1);
        assert_eq!(r.placed[0].vm, "a");
        assert_eq!(r.placed[0].from_name.as_deref(), Some("n1"));
        // "c" books node 2, so spread sends "a" to node 3.
        assert_eq!(r.placed[0].to, Some(3));
        assert_eq!(r.unplaced.len(), 1);
        let pinned = &r.unplaced[0].explanation;
        assert_eq!(pinned.filtered.get("required_node"), Some(&2));
        assert_eq!(pinned.filtered.get("unschedulable"), Some(&1));
        let unknown = SimulateRequest::Drain { node: "n9".into() };
        assert!(matches!(
            simulate_on(&nodes, &vms, &BTreeMap::new(), Policy::default(), &unknown),
            Err(PlacementError::UnknownNode(_))
        ));
    }

    #[test]
    fn a_create_simulation_books_each_vm_before_the_next() {
        let nodes = [node(1)];
        let new = |name: &str| SimulatedVm {
            name: Some(name.into()),
            tenant: None,
            vcpus: 8,
            memory_mib: 1024,
            disk_gib: None,
            node: None,
            node_selector: None,
            anti_affinity_group: None,
            affinity_group: None,
        };
        let policy = Policy {
            cpu_overcommit: 4.0,
            ..Policy::default()
        };
        // 4 CPUs at 4.0 take 16 vCPUs: two VMs of 8 fit, the third does not.
        let req = SimulateRequest::Create {
            vms: vec![new("x"), new("y"), new("z")],
        };
        let r = simulate_on(&nodes, &[], &BTreeMap::new(), policy, &req).unwrap();
        let placed: Vec<&str> = r.placed.iter().map(|p| p.vm.as_str()).collect();
        assert_eq!(placed, ["x", "y"]);
        assert_eq!(r.unplaced[0].vm, "z");
        assert_eq!(r.unplaced[0].explanation.filtered.get("cpu"), Some(&1));
    }
}
