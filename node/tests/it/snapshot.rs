//! A node that fell behind past log compaction catches up by installing a snapshot.

use crate::harness::{fast_tuning, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_compaction_installs_a_snapshot() -> anyhow::Result<()> {
    // Snapshot every 50 entries, keep 10 behind it: the log is purged quickly.
    let mut c = TestCluster::start(3, fast_tuning(60_000, 50, 10)).await?;
    let lagging = 2;
    c.wait_has_tenants(lagging, &[]).await?;
    let applied_at_stop = c.metric(lagging, "novacron_raft_last_log_index").await?;
    c.stop(lagging)?;
    let mut names = Vec::new();
    for k in 0..200 {
        let name = format!("t{k:04}");
        c.create_tenant_eventually(0, &name).await?;
        names.push(name);
    }
    let leader = c.wait_leader(0, Some(lagging)).await?;
    let purged = c.metric(leader, "novacron_raft_purged_index").await?;
    assert!(
        purged > applied_at_stop,
        "the leader must have purged past the lagging node's log ({purged} <= {applied_at_stop})"
    );
    c.restart(lagging).await?;
    c.wait_ready(lagging).await?;
    c.wait_has_tenants(lagging, &names).await?;
    let snap = c.metric(lagging, "novacron_raft_snapshot_index").await?;
    assert!(
        snap > applied_at_stop,
        "the lagging node holds no snapshot past its old log"
    );
    Ok(())
}
