//! Cross-site moves on real processes: two linked sites (gRPC with mutual TLS between them),
//! a stopped VM on the test driver moves from one to the other with its id and an identical
//! disk, and nothing of it is left at the source.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::harness::{eventually, fast_tuning, TestCluster};

fn tuning() -> String {
    let mut t: Value = serde_json::from_str(&fast_tuning(30_000, 10_000, 1_000)).unwrap();
    t["federation_sync_ms"] = json!(200);
    t["federation_heartbeat_ms"] = json!(500);
    t.to_string()
}

/// A one-node site whose cluster was created with `--site name`.
async fn site(name: &str) -> Result<TestCluster> {
    let mut c = TestCluster::empty(tuning())?;
    c.add_node_with(true, &["--site", name], &[]).await?;
    let password = std::fs::read_to_string(c.nodes[0].dir.join("admin-password"))?;
    c.token = Some(c.login(0, "admin", password.trim()).await?);
    Ok(c)
}

async fn ok(c: &TestCluster, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
    let (s, v) = c.request(0, method.clone(), path, body).await?;
    if !(200..300).contains(&s) {
        bail!("{method} {path}: HTTP {s} {v}");
    }
    Ok(v)
}

fn sha256_of(path: &std::path::Path) -> Option<String> {
    std::fs::read(path)
        .ok()
        .map(|b| hex::encode(Sha256::digest(&b)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_vm_moves_to_a_linked_site_with_its_id_and_identical_disk() -> Result<()> {
    let a = site("hq").await?;
    let b = site("edge").await?;
    // Link b to a with a token of a, once every node advertises its federation address.
    let t = eventually(
        "a token with a's addresses",
        Duration::from_secs(30),
        || async {
            let v = ok(&a, Method::POST, "/api/v1/federation/tokens", None)
                .await
                .ok()?;
            (v["addrs"].as_array().map(Vec::len) == Some(1)).then_some(v)
        },
    )
    .await?;
    ok(
        &b,
        Method::POST,
        "/api/v1/sites",
        Some(json!({"token": t["token"], "addrs": t["addrs"]})),
    )
    .await?;

    let tenant = ok(
        &a,
        Method::POST,
        "/api/v1/tenants",
        Some(json!({"name": "acme"})),
    )
    .await?["id"]
        .as_str()
        .ok_or_else(|| anyhow!("no tenant id"))?
        .to_string();
    let created = ok(
        &a,
        Method::POST,
        "/api/v1/vms",
        Some(
            json!({"name": "web", "vcpus": 1, "memory_mib": 128, "disk_gib": 1,
                    "tenant": tenant, "start": false}),
        ),
    )
    .await?;
    let vm = created["vm"]["id"]
        .as_str()
        .ok_or_else(|| anyhow!("no VM id in {created}"))?
        .to_string();
    // The agent gives the VM a blank disk of its size; it is stopped.
    let src_disk = a.nodes[0]
        .dir
        .join("images/vms")
        .join(&vm)
        .join("root.qcow2");
    let sha = eventually(
        "the VM's disk at the source",
        Duration::from_secs(30),
        || async {
            let v = ok(&a, Method::GET, &format!("/api/v1/vms/{vm}"), None)
                .await
                .ok()?;
            (v["state"] == "stopped").then_some(())?;
            sha256_of(&src_disk)
        },
    )
    .await?;
    // The target knows the tenant from a's catalog before it can import a VM of it.
    eventually("a's tenant at b", Duration::from_secs(30), || async {
        let (s, v) = b
            .request(0, Method::GET, "/api/v1/vms?site=all", None)
            .await
            .ok()?;
        (s == 200
            && v["items"]
                .as_array()?
                .iter()
                .any(|x| x["id"] == vm.as_str()))
        .then_some(())
    })
    .await?;

    let accepted = ok(
        &a,
        Method::POST,
        &format!("/api/v1/vms/{vm}/move"),
        Some(json!({"site": "edge"})),
    )
    .await?;
    let op = accepted["operation"]["id"]
        .as_str()
        .ok_or_else(|| anyhow!("no operation in {accepted}"))?
        .to_string();
    // While it moves, the VM refuses other actions.
    let (s, v) = a
        .request(0, Method::POST, &format!("/api/v1/vms/{vm}/start"), None)
        .await?;
    let finished = eventually("the move to finish", Duration::from_secs(90), || async {
        let v = ok(&a, Method::GET, &format!("/api/v1/operations/{op}"), None)
            .await
            .ok()?;
        matches!(v["state"].as_str(), Some("succeeded" | "failed")).then_some(v)
    })
    .await?;
    assert!(
        s == 409 || finished["state"] == "succeeded",
        "start during the move: {s} {v}"
    );
    assert_eq!(finished["state"], "succeeded", "{finished}");

    // At the target: the same id, the copied disk, byte for byte.
    let there = ok(&b, Method::GET, &format!("/api/v1/vms/{vm}"), None).await?;
    assert_eq!(there["id"], vm.as_str());
    assert_eq!(there["name"], "web");
    let dst_disk = b.nodes[0]
        .dir
        .join("images/vms")
        .join(&vm)
        .join("root.qcow2");
    assert_eq!(sha256_of(&dst_disk), Some(sha.clone()), "identical disk");
    // At the source: no record, no disk (the agent removed the domain and its files).
    eventually(
        "nothing left at the source",
        Duration::from_secs(30),
        || async {
            let (s, _) = a
                .request(0, Method::GET, &format!("/api/v1/vms/{vm}"), None)
                .await
                .ok()?;
            (s == 404 && !src_disk.exists()).then_some(())
        },
    )
    .await?;
    // The target runs it from there: start it and see it running.
    ok(&b, Method::POST, &format!("/api/v1/vms/{vm}/start"), None).await?;
    eventually(
        "the moved VM running at the target",
        Duration::from_secs(30),
        || async {
            let v = ok(&b, Method::GET, &format!("/api/v1/vms/{vm}"), None)
                .await
                .ok()?;
            (v["state"] == "running").then_some(())
        },
    )
    .await?;
    assert!(dst_disk.exists());
    Ok(())
}
