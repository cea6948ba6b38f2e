//! Live migration of a real guest under QEMU between nodes that each run inside their own
//! libvirt host (network, mount and UTS namespaces, own libvirtd), through the QUIC tunnel.
//! Runs when CI provides libvirt, QEMU and the tiny guest (see `real_vm.rs`) and the tests run
//! as root; elsewhere each test prints SKIP and returns.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{eventually, fast_tuning, TestCluster};
use crate::migration::{create_on, migrate, node_id, node_id_via};
use crate::real_vm::{daemon_turn, real_env, RealEnv};
use crate::vms::{vm, wait_op};

fn hosts_env(test: &str) -> Option<RealEnv> {
    let env = real_env(test)?;
    if let Err(e) = node::hosts::available() {
        println!("SKIP {test}: separate libvirt hosts unavailable: {e}");
        return None;
    }
    Some(env)
}

async fn cluster(env: &RealEnv, n: usize) -> anyhow::Result<TestCluster> {
    TestCluster::start_on_hosts(
        n,
        fast_tuning(60_000, 10_000, 1_000),
        vec![
            // Inside each host's mount namespace this is that host's own libvirtd.
            ("NOVACRON_LIBVIRT_URI".into(), "qemu:///system".into()),
            ("NOVACRON_GUEST_KERNEL".into(), env.kernel.clone()),
            ("NOVACRON_GUEST_INITRD".into(), env.initrd.clone()),
            ("NOVACRON_DOMAIN_TYPE".into(), "qemu".into()),
        ],
    )
    .await
}

/// `virsh domstate` of the VM's domain on node i's host; "absent" when it has none.
fn domstate(c: &TestCluster, i: usize, id: &str) -> String {
    let host = c.host(i).expect("the cluster runs on hosts");
    let out = Command::new("virsh")
        .args([
            "-q",
            "-c",
            &host.outside_uri(),
            "domstate",
            &format!("nc-{id}"),
        ])
        .output()
        .expect("virsh runs");
    if !out.status.success() {
        return "absent".into();
    }
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The hosts whose libvirt runs the VM's guest.
fn running_on(c: &TestCluster, id: &str) -> Vec<usize> {
    (0..c.nodes.len())
        .filter(|i| domstate(c, *i, id) == "running")
        .collect()
}

/// Reads the console through node `via`'s API until a complete `tick N` line arrives after
/// connecting; returns N and when it arrived. A console stream cut short (the hosting node
/// changed, or a previous reader's stream was just taken over) is opened again.
async fn next_tick(c: &TestCluster, via: usize, id: &str) -> anyhow::Result<(u64, Instant)> {
    eventually(
        "a tick on the console",
        Duration::from_secs(180),
        || async {
            match next_tick_once(c, via, id).await {
                Ok(t) => Some(t),
                Err(e) => {
                    println!("console read ended early ({e:#}); reading again");
                    None
                }
            }
        },
    )
    .await
}

async fn next_tick_once(c: &TestCluster, via: usize, id: &str) -> anyhow::Result<(u64, Instant)> {
    let mut resp = c
        .http
        .get(format!("{}/api/v1/vms/{id}/console", c.nodes[via].url()))
        .bearer_auth(c.token.as_deref().unwrap())
        .timeout(Duration::from_secs(120))
        .send()
        .await?;
    anyhow::ensure!(
        resp.status().is_success(),
        "console: HTTP {}",
        resp.status()
    );
    let mut seen = String::new();
    let read = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(chunk) = resp.chunk().await? {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            let lines: Vec<&str> = seen.split('\n').collect();
            // Only complete lines count: the last piece may be a tick still being written.
            for l in lines[..lines.len() - 1].iter().rev() {
                if let Some(n) = l
                    .trim()
                    .strip_prefix("tick ")
                    .and_then(|n| n.trim().parse().ok())
                {
                    return Ok::<_, anyhow::Error>((n, Instant::now()));
                }
            }
        }
        anyhow::bail!("console closed before a tick")
    })
    .await;
    match read {
        Ok(r) => r,
        Err(_) => anyhow::bail!("no tick on the console within 120 s; saw: {seen}"),
    }
}

async fn op(c: &TestCluster, via: usize, op: &str) -> Option<Value> {
    let (s, v) = c
        .request(
            via,
            reqwest::Method::GET,
            &format!("/api/v1/operations/{op}"),
            None,
        )
        .await
        .ok()?;
    (s == 200).then_some(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_guest_migrates_live_through_the_tunnel_and_keeps_ticking() -> anyhow::Result<()>
{
    let test = "a_running_guest_migrates_live_through_the_tunnel_and_keeps_ticking";
    let Some(env) = hosts_env(test) else {
        return Ok(());
    };
    let _turn = daemon_turn();
    let c = cluster(&env, 2).await?;
    let n2 = node_id(&c, "n2").await?;
    let id = create_on(&c, "n1", "live", Some("tiny")).await?;
    let (before, _) = next_tick(&c, 0, &id).await?;
    assert_eq!(running_on(&c, &id), vec![0]);

    let started = Instant::now();
    let op_id = migrate(&c, 0, &id, json!({"target_node": "n2"})).await?;
    let done = wait_op(&c, 0, &op_id).await?;
    let took = started.elapsed();
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["result"]["mode"], "live", "{done}");
    let (after, _) = next_tick(&c, 1, &id).await?;
    let v = vm(&c, 0, &id).await.unwrap();
    println!(
        "live migration: total {} ms (libvirt job), downtime {} ms, {} bytes; request to done {:?}; \
         console tick {before} before, {after} after",
        done["result"]["total_ms"], done["result"]["downtime_ms"], done["result"]["bytes"], took
    );
    // The guest kept its state: its counter went on instead of starting again from 1.
    assert!(
        after > before,
        "tick {after} after is not past {before} before"
    );
    assert_eq!(v["node"], n2, "{v}");
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(running_on(&c, &id), vec![1]);
    assert_eq!(domstate(&c, 0, &id), "absent", "debris left on the source");
    assert!(done["result"]["downtime_ms"].as_u64().is_some(), "{done}");
    // The agents settle on the new placement: nothing restarts the guest on the source.
    let (later, _) = next_tick(&c, 0, &id).await?;
    assert!(later >= after);
    assert_eq!(running_on(&c, &id), vec![1]);
    Ok(())
}

/// The pid of the tunnel command libvirt started for node `i`'s migration, if any.
fn tunnel_process(c: &TestCluster, i: usize) -> Option<u32> {
    let prefix = c.nodes[i].dir.join("migration").join("novacron-tunnel-");
    let prefix = prefix.to_string_lossy().to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let argv0 = cmdline.split(|b| *b == 0).next()?;
        String::from_utf8_lossy(argv0)
            .starts_with(&prefix)
            .then_some(pid)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_tunnel_leaves_the_guest_running_on_the_source_only() -> anyhow::Result<()> {
    let test = "a_killed_tunnel_leaves_the_guest_running_on_the_source_only";
    let Some(env) = hosts_env(test) else {
        return Ok(());
    };
    let _turn = daemon_turn();
    let c = cluster(&env, 2).await?;
    let r = killed_tunnel(&c).await;
    if r.is_err() {
        c.dump_logs();
    }
    r
}

async fn killed_tunnel(c: &TestCluster) -> anyhow::Result<()> {
    let n1 = node_id(c, "n1").await?;
    let id = create_on(c, "n1", "cut", Some("tiny")).await?;
    let (before, _) = next_tick(c, 0, &id).await?;
    // A slow transfer (1 MiB/s) so the tunnel is cut while memory is being copied.
    let op_id = migrate(
        c,
        0,
        &id,
        json!({"target_node": "n2", "bandwidth_mib_s": 1}),
    )
    .await?;
    let pid = eventually(
        "the tunnel command to run",
        Duration::from_secs(60),
        || async { tunnel_process(c, 0) },
    )
    .await?;
    eventually(
        "memory to be in flight",
        Duration::from_secs(60),
        || async {
            let o = op(c, 0, &op_id).await?;
            (o["result"]["phase"] == "migrating" && domstate(c, 1, &id) != "absent").then_some(())
        },
    )
    .await?;
    let status = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    assert!(status.success());
    let done = wait_op(c, 0, &op_id).await?;
    println!("after the tunnel was killed: {done}");
    assert_eq!(done["state"], "failed", "{done}");
    assert!(
        done["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{done}"
    );
    let v = vm(c, 0, &id).await.unwrap();
    assert_eq!(v["node"], n1, "{v}");
    eventually(
        "no debris on the target",
        Duration::from_secs(60),
        || async { (domstate(c, 1, &id) == "absent").then_some(()) },
    )
    .await?;
    assert_eq!(running_on(c, &id), vec![0]);
    let (after, _) = next_tick(c, 0, &id).await?;
    assert!(
        after > before,
        "the guest did not keep running: {after} <= {before}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_mid_migration_leaves_the_guest_on_exactly_one_node() -> anyhow::Result<()>
{
    let test = "a_leader_killed_mid_migration_leaves_the_guest_on_exactly_one_node";
    let Some(env) = hosts_env(test) else {
        return Ok(());
    };
    let _turn = daemon_turn();
    let mut c = cluster(&env, 3).await?;
    let leader = c.wait_leader(0, None).await?;
    let (source, target) = ((leader + 1) % 3, (leader + 2) % 3);
    let (sname, tname) = (c.nodes[source].name.clone(), c.nodes[target].name.clone());
    let id = create_on(&c, &sname, "failover", Some("tiny")).await?;
    let op_id = migrate(
        &c,
        source,
        &id,
        json!({"target_node": tname, "bandwidth_mib_s": 8}),
    )
    .await?;
    eventually("the transfer to start", Duration::from_secs(60), || async {
        let o = op(&c, source, &op_id).await?;
        (o["result"]["phase"] == "migrating").then_some(())
    })
    .await?;
    c.kill(leader)?;
    let new_leader = c.wait_leader(source, Some(leader)).await?;
    println!("killed leader {leader} mid-migration; new leader {new_leader}");
    let done = eventually(
        "the migration to finish",
        Duration::from_secs(180),
        || async {
            let o = op(&c, source, &op_id).await?;
            (o["state"] == "succeeded" || o["state"] == "failed").then_some(o)
        },
    )
    .await?;
    println!("outcome after the leader change: {done}");
    let v = vm(&c, source, &id).await.unwrap();
    let placed = if done["state"] == "succeeded" {
        target
    } else {
        source
    };
    assert_eq!(
        v["node"],
        node_id_via(&c, source, &c.nodes[placed].name).await?,
        "{v}"
    );
    // The guest runs on exactly the node the cluster placed it on, and stays there.
    eventually(
        "the guest on exactly one host",
        Duration::from_secs(60),
        || async { (running_on(&c, &id) == vec![placed]).then_some(()) },
    )
    .await?;
    next_tick(&c, source, &id).await?;
    assert_eq!(running_on(&c, &id), vec![placed]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_node_moves_all_its_guests_live() -> anyhow::Result<()> {
    let test = "draining_a_node_moves_all_its_guests_live";
    let Some(env) = hosts_env(test) else {
        return Ok(());
    };
    let _turn = daemon_turn();
    let c = cluster(&env, 3).await?;
    let n1 = node_id(&c, "n1").await?;
    let n3 = node_id(&c, "n3").await?;
    let mut ids = Vec::new();
    for i in 0..2 {
        ids.push(create_on(&c, "n1", &format!("drain{i}"), Some("tiny")).await?);
    }
    let (s, v) = c
        .request(0, reqwest::Method::POST, "/api/v1/nodes/n3/drain", None)
        .await?;
    assert_eq!(s, 200, "{v}");
    let started = Instant::now();
    let (s, v) = c
        .request(0, reqwest::Method::POST, "/api/v1/nodes/n1/drain", None)
        .await?;
    assert_eq!(s, 200, "{v}");
    eventually(
        "every guest to leave n1",
        Duration::from_secs(300),
        || async {
            for id in &ids {
                let v = vm(&c, 0, id).await?;
                if v["node"] == n1 || v["state"] != "running" {
                    return None;
                }
            }
            Some(())
        },
    )
    .await?;
    println!("drained 2 guests off n1 in {:?}", started.elapsed());
    for id in &ids {
        let v = vm(&c, 0, id).await.unwrap();
        assert_ne!(v["node"], n3, "moved onto a drained node: {v}");
        assert_eq!(running_on(&c, id), vec![1], "{id}");
        next_tick(&c, 0, id).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_leader_killed_mid_migration_is_rolled_back_by_the_new_leader(
) -> anyhow::Result<()> {
    let test = "a_source_leader_killed_mid_migration_is_rolled_back_by_the_new_leader";
    let Some(env) = hosts_env(test) else {
        return Ok(());
    };
    let _turn = daemon_turn();
    let mut c = cluster(&env, 3).await?;
    let leader = c.wait_leader(0, None).await?;
    let (source, target) = (leader, (leader + 1) % 3);
    let other = (leader + 2) % 3;
    let (sname, tname) = (c.nodes[source].name.clone(), c.nodes[target].name.clone());
    let id = create_on(&c, &sname, "orphan", Some("tiny")).await?;
    let op_id = migrate(
        &c,
        other,
        &id,
        json!({"target_node": tname, "bandwidth_mib_s": 1}),
    )
    .await?;
    eventually(
        "memory to be in flight",
        Duration::from_secs(60),
        || async {
            let o = op(&c, other, &op_id).await?;
            (o["result"]["phase"] == "migrating" && domstate(&c, target, &id) != "absent")
                .then_some(())
        },
    )
    .await?;
    // The source node (also the leader) dies: its tunnel goes with it, libvirt's job fails and
    // the guest stays on the source host, where the dead node's libvirtd keeps it running.
    c.kill(source)?;
    let done = eventually(
        "the new leader to settle the migration",
        Duration::from_secs(120),
        || async {
            let o = op(&c, other, &op_id).await?;
            (o["state"] == "succeeded" || o["state"] == "failed").then_some(o)
        },
    )
    .await?;
    println!("outcome with the source dead: {done}");
    assert_eq!(done["state"], "failed", "{done}");
    eventually(
        "no debris on the target",
        Duration::from_secs(60),
        || async { (domstate(&c, target, &id) == "absent").then_some(()) },
    )
    .await?;
    assert_eq!(running_on(&c, &id), vec![source]);
    // The source node comes back and keeps its guest; still exactly one copy.
    c.restart(source).await?;
    c.wait_ready(source).await?;
    let v = vm(&c, other, &id).await.unwrap();
    assert_eq!(v["node"], node_id_via(&c, other, &sname).await?, "{v}");
    // The restarted node serves the console once its agent reconnected to libvirt.
    next_tick(&c, other, &id).await?;
    assert_eq!(running_on(&c, &id), vec![source]);
    Ok(())
}
