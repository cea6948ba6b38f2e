//! HA with fencing on real processes (libvirt's test driver, one private hypervisor per node):
//! a node running HA VMs is partitioned at the QUIC transport; its lease lapses and its HA VMs
//! stop there; the leader marks it down and restarts them elsewhere with a higher epoch; its
//! non-HA VM is reported `unknown`, not moved; after healing, the old node removes its stale
//! copies. Every node's hypervisor is polled throughout (through the node's
//! `novacron_agent_domain_active` metric) and no VM may ever be active on two nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{eventually, TestCluster};
use crate::vms::{vm, wait_state};

/// Short liveness timers: heartbeat 200 ms, down after 2 s, lease 2 s, margin 1 s.
fn ha_tuning() -> String {
    json!({
        "heartbeat_ms": 100,
        "election_min_ms": 400,
        "election_max_ms": 800,
        "snapshot_every": 10_000,
        "keep_after_snapshot": 1_000,
        "voter_down_after_ms": 60_000,
        "suspect_after_ms": 1_000,
        "node_heartbeat_ms": 200,
        "node_down_after_ms": 2_000,
        "lease_ms": 2_000,
        "lease_margin_ms": 1_000
    })
    .to_string()
}

/// The VMs whose domain is active on a node, from its metrics.
fn active_domains(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("novacron_agent_domain_active{vm=\""))
        .filter(|rest| rest.trim_end().ends_with(" 1"))
        .filter_map(|rest| rest.split('"').next().map(str::to_string))
        .collect()
}

#[derive(Default)]
struct Watch {
    samples: u64,
    /// (vm, nodes) each time a VM was seen active on more than one node.
    doubles: Vec<(String, Vec<usize>)>,
    /// The nodes each VM was last seen active on.
    last: BTreeMap<String, BTreeSet<usize>>,
}

async fn create(c: &TestCluster, name: &str, node: &str, ha: bool) -> anyhow::Result<String> {
    let body = json!({"name": name, "vcpus": 1, "memory_mib": 128, "ha": ha,
                      "placement": {"node": node}});
    let (s, v) = c
        .request(0, reqwest::Method::POST, "/api/v1/vms", Some(body))
        .await?;
    anyhow::ensure!(s == 202, "create {name}: HTTP {s} {v}");
    Ok(v["vm"]["id"].as_str().unwrap().to_string())
}

async fn node_state(c: &TestCluster, via: usize, name: &str) -> Option<String> {
    let (s, v) = c
        .request(
            via,
            reqwest::Method::GET,
            "/api/v1/nodes?consistency=stale",
            None,
        )
        .await
        .ok()?;
    if s != 200 {
        return None;
    }
    v.as_array()?
        .iter()
        .find(|n| n["member"]["name"] == name)
        .and_then(|n| n["state"].as_str().map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_follower_fences_its_ha_vms_and_they_restart_elsewhere() -> anyhow::Result<()>
{
    scenario(false).await
}

/// The partitioned node is the leader: it keeps believing it leads, but without a quorum it
/// grants itself no lease, so it fences its own HA VMs before the new leader restarts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_fences_its_ha_vms_and_they_restart_elsewhere() -> anyhow::Result<()> {
    scenario(true).await
}

async fn scenario(partition_leader: bool) -> anyhow::Result<()> {
    let c = Arc::new(TestCluster::start(3, ha_tuning()).await?);
    // Partitioning a node while it is still being promoted would leave the membership change
    // (and so every write) waiting for it: wait for three voters first. The VM writes that
    // follow commit after the final membership entry.
    c.wait_voters(3).await?;
    let result = run(&c, partition_leader).await;
    if result.is_err() {
        c.dump_logs();
    }
    result
}

async fn run(c: &Arc<TestCluster>, partition_leader: bool) -> anyhow::Result<()> {
    let leader = c.wait_leader(0, None).await?;
    let victim = if partition_leader {
        leader
    } else {
        (leader + 1) % 3
    };
    let victim_name = c.nodes[victim].name.clone();
    let others: Vec<usize> = (0..3).filter(|i| *i != victim).collect();

    let ha_vms = vec![
        create(c, "ha-1", &victim_name, true).await?,
        create(c, "ha-2", &victim_name, true).await?,
    ];
    let plain = create(c, "plain-1", &victim_name, false).await?;
    for id in ha_vms.iter().chain([&plain]) {
        wait_state(c, leader, id, "running").await?;
    }
    let epochs: BTreeMap<String, u64> = {
        let mut m = BTreeMap::new();
        for id in &ha_vms {
            let v = vm(c, leader, id).await.unwrap();
            m.insert(id.clone(), v["epoch"].as_u64().unwrap());
        }
        m
    };

    // Poll every node's hypervisor for the whole test.
    let watch = Arc::new(Mutex::new(Watch::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (c, watch, stop) = (c.clone(), watch.clone(), stop.clone());
        tokio::spawn(async move {
            // Paces the polling; the test itself waits on conditions.
            let mut pace = tokio::time::interval(Duration::from_millis(20));
            while !stop.load(Ordering::Relaxed) {
                let mut seen: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
                let mut complete = true;
                for i in 0..3 {
                    match c.metrics_text(i).await {
                        Ok(text) => {
                            for vm in active_domains(&text) {
                                seen.entry(vm).or_default().insert(i);
                            }
                        }
                        Err(_) => complete = false,
                    }
                }
                {
                    let mut w = watch.lock().unwrap();
                    if complete {
                        w.samples += 1;
                    }
                    for (vm, nodes) in &seen {
                        if nodes.len() > 1 {
                            w.doubles
                                .push((vm.clone(), nodes.iter().copied().collect()));
                        }
                    }
                    w.last = seen;
                }
                pace.tick().await;
            }
        })
    };
    let active_on = |vm: &str| -> BTreeSet<usize> {
        watch
            .lock()
            .unwrap()
            .last
            .get(vm)
            .cloned()
            .unwrap_or_default()
    };
    eventually(
        "the poller to see every VM on the victim",
        Duration::from_secs(30),
        || async {
            ha_vms
                .iter()
                .chain([&plain])
                .all(|v| active_on(v) == BTreeSet::from([victim]))
                .then_some(())
        },
    )
    .await?;

    // Partition the victim from both other nodes.
    c.partition(victim)?;
    let t0 = Instant::now();

    eventually(
        "the victim to destroy its HA VMs when its lease lapses",
        Duration::from_secs(30),
        || async {
            ha_vms
                .iter()
                .all(|v| !active_on(v).contains(&victim))
                .then_some(())
        },
    )
    .await?;
    let fenced_after = t0.elapsed();
    assert!(
        active_on(&plain).contains(&victim),
        "the non-HA VM keeps running on the partitioned node"
    );

    let restarted_on = eventually(
        "the HA VMs to run on other nodes",
        Duration::from_secs(60),
        || async {
            let mut on = BTreeMap::new();
            for id in &ha_vms {
                let nodes = active_on(id);
                if nodes.len() != 1 || nodes.contains(&victim) {
                    return None;
                }
                on.insert(id.clone(), *nodes.iter().next()?);
            }
            Some(on)
        },
    )
    .await?;
    let restarted_after = t0.elapsed();
    println!(
        "HA (partitioned {}): partition -> HA VMs fenced on the old node after {fenced_after:?}, \
         running elsewhere after {restarted_after:?} (restarted on {restarted_on:?})",
        if partition_leader {
            "leader"
        } else {
            "follower"
        }
    );
    // Not before the lease plus margin (2 s + 1 s) from the last heartbeat the leader
    // received, which may precede the partition by up to one heartbeat interval (200 ms).
    assert!(
        restarted_after >= Duration::from_millis(2_750),
        "{restarted_after:?}"
    );
    assert!(
        fenced_after < restarted_after,
        "restarted before the old copies stopped"
    );

    // The replica agrees: new node, higher epoch, running; the victim is down; the non-HA VM
    // is reported unknown and stays placed on the victim; the change is in the audit log.
    let via = others[0];
    for id in &ha_vms {
        let v = wait_state(c, via, id, "running").await?;
        assert_ne!(
            v["node"].as_u64(),
            vm(c, via, &plain).await.unwrap()["node"].as_u64()
        );
        assert!(v["epoch"].as_u64().unwrap() > epochs[id], "{v}");
    }
    assert_eq!(
        node_state(c, via, &victim_name).await.as_deref(),
        Some("down")
    );
    let p = wait_state(c, via, &plain, "unknown").await?;
    assert_eq!(p["node"].as_u64(), Some(victim as u64 + 1), "{p}");
    let (s, audit) = c
        .request(
            via,
            reqwest::Method::GET,
            "/api/v1/audit?action=vm.mark_unknown&limit=500",
            None,
        )
        .await?;
    assert_eq!(s, 200, "{audit}");
    let marks = audit["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["action"] == "vm.mark_unknown" && e["target"] == format!("vm/{plain}"))
        .count();
    assert!(marks >= 1, "no audit entry for the unknown VM: {audit}");

    // Heal: the victim comes back up, removes its stale HA copies (their epoch is older and
    // they are placed elsewhere) and reports its non-HA VM running again.
    c.heal()?;
    eventually(
        "the victim to be up again",
        Duration::from_secs(30),
        || async {
            (node_state(c, via, &victim_name).await.as_deref() == Some("up")).then_some(())
        },
    )
    .await?;
    wait_state(c, via, &plain, "running").await?;
    eventually(
        "the victim to hold no copy of the HA VMs",
        Duration::from_secs(30),
        || async {
            let text = c.metrics_text(victim).await.ok()?;
            ha_vms
                .iter()
                .all(|id| !text.contains(&format!("vm=\"{id}\"")))
                .then_some(())
        },
    )
    .await?;
    // A few more rounds of polling after the heal, then the verdict.
    let samples_at_heal = watch.lock().unwrap().samples;
    eventually(
        "more samples after the heal",
        Duration::from_secs(30),
        || async { (watch.lock().unwrap().samples >= samples_at_heal + 20).then_some(()) },
    )
    .await?;
    for (id, node) in &restarted_on {
        assert_eq!(
            active_on(id),
            BTreeSet::from([*node]),
            "HA VM {id} stayed where it restarted"
        );
    }
    stop.store(true, Ordering::Relaxed);
    poller.await?;
    let w = watch.lock().unwrap();
    println!("HA: {} complete samples of every hypervisor", w.samples);
    assert!(w.samples > 50, "too few samples: {}", w.samples);
    assert!(
        w.doubles.is_empty(),
        "a VM ran on two nodes at once: {:?}",
        w.doubles
    );
    Ok(())
}
