//! The scheduler on a real 3-node cluster (libvirt's test driver): VMs created through the API
//! are placed by the leader's controller, every decision is explained on every node (also by
//! `novacron vm explain`), and a simulated drain says what would move where without moving
//! anything.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{eventually, fast_tuning, TestCluster, BIN};
use crate::vms::vm;

async fn create(c: &TestCluster, via: usize, body: Value) -> anyhow::Result<String> {
    let (s, v) = c
        .request(via, reqwest::Method::POST, "/api/v1/vms", Some(body))
        .await?;
    anyhow::ensure!(s == 202, "create: HTTP {s} {v}");
    Ok(v["vm"]["id"].as_str().unwrap().to_string())
}

async fn placement(c: &TestCluster, via: usize, id: &str) -> Option<Value> {
    let (s, v) = c
        .request(
            via,
            reqwest::Method::GET,
            &format!("/api/v1/vms/{id}/placement"),
            None,
        )
        .await
        .ok()?;
    (s == 200).then_some(v)
}

/// Node name by id, once every node has reported its capacity.
async fn nodes_with_capacity(c: &TestCluster) -> anyhow::Result<BTreeMap<u64, String>> {
    eventually(
        "every node to report its capacity",
        Duration::from_secs(30),
        || async {
            let (_, v) = c
                .request(0, reqwest::Method::GET, "/api/v1/nodes", None)
                .await
                .ok()?;
            let nodes = v.as_array()?;
            (nodes.len() == 3
                && nodes
                    .iter()
                    .all(|n| n["capacity"]["vcpus"].as_u64() > Some(0)))
            .then(|| {
                nodes
                    .iter()
                    .map(|n| {
                        (
                            n["id"].as_u64().unwrap(),
                            n["member"]["name"].as_str().unwrap().to_string(),
                        )
                    })
                    .collect()
            })
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placements_are_made_by_the_scheduler_and_explained_everywhere() -> anyhow::Result<()> {
    let c = TestCluster::start(3, fast_tuning(60_000, 10_000, 1_000)).await?;
    let names = nodes_with_capacity(&c).await?;
    // Three members of one anti-affinity group land on three different nodes; a fourth fits
    // nowhere and says why.
    let mut db = Vec::new();
    for k in 0..3 {
        let body = json!({"name": format!("db-{k}"), "vcpus": 1, "memory_mib": 64,
            "start": false, "placement": {"anti_affinity_group": "db"}});
        db.push(create(&c, k % 3, body).await?);
    }
    let placed: BTreeSet<u64> = eventually("db VMs placed", Duration::from_secs(30), || async {
        let mut nodes = BTreeSet::new();
        for id in &db {
            nodes.insert(vm(&c, 1, id).await?["node"].as_u64()?);
        }
        Some(nodes)
    })
    .await?;
    assert_eq!(
        placed.len(),
        3,
        "anti-affinity spreads the group: {placed:?}"
    );
    let extra = create(
        &c,
        2,
        json!({"name": "db-3", "vcpus": 1, "memory_mib": 64, "start": false,
            "placement": {"anti_affinity_group": "db"}}),
    )
    .await?;
    let why = eventually("db-3 explained", Duration::from_secs(30), || async {
        placement(&c, 1, &extra).await
    })
    .await?;
    assert_eq!(why["chosen"], Value::Null, "{why}");
    assert_eq!(why["filtered"]["anti_affinity"], 3, "{why}");
    assert_eq!(why["nodes_considered"], 3);
    assert!(vm(&c, 0, &extra).await.unwrap()["node"].is_null());

    // A required node is a constraint: the VM goes there, the others are filtered for it.
    let (&target, target_name) = names.iter().last().unwrap();
    let pinned = create(
        &c,
        0,
        json!({"name": "pinned", "vcpus": 1, "memory_mib": 64, "start": false,
            "placement": {"node": target_name}}),
    )
    .await?;
    let why = eventually("pinned explained", Duration::from_secs(30), || async {
        placement(&c, 2, &pinned).await
    })
    .await?;
    assert_eq!(why["chosen"], target, "{why}");
    assert_eq!(why["chosen_name"], target_name.as_str());
    assert_eq!(why["filtered"]["required_node"], 2, "{why}");
    let verdicts = why["verdicts"].as_array().unwrap();
    assert_eq!(verdicts.len(), 3);
    assert_eq!(verdicts[0]["node"], target, "the chosen node comes first");
    assert_eq!(verdicts[0]["verdict"], "scored");
    assert_eq!(vm(&c, 1, &pinned).await.unwrap()["node"], target);

    // The explanation of a placed VM names the node it is on, from any node.
    for via in 0..3 {
        let why = placement(&c, via, &db[0]).await.unwrap();
        assert_eq!(why["chosen"], vm(&c, via, &db[0]).await.unwrap()["node"]);
        assert_eq!(why["eligible"], 3, "the first db VM had every node: {why}");
    }

    // The CLI shows the same explanation as a table.
    let out = std::process::Command::new(BIN)
        .args(["vm", "explain", &extra])
        .env("NOVACRON_URL", c.nodes[1].url())
        .env("NOVACRON_TOKEN", c.token.clone().unwrap())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("does not fit on any node"), "{text}");
    assert!(text.contains("anti_affinity: 3"), "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_drain_moves_nothing_and_respects_anti_affinity() -> anyhow::Result<()> {
    let c = TestCluster::start(3, fast_tuning(60_000, 10_000, 1_000)).await?;
    let names = nodes_with_capacity(&c).await?;
    let mut ids = Vec::new();
    for k in 0..3 {
        let body = json!({"name": format!("db-{k}"), "vcpus": 1, "memory_mib": 64,
            "start": false, "placement": {"anti_affinity_group": "db"}});
        ids.push(create(&c, 0, body).await?);
    }
    for k in 0..6 {
        let body =
            json!({"name": format!("web-{k}"), "vcpus": 1, "memory_mib": 64, "start": false});
        ids.push(create(&c, 1, body).await?);
    }
    let before: BTreeMap<String, u64> =
        eventually("all placed", Duration::from_secs(30), || async {
            let mut at = BTreeMap::new();
            for id in &ids {
                at.insert(id.clone(), vm(&c, 2, id).await?["node"].as_u64()?);
            }
            Some(at)
        })
        .await?;
    let (&drained, drained_name) = names.iter().next().unwrap();
    let on_drained: BTreeSet<&String> = before
        .iter()
        .filter(|(_, n)| **n == drained)
        .map(|(id, _)| id)
        .collect();
    assert!(
        !on_drained.is_empty(),
        "spread put something on every node: {before:?}"
    );

    // Asked through a follower: it is answered on the leader's view.
    let leader = c.wait_leader(0, None).await?;
    let follower = (leader + 1) % 3;
    let (s, sim) = c
        .request(
            follower,
            reqwest::Method::POST,
            "/api/v1/scheduler/simulate",
            Some(json!({"kind": "drain", "node": drained_name})),
        )
        .await?;
    assert_eq!(s, 200, "{sim}");
    let moved: Vec<&Value> = sim["placed"].as_array().unwrap().iter().collect();
    let stuck: Vec<&Value> = sim["unplaced"].as_array().unwrap().iter().collect();
    let simulated: BTreeSet<&String> = moved
        .iter()
        .chain(&stuck)
        .map(|p| match &p["vm"] {
            Value::String(s) => before.keys().find(|k| *k == s).unwrap(),
            other => panic!("{other}"),
        })
        .collect();
    assert_eq!(
        simulated, on_drained,
        "every VM of the drained node and only those"
    );
    for p in &moved {
        assert_eq!(p["from"], drained);
        assert_ne!(p["to"], drained, "nothing moves onto the drained node: {p}");
        assert!(p["to"].is_u64());
    }
    // The db VM on the drained node cannot go anywhere: the other two nodes hold its group.
    assert_eq!(stuck.len(), 1, "{sim}");
    assert!(ids[..3].contains(&stuck[0]["vm"].as_str().unwrap().to_string()));
    assert_eq!(
        stuck[0]["explanation"]["filtered"]["anti_affinity"], 2,
        "{sim}"
    );
    assert_eq!(
        stuck[0]["explanation"]["filtered"]["unschedulable"], 1,
        "{sim}"
    );

    // No effect: every VM is where it was, and the node is still schedulable.
    for (id, node) in &before {
        assert_eq!(vm(&c, 0, id).await.unwrap()["node"], *node);
    }
    let (_, nodes) = c
        .request(0, reqwest::Method::GET, "/api/v1/nodes", None)
        .await?;
    assert!(nodes
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n["schedulable"] == true));

    // What-if create: 2 VMs that fit and one too big for any node.
    let (s, sim) = c
        .request(
            0,
            reqwest::Method::POST,
            "/api/v1/scheduler/simulate",
            Some(json!({"kind": "create", "vms": [
                {"name": "a", "vcpus": 1, "memory_mib": 64},
                {"name": "b", "vcpus": 1, "memory_mib": 64},
                {"name": "huge", "vcpus": 1, "memory_mib": 64 * 1024 * 1024}
            ]})),
        )
        .await?;
    assert_eq!(s, 200, "{sim}");
    assert_eq!(sim["placed"].as_array().unwrap().len(), 2, "{sim}");
    assert_eq!(sim["unplaced"][0]["vm"], "huge");
    assert_eq!(sim["unplaced"][0]["explanation"]["filtered"]["memory"], 3);

    // Unknown node: a client error, not a failure.
    let (s, v) = c
        .request(
            follower,
            reqwest::Method::POST,
            "/api/v1/scheduler/simulate",
            Some(json!({"kind": "drain", "node": "nope"})),
        )
        .await?;
    assert_eq!(s, 400, "{v}");
    Ok(())
}
