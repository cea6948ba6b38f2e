//! Migration on libvirt's test driver, which cannot migrate live: the same Raft state machine
//! moves the VM by a hand-off between the two agents (reported as `mode: "handoff"`), and a
//! drained node's VMs all move away. The live path is tested on QEMU in `real_migration.rs`.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{eventually, fast_tuning, TestCluster};
use crate::vms::{vm, wait_op, wait_state};

pub async fn node_id(c: &TestCluster, name: &str) -> anyhow::Result<u64> {
    node_id_via(c, 0, name).await
}

pub async fn node_id_via(c: &TestCluster, via: usize, name: &str) -> anyhow::Result<u64> {
    let (s, v) = c
        .request(via, reqwest::Method::GET, "/api/v1/nodes", None)
        .await?;
    anyhow::ensure!(s == 200, "nodes: HTTP {s} {v}");
    v.as_array()
        .into_iter()
        .flatten()
        .find(|n| n["member"]["name"] == name)
        .and_then(|n| n["id"].as_u64())
        .ok_or_else(|| anyhow::anyhow!("no node {name} in {v}"))
}

pub async fn create_on(
    c: &TestCluster,
    node: &str,
    name: &str,
    image: Option<&str>,
) -> anyhow::Result<String> {
    let mut body =
        json!({"name": name, "vcpus": 1, "memory_mib": 128, "placement": {"node": node}});
    if let Some(i) = image {
        body["image"] = json!(i);
    }
    let (s, v) = c
        .request(0, reqwest::Method::POST, "/api/v1/vms", Some(body))
        .await?;
    anyhow::ensure!(s == 202, "create: HTTP {s} {v}");
    let id = v["vm"]["id"].as_str().unwrap().to_string();
    let op = wait_op(c, 0, v["operation"]["id"].as_str().unwrap()).await?;
    anyhow::ensure!(op["state"] == "succeeded", "create failed: {op}");
    wait_state(c, 0, &id, "running").await?;
    Ok(id)
}

pub async fn migrate(c: &TestCluster, via: usize, id: &str, body: Value) -> anyhow::Result<String> {
    let (s, v) = c
        .request(
            via,
            reqwest::Method::POST,
            &format!("/api/v1/vms/{id}/migrate"),
            Some(body),
        )
        .await?;
    anyhow::ensure!(s == 202, "migrate: HTTP {s} {v}");
    Ok(v["operation"]["id"].as_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_moves_by_handoff_on_the_test_driver() -> anyhow::Result<()> {
    let c = TestCluster::start(3, fast_tuning(60_000, 10_000, 1_000)).await?;
    let (n1, n2) = (node_id(&c, "n1").await?, node_id(&c, "n2").await?);
    let id = create_on(&c, "n1", "mover", None).await?;
    let before = vm(&c, 0, &id).await.unwrap();
    assert_eq!(before["node"], n1);

    let op = migrate(&c, 1, &id, json!({"target_node": "n2"})).await?;
    let done = wait_op(&c, 0, &op).await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["result"]["mode"], "handoff", "{done}");
    assert_eq!(done["result"]["phase"], "done", "{done}");
    assert_eq!(done["result"]["target"], n2);
    let after = wait_state(&c, 0, &id, "running").await?;
    assert_eq!(after["node"], n2, "{after}");
    // The source counted it.
    let counted = c
        .metric(
            0,
            "novacron_migrations_total{mode=\"handoff\",outcome=\"succeeded\"}",
        )
        .await?;
    assert_eq!(counted, 1.0);
    // The owner switch is a new placement: the fencing token moved on by exactly one.
    assert_eq!(
        after["epoch"].as_u64().unwrap(),
        before["epoch"].as_u64().unwrap() + 1
    );

    // Without a target the leader chooses another node than the current one.
    let op = migrate(&c, 0, &id, json!({})).await?;
    let done = wait_op(&c, 0, &op).await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    let moved = wait_state(&c, 0, &id, "running").await?;
    assert_ne!(moved["node"], n2, "{moved}");

    // A stopped VM cannot migrate live, and a VM cannot migrate to where it runs.
    let (s, v) = c
        .request(
            0,
            reqwest::Method::POST,
            &format!("/api/v1/vms/{id}/stop"),
            None,
        )
        .await?;
    assert_eq!(s, 202, "{v}");
    wait_state(&c, 0, &id, "stopped").await?;
    let (s, v) = c
        .request(
            0,
            reqwest::Method::POST,
            &format!("/api/v1/vms/{id}/migrate"),
            Some(json!({"target_node": "n1"})),
        )
        .await?;
    assert!((400..500).contains(&s), "HTTP {s} {v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_every_vm_off_the_node_and_none_onto_a_drained_one() -> anyhow::Result<()> {
    let c = TestCluster::start(3, fast_tuning(60_000, 10_000, 1_000)).await?;
    let (n1, n3) = (node_id(&c, "n1").await?, node_id(&c, "n3").await?);
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(create_on(&c, "n1", &format!("d{i}"), None).await?);
    }
    // n3 is drained first (empty): nothing may move onto it.
    let (s, v) = c
        .request(0, reqwest::Method::POST, "/api/v1/nodes/n3/drain", None)
        .await?;
    assert_eq!(s, 200, "{v}");
    let (s, v) = c
        .request(1, reqwest::Method::POST, "/api/v1/nodes/n1/drain", None)
        .await?;
    assert_eq!(s, 200, "{v}");
    eventually("every VM to leave n1", Duration::from_secs(90), || async {
        for id in &ids {
            let v = vm(&c, 0, id).await?;
            if v["node"] == n1 || v["state"] != "running" {
                return None;
            }
        }
        Some(())
    })
    .await?;
    for id in &ids {
        let v = vm(&c, 0, id).await.unwrap();
        assert_ne!(v["node"], n3, "moved onto a drained node: {v}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_migrates_a_vm_and_waits_for_a_drain() -> anyhow::Result<()> {
    let c = TestCluster::start(3, fast_tuning(60_000, 10_000, 1_000)).await?;
    let (n1, n3) = (node_id(&c, "n1").await?, node_id(&c, "n3").await?);
    let a = create_on(&c, "n1", "cli-a", None).await?;
    let b = create_on(&c, "n2", "cli-b", None).await?;
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(crate::harness::BIN)
            .args(args)
            .env("NOVACRON_URL", c.nodes[1].url())
            .env("NOVACRON_TOKEN", c.token.as_deref().unwrap())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = cli(&["vm", "migrate", &a, "--to", "n3"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("succeeded") && out.contains("handoff"),
        "{out}"
    );
    assert_eq!(vm(&c, 0, &a).await.unwrap()["node"], n3);

    // `node drain` returns once nothing runs on the node any more, and says how it went.
    let (ok, out, err) = cli(&["node", "drain", "n2"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("0 running VM(s) left"), "{out}");
    let v = wait_state(&c, 0, &b, "running").await?;
    assert!(v["node"] == n1 || v["node"] == n3, "{v}");
    Ok(())
}
