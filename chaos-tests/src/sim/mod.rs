//! The deterministic simulation tier: the product's Raft (openraft with the product's type
//! configuration, `apply` and wire mapping) on N simulated nodes, an in-memory disk that loses
//! unflushed writes on a crash, and a simulated network, all driven by one seed.
//!
//! One seed fixes everything: the run executes on a tokio current-thread runtime with paused
//! time (timers fire in simulated time, in a fixed order; nothing reads the wall clock), and
//! every random choice (network delays and losses, faults, client operations, election
//! timeouts) comes from generators seeded from it. Running a seed twice therefore produces the
//! same trace, whose sha256 [`SimOutcome::trace_hash`] is compared by the replay test.
//!
//! A run: start the nodes, create the quota tenants, then clients and a nemesis run together for
//! the fault phase (crashes with loss of unflushed data, partitions of every shape, one-way
//! links, loss, delay); a step checker samples the Raft invariants every 10 ms of simulated time
//! ([`observer`] checks the rest at every event). Then everything heals, a write must succeed
//! through every node, the nodes must converge, and the checkers of the real tier judge the
//! history: linearizability, lost acknowledged writes, quota, convergence.

pub mod client;
pub mod cluster;
pub mod network;
pub mod observer;
pub mod store;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use raft::NodeId;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::checker::convergence::{self, NodeDigest};
use crate::checker::lost_writes::{self, FinalReads};
use crate::checker::{linearizable, quota, CheckResult, Verdict};
use crate::history::{self, Operation};
use crate::report::OperationStats;

use self::client::{Recorder, Workload};
use self::cluster::SimCluster;
use self::network::Net;
use self::observer::Observer;
pub use self::store::Durability;

/// Everything that can stop a simulated run before its checks.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot build the simulation runtime")]
    Runtime(#[source] std::io::Error),
    #[error("invalid Raft settings: {0}")]
    Config(String),
    #[error("node {0} could not start: {1}")]
    Start(NodeId, String),
    #[error("no node {0}")]
    UnknownNode(NodeId),
    #[error("the history is malformed")]
    History(#[from] history::HistoryError),
    #[error("an operation has a shape the linearizability checker cannot read")]
    Shape(#[from] linearizable::ShapeError),
}

/// What a simulated run does.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Cluster size; `None` draws 3 or 5 from the seed.
    pub nodes: Option<usize>,
    /// Simulated duration of the fault phase.
    pub fault_phase: Duration,
    pub register_clients: u64,
    pub quota_clients: u64,
    pub durability: Durability,
    /// How long, after healing, the cluster has to accept a write through every node and to
    /// converge (simulated time).
    pub recovery_bound: Duration,
    /// Keep the whole event trace in the outcome (for studying one seed).
    pub keep_trace: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            nodes: None,
            fault_phase: Duration::from_secs(12),
            register_clients: 4,
            quota_clients: 2,
            durability: Durability::Faithful,
            recovery_bound: Duration::from_secs(10),
            keep_trace: false,
        }
    }
}

/// The result of one seed.
#[derive(Debug, Clone)]
pub struct SimOutcome {
    pub seed: u64,
    pub nodes: usize,
    /// sha256 of the full event trace: equal for equal seeds.
    pub trace_hash: String,
    pub events: u64,
    /// Raft invariants broken during the run (empty when sound).
    pub violations: Vec<String>,
    /// The real tier's checkers on the client history, plus availability after healing.
    pub checks: Vec<CheckResult>,
    pub operations: OperationStats,
    pub faults: u64,
    pub entries_applied: u64,
    /// Elections won.
    pub leaders_elected: usize,
    /// Terms in which two nodes won (allowed by openraft's default leader-id mode).
    pub terms_with_two_leaders: usize,
    /// The last lines of the trace, for a failure report.
    pub tail: Vec<String>,
    /// The whole trace, when [`SimConfig::keep_trace`] asked for it.
    pub trace: Option<Vec<String>>,
}

impl SimOutcome {
    /// Pass only when no invariant broke and every checker passed.
    pub fn verdict(&self) -> Verdict {
        let invariants = if self.violations.is_empty() {
            Verdict::Pass
        } else {
            Verdict::Fail
        };
        self.checks.iter().fold(invariants, |v, c| v.and(c.verdict))
    }

    /// A few lines for people: what ran and what was found.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "sim seed {} ({} nodes): {} — {} events, trace {}, {} faults, {} applies, {} leaders elected ({} terms with two)\n",
            self.seed,
            self.nodes,
            self.verdict().as_str(),
            self.events,
            &self.trace_hash[..16],
            self.faults,
            self.entries_applied,
            self.leaders_elected,
            self.terms_with_two_leaders,
        );
        let count = |k: &str| self.operations.by_outcome.get(k).copied().unwrap_or(0);
        out.push_str(&format!(
            "  operations: {} ({} ok, {} fail, {} info)\n",
            self.operations.total,
            count("ok"),
            count("fail"),
            count("info")
        ));
        for v in &self.violations {
            out.push_str(&format!("  invariant broken: {v}\n"));
        }
        for c in &self.checks {
            out.push_str(&format!(
                "  {:<13} {:<7} {}\n",
                c.checker,
                c.verdict.as_str(),
                c.summary
            ));
            for d in c.details.iter().take(10) {
                out.push_str(&format!("      {d}\n"));
            }
        }
        if self.verdict() != Verdict::Pass {
            out.push_str("  last events:\n");
            for line in &self.tail {
                out.push_str(&format!("    {line}\n"));
            }
            out.push_str(&format!(
                "  replay: cargo xtask chaos sim --seed {}\n",
                self.seed
            ));
        }
        out
    }
}

/// Derives an independent generator for one part of the run.
fn rng_for(seed: u64, part: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ part.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Runs one seed to completion on its own deterministic runtime.
pub fn run_seed(seed: u64, config: &SimConfig) -> Result<SimOutcome, SimError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(SimError::Runtime)?;
    runtime.block_on(run(seed, config))
}

async fn run(seed: u64, config: &SimConfig) -> Result<SimOutcome, SimError> {
    let n = config
        .nodes
        .unwrap_or(if rng_for(seed, 1).gen_bool(0.5) { 3 } else { 5 });
    let observer = Arc::new(Observer::new());
    if config.keep_trace {
        observer.keep_full_trace();
    }
    observer.event(format_args!("seed {seed}, {n} nodes"));
    observer.set_voters(n);
    let net = Arc::new(Net::new(observer.clone(), rng_for(seed, 2)));
    let cluster = Arc::new(SimCluster::new(
        n,
        net.clone(),
        observer.clone(),
        config.durability,
        rng_for(seed, 3),
    ));
    for id in cluster.ids() {
        cluster.start(id).await?;
    }
    cluster.initialize().await?;

    let recorder = Arc::new(Recorder::new(cluster.clone()));
    let mut workload = Workload::new(
        cluster.clone(),
        recorder.clone(),
        Vec::new(),
        config.fault_phase,
        seed,
    );
    let mut quota_tenants = Vec::new();
    for i in 0..3 {
        if let Some(t) = workload.setup_quota_tenant(&format!("quota-{i}")).await {
            quota_tenants.push(t);
        }
    }
    workload.quota_tenants = quota_tenants.clone();
    let workload = Arc::new(workload);

    let stop_steps = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let steps = tokio::spawn(step_checker(cluster.clone(), stop_steps.clone()));
    let mut tasks = Vec::new();
    for p in 1..=config.register_clients {
        tasks.push(tokio::spawn(workload.clone().register_client(p)));
    }
    for p in 0..config.quota_clients {
        tasks.push(tokio::spawn(workload.clone().quota_client(100 + p)));
    }
    tasks.push(tokio::spawn(workload.clone().sampler()));

    let faults = nemesis(cluster.clone(), rng_for(seed, 4), config.fault_phase).await;

    // Heal: every link whole, every node up.
    {
        let mut st = net.state();
        st.blocked.clear();
        st.loss_percent = 0;
        st.delay_ms = (1, 5);
    }
    for id in cluster.ids() {
        cluster.start(id).await?;
    }
    observer.event(format_args!("healed"));
    workload.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let availability = probe_availability(&workload, config.recovery_bound).await;
    let converged = wait_converged(&cluster, config.recovery_bound).await;
    stop_steps.store(true, Ordering::Relaxed);
    let _ = steps.await;

    // Evidence for the checkers, read from every node's state.
    let names = workload
        .names
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut final_reads: FinalReads = BTreeMap::new();
    let mut digests = Vec::new();
    for id in cluster.ids() {
        let Some(disk) = cluster.disk(id) else {
            continue;
        };
        let guard = store::lock(&disk);
        let mut reads = BTreeMap::new();
        for name in &names {
            if let Some(v) = client::final_read(&guard.volatile, name) {
                reads.insert(name.clone(), v);
            }
        }
        final_reads.insert(format!("n{id}"), reads);
        digests.push(NodeDigest {
            node: format!("n{id}"),
            applied_index: guard.volatile.last_applied.map(|l| l.index),
            digest: guard.volatile.digest(),
        });
    }
    cluster.shutdown().await;

    let ops: Vec<Operation> = history::pair(&recorder.take())?;
    let mut checks = Vec::new();
    let lin = linearizable::check(
        &ops,
        &linearizable::Options {
            budget: Duration::from_secs(20),
            ..Default::default()
        },
    )?;
    checks.push(lin.to_result());
    checks.push(
        lost_writes::check(&ops, &final_reads, &BTreeMap::<String, Value>::new()).to_result(),
    );
    let samples = workload
        .samples
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    checks
        .push(quota::check(&crate::run::quota_evidence(&ops, &quota_tenants, samples)).to_result());
    let mut conv = convergence::check(&digests).to_result();
    if !converged {
        conv.verdict = Verdict::Fail;
        conv.details.push(format!(
            "not converged within {:?} after healing",
            config.recovery_bound
        ));
    }
    checks.push(conv);
    checks.push(availability);

    let (trace_hash, events) = observer.fingerprint();
    let (entries_applied, leaders_elected, terms_with_two_leaders) = observer.counts();
    Ok(SimOutcome {
        seed,
        nodes: n,
        trace_hash,
        events,
        violations: observer.violations(),
        checks,
        operations: OperationStats::of(&ops),
        faults,
        entries_applied,
        leaders_elected,
        terms_with_two_leaders,
        tail: observer.tail(),
        trace: observer.full_trace(),
    })
}

/// The faults a nemesis step can inject.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Crash,
    CrashLeader,
    Partition,
    IsolateLeader,
    OneWay,
    Ring,
    Loss,
    Delay,
}

const FAULTS: [Fault; 8] = [
    Fault::Crash,
    Fault::CrashLeader,
    Fault::Partition,
    Fault::IsolateLeader,
    Fault::OneWay,
    Fault::Ring,
    Fault::Loss,
    Fault::Delay,
];

fn current_leader(cluster: &SimCluster) -> Option<NodeId> {
    cluster.ids().into_iter().find(|id| {
        cluster
            .raft(*id)
            .map(|r| r.metrics().borrow().state.is_leader())
            .unwrap_or(false)
    })
}

/// Blocks every link from a node in `a` to a node in `b` (and back when `both`).
fn cut(net: &Net, a: &[NodeId], b: &[NodeId], both: bool) -> Vec<(NodeId, NodeId)> {
    let mut links = Vec::new();
    for &x in a {
        for &y in b {
            if x != y {
                links.push((x, y));
                if both {
                    links.push((y, x));
                }
            }
        }
    }
    let mut st = net.state();
    for l in &links {
        st.blocked.insert(*l);
    }
    links
}

/// Injects seeded faults for `phase`, each undone after a seeded while; returns how many.
async fn nemesis(cluster: Arc<SimCluster>, mut rng: StdRng, phase: Duration) -> u64 {
    let start = tokio::time::Instant::now();
    let obs = cluster.observer.clone();
    let net = cluster.net.clone();
    let mut count = 0;
    while start.elapsed() < phase {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..800))).await;
        let fault = FAULTS[rng.gen_range(0..FAULTS.len())];
        let hold = Duration::from_millis(rng.gen_range(200..1800));
        let ids = cluster.ids();
        count += 1;
        match fault {
            Fault::Crash | Fault::CrashLeader => {
                let victim = match fault {
                    Fault::CrashLeader => current_leader(&cluster),
                    _ => None,
                }
                .unwrap_or(ids[rng.gen_range(0..ids.len())]);
                obs.event(format_args!("fault {fault:?} n{victim} for {hold:?}"));
                cluster.crash(victim).await;
                tokio::time::sleep(hold).await;
                if let Err(e) = cluster.start(victim).await {
                    obs.violation(format!("n{victim} cannot restart: {e}"));
                }
            }
            Fault::Partition | Fault::IsolateLeader | Fault::OneWay | Fault::Ring => {
                let links = match fault {
                    Fault::Partition => {
                        let mut shuffled = ids.clone();
                        shuffled.shuffle(&mut rng);
                        let k = rng.gen_range(1..ids.len());
                        cut(&net, &shuffled[..k], &shuffled[k..], true)
                    }
                    Fault::IsolateLeader => {
                        let l = current_leader(&cluster).unwrap_or(ids[0]);
                        cut(&net, &[l], &ids, true)
                    }
                    Fault::OneWay => {
                        // The leader can send but not hear (or the reverse).
                        let l = current_leader(&cluster).unwrap_or(ids[0]);
                        if rng.gen_bool(0.5) {
                            cut(&net, &[l], &ids, false)
                        } else {
                            cut(&net, &ids, &[l], false)
                        }
                    }
                    _ => {
                        // Ring: each node hears only its two neighbours.
                        let n = ids.len();
                        let mut links = Vec::new();
                        for (i, &a) in ids.iter().enumerate() {
                            for (j, &b) in ids.iter().enumerate() {
                                let d = (i + n - j) % n;
                                if a != b && d != 1 && d != n - 1 {
                                    links.push((a, b));
                                }
                            }
                        }
                        let mut st = net.state();
                        for l in &links {
                            st.blocked.insert(*l);
                        }
                        links
                    }
                };
                obs.event(format_args!("fault {fault:?} {links:?} for {hold:?}"));
                tokio::time::sleep(hold).await;
                let mut st = net.state();
                for l in &links {
                    st.blocked.remove(l);
                }
                drop(st);
                obs.event(format_args!("heal {fault:?}"));
            }
            Fault::Loss => {
                let p = rng.gen_range(10..60);
                obs.event(format_args!("fault loss {p}% for {hold:?}"));
                net.state().loss_percent = p;
                tokio::time::sleep(hold).await;
                net.state().loss_percent = 0;
                obs.event(format_args!("heal loss"));
            }
            Fault::Delay => {
                let hi = rng.gen_range(50..400);
                obs.event(format_args!("fault delay 1..{hi} ms for {hold:?}"));
                net.state().delay_ms = (1, hi);
                tokio::time::sleep(hold).await;
                net.state().delay_ms = (1, 5);
                obs.event(format_args!("heal delay"));
            }
        }
    }
    count
}

/// Samples the invariants that need every node at once, every 10 ms of simulated time.
async fn step_checker(cluster: Arc<SimCluster>, stop: Arc<std::sync::atomic::AtomicBool>) {
    let mut step: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(10)).await;
        step += 1;
        for id in cluster.ids() {
            if let Some(raft) = cluster.raft(id) {
                let (leader, vote) = {
                    let m = raft.metrics();
                    let m = m.borrow();
                    (m.state.is_leader(), m.vote)
                };
                if leader {
                    cluster.observer.leader_seen(id, &vote);
                }
            }
        }
        if !step.is_multiple_of(10) {
            continue;
        }
        // Log matching and digests at equal applied indices, every 100 ms.
        let mut logs = Vec::new();
        let mut by_applied: BTreeMap<u64, Vec<(NodeId, String)>> = BTreeMap::new();
        for id in cluster.ids() {
            let Some(disk) = cluster.disk(id) else {
                continue;
            };
            let guard = store::lock(&disk);
            let log: BTreeMap<_, _> = guard
                .volatile
                .log
                .iter()
                .map(|(i, e)| (*i, (e.log_id, observer::fingerprint(&e.payload))))
                .collect();
            logs.push((id, log));
            if step.is_multiple_of(50) {
                if let Some(applied) = guard.volatile.last_applied {
                    by_applied
                        .entry(applied.index)
                        .or_default()
                        .push((id, guard.volatile.digest()));
                }
            }
        }
        for v in observer::log_matching(&logs) {
            cluster.observer.violation(v);
        }
        for (index, nodes) in by_applied {
            if let Some((first, digest)) = nodes.first() {
                for (other, d) in &nodes[1..] {
                    if d != digest {
                        cluster.observer.violation(format!(
                            "n{first} and n{other} both applied up to {index} but hold different states"
                        ));
                    }
                }
            }
        }
    }
}

/// After healing, a write must succeed through every node within `bound`.
async fn probe_availability(workload: &Workload, bound: Duration) -> CheckResult {
    let healed = tokio::time::Instant::now();
    let mut per_node = Vec::new();
    let mut verdict = Verdict::Pass;
    for id in workload.cluster.ids() {
        let mut attempt = 0;
        let mut done = None;
        while healed.elapsed() < bound {
            attempt += 1;
            let name = format!("avail-n{id}-{attempt}");
            if workload
                .create_register(999, id, &name, 1000 + attempt)
                .await
            {
                done = Some(healed.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match done {
            Some(d) => per_node.push(format!("n{id} {:.3}s", d.as_secs_f64())),
            None => {
                verdict = Verdict::Fail;
                per_node.push(format!("n{id} not available within {bound:?}"));
            }
        }
    }
    CheckResult {
        checker: "availability".into(),
        verdict,
        summary: format!(
            "first acknowledged write through each node after healing: {}",
            per_node.join(", ")
        ),
        details: Vec::new(),
    }
}

/// Waits until every node has applied the same index and holds the same state.
async fn wait_converged(cluster: &SimCluster, bound: Duration) -> bool {
    let start = tokio::time::Instant::now();
    while start.elapsed() < bound {
        let mut seen = Vec::new();
        for id in cluster.ids() {
            if let Some(disk) = cluster.disk(id) {
                let guard = store::lock(&disk);
                seen.push((guard.volatile.last_applied, guard.volatile.digest()));
            }
        }
        if seen.windows(2).all(|w| w[0] == w[1]) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
