//! A VM runs on at most one node at any time, outside the hand-over of a live migration.
//!
//! Evidence is a poll of every node's hypervisor: `(time, node, vm, running)` samples. Between two
//! consecutive `running` samples of one node the VM is taken to have run there throughout (a stop
//! and restart inside one poll interval would go unseen; polls faster than a VM restarts make that
//! moot). So each node yields *observed running spans*, from the first to the last of a series of
//! consecutive `running` samples, and two spans on different nodes that overlap prove two copies
//! ran at once. An overlap is excused only when it lies inside the window of a migration of that
//! VM between exactly those two nodes, widened by a tolerance for the pause-and-resume instant.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{CheckResult, Verdict, MAX_DETAILS};

/// One poll of one node's hypervisor for one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSample {
    pub time_ns: u64,
    pub node: String,
    pub vm_id: String,
    pub running: bool,
}

/// A live migration, during which source and target may both run the VM for an instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    /// The operation id of the migration.
    pub id: String,
    pub vm_id: String,
    pub source: String,
    pub target: String,
    pub start_ns: u64,
    /// `None`: never observed to finish (it may have been interrupted).
    pub end_ns: Option<u64>,
}

/// Tolerances of the check.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// How far beyond a migration's recorded window an overlap between its two nodes is excused.
    pub handover_tolerance_ns: u64,
}

/// Two nodes seen running the same VM over the same span of time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DoubleRun {
    pub vm_id: String,
    pub nodes: (String, String),
    /// The overlap of the observed running spans.
    pub from_ns: u64,
    pub to_ns: u64,
}

impl DoubleRun {
    pub fn describe(&self) -> String {
        format!(
            "vm {} ran on {} and {} at once during [{} ns, {} ns]",
            self.vm_id, self.nodes.0, self.nodes.1, self.from_ns, self.to_ns
        )
    }
}

/// The result of the check.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub samples: usize,
    pub vms: usize,
    /// Overlaps excused by a migration window.
    pub handovers: usize,
    pub double_runs: Vec<DoubleRun>,
}

impl Report {
    pub fn verdict(&self) -> Verdict {
        if self.double_runs.is_empty() {
            Verdict::Pass
        } else {
            Verdict::Fail
        }
    }

    pub fn to_result(&self) -> CheckResult {
        CheckResult {
            checker: "single_runner".into(),
            verdict: self.verdict(),
            summary: format!(
                "{} samples of {} VMs: {} double runs, {} migration hand-overs excused",
                self.samples,
                self.vms,
                self.double_runs.len(),
                self.handovers
            ),
            details: self
                .double_runs
                .iter()
                .take(MAX_DETAILS)
                .map(DoubleRun::describe)
                .collect(),
        }
    }
}

/// A span over which one node was observed running a VM.
struct Span<'a> {
    node: &'a str,
    from_ns: u64,
    to_ns: u64,
}

/// Splits one node's samples (sorted by time) into observed running spans.
fn spans<'a>(node: &'a str, samples: &[&RunSample]) -> Vec<Span<'a>> {
    let mut out = Vec::new();
    let mut open: Option<(u64, u64)> = None;
    for s in samples {
        match (s.running, open) {
            (true, None) => open = Some((s.time_ns, s.time_ns)),
            (true, Some((from, _))) => open = Some((from, s.time_ns)),
            (false, Some((from, to))) => {
                out.push(Span {
                    node,
                    from_ns: from,
                    to_ns: to,
                });
                open = None;
            }
            (false, None) => {}
        }
    }
    if let Some((from, to)) = open {
        out.push(Span {
            node,
            from_ns: from,
            to_ns: to,
        });
    }
    out
}

/// Checks that no VM was observed running on two nodes at once.
pub fn check(samples: &[RunSample], migrations: &[Migration], options: Options) -> Report {
    let mut by_vm: BTreeMap<&str, BTreeMap<&str, Vec<&RunSample>>> = BTreeMap::new();
    for s in samples {
        by_vm
            .entry(s.vm_id.as_str())
            .or_default()
            .entry(s.node.as_str())
            .or_default()
            .push(s);
    }
    let mut double_runs = Vec::new();
    let mut handovers = 0;
    for (vm, nodes) in &by_vm {
        let mut all: Vec<Span<'_>> = Vec::new();
        for (node, node_samples) in nodes {
            let mut sorted = node_samples.clone();
            sorted.sort_by_key(|s| s.time_ns);
            all.extend(spans(node, &sorted));
        }
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                if a.node == b.node {
                    continue;
                }
                let from = a.from_ns.max(b.from_ns);
                let to = a.to_ns.min(b.to_ns);
                if from > to {
                    continue;
                }
                let excused = migrations.iter().any(|m| {
                    let pair = (m.source.as_str() == a.node && m.target.as_str() == b.node)
                        || (m.source.as_str() == b.node && m.target.as_str() == a.node);
                    let start = m.start_ns.saturating_sub(options.handover_tolerance_ns);
                    let end = m.end_ns.map_or(u64::MAX, |e| {
                        e.saturating_add(options.handover_tolerance_ns)
                    });
                    m.vm_id == *vm && pair && start <= from && to <= end
                });
                if excused {
                    handovers += 1;
                    continue;
                }
                let mut pair = (a.node.to_string(), b.node.to_string());
                if pair.0 > pair.1 {
                    pair = (pair.1, pair.0);
                }
                double_runs.push(DoubleRun {
                    vm_id: (*vm).to_string(),
                    nodes: pair,
                    from_ns: from,
                    to_ns: to,
                });
            }
        }
    }
    Report {
        samples: samples.len(),
        vms: by_vm.len(),
        handovers,
        double_runs,
    }
}
