//! The long tier: one real-process scenario per fault class on a 5-node cluster, each judged by
//! every checker, with one summary for all of them under `target/chaos/`.
//!
//! Each scenario is a fast-tier run ([`crate::run`]) restricted to one fault kind, and for the
//! leader-directed ones aimed at whichever node leads when the fault starts. Faults that need a
//! mechanism this machine lacks are listed in [`NOT_COVERED`] rather than faked.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::checker::Verdict;
use crate::nemesis::FaultKind;
use crate::run::{self, RunConfig, RunError};

/// One scenario of the long tier.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: &'static str,
    pub what: &'static str,
    pub kind: FaultKind,
    /// Node index every fault hits (0 follows the leader); `None` draws one per fault.
    pub target: Option<usize>,
}

/// The scenarios, one per fault class.
pub fn scenarios() -> Vec<Scenario> {
    let s = |name, what, kind, target| Scenario {
        name,
        what,
        kind,
        target,
    };
    vec![
        s(
            "kill-leader",
            "SIGKILL the leader, restart it",
            FaultKind::Kill,
            Some(0),
        ),
        s(
            "kill-any",
            "SIGKILL a random node, restart it",
            FaultKind::Kill,
            None,
        ),
        s(
            "pause-leader",
            "SIGSTOP the leader, SIGCONT it",
            FaultKind::Pause,
            Some(0),
        ),
        s(
            "isolate-leader",
            "cut the leader off both ways",
            FaultKind::Partition,
            Some(0),
        ),
        s(
            "minority-partition",
            "the leader and one more node on the minority side (2 | 3)",
            FaultKind::Minority,
            Some(0),
        ),
        s(
            "one-way",
            "the leader cannot send, still receives",
            FaultKind::OneWay,
            Some(0),
        ),
        s(
            "ring",
            "each node hears only its two neighbours",
            FaultKind::Ring,
            None,
        ),
        s(
            "loss",
            "30% random loss on all peer traffic",
            FaultKind::Loss,
            None,
        ),
        s(
            "disk-full",
            "n5's data directory (a 256 MiB tmpfs) filled up",
            FaultKind::DiskFull,
            Some(4),
        ),
        s(
            "fsync-failure",
            "fsync and fdatasync fail with an I/O error on one node (fiu-run, fiu-ctrl)",
            FaultKind::FsyncFail,
            None,
        ),
        s(
            "rolling-restart",
            "every node in turn: SIGTERM, start, wait until ready",
            FaultKind::RollingRestart,
            None,
        ),
    ]
}

/// Fault classes of the issue that the long tier does not inject yet, and why.
pub const NOT_COVERED: &[(&str, &str)] = &[
    (
        "added delay",
        "the kernel has no netem; delaying needs an NFQUEUE rule plus a userspace delayer (crate nfq), not written yet",
    ),
    (
        "node removed and re-added",
        "removal and re-join through the API are not scripted yet",
    ),
    (
        "per-node network namespaces",
        "faults act on loopback with nftables rules on the nodes' QUIC ports, not on a bridge between namespaces",
    ),
];

/// The outcome of one scenario.
#[derive(Debug)]
pub struct ScenarioResult {
    pub scenario: Scenario,
    pub outcome: Result<run::RunOutcome, RunError>,
}

impl ScenarioResult {
    pub fn verdict(&self) -> Verdict {
        match &self.outcome {
            Ok(o) => o.report.verdict(),
            Err(_) => Verdict::Fail,
        }
    }
}

/// Runs every scenario (or those whose name contains `only`) on `nodes` nodes, one after the
/// other, `duration` of faults each.
pub async fn run_all(
    bin: &Path,
    out_dir: &Path,
    seed: u64,
    nodes: usize,
    duration: Duration,
    only: Option<&str>,
) -> Vec<ScenarioResult> {
    let mut results = Vec::new();
    for scenario in scenarios() {
        if only.is_some_and(|o| !scenario.name.contains(o)) {
            continue;
        }
        let mut config = RunConfig::fast(bin.to_path_buf(), seed, duration);
        config.nodes = nodes;
        config.faults = vec![scenario.kind];
        config.fixed_target = scenario.target;
        config.label = format!("long-{}", scenario.name);
        config.out_dir = out_dir.to_path_buf();
        println!("long tier: {} ({})", scenario.name, scenario.what);
        let outcome = run::run(&config).await;
        match &outcome {
            Ok(o) => println!("{}", o.report.to_text()),
            Err(e) => println!("error: {e}"),
        }
        results.push(ScenarioResult { scenario, outcome });
    }
    results
}

/// The Markdown summary of a long-tier run; also written to `out_dir/long-summary.md`.
pub fn summary(results: &[ScenarioResult], seed: u64, nodes: usize, duration: Duration) -> String {
    let mut out = format!(
        "# Long tier: {} scenarios, {nodes} nodes, {}s of faults each, seed {seed}\n\n",
        results.len(),
        duration.as_secs()
    );
    out.push_str("| scenario | fault events | verdict | operations (ok/fail/info) | checks |\n|---|---|---|---|---|\n");
    for r in results {
        match &r.outcome {
            Ok(o) => {
                let rep = &o.report;
                let count = |k: &str| rep.operations.by_outcome.get(k).copied().unwrap_or(0);
                let checks: Vec<String> = rep
                    .checks
                    .iter()
                    .map(|c| format!("{} {}", c.checker, c.verdict.as_str()))
                    .collect();
                out.push_str(&format!(
                    "| {} | {} | {} | {}/{}/{} | {} |\n",
                    r.scenario.name,
                    rep.faults.len(),
                    rep.verdict().as_str(),
                    count("ok"),
                    count("fail"),
                    count("info"),
                    checks.join(", ")
                ));
            }
            Err(e) => out.push_str(&format!(
                "| {} | - | error | - | {} |\n",
                r.scenario.name,
                e.to_string().replace('|', "/")
            )),
        }
    }
    out.push_str("\nNot covered:\n\n");
    for (what, why) in NOT_COVERED {
        out.push_str(&format!("- **{what}**: {why}\n"));
    }
    out
}

/// Writes the summary next to the scenario reports and returns its path.
pub fn write_summary(out_dir: &Path, text: &str) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(out_dir)?;
    let path = out_dir.join("long-summary.md");
    std::fs::write(&path, text)?;
    Ok(path)
}
