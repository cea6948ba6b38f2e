//! Six nodes: five voters and a learner; a voter gone too long is replaced by the learner and
//! comes back as a learner.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{eventually, fast_tuning, TestCluster};

fn roles(v: &Value) -> Vec<(String, String)> {
    v["members"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    (
                        m["name"].as_str().unwrap_or_default().to_string(),
                        m["role"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn count(v: &Value, role: &str) -> usize {
    roles(v).iter().filter(|(_, r)| r == role).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learner_replaces_a_voter_down_beyond_the_timeout() -> anyhow::Result<()> {
    let mut c = TestCluster::start(6, fast_tuning(3_000, 10_000, 1_000)).await?;
    eventually(
        "5 voters and 1 learner",
        Duration::from_secs(60),
        || async {
            let v = c.status(0).await.ok()?;
            (count(&v, "voter") == 5 && count(&v, "learner") == 1).then_some(())
        },
    )
    .await?;

    // Stop a voter that is not the leader.
    let leader = c.wait_leader(0, None).await?;
    let v = c.status(leader).await?;
    let victim_name = roles(&v)
        .into_iter()
        .find(|(n, r)| r == "voter" && *n != c.nodes[leader].name)
        .map(|(n, _)| n)
        .unwrap();
    let learner_name = roles(&v)
        .into_iter()
        .find(|(_, r)| r == "learner")
        .map(|(n, _)| n)
        .unwrap();
    let victim = c.nodes.iter().position(|n| n.name == victim_name).unwrap();
    c.kill(victim)?;

    // The learner is promoted, voters stay at 5, the stopped node is now a learner.
    let observer = leader;
    eventually(
        "the learner to replace the stopped voter",
        Duration::from_secs(60),
        || async {
            let v = c.status(observer).await.ok()?;
            let r = roles(&v);
            let promoted = r
                .iter()
                .any(|(n, role)| *n == learner_name && role == "voter");
            let demoted = r
                .iter()
                .any(|(n, role)| *n == victim_name && role == "learner");
            (promoted && demoted && count(&v, "voter") == 5).then_some(())
        },
    )
    .await?;

    // The stopped node comes back, as a learner, and catches up.
    c.restart(victim).await?;
    c.wait_ready(victim).await?;
    c.create_tenant_eventually(observer, "after-replacement")
        .await?;
    c.wait_has_tenants(victim, &["after-replacement".to_string()])
        .await?;
    let v = c.status(observer).await?;
    assert!(
        roles(&v).contains(&(victim_name.clone(), "learner".to_string())),
        "{victim_name} should be a learner: {v}"
    );
    assert_eq!(count(&v, "voter"), 5, "{v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_leaves_the_membership() -> anyhow::Result<()> {
    let c = TestCluster::start(4, fast_tuning(60_000, 10_000, 1_000)).await?;
    eventually("4 members", Duration::from_secs(60), || async {
        let v = c.status(0).await.ok()?;
        (roles(&v).len() == 4 && count(&v, "voter") == 3).then_some(())
    })
    .await?;
    let (s, v) = c
        .request(0, reqwest::Method::DELETE, "/api/v1/nodes/n4", None)
        .await?;
    assert_eq!(s, 204, "{v}");
    eventually("n4 to leave", Duration::from_secs(30), || async {
        let v = c.status(0).await.ok()?;
        let r = roles(&v);
        (r.len() == 3 && !r.iter().any(|(n, _)| n == "n4")).then_some(())
    })
    .await?;
    // Its name cannot be reused by a node with the old identity.
    let (s, _) = c
        .request(0, reqwest::Method::DELETE, "/api/v1/nodes/n4", None)
        .await?;
    assert_eq!(s, 404);
    Ok(())
}
