//! The scheduler: where each VM should run, and why. Pure: no I/O, no clock, no randomness, so
//! the leader's placement controller, the simulation endpoint and the benchmark all call the
//! same code, and tests exercise it as data.
//!
//! A decision runs filters (node up, schedulable, capacity known, required node, node selector,
//! CPU, memory and disk with overcommit ratios, anti-affinity, affinity) and then weighs the
//! remaining nodes (spread or pack, plus the node's current load as its heartbeats report it).
//! The highest score wins; ties go to the lowest node id. Every decision carries an
//! explanation listing each node's verdict (truncated for large clusters, with counts per
//! filter so nothing is silently dropped).
//!
//! A [`Scheduler`] is built from the current state and then asked for decisions one VM at a
//! time; each decision is booked into its state before the next one, so a batch accounts for
//! the VMs placed earlier in the same batch and equals the same VMs placed one by one.

use std::collections::{BTreeMap, HashMap};

use raft::model::{NodeId, NodeRecord, NodeState, Vm};
use raft::placement::{
    FilterKind, NodeCapacity, NodeVerdict, PlacementConstraints, PlacementExplanation, Verdict,
};
use serde::{Deserialize, Serialize};

#[cfg(test)]
mod tests;

/// What a node's agent last reported it actually uses (heartbeats). Used for weighting only:
/// capacity checks use the resources the replicated state books for placed VMs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLoad {
    pub vcpus_used: u64,
    pub memory_used_mib: u64,
    pub running_vms: u32,
}

/// How nodes are weighed once filters have passed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Prefer the emptiest node (fewer VMs hurt by one host failing).
    #[default]
    Spread,
    /// Prefer the fullest node that still fits (keeps whole hosts free).
    Pack,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Spread => "spread",
            Strategy::Pack => "pack",
        }
    }
}

/// The scheduler's settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// vCPUs that may be booked per physical CPU (e.g. 4.0).
    pub cpu_overcommit: f64,
    /// Memory that may be booked per MiB of RAM (1.0: none).
    pub memory_overcommit: f64,
    pub strategy: Strategy,
    /// Most per-node verdicts kept in one explanation; counts per filter are always complete.
    pub max_verdicts: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
            strategy: Strategy::Spread,
            max_verdicts: 32,
        }
    }
}

/// A node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub id: NodeId,
    pub state: NodeState,
    pub schedulable: bool,
    pub labels: BTreeMap<String, String>,
    pub capacity: Option<NodeCapacity>,
}

impl From<&NodeRecord> for NodeView {
    fn from(n: &NodeRecord) -> Self {
        NodeView {
            id: n.id,
            state: n.state,
            // A removed node takes nothing, whatever its flag says.
            schedulable: n.schedulable && !n.removed,
            labels: n.labels.clone(),
            capacity: n.capacity,
        }
    }
}

/// What a VM needs from its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDemand {
    pub id: String,
    /// Groups are scoped by tenant: one tenant's group never constrains another's VMs.
    pub tenant: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub constraints: PlacementConstraints,
    pub anti_affinity_group: Option<String>,
}

impl From<&Vm> for VmDemand {
    fn from(vm: &Vm) -> Self {
        VmDemand {
            id: vm.id.clone(),
            tenant: vm.tenant.clone(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            disk_gib: vm.disk_gib,
            constraints: vm.placement.clone(),
            anti_affinity_group: vm.anti_affinity_group.clone(),
        }
    }
}

/// One decision: the chosen node (or none) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub vm: String,
    pub node: Option<NodeId>,
    pub explanation: PlacementExplanation,
}

/// Resources booked on a node by the VMs placed there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Booked {
    vcpus: u64,
    memory_mib: u64,
    disk_gib: u64,
    vms: u32,
}

struct NodeSlot {
    view: NodeView,
    /// Capacity with overcommit applied: what may be booked.
    cpu_limit: u64,
    memory_limit: u64,
    booked: Booked,
    load: Option<NodeLoad>,
}

type GroupKey = (String, String);

/// The scheduler's working state: nodes with their bookings, and where each group runs.
pub struct Scheduler {
    policy: Policy,
    /// Sorted by node id, so iteration order (and thus tie-breaking) is fixed.
    nodes: Vec<NodeSlot>,
    index: HashMap<NodeId, usize>,
    anti: HashMap<GroupKey, BTreeMap<NodeId, u32>>,
    affinity: HashMap<GroupKey, BTreeMap<NodeId, u32>>,
}

/// A filter's refusal, with the numbers needed to explain it later.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    Plain(FilterKind),
    Short {
        kind: FilterKind,
        need: u64,
        free: u64,
    },
}

impl Refusal {
    fn kind(self) -> FilterKind {
        match self {
            Refusal::Plain(k) | Refusal::Short { kind: k, .. } => k,
        }
    }
}

fn limit(capacity: u64, ratio: f64) -> u64 {
    if !(ratio.is_finite() && ratio > 0.0) {
        return capacity;
    }
    // The float product is exact enough for capacities far below 2^52 and identical on every
    // run, which is all determinism needs here.
    (capacity as f64 * ratio).floor() as u64
}

fn group_key(tenant: &str, group: &Option<String>) -> Option<GroupKey> {
    group.as_ref().map(|g| (tenant.to_string(), g.clone()))
}

fn permille(used: u64, total: u64) -> u64 {
    if total == 0 {
        return 1000;
    }
    (used.saturating_mul(1000) / total).min(1000)
}

impl Scheduler {
    /// Builds the state from the nodes, their reported loads and the VMs already placed.
    pub fn new<'a>(
        nodes: impl IntoIterator<Item = NodeView>,
        loads: &BTreeMap<NodeId, NodeLoad>,
        placed: impl IntoIterator<Item = (&'a VmDemand, NodeId)>,
        policy: Policy,
    ) -> Scheduler {
        let mut views: Vec<NodeView> = nodes.into_iter().collect();
        views.sort_by_key(|n| n.id);
        views.dedup_by_key(|n| n.id);
        let nodes: Vec<NodeSlot> = views
            .into_iter()
            .map(|view| {
                let cap = view.capacity.unwrap_or_default();
                NodeSlot {
                    cpu_limit: limit(u64::from(cap.vcpus), policy.cpu_overcommit),
                    memory_limit: limit(cap.memory_mib, policy.memory_overcommit),
                    booked: Booked::default(),
                    load: loads.get(&view.id).copied(),
                    view,
                }
            })
            .collect();
        let index = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.view.id, i))
            .collect();
        let mut s = Scheduler {
            policy,
            nodes,
            index,
            anti: HashMap::new(),
            affinity: HashMap::new(),
        };
        for (vm, node) in placed {
            s.book(vm, node);
        }
        s
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Records `vm` as running on `node`: its resources and its groups.
    pub fn book(&mut self, vm: &VmDemand, node: NodeId) {
        if let Some(&i) = self.index.get(&node) {
            let b = &mut self.nodes[i].booked;
            b.vcpus += u64::from(vm.vcpus);
            b.memory_mib += vm.memory_mib;
            b.disk_gib += vm.disk_gib;
            b.vms += 1;
        }
        if let Some(k) = group_key(&vm.tenant, &vm.anti_affinity_group) {
            *self.anti.entry(k).or_default().entry(node).or_default() += 1;
        }
        if let Some(k) = group_key(&vm.tenant, &vm.constraints.affinity_group) {
            *self.affinity.entry(k).or_default().entry(node).or_default() += 1;
        }
    }

    /// Whether `vm` may run on `slot`, and its score there if so.
    fn evaluate(&self, slot: &NodeSlot, vm: &VmDemand) -> Result<u32, Refusal> {
        let n = &slot.view;
        if n.state != NodeState::Up {
            return Err(Refusal::Plain(FilterKind::NodeNotUp));
        }
        if !n.schedulable {
            return Err(Refusal::Plain(FilterKind::Unschedulable));
        }
        let Some(cap) = n.capacity else {
            return Err(Refusal::Plain(FilterKind::CapacityUnknown));
        };
        if vm.constraints.node.is_some_and(|r| r != n.id) {
            return Err(Refusal::Plain(FilterKind::RequiredNode));
        }
        if !vm
            .constraints
            .node_selector
            .iter()
            .all(|(k, v)| n.labels.get(k) == Some(v))
        {
            return Err(Refusal::Plain(FilterKind::NodeSelector));
        }
        let b = slot.booked;
        let need_cpu = u64::from(vm.vcpus);
        let free_cpu = slot.cpu_limit.saturating_sub(b.vcpus);
        if need_cpu > free_cpu {
            return Err(Refusal::Short {
                kind: FilterKind::Cpu,
                need: need_cpu,
                free: free_cpu,
            });
        }
        let free_mem = slot.memory_limit.saturating_sub(b.memory_mib);
        if vm.memory_mib > free_mem {
            return Err(Refusal::Short {
                kind: FilterKind::Memory,
                need: vm.memory_mib,
                free: free_mem,
            });
        }
        if let Some(disk) = cap.disk_gib {
            let free = disk.saturating_sub(b.disk_gib);
            if vm.disk_gib > free {
                return Err(Refusal::Short {
                    kind: FilterKind::Disk,
                    need: vm.disk_gib,
                    free,
                });
            }
        }
        if let Some(k) = group_key(&vm.tenant, &vm.anti_affinity_group) {
            if self.anti.get(&k).is_some_and(|m| m.contains_key(&n.id)) {
                return Err(Refusal::Plain(FilterKind::AntiAffinity));
            }
        }
        if let Some(k) = group_key(&vm.tenant, &vm.constraints.affinity_group) {
            if let Some(m) = self.affinity.get(&k) {
                if !m.is_empty() && !m.contains_key(&n.id) {
                    return Err(Refusal::Plain(FilterKind::Affinity));
                }
            }
        }
        Ok(self.score(slot, vm, cap))
    }

    /// 0 to 1000, higher is better: 70% how full the node would be after placing (emptier
    /// for spread, fuller for pack), 30% how idle its reported load is.
    fn score(&self, slot: &NodeSlot, vm: &VmDemand, cap: NodeCapacity) -> u32 {
        let b = slot.booked;
        let cpu = permille(b.vcpus + u64::from(vm.vcpus), slot.cpu_limit);
        let mem = permille(b.memory_mib + vm.memory_mib, slot.memory_limit);
        let fill = (cpu + mem) / 2;
        // Without a heartbeat, what is booked stands in for what is used.
        let load = match slot.load {
            Some(l) => permille(l.vcpus_used, u64::from(cap.vcpus))
                .max(permille(l.memory_used_mib, cap.memory_mib)),
            None => permille(b.vcpus, u64::from(cap.vcpus).max(1))
                .max(permille(b.memory_mib, cap.memory_mib)),
        };
        let fit = match self.policy.strategy {
            Strategy::Spread => 1000 - fill,
            Strategy::Pack => fill,
        };
        ((fit * 7 + (1000 - load) * 3) / 10) as u32
    }

    fn detail(&self, slot: &NodeSlot, vm: &VmDemand, r: Refusal) -> String {
        let n = &slot.view;
        match r {
            Refusal::Short { kind, need, free } => {
                let unit = match kind {
                    FilterKind::Cpu => "vCPUs",
                    FilterKind::Memory => "MiB",
                    _ => "GiB",
                };
                format!("needs {need} {unit}, {free} free")
            }
            Refusal::Plain(kind) => match kind {
                FilterKind::NodeNotUp => format!("node is {:?}", n.state).to_lowercase(),
                FilterKind::Unschedulable => "node is drained".into(),
                FilterKind::CapacityUnknown => "node has not reported its capacity".into(),
                FilterKind::RequiredNode => format!(
                    "VM requires node {}",
                    vm.constraints.node.unwrap_or_default()
                ),
                FilterKind::NodeSelector => {
                    let missing: Vec<String> = vm
                        .constraints
                        .node_selector
                        .iter()
                        .filter(|(k, v)| n.labels.get(*k) != Some(*v))
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    format!("lacks label {}", missing.join(", "))
                }
                FilterKind::AntiAffinity => format!(
                    "runs a VM of anti-affinity group {:?}",
                    vm.anti_affinity_group.clone().unwrap_or_default()
                ),
                FilterKind::Affinity => format!(
                    "affinity group {:?} runs elsewhere",
                    vm.constraints.affinity_group.clone().unwrap_or_default()
                ),
                FilterKind::Cpu | FilterKind::Memory | FilterKind::Disk => kind.as_str().into(),
            },
        }
    }

    /// Decides where `vm` goes, without booking it.
    pub fn decide(&self, vm: &VmDemand) -> Decision {
        let mut results: Vec<(usize, Result<u32, Refusal>)> = Vec::with_capacity(self.nodes.len());
        let mut best: Option<(u32, usize)> = None;
        let mut filtered: BTreeMap<FilterKind, u32> = BTreeMap::new();
        for (i, slot) in self.nodes.iter().enumerate() {
            let r = self.evaluate(slot, vm);
            match r {
                // Strictly greater: among equal scores the first (lowest id) stays.
                Ok(score) if best.is_none_or(|(s, _)| score > s) => best = Some((score, i)),
                Ok(_) => {}
                Err(refusal) => *filtered.entry(refusal.kind()).or_default() += 1,
            }
            results.push((i, r));
        }
        let chosen = best.map(|(_, i)| self.nodes[i].view.id);
        let explanation = self.explain(vm, chosen, &results, filtered);
        Decision {
            vm: vm.id.clone(),
            node: chosen,
            explanation,
        }
    }

    fn explain(
        &self,
        vm: &VmDemand,
        chosen: Option<NodeId>,
        results: &[(usize, Result<u32, Refusal>)],
        filtered: BTreeMap<FilterKind, u32>,
    ) -> PlacementExplanation {
        let max = self.policy.max_verdicts.max(1);
        let mut scored: Vec<(u32, usize)> = results
            .iter()
            .filter_map(|(i, r)| r.as_ref().ok().map(|s| (*s, *i)))
            .collect();
        let eligible = scored.len() as u32;
        // Best first; among equal scores the lowest id, matching the decision.
        scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut keep: Vec<usize> = Vec::new();
        if results.len() <= max {
            keep.extend(scored.iter().map(|(_, i)| *i));
            keep.extend(results.iter().filter(|(_, r)| r.is_err()).map(|(i, _)| *i));
        } else {
            // Half the room for the best scored nodes, the rest for examples of each filter.
            keep.extend(scored.iter().take(max.div_ceil(2)).map(|(_, i)| *i));
            let kinds = filtered.len().max(1);
            let per_kind = ((max - keep.len()) / kinds).max(1);
            let mut shown: BTreeMap<FilterKind, usize> = BTreeMap::new();
            for (i, r) in results {
                if let Err(refusal) = r {
                    let c = shown.entry(refusal.kind()).or_default();
                    if *c < per_kind {
                        *c += 1;
                        keep.push(*i);
                    }
                }
            }
        }
        let verdicts: Vec<NodeVerdict> = keep
            .iter()
            .map(|&i| {
                let slot = &self.nodes[i];
                let verdict = match results[i].1 {
                    Ok(score) => Verdict::Scored { score },
                    Err(r) => Verdict::Filtered {
                        filter: r.kind(),
                        detail: self.detail(slot, vm, r),
                    },
                };
                NodeVerdict {
                    node: slot.view.id,
                    verdict,
                }
            })
            .collect();
        PlacementExplanation {
            vm: vm.id.clone(),
            at: 0,
            chosen,
            strategy: self.policy.strategy.as_str().into(),
            nodes_considered: results.len() as u32,
            eligible,
            filtered: filtered
                .into_iter()
                .map(|(k, c)| (k.as_str().to_string(), c))
                .collect(),
            truncated: (results.len() - verdicts.len()) as u32,
            verdicts,
        }
    }

    /// Decides where `vm` goes and books it there (if anywhere).
    pub fn place(&mut self, vm: &VmDemand) -> Decision {
        let d = self.decide(vm);
        if let Some(node) = d.node {
            self.book(vm, node);
        }
        d
    }

    /// Places `vms` in order, each seeing the ones placed before it.
    pub fn place_batch(&mut self, vms: &[VmDemand]) -> Vec<Decision> {
        vms.iter().map(|vm| self.place(vm)).collect()
    }
}
