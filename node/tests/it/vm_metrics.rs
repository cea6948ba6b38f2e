//! Per-VM statistics on a 3-node cluster over libvirt's test driver: the hosting node samples
//! its VMs, exports them on `/metrics`, and any other node serves the series through the API by
//! asking the hosting node over QUIC.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{eventually, fast_tuning, TestCluster};
use crate::vms::wait_state;

/// The fast test timers, sampling statistics every 200 ms.
fn tuning() -> String {
    let mut t: Value = serde_json::from_str(&fast_tuning(60_000, 10_000, 1_000)).unwrap();
    t["stats_interval_ms"] = json!(200);
    t.to_string()
}

/// The index in `c.nodes` of the node with Raft id `id`.
async fn index_of(c: &TestCluster, id: u64) -> anyhow::Result<usize> {
    let status = c.status(0).await?;
    let member = status["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["id"] == id))
        .ok_or_else(|| anyhow::anyhow!("node {id} not in {status}"))?;
    let api = member["api_addr"].as_str().unwrap_or_default();
    c.nodes
        .iter()
        .position(|n| n.api == api)
        .ok_or_else(|| anyhow::anyhow!("no test node serves {api}"))
}

async fn metrics_text(c: &TestCluster, i: usize) -> anyhow::Result<String> {
    Ok(c.http
        .get(format!("{}/metrics", c.nodes[i].url()))
        .send()
        .await?
        .text()
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_metrics_are_served_by_a_node_that_does_not_host_the_vm() -> anyhow::Result<()> {
    let c = TestCluster::start(3, tuning()).await?;
    let (s, created) = c
        .request(
            0,
            reqwest::Method::POST,
            "/api/v1/vms",
            Some(json!({"name": "stats-1", "vcpus": 2, "memory_mib": 128})),
        )
        .await?;
    assert_eq!(s, 202, "{created}");
    let id = created["vm"]["id"].as_str().unwrap().to_string();
    let vm = wait_state(&c, 0, &id, "running").await?;
    let host = index_of(&c, vm["node"].as_u64().unwrap()).await?;
    let other = (host + 1) % 3;

    // Through a node that does not run the VM: at least two samples, so a rate exists.
    let path = format!("/api/v1/vms/{id}/metrics");
    let series = eventually(
        "two samples with rates",
        Duration::from_secs(30),
        || async {
            let (s, v) = c
                .request(other, reqwest::Method::GET, &path, None)
                .await
                .ok()?;
            let samples = v["samples"].as_array()?;
            (s == 200 && samples.len() >= 2 && samples.iter().any(|x| x["cpu_percent"].is_number()))
                .then_some(v)
        },
    )
    .await;
    let series = match series {
        Ok(v) => v,
        Err(e) => {
            c.dump_logs();
            return Err(e);
        }
    };
    assert_eq!(series["vm_id"], id.as_str());
    assert_eq!(series["node"], vm["node"], "sampled by the hosting node");
    assert_eq!(series["interval_ms"], 200);
    let samples = series["samples"].as_array().unwrap();
    let last = samples.last().unwrap();
    assert_eq!(last["vcpus"], 2);
    assert_eq!(last["memory_bytes"], 128u64 * 1024 * 1024);
    let at: Vec<u64> = samples
        .iter()
        .map(|s| s["at_ms"].as_u64().unwrap())
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "oldest first: {at:?}");

    // `since` returns only what is newer.
    let cut = at[at.len() - 2];
    let (s, newer) = c
        .request(
            other,
            reqwest::Method::GET,
            &format!("{path}?since={cut}"),
            None,
        )
        .await?;
    assert_eq!(s, 200, "{newer}");
    assert!(newer["samples"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["at_ms"].as_u64().unwrap() > cut));
    assert!(!newer["samples"].as_array().unwrap().is_empty());

    // Prometheus: the hosting node exports the VM with its id and tenant; the others do not.
    let text = metrics_text(&c, host).await?;
    let tenant = vm["tenant"].as_str().unwrap();
    let line = format!("novacron_vm_memory_bytes{{tenant=\"{tenant}\",vm=\"{id}\"}} 134217728");
    assert!(text.contains(&line), "missing {line} in:\n{text}");
    assert!(text.contains("novacron_vm_cpu_time_seconds{"), "{text}");
    assert!(!metrics_text(&c, other).await?.contains(&id));

    // Deleted: the series goes with the VM.
    let (s, _) = c
        .request(
            0,
            reqwest::Method::DELETE,
            &format!("/api/v1/vms/{id}"),
            None,
        )
        .await?;
    assert_eq!(s, 202);
    eventually(
        "the VM to leave /metrics",
        Duration::from_secs(30),
        || async {
            let text = metrics_text(&c, host).await.ok()?;
            (!text.contains(&id)).then_some(())
        },
    )
    .await?;
    Ok(())
}
