//! Three processes form a cluster, survive a leader SIGKILL and a whole-cluster restart.

use std::collections::BTreeSet;

use crate::harness::{fast_tuning, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_fail_over_and_restart() -> anyhow::Result<()> {
    let mut c = TestCluster::start(3, fast_tuning(60_000, 10_000, 1_000)).await?;

    // Three voters, eventually (the joiners are promoted once caught up).
    c.wait_voters(3).await?;

    // A write through a follower is readable on every node, linearizably.
    let leader = c.wait_leader(0, None).await?;
    let follower = (leader + 1) % 3;
    let t = c.create_tenant(follower, "through-follower").await?;
    let id = t["id"].as_str().unwrap().to_string();
    for i in 0..3 {
        let (s, v) = c
            .request(
                i,
                reqwest::Method::GET,
                &format!("/api/v1/tenants/{id}"),
                None,
            )
            .await?;
        assert_eq!(s, 200, "node {i}: {v}");
        assert_eq!(v["name"], "through-follower");
    }

    // SIGKILL the leader: a new leader is elected and a write succeeds.
    let mut written = vec!["through-follower".to_string()];
    c.kill(leader)?;
    let survivor = (leader + 1) % 3;
    let new_leader = c.wait_leader(survivor, Some(leader)).await?;
    assert_ne!(new_leader, leader);
    c.create_tenant_eventually(survivor, "after-failover")
        .await?;
    written.push("after-failover".into());

    // The killed node comes back and catches up with everything.
    c.restart(leader).await?;
    c.wait_ready(leader).await?;
    c.wait_has_tenants(leader, &written).await?;

    // Whole-cluster stop (SIGTERM, clean) and start keeps every acknowledged write.
    for i in 0..3 {
        c.stop(i)?;
    }
    for i in 0..3 {
        c.restart(i).await?;
    }
    for i in 0..3 {
        c.wait_ready(i).await?;
    }
    c.create_tenant_eventually(0, "after-restart").await?;
    written.push("after-restart".into());
    // Raft metrics are exported on every node.
    let text = c
        .http
        .get(format!("{}/metrics", c.nodes[0].url()))
        .send()
        .await?
        .text()
        .await?;
    for name in [
        "novacron_raft_term",
        "novacron_raft_leader_changes_total",
        "novacron_raft_commit_index",
        "novacron_raft_last_applied",
        "novacron_raft_apply_lag",
        "novacron_raft_append_seconds_bucket",
        "novacron_raft_write_seconds_bucket",
        "novacron_http_requests_total",
    ] {
        assert!(text.contains(name), "metric {name} missing");
    }
    for i in 0..3 {
        c.wait_has_tenants(i, &written).await?;
        let linear: BTreeSet<String> = c
            .tenant_names(i, "linearizable")
            .await?
            .into_iter()
            .collect();
        for w in &written {
            assert!(linear.contains(w), "node {i} lost {w}");
        }
    }
    Ok(())
}
