//! One fast-tier run against real processes: start the cluster, run the workload under a seeded
//! fault schedule (kill, pause, partition, loss), heal, time the return of availability, read the
//! final state from every node, run the checkers and write the report under `target/chaos/`.
//!
//! Convergence compares every node's full listing of tenants and VMs read with
//! `consistency=stale` (the node does not expose a state-machine digest yet): tenants whole, VMs
//! by id, name and tenant only, because agents may still be updating their status.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde_json::{json, Value};

use crate::checker::convergence::{self, NodeDigest};
use crate::checker::lost_writes::{self, FinalReads};
use crate::checker::quota::{self, Claim, Direction, Evidence, Resource};
use crate::checker::{canonical, linearizable, CheckResult, Verdict};
use crate::cluster::{Client, Cluster, ClusterError};
use crate::history::{self, Clock, Func, HistoryError, Operation};
use crate::nemesis::{self, Action, FaultKind, FaultLog, Managed, Schedule, ScheduleConfig};
use crate::netfault::{self, Firewall, NetError};
use crate::report::{OperationStats, ReportError, RunReport};
use crate::workload::{Completion, QuotaTenant, Recorder, Workload};

/// Errors that stop a run before it can report (a failed check is a report, not an error).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("nftables is not usable here (needs root and the nft command)")]
    NoNftables,
    #[error("cannot write the history {path}")]
    HistoryFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error("the history does not fit the register model")]
    Shape(#[from] linearizable::ShapeError),
    #[error("setting up the run: {what}: {detail}")]
    Setup { what: String, detail: String },
    #[error("the nemesis task panicked")]
    Nemesis,
}

/// What a run does.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub bin: PathBuf,
    pub nodes: usize,
    pub seed: u64,
    /// How long faults are injected (the workload runs as long, plus the last heal).
    pub duration: Duration,
    pub register_clients: usize,
    pub quota_clients: usize,
    pub faults: Vec<FaultKind>,
    /// Percent of peer packets dropped by a loss fault.
    pub loss_percent: u8,
    /// Bound on the return of availability after healing.
    pub availability_bound: Duration,
    /// Where the report, history and node data go.
    pub out_dir: PathBuf,
    /// Keep node data directories and logs under `out_dir` (else a temporary directory).
    pub keep_data: bool,
    /// The tier or scenario, the first word of the run's name.
    pub label: String,
    /// Every fault hits this node (0 follows the leader) instead of a drawn one.
    pub fixed_target: Option<usize>,
}

impl RunConfig {
    /// The fast tier: 3 nodes, all four fault classes, 10 clients.
    pub fn fast(bin: PathBuf, seed: u64, duration: Duration) -> Self {
        Self {
            bin,
            nodes: 3,
            seed,
            duration,
            register_clients: 7,
            quota_clients: 3,
            faults: vec![
                FaultKind::Kill,
                FaultKind::Pause,
                FaultKind::Partition,
                FaultKind::Loss,
            ],
            loss_percent: 30,
            availability_bound: Duration::from_secs(30),
            out_dir: crate::report::default_dir(),
            keep_data: true,
            label: "fast".into(),
            fixed_target: None,
        }
    }

    /// The run's name: the file stem of its report.
    pub fn name(&self) -> String {
        format!("{}-{}n-seed{}", self.label, self.nodes, self.seed)
    }
}

/// What a run produced.
#[derive(Debug)]
pub struct RunOutcome {
    pub report: RunReport,
    pub text_path: PathBuf,
    pub json_path: PathBuf,
    pub history_path: PathBuf,
}

/// Timers short enough for faults of a few seconds; voters are never replaced during a run.
pub fn tuning() -> String {
    json!({
        "heartbeat_ms": 100,
        "election_min_ms": 400,
        "election_max_ms": 800,
        "snapshot_every": 10000,
        "keep_after_snapshot": 1000,
        "voter_down_after_ms": 60000,
        "suspect_after_ms": 1000
    })
    .to_string()
}

fn setup_error(what: &str, detail: impl std::fmt::Display) -> RunError {
    RunError::Setup {
        what: what.to_string(),
        detail: detail.to_string(),
    }
}

/// Creates a tenant through `url`, retrying through elections; setup happens before any fault.
async fn create_tenant(
    client: &Client,
    url: &str,
    name: &str,
    max_vms: u64,
) -> Result<Value, RunError> {
    let body = json!({"name": name, "quota": {"max_vms": max_vms}});
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = client
            .call(
                Method::POST,
                &format!("{url}/api/v1/tenants"),
                Some(&body),
                None,
            )
            .await;
        match r {
            Ok(r) if r.status == 201 => return Ok(r.body),
            other if Instant::now() > deadline => {
                return Err(setup_error(
                    &format!("create tenant {name}"),
                    format!("{other:?}"),
                ))
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Every item of a paginated listing, read from one node with the given consistency.
async fn list_all(client: &Client, url: &str, what: &str, consistency: &str) -> Option<Vec<Value>> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut u = format!("{url}/api/v1/{what}?limit=500&consistency={consistency}");
        if let Some(c) = &cursor {
            u.push_str(&format!("&cursor={c}"));
        }
        let r = client.call(Method::GET, &u, None, None).await.ok()?;
        if r.status != 200 {
            return None;
        }
        items.extend(r.body["items"].as_array()?.iter().cloned());
        match r.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return Some(items),
        }
    }
}

/// One node's final state: read-shaped values by history key, and the text compared for
/// convergence.
struct NodeState {
    reads: BTreeMap<String, Value>,
    digest: String,
}

async fn node_state(client: &Client, url: &str) -> Option<NodeState> {
    let tenants = list_all(client, url, "tenants", "stale").await?;
    let vms = list_all(client, url, "vms", "stale").await?;
    let mut reads = BTreeMap::new();
    let mut tenant_names = BTreeMap::new();
    for t in &tenants {
        let name = t["name"].as_str()?.to_string();
        tenant_names.insert(t["id"].as_str()?.to_string(), name.clone());
        reads.insert(
            name,
            json!({"value": t["quota"]["max_vms"], "version": t["version"]}),
        );
    }
    let mut vm_digest = Vec::new();
    for v in &vms {
        let name = v["name"].as_str()?;
        let tenant = v["tenant"].as_str()?;
        let tenant_name = tenant_names.get(tenant).cloned().unwrap_or_default();
        reads.insert(format!("vm/{name}"), json!({"value": tenant_name}));
        vm_digest.push(json!([v["id"], name, tenant]));
    }
    vm_digest.sort_by_key(|v| v.to_string());
    let digest = canonical(&json!({"tenants": tenants, "vms": vm_digest}));
    Some(NodeState { reads, digest })
}

/// What network faults act on.
#[derive(Clone, Copy)]
struct Network<'a> {
    /// The nodes' peer ports, in node order.
    ports: &'a [u16],
    /// `None` when the run draws no network fault.
    firewall: Option<&'a Firewall>,
    loss_percent: u8,
    /// The nodes' data directories, in node order (a full disk fills one).
    dirs: &'a [PathBuf],
}

/// Runs the nemesis schedule on the processes and the firewall (blocking; call off the runtime).
///
/// A fault drawn for target 0 hits whichever node leads when it starts (its heal follows it):
/// killing, pausing and isolating the leader are the faults that exercise failover, and the
/// leader's identity is not known when the schedule is drawn.
fn run_nemesis(
    schedule: &Schedule,
    procs: &mut [Managed],
    net: &Network<'_>,
    clock: Clock,
    log: &FaultLog,
    leader: &dyn Fn() -> Option<String>,
    ready: &dyn Fn(usize) -> bool,
) {
    let Network {
        ports,
        firewall,
        loss_percent,
        dirs,
    } = *net;
    // Where the fault currently running started, so its heal reaches the same node.
    let mut redirected: Option<usize> = None;
    for (at, action, scheduled) in schedule.actions() {
        let now = clock.now_ns();
        if at > now {
            std::thread::sleep(Duration::from_nanos(at - now));
        }
        let starts = matches!(
            action,
            Action::Kill
                | Action::Pause
                | Action::Isolate
                | Action::StartLoss
                | Action::CutOneWay
                | Action::CutMinority
        );
        let index = match (scheduled, starts) {
            (0, true) => {
                let found = leader().and_then(|name| procs.iter().position(|p| p.name == name));
                redirected = found;
                found.unwrap_or(0)
            }
            (0, false) => redirected.take().unwrap_or(0),
            _ => scheduled,
        };
        let name = procs
            .get(index)
            .map(|p| p.name.clone())
            .unwrap_or_else(|| format!("#{index}"));
        if action.is_network() {
            let Some(firewall) = firewall else {
                log.record(action, &name, Some("no firewall installed".into()));
                continue;
            };
            let minority: Vec<usize> = vec![index, (index + 1) % ports.len().max(1)];
            let result = match action {
                Action::Isolate => match ports.get(index) {
                    Some(port) => firewall.isolate(*port),
                    None => Ok(()),
                },
                Action::CutOneWay => match ports.get(index) {
                    Some(port) => firewall.one_way(*port),
                    None => Ok(()),
                },
                Action::CutMinority => {
                    let side = |inside: bool| -> Vec<u16> {
                        ports
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| minority.contains(i) == inside)
                            .map(|(_, p)| *p)
                            .collect()
                    };
                    let (a, b) = (side(true), side(false));
                    firewall.cut_between(&a, &b)
                }
                Action::CutRing => firewall.ring(ports),
                Action::StartLoss => firewall.loss(ports, loss_percent),
                _ => firewall.heal(),
            };
            let target = match action {
                Action::StartLoss | Action::StopLoss => format!("all ({loss_percent}%)"),
                Action::CutRing => "ring".to_string(),
                Action::CutMinority => minority
                    .iter()
                    .filter_map(|i| procs.get(*i).map(|p| p.name.clone()))
                    .collect::<Vec<_>>()
                    .join("+"),
                _ => name,
            };
            log.record(action, &target, result.err().map(|e| e.to_string()));
        } else if matches!(action, Action::FillDisk | Action::FreeDisk) {
            let dir = dirs.get(index).map(|d| d.join(FILLER));
            let result = match (action, dir) {
                (Action::FillDisk, Some(path)) => fill_disk(&path),
                (_, Some(path)) => std::fs::remove_file(&path).map(|_| ()),
                (_, None) => Ok(()),
            };
            log.record(action, &name, result.err().map(|e| e.to_string()));
            // A node stops when its disk fills up; its supervisor (systemd in production)
            // starts it again, which only helps once there is room.
            if action == Action::FreeDisk {
                if let Some(p) = procs.get_mut(index) {
                    if p.has_exited() {
                        let _ = nemesis::apply(Action::Restart, p, log);
                    }
                }
            }
        } else if matches!(action, Action::FailFsync | Action::FixFsync) {
            let verb = if action == Action::FailFsync {
                "enable"
            } else {
                "disable"
            };
            let result = match procs.get(index).and_then(Managed::pid) {
                Some(pid) => fiu_ctrl(pid, verb),
                None => Err(format!("{name} is not running")),
            };
            log.record(action, &name, result.err());
            // A node stops when fsync fails; like its supervisor, start it again.
            if action == Action::FixFsync {
                if let Some(p) = procs.get_mut(index) {
                    if p.has_exited() {
                        let _ = nemesis::apply(Action::Restart, p, log);
                    }
                }
            }
        } else if action == Action::RollingRestart {
            for (i, p) in procs.iter_mut().enumerate() {
                let result = p
                    .terminate(Duration::from_secs(10))
                    .and_then(|()| p.start().map(|_| ()));
                log.record(action, &p.name, result.err().map(|e| e.to_string()));
                // The next node goes down only once this one serves again.
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                while !ready(i) && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        } else if let Some(p) = procs.get_mut(index) {
            // A failed action is logged by `apply`; the schedule goes on.
            let _ = nemesis::apply(action, p, log);
        }
    }
}

/// The libfiu failure points of fsync and fdatasync (libfiu's POSIX preload library).
const FSYNC_POINTS: &str = "posix/io/sync/*";

/// Switches the fsync failure points of process `pid` (started under `fiu-run -x`).
fn fiu_ctrl(pid: u32, verb: &str) -> Result<(), String> {
    let out = std::process::Command::new("fiu-ctrl")
        .arg("-c")
        .arg(format!("{verb} name={FSYNC_POINTS}"))
        .arg(pid.to_string())
        .output()
        .map_err(|e| format!("cannot run fiu-ctrl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// The file a full-disk fault writes into the target's data directory.
const FILLER: &str = "chaos-filler";

/// Writes zeros to `path` until the file system is full.
fn fill_disk(path: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    let chunk = vec![0u8; 1 << 20];
    loop {
        match file.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC: the point of the fault
            Err(e) => return Err(e),
        }
    }
    // Whatever fits in the last partial chunk, byte by byte in small pieces.
    let small = [0u8; 4096];
    while file.write_all(&small).is_ok() {}
    let _ = file.sync_all();
    Ok(())
}

/// Size of the tmpfs a full-disk scenario mounts as the target's data directory.
const SMALL_DISK: &str = "size=256m";

/// Mounts a small tmpfs at `dir` (root only), so filling it is cheap and harmless.
fn mount_small_disk(dir: &std::path::Path) -> Result<(), RunError> {
    std::fs::create_dir_all(dir).map_err(|e| setup_error("data dir", e))?;
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", SMALL_DISK, "tmpfs"])
        .arg(dir)
        .status()
        .map_err(|e| setup_error("mount tmpfs", e))?;
    if status.success() {
        Ok(())
    } else {
        Err(setup_error("mount tmpfs", status))
    }
}

/// A mounted small disk, unmounted when the run ends (after its cluster is gone).
struct SmallDisk(PathBuf);

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy: a node process may still hold files there while it is being torn down.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Runs one fast-tier scenario end to end.
pub async fn run(config: &RunConfig) -> Result<RunOutcome, RunError> {
    let name = config.name();
    std::fs::create_dir_all(&config.out_dir).map_err(|source| RunError::HistoryFile {
        path: config.out_dir.clone(),
        source,
    })?;
    let needs_net = config.faults.iter().any(|f| {
        matches!(
            f,
            FaultKind::Partition
                | FaultKind::Loss
                | FaultKind::OneWay
                | FaultKind::Minority
                | FaultKind::Ring
        )
    });
    if needs_net && !netfault::available() {
        return Err(RunError::NoNftables);
    }
    let data_dir = config.out_dir.join(format!("{name}.data"));
    if config.keep_data {
        // Each run starts from empty data directories.
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    // A full disk needs a small file system of its own: a tmpfs as the target's data directory.
    // Declared before the cluster, so it is dropped (unmounted) after the cluster's processes.
    let _small_disk = match (
        config.faults.contains(&FaultKind::DiskFull),
        config.keep_data,
    ) {
        (true, true) => {
            let target = config
                .fixed_target
                .unwrap_or(config.nodes.saturating_sub(1));
            let dir = data_dir.join(format!("n{}", target + 1));
            mount_small_disk(&dir)?;
            Some(SmallDisk(dir))
        }
        (true, false) => return Err(setup_error("full disk", "needs keep_data")),
        _ => None,
    };
    // Failing fsync needs libfiu's preload libraries in every node process.
    let wrapper: Vec<String> = if config.faults.contains(&FaultKind::FsyncFail) {
        vec!["fiu-run".into(), "-x".into()]
    } else {
        Vec::new()
    };
    let mut cluster = Cluster::start_wrapped(
        &config.bin,
        config.nodes,
        &tuning(),
        config.keep_data.then_some(data_dir.as_path()),
        &wrapper,
    )
    .await?;
    let urls = cluster.urls();
    let admin = cluster.client.clone();

    // Setup before any fault: the quota tenants, then the state every key starts from.
    let quota_count = (config.duration.as_secs() / 5).clamp(2, 12) as usize;
    let mut quota_tenants = Vec::new();
    for i in 0..quota_count {
        let qname = format!("q{i}");
        let t = create_tenant(&admin, &urls[0], &qname, 5).await?;
        let id = t["id"]
            .as_str()
            .ok_or_else(|| setup_error("quota tenant", &t))?
            .to_string();
        quota_tenants.push(QuotaTenant { name: qname, id });
    }
    let initial_state = node_state(&admin, &urls[0])
        .await
        .ok_or_else(|| setup_error("initial listing", "node 1 did not answer"))?;
    let initial: BTreeMap<String, Value> = initial_state
        .reads
        .iter()
        .map(|(k, v)| (k.clone(), v["value"].clone()))
        .collect();

    let history_path = config.out_dir.join(format!("{name}.history.jsonl"));
    let file = std::fs::File::create(&history_path).map_err(|source| RunError::HistoryFile {
        path: history_path.clone(),
        source,
    })?;
    let clock = Clock::start();
    let recorder = Arc::new(Recorder::new(clock, file));
    let worker_client = Client::new(Duration::from_secs(2))?.with_token_of(&admin);
    let nodes: Vec<(String, String)> = cluster
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.url()))
        .collect();
    let workload = Arc::new(Workload::new(
        recorder.clone(),
        worker_client,
        nodes.clone(),
        quota_tenants.clone(),
        config.duration,
        config.seed,
    ));

    let schedule = Schedule::generate(
        config.seed,
        &ScheduleConfig {
            targets: config.nodes,
            kinds: config.faults.clone(),
            run_for: config.duration,
            gap: (Duration::from_millis(1000), Duration::from_millis(3000)),
            duration: (Duration::from_millis(2000), Duration::from_millis(5000)),
        },
    );
    let mut schedule = schedule;
    if let Some(target) = config.fixed_target {
        for f in &mut schedule.faults {
            f.target = target;
        }
    }
    let mut tasks = Vec::new();
    for p in 0..config.register_clients {
        tasks.push(tokio::spawn(workload.clone().register_client(p as u64)));
    }
    for p in 0..config.quota_clients {
        tasks.push(tokio::spawn(workload.clone().quota_client(100 + p as u64)));
    }
    tasks.push(tokio::spawn(workload.clone().sampler()));

    // The nemesis owns the processes and the firewall while it runs.
    let firewall = if needs_net {
        Some(Firewall::install()?)
    } else {
        None
    };
    let ports = cluster.peer_ports();
    let mut procs: Vec<Managed> = cluster
        .nodes
        .iter_mut()
        .map(|n| std::mem::replace(&mut n.process, Managed::new(&n.name, "true", [""; 0])))
        .collect();
    let log = Arc::new(FaultLog::new(clock));
    let nemesis_log = log.clone();
    let loss = config.loss_percent;
    let handle = tokio::runtime::Handle::current();
    let leader_client = admin.clone();
    let leader_urls = urls.clone();
    let ready_client = admin.clone();
    let ready_urls = urls.clone();
    let dirs: Vec<PathBuf> = cluster.nodes.iter().map(|n| n.dir.clone()).collect();
    let (procs_back, firewall) = tokio::task::spawn_blocking(move || {
        // Asks the nodes in turn who leads; a paused or dead node does not answer.
        let leader = || {
            handle.block_on(async {
                for url in &leader_urls {
                    let reply = leader_client
                        .call(Method::GET, &format!("{url}/api/v1/cluster"), None, None)
                        .await;
                    if let Ok(r) = reply {
                        if let Some(name) = r.body["leader_name"].as_str() {
                            return Some(name.to_string());
                        }
                    }
                }
                None
            })
        };
        // Whether node `i` answers `/readyz` (a rolling restart waits for it).
        let ready = |i: usize| {
            let Some(url) = ready_urls.get(i) else {
                return true;
            };
            handle.block_on(async {
                ready_client
                    .call(Method::GET, &format!("{url}/readyz"), None, None)
                    .await
                    .is_ok_and(|r| r.status == 200)
            })
        };
        run_nemesis(
            &schedule,
            &mut procs,
            &Network {
                ports: &ports,
                firewall: firewall.as_ref(),
                loss_percent: loss,
                dirs: &dirs,
            },
            clock,
            &nemesis_log,
            &leader,
            &ready,
        );
        (procs, firewall)
    })
    .await
    .map_err(|_| RunError::Nemesis)?;
    for (node, p) in cluster.nodes.iter_mut().zip(procs_back) {
        node.process = p;
    }
    // Whatever the schedule did, every node runs and the network is whole from here on.
    if let Some(fw) = &firewall {
        if let Err(e) = fw.heal() {
            log.record(Action::Heal, "all", Some(e.to_string()));
        }
    }
    for node in &mut cluster.nodes {
        if node.process.pid().is_none() || node.process.has_exited() {
            let _ = nemesis::apply(Action::Restart, &mut node.process, &log);
        } else {
            // SIGCONT is harmless to a running process and ends any pause left behind.
            let _ = node.process.resume();
        }
    }
    // As a supervisor would (systemd's `Restart=on-failure`): a node that is still exiting on
    // its own (its Raft stopped on a storage failure) is started again once it has exited,
    // until every node answers `/readyz` or the bound passes.
    let supervise_until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < supervise_until {
        let mut all_ready = true;
        for node in &mut cluster.nodes {
            if node.process.has_exited() {
                let _ = nemesis::apply(Action::Restart, &mut node.process, &log);
            }
            let ready = admin
                .call(Method::GET, &format!("{}/readyz", node.url()), None, None)
                .await
                .is_ok_and(|r| r.status == 200);
            all_ready &= ready;
        }
        if all_ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let healed_ns = clock.now_ns();
    workload.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    drop(firewall);

    // Liveness: after healing, a write must succeed through every node within the bound.
    let availability = wait_available(
        &recorder,
        &admin,
        &nodes,
        config.availability_bound,
        healed_ns,
    )
    .await;

    // Final reads, once every node shows the same state (or the wait gives up).
    let mut finals: Vec<Option<NodeState>> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        finals.clear();
        for url in &urls {
            finals.push(node_state(&admin, url).await);
        }
        let first = finals.first().and_then(|f| f.as_ref()).map(|f| &f.digest);
        let same = finals
            .iter()
            .all(|f| f.as_ref().map(|f| &f.digest) == first && first.is_some());
        if same || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    crate::workload::flush(&recorder)?;
    if let Some(e) = recorder.take_error() {
        return Err(e.into());
    }
    let file = std::fs::File::open(&history_path).map_err(|source| RunError::HistoryFile {
        path: history_path.clone(),
        source,
    })?;
    let ops = history::read_operations(std::io::BufReader::new(file))?;

    let mut final_reads: FinalReads = BTreeMap::new();
    let mut digests = Vec::new();
    let mut missing = Vec::new();
    for ((node, _), state) in nodes.iter().zip(&finals) {
        match state {
            Some(s) => {
                final_reads.insert(node.clone(), s.reads.clone());
                digests.push(NodeDigest {
                    node: node.clone(),
                    applied_index: None,
                    digest: short_hash(&s.digest),
                });
            }
            None => missing.push(node.clone()),
        }
    }

    let mut checks: Vec<CheckResult> = Vec::new();
    let lin = linearizable::check(
        &ops,
        &linearizable::Options {
            budget: Duration::from_secs(60),
            ..Default::default()
        },
    )?;
    checks.push(lin.to_result());
    checks.push(lost_writes::check(&ops, &final_reads, &initial).to_result());
    checks
        .push(quota::check(&quota_evidence(&ops, &quota_tenants, workload.samples())).to_result());
    let mut conv = convergence::check(&digests).to_result();
    if !missing.is_empty() {
        conv.verdict = Verdict::Fail;
        conv.details
            .push(format!("no final read from {}", missing.join(", ")));
    }
    checks.push(conv);
    let mut availability = availability;
    let windows = unavailability_windows(&ops, Duration::from_secs(1));
    if !windows.is_empty() {
        // Clients are closed-loop with a 2 s timeout: soon after a node stalls every client
        // waits on it once, so a window near 2 s may be clients waiting, not the whole cluster.
        availability.details.push(
            "windows without any acknowledged operation (clients time out after 2 s):".into(),
        );
        availability.details.extend(windows);
    }
    checks.push(availability);

    let report = RunReport {
        name: name.clone(),
        seed: Some(config.seed),
        duration_ns: clock.now_ns(),
        operations: OperationStats::of(&ops),
        checks,
        faults: log.events(),
    };
    let (text_path, json_path) = report.write_to(&config.out_dir)?;
    Ok(RunOutcome {
        report,
        text_path,
        json_path,
        history_path,
    })
}

/// A short stable name for a long digest text (FNV-1a; only equality matters).
fn short_hash(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Waits until a tenant create succeeds through every node; the creates go into the history.
async fn wait_available(
    recorder: &Recorder,
    admin: &Client,
    nodes: &[(String, String)],
    bound: Duration,
    healed_ns: u64,
) -> CheckResult {
    let client = Client::new(Duration::from_secs(2))
        .map(|c| c.with_token_of(admin))
        .unwrap_or_else(|_| admin.clone());
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(healed_ns);
    let mut per_node = Vec::new();
    let mut verdict = Verdict::Pass;
    for (node, url) in nodes {
        let mut done = None;
        while started.elapsed() < bound {
            let name = format!("avail-{node}-{}", rng.gen_range(0..u32::MAX));
            let value = 1000 + rng.gen_range(0..1_000_000u64);
            let pending = recorder.invoke(999, Func::Create, &name, json!(value), node);
            let body = json!({"name": name, "quota": {"max_vms": value}});
            let result = client
                .call(
                    Method::POST,
                    &format!("{url}/api/v1/tenants"),
                    Some(&body),
                    None,
                )
                .await;
            match result {
                Ok(r) if r.status == 201 => {
                    let version = r.body["version"].clone();
                    recorder.complete(pending, Completion::Ok(json!({"version": version})));
                    done = Some(recorder.clock().now_ns().saturating_sub(healed_ns));
                    break;
                }
                Ok(r) if (400..500).contains(&r.status) => {
                    recorder.complete(pending, Completion::Fail(format!("HTTP {}", r.status)));
                }
                Ok(r) => recorder.complete(pending, Completion::Info(format!("HTTP {}", r.status))),
                Err(e) => recorder.complete(pending, Completion::Info(e.to_string())),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match done {
            Some(ns) => per_node.push(format!("{node} {:.3}s", ns as f64 / 1e9)),
            None => {
                verdict = Verdict::Fail;
                per_node.push(format!("{node} not available within {bound:?}"));
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

/// Windows longer than `min` during which no operation was acknowledged, longest first (at most
/// ten): how long clients went without service during the faults.
fn unavailability_windows(ops: &[Operation], min: Duration) -> Vec<String> {
    let mut acks: Vec<u64> = ops
        .iter()
        .filter(|op| op.outcome == history::Outcome::Ok)
        .filter_map(|op| op.complete_ns)
        .collect();
    acks.sort_unstable();
    let min = u64::try_from(min.as_nanos()).unwrap_or(u64::MAX);
    let mut windows: Vec<(u64, u64)> = acks
        .windows(2)
        .filter(|w| w[1] - w[0] > min)
        .map(|w| (w[0], w[1]))
        .collect();
    windows.sort_by_key(|(a, b)| std::cmp::Reverse(b - a));
    windows
        .iter()
        .take(10)
        .map(|(a, b)| {
            format!(
                "no acknowledged operation for {:.3}s from {:.3}s",
                (b - a) as f64 / 1e9,
                *a as f64 / 1e9
            )
        })
        .collect()
}

/// The quota checker's evidence (also used by the simulation tier): VM creates as claims against the quota tenants (limit 5).
pub fn quota_evidence(
    ops: &[Operation],
    tenants: &[QuotaTenant],
    samples: Vec<quota::UsageSample>,
) -> Evidence {
    let mut evidence = Evidence {
        samples,
        ..Default::default()
    };
    for t in tenants {
        evidence
            .initial_limits
            .entry(t.name.clone())
            .or_default()
            .insert(Resource::Vms, 5);
    }
    for op in ops.iter().filter(|op| op.key.starts_with("vm/")) {
        let Some(tenant) = op.input.as_str() else {
            continue;
        };
        evidence.claims.push(Claim {
            tenant: tenant.to_string(),
            resource: Resource::Vms,
            direction: Direction::Acquire,
            amount: 1,
            invoke_ns: op.invoke_ns,
            complete_ns: op.complete_ns,
            outcome: op.outcome,
            op_id: Some(op.op_id),
        });
    }
    evidence
}
