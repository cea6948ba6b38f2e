//! `novacron bench-scheduler`: the scheduler's throughput, alone and committed through Raft.
//!
//! 1. Pure: `Scheduler::place_batch` of N VMs onto M simulated nodes, explanations included.
//! 2. Committed: a real 3-node cluster in this process (sled on disk, QUIC with mTLS on
//!    loopback), M simulated nodes registered as node records with a reported capacity, N VMs
//!    created unplaced, then the leader's placement passes (the same code the controller runs)
//!    until every VM is placed; the rate counts placements acknowledged by the Raft quorum.
//!
//! `cargo xtask bench scheduler` runs this and writes the result into docs/benchmarks.md.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use raft::model::{
    DesiredState, Member, NodeState, Operation, OperationState, Tenant, Vm, VmState,
};
use raft::placement::{NodeCapacity, PlacementConstraints};
use raft::{Command, Request, Response};
use serde::Serialize;

use crate::config::Tuning;
use crate::placement::{Memory, PlacementConfig};
use crate::scheduler::{NodeView, Policy, Scheduler, VmDemand};
use crate::server::{Node, ServeOptions};

#[derive(Debug, Clone, Copy)]
pub struct BenchArgs {
    pub nodes: usize,
    pub vms: usize,
    pub batch: usize,
    /// Concurrent writes while registering nodes and creating VMs (setup, not measured).
    pub concurrency: usize,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub nodes: usize,
    pub vms: usize,
    pub batch: usize,
    pub pure_seconds: f64,
    pub pure_per_second: f64,
    pub pure_placed: usize,
    pub committed_seconds: f64,
    pub committed_per_second: f64,
    pub committed_placed: usize,
    pub batches: usize,
    pub unplaced: usize,
    /// Placements every replica had applied when checked (should equal `committed_placed`).
    pub follower_placed: usize,
}

/// The same shapes for the pure run and the cluster: mixed sizes, 10% in anti-affinity groups
/// of 5, 10% with a node selector, on nodes of 64 CPUs / 256 GiB in 4 zones.
fn capacity() -> NodeCapacity {
    NodeCapacity {
        vcpus: 64,
        memory_mib: 256 * 1024,
        disk_gib: Some(4096),
    }
}

fn zone(i: usize) -> String {
    format!("z{}", i % 4)
}

fn demand(i: usize, tenant: &str) -> (u32, u64, PlacementConstraints, Option<String>) {
    let vcpus = [1u32, 2, 4][i % 3];
    let memory = [512u64, 1024, 2048, 4096][i % 4];
    let mut c = PlacementConstraints::default();
    if i % 10 == 3 {
        c.node_selector.insert("zone".into(), zone(i / 10));
    }
    let anti = (i % 10 == 7).then(|| format!("{tenant}-g{}", i / 50));
    (vcpus, memory, c, anti)
}

fn pure(args: &BenchArgs) -> (Duration, usize) {
    let nodes: Vec<NodeView> = (1..=args.nodes as u64)
        .map(|id| NodeView {
            id,
            state: NodeState::Up,
            schedulable: true,
            labels: [("zone".to_string(), zone(id as usize))].into(),
            capacity: Some(capacity()),
        })
        .collect();
    let vms: Vec<VmDemand> = (0..args.vms)
        .map(|i| {
            let (vcpus, memory_mib, constraints, anti) = demand(i, "bench");
            VmDemand {
                id: format!("vm-{i}"),
                tenant: "bench".into(),
                vcpus,
                memory_mib,
                disk_gib: 10,
                constraints,
                anti_affinity_group: anti,
            }
        })
        .collect();
    let start = Instant::now();
    let mut s = Scheduler::new(
        nodes,
        &BTreeMap::new(),
        std::iter::empty(),
        Policy::default(),
    );
    let placed = s
        .place_batch(&vms)
        .iter()
        .filter(|d| d.node.is_some())
        .count();
    (start.elapsed(), placed)
}

fn bench_tuning() -> Tuning {
    Tuning {
        // Simulated nodes never answer: keep them (and the real ones) "up" for the whole run,
        // so the membership controller does not spend the run marking them down.
        suspect_after_ms: 3_600_000,
        voter_down_after_ms: 7_200_000,
        // Snapshots are measured by `bench raft`; here they would only add noise.
        snapshot_every: 1_000_000,
        ..Tuning::default()
    }
}

async fn start_cluster(root: &Path) -> anyhow::Result<Vec<Node>> {
    let any: std::net::SocketAddr = "127.0.0.1:0".parse()?;
    let base = |i: usize| ServeOptions {
        data_dir: root.join(format!("n{i}")),
        name: Some(format!("n{i}")),
        api_addr: Some(any),
        peer_addr: Some(any),
        tuning: Some(bench_tuning()),
        // No hypervisor: the real nodes report no capacity and take no VMs; only the
        // simulated nodes do.
        libvirt_uri: Some("test:///nonexistent/bench.xml".into()),
        no_placement_controller: true,
        ..Default::default()
    };
    let first = Node::start(ServeOptions {
        init: true,
        ..base(1)
    })
    .await?;
    let token = std::fs::read_to_string(root.join("n1").join(crate::config::JOIN_TOKEN_FILE))?;
    let url = format!("http://{}", first.api_addr);
    let mut nodes = vec![first];
    for i in 2..=3 {
        nodes.push(
            Node::start(ServeOptions {
                join: Some(url.clone()),
                token: Some(token.trim().to_string()),
                ..base(i)
            })
            .await?,
        );
    }
    crate::control::wait_metrics(
        &nodes[0].control.raft,
        Duration::from_secs(60),
        "three voters",
        |m| m.membership_config.membership().voter_ids().count() == 3,
    )
    .await?;
    Ok(nodes)
}

async fn write_all(
    ctl: &crate::control::NodeControl,
    commands: Vec<Command>,
    concurrency: usize,
) -> anyhow::Result<()> {
    let mut results = futures::stream::iter(commands.into_iter().map(|c| async move {
        ctl.cluster
            .write(Request::new(api::now_ms(), "bench", c))
            .await
    }))
    .buffer_unordered(concurrency.max(1));
    while let Some(r) = results.next().await {
        if let (_, Response::Rejected { code, message }) =
            r.map_err(|e| anyhow!("write failed: {e}"))?
        {
            bail!("setup write refused ({}): {message}", code.as_str())
        }
    }
    Ok(())
}

async fn committed(
    args: &BenchArgs,
    root: &Path,
) -> anyhow::Result<(Duration, usize, usize, usize, usize)> {
    let nodes = start_cluster(root).await?;
    let leader = nodes
        .iter()
        .find(|n| n.control.raft.metrics().borrow().current_leader == Some(n.control.id))
        .context("no leader among the three nodes")?;
    let ctl = leader.control.clone();
    let now = api::now_ms();

    // Simulated nodes: registered records with a capacity (setup, not measured).
    let registers: Vec<Command> = (0..args.nodes)
        .map(|i| Command::RegisterNode {
            member: Member {
                name: format!("sim-{i:04}"),
                api_addr: "127.0.0.1:9".into(),
                peer_addr: "127.0.0.1:9".into(),
            },
        })
        .collect();
    write_all(&ctl, registers, args.concurrency).await?;
    let sims: Vec<u64> = ctl
        .reader
        .nodes()?
        .into_iter()
        .filter(|n| n.member.name.starts_with("sim-"))
        .map(|n| n.id)
        .collect();
    let caps: Vec<Command> = sims
        .iter()
        .map(|id| Command::ReportNodeCapacity {
            id: *id,
            capacity: capacity(),
        })
        .collect();
    write_all(&ctl, caps, args.concurrency).await?;
    let tenant = Tenant {
        id: "bench".into(),
        name: "bench".into(),
        quota: Default::default(),
        usage: Default::default(),
        created_at: now,
        updated_at: now,
        version: 0,
    };
    write_all(&ctl, vec![Command::CreateTenant { tenant }], 1).await?;
    let creates: Vec<Command> = (0..args.vms)
        .map(|i| {
            let (vcpus, memory_mib, mut placement, anti) = demand(i, "bench");
            // Node labels cannot be set through a command yet, so the simulated nodes have
            // none and the cluster run drops the zone selectors (the pure run keeps them).
            placement.node_selector.clear();
            let id = uuid::Uuid::new_v4().to_string();
            Command::CreateVm {
                vm: Vm {
                    id: id.clone(),
                    name: format!("vm-{i:05}"),
                    tenant: "bench".into(),
                    vcpus,
                    memory_mib,
                    disk_gib: 10,
                    image: None,
                    labels: Default::default(),
                    node: None,
                    desired_state: DesiredState::Stopped,
                    state: VmState::Pending,
                    ha: false,
                    anti_affinity_group: anti,
                    epoch: 0,
                    created_at: 0,
                    updated_at: 0,
                    version: 0,
                    placement,
                },
                operation: Operation {
                    id: uuid::Uuid::new_v4().to_string(),
                    kind: "vm.create".into(),
                    tenant: "bench".into(),
                    target: format!("vm/{id}"),
                    state: OperationState::Pending,
                    error: None,
                    created_at: 0,
                    updated_at: 0,
                },
            }
        })
        .collect();
    write_all(&ctl, creates, args.concurrency).await?;

    // Measured: leader passes until nothing is left to place.
    let config = PlacementConfig {
        batch_size: args.batch,
        ..PlacementConfig::default()
    };
    let mut memory = Memory::default();
    let mut placed = 0;
    let mut unplaced = 0;
    let mut batches = 0;
    let start = Instant::now();
    loop {
        let r = crate::placement::run_pass(&ctl, &config, &mut memory).await?;
        batches += (r.placed + r.unfit + r.refused).div_ceil(config.batch_size.max(1));
        placed += r.placed;
        unplaced += r.unfit;
        if r.placed + r.refused == 0 {
            break;
        }
    }
    let elapsed = start.elapsed();

    // Every replica has the placements (checked on the last node, a follower or not).
    let last = nodes.last().context("no nodes")?;
    let index = ctl
        .raft
        .metrics()
        .borrow()
        .last_applied
        .map(|l| l.index)
        .unwrap_or(0);
    last.control
        .reader
        .wait_applied(index, Duration::from_secs(30))
        .await
        .map_err(|e| anyhow!("follower did not catch up: {e}"))?;
    let follower_placed = last
        .control
        .reader
        .vms()?
        .iter()
        .filter(|v| v.node.is_some())
        .count();
    for n in nodes {
        n.stop().await?;
    }
    Ok((elapsed, placed, unplaced, batches, follower_placed))
}

/// Runs both measurements in a temporary directory.
pub async fn run(args: BenchArgs) -> anyhow::Result<BenchReport> {
    let (pure_time, pure_placed) = pure(&args);
    let root = tempfile_dir()?;
    let result = committed(&args, &root).await;
    let _ = std::fs::remove_dir_all(&root);
    let (elapsed, placed, unplaced, batches, follower_placed) = result?;
    Ok(BenchReport {
        nodes: args.nodes,
        vms: args.vms,
        batch: args.batch,
        pure_seconds: pure_time.as_secs_f64(),
        pure_per_second: pure_placed as f64 / pure_time.as_secs_f64().max(1e-9),
        pure_placed,
        committed_seconds: elapsed.as_secs_f64(),
        committed_per_second: placed as f64 / elapsed.as_secs_f64().max(1e-9),
        committed_placed: placed,
        batches,
        unplaced,
        follower_placed,
    })
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("novacron-bench-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
