//! VM life cycle through the REST API of a 3-node cluster, on libvirt's test driver: the agent
//! on the assigned node makes libvirt match, reports back, and finishes the operations.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{eventually, fast_tuning, TestCluster};

pub async fn vm(c: &TestCluster, via: usize, id: &str) -> Option<Value> {
    let (s, v) = c
        .request(
            via,
            reqwest::Method::GET,
            &format!("/api/v1/vms/{id}"),
            None,
        )
        .await
        .ok()?;
    (s == 200).then_some(v)
}

pub async fn wait_state(
    c: &TestCluster,
    via: usize,
    id: &str,
    state: &str,
) -> anyhow::Result<Value> {
    eventually(
        &format!("vm {id} to be {state}"),
        Duration::from_secs(60),
        || async {
            let v = vm(c, via, id).await?;
            (v["state"] == state).then_some(v)
        },
    )
    .await
}

pub async fn wait_op(c: &TestCluster, via: usize, op: &str) -> anyhow::Result<Value> {
    eventually(
        &format!("operation {op} to finish"),
        Duration::from_secs(60),
        || async {
            let (s, v) = c
                .request(
                    via,
                    reqwest::Method::GET,
                    &format!("/api/v1/operations/{op}"),
                    None,
                )
                .await
                .ok()?;
            (s == 200 && (v["state"] == "succeeded" || v["state"] == "failed")).then_some(v)
        },
    )
    .await
}

async fn post(
    c: &TestCluster,
    via: usize,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let (s, v) = c.request(via, reqwest::Method::POST, path, body).await?;
    anyhow::ensure!(s == 202, "POST {path}: HTTP {s} {v}");
    Ok(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_life_cycle_on_the_test_driver() -> anyhow::Result<()> {
    let c = TestCluster::start(3, fast_tuning(60_000, 10_000, 1_000)).await?;
    let leader = c.wait_leader(0, None).await?;
    let follower = (leader + 1) % 3;

    let created = post(
        &c,
        follower,
        "/api/v1/vms",
        Some(json!({"name": "web-1", "vcpus": 1, "memory_mib": 128})),
    )
    .await?;
    let id = created["vm"]["id"].as_str().unwrap().to_string();
    let op = created["operation"]["id"].as_str().unwrap().to_string();
    let op = wait_op(&c, follower, &op).await?;
    assert_eq!(op["state"], "succeeded", "{op}");
    let running = wait_state(&c, leader, &id, "running").await?;
    assert!(running["node"].is_u64(), "placed on a node: {running}");
    assert!(running["epoch"].as_u64().unwrap() >= 1);

    // Stop, start, reboot: each operation finishes when the agent has done it.
    let stop = post(&c, 0, &format!("/api/v1/vms/{id}/stop"), None).await?;
    assert_eq!(
        wait_op(&c, 0, stop["operation"]["id"].as_str().unwrap()).await?["state"],
        "succeeded"
    );
    wait_state(&c, 1, &id, "stopped").await?;
    let start = post(&c, 1, &format!("/api/v1/vms/{id}/start"), None).await?;
    assert_eq!(
        wait_op(&c, 1, start["operation"]["id"].as_str().unwrap()).await?["state"],
        "succeeded"
    );
    wait_state(&c, 2, &id, "running").await?;
    let reboot = post(&c, 2, &format!("/api/v1/vms/{id}/reboot"), None).await?;
    assert_eq!(
        wait_op(&c, 2, reboot["operation"]["id"].as_str().unwrap()).await?["state"],
        "succeeded"
    );

    // Delete: the record disappears once the agent has removed the domain.
    let (s, del) = c
        .request(
            0,
            reqwest::Method::DELETE,
            &format!("/api/v1/vms/{id}"),
            None,
        )
        .await?;
    assert_eq!(s, 202, "{del}");
    assert_eq!(
        wait_op(&c, 0, del["operation"]["id"].as_str().unwrap()).await?["state"],
        "succeeded"
    );
    eventually("the VM record to go", Duration::from_secs(30), || async {
        vm(&c, 0, &id).await.is_none().then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_spread_over_nodes_and_quota_holds_across_nodes() -> anyhow::Result<()> {
    let c = TestCluster::start(3, fast_tuning(60_000, 10_000, 1_000)).await?;
    // The scheduler places only on nodes that are up and have reported their capacity.
    eventually(
        "every node up with its capacity known",
        Duration::from_secs(30),
        || async {
            let (_, v) = c
                .request(0, reqwest::Method::GET, "/api/v1/nodes", None)
                .await
                .ok()?;
            let nodes = v.as_array().or_else(|| v["items"].as_array())?;
            let ready = nodes
                .iter()
                .filter(|n| n["state"] == "up" && !n["capacity"].is_null())
                .count();
            (ready == 3).then_some(())
        },
    )
    .await?;
    let (s, t) = c
        .request(
            0,
            reqwest::Method::POST,
            "/api/v1/tenants",
            Some(json!({"name": "q", "quota": {"max_vms": 10}})),
        )
        .await?;
    assert_eq!(s, 201, "{t}");
    let tenant = t["id"].as_str().unwrap().to_string();
    // 50 concurrent creates spread over the 3 nodes: exactly 10 are accepted.
    let mut tasks = Vec::new();
    for k in 0..50 {
        let c = &c;
        let tenant = tenant.clone();
        tasks.push(async move {
            let body = json!({"name": format!("q{k}"), "vcpus": 1, "memory_mib": 64, "tenant": tenant, "start": false});
            c.request(k % 3, reqwest::Method::POST, "/api/v1/vms", Some(body)).await
        });
    }
    let results = futures::future::join_all(tasks).await;
    let mut accepted = 0;
    for r in results {
        let (s, v) = r?;
        match s {
            202 => accepted += 1,
            409 => assert_eq!(v["code"], "quota_exceeded", "{v}"),
            other => panic!("unexpected HTTP {other}: {v}"),
        }
    }
    assert_eq!(accepted, 10);
    // The leader's scheduler places them shortly after they are created.
    let items = eventually(
        "the 10 VMs to be placed",
        Duration::from_secs(30),
        || async {
            let (_, list) = c
                .request(
                    2,
                    reqwest::Method::GET,
                    &format!("/api/v1/vms?tenant={tenant}&limit=100"),
                    None,
                )
                .await
                .ok()?;
            let items = list["items"].as_array()?.clone();
            items.iter().all(|v| v["node"].is_u64()).then_some(items)
        },
    )
    .await?;
    assert_eq!(items.len(), 10);
    let nodes: std::collections::BTreeSet<u64> =
        items.iter().filter_map(|v| v["node"].as_u64()).collect();
    assert!(nodes.len() >= 2, "VMs should spread over nodes: {nodes:?}");
    Ok(())
}
