//! Cross-site moves on real processes: two linked sites (gRPC with mutual TLS between them),
//! a stopped VM on the test driver moves from one to the other with its id and an identical
//! disk, and nothing of it is left at the source.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::harness::{eventually, fast_tuning, TestCluster};

/// Fast federation timers; moves copy at `rate` bytes/s and roll back after the link has been
/// down for `link_timeout_ms`.
fn tuning(rate: Option<u64>, link_timeout_ms: u64) -> String {
    let mut t: Value = serde_json::from_str(&fast_tuning(30_000, 10_000, 1_000)).unwrap();
    t["federation_sync_ms"] = json!(200);
    t["federation_heartbeat_ms"] = json!(500);
    t["site_move_bytes_per_sec"] = json!(rate);
    t["site_move_link_timeout_ms"] = json!(link_timeout_ms);
    t.to_string()
}

/// A one-node site whose cluster was created with `--site name`.
async fn site(name: &str, tuning: String) -> Result<TestCluster> {
    site_with(name, tuning, &[]).await
}

async fn site_with(name: &str, tuning: String, env: &[(&str, &str)]) -> Result<TestCluster> {
    let mut c = TestCluster::empty(tuning)?;
    c.add_node_with(true, &["--site", name], env).await?;
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

/// Whether the site's own list (not the cross-site one) has VM `id`.
async fn holds(c: &TestCluster, id: &str) -> Option<bool> {
    let (s, v) = c
        .request(0, Method::GET, "/api/v1/vms?limit=500", None)
        .await
        .ok()?;
    (s == 200).then_some(())?;
    Some(v["items"].as_array()?.iter().any(|x| x["id"] == id))
}

fn sha256_of(path: &std::path::Path) -> Option<String> {
    std::fs::read(path)
        .ok()
        .map(|b| hex::encode(Sha256::digest(&b)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_vm_moves_to_a_linked_site_with_its_id_and_identical_disk() -> Result<()> {
    let a = site("hq", tuning(None, 60_000)).await?;
    let b = site("edge", tuning(None, 60_000)).await?;
    let (vm, sha) = linked_with_a_stopped_vm(&a, &b).await?;
    let src_disk = a.nodes[0]
        .dir
        .join("images/vms")
        .join(&vm)
        .join("root.qcow2");
    let op = start_move(&a, &vm).await?;
    // While it moves, the VM refuses other actions.
    let (s, v) = a
        .request(0, Method::POST, &format!("/api/v1/vms/{vm}/start"), None)
        .await?;
    let finished = finished(&a, &op).await?;
    assert!(
        s == 409 || finished["state"] == "succeeded",
        "start during the move: {s} {v}"
    );
    assert_eq!(finished["state"], "succeeded", "{finished}");
    // The source measured the disk it sent: the same bytes as the test read.
    assert_eq!(
        finished["result"]["disk"]["sha256"],
        sha.as_str(),
        "{finished}"
    );
    assert_eq!(finished["result"]["phase"], "done", "{finished}");
    assert_moved(&a, &b, &vm, &sha, &src_disk).await
}

/// Links b to a, creates a stopped VM with a 1 GiB disk at a and waits until b knows its
/// tenant; returns the VM's id and its disk's sha256.
async fn linked_with_a_stopped_vm(a: &TestCluster, b: &TestCluster) -> Result<(String, String)> {
    // Link b to a with a token of a, once every node advertises its federation address.
    let t = eventually(
        "a token with a's addresses",
        Duration::from_secs(30),
        || async {
            let v = ok(a, Method::POST, "/api/v1/federation/tokens", None)
                .await
                .ok()?;
            (v["addrs"].as_array().map(Vec::len) == Some(1)).then_some(v)
        },
    )
    .await?;
    ok(
        b,
        Method::POST,
        "/api/v1/sites",
        Some(json!({"token": t["token"], "addrs": t["addrs"]})),
    )
    .await?;

    let tenant = ok(
        a,
        Method::POST,
        "/api/v1/tenants",
        Some(json!({"name": "acme"})),
    )
    .await?["id"]
        .as_str()
        .ok_or_else(|| anyhow!("no tenant id"))?
        .to_string();
    let created = ok(
        a,
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
            let v = ok(a, Method::GET, &format!("/api/v1/vms/{vm}"), None)
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
    Ok((vm, sha))
}

/// Asks a to move `vm` to b; the move's operation id.
async fn start_move(a: &TestCluster, vm: &str) -> Result<String> {
    let accepted = ok(
        a,
        Method::POST,
        &format!("/api/v1/vms/{vm}/move"),
        Some(json!({"site": "edge"})),
    )
    .await?;
    accepted["operation"]["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no operation in {accepted}"))
}

/// The move's operation once it succeeded or failed.
async fn finished(a: &TestCluster, op: &str) -> Result<Value> {
    eventually("the move to finish", Duration::from_secs(90), || async {
        let v = ok(a, Method::GET, &format!("/api/v1/operations/{op}"), None)
            .await
            .ok()?;
        matches!(v["state"].as_str(), Some("succeeded" | "failed")).then_some(v)
    })
    .await
}

async fn assert_moved(
    a: &TestCluster,
    b: &TestCluster,
    vm: &str,
    sha: &str,
    src_disk: &std::path::Path,
) -> Result<()> {
    // At the target: the same id, the copied disk, byte for byte.
    let there = ok(b, Method::GET, &format!("/api/v1/vms/{vm}"), None).await?;
    assert_eq!(there["id"], vm);
    assert_eq!(there["name"], "web");
    let dst_disk = b.nodes[0]
        .dir
        .join("images/vms")
        .join(vm)
        .join("root.qcow2");
    assert_eq!(sha256_of(&dst_disk).as_deref(), Some(sha), "identical disk");
    // At the source: no record, no disk (the agent removed the domain and its files). A
    // plain GET by id is forwarded to the VM's site once the catalog knows it moved, so the
    // site's own list is what tells.
    eventually(
        "nothing left at the source",
        Duration::from_secs(30),
        || async { (!holds(a, vm).await? && !src_disk.exists()).then_some(()) },
    )
    .await?;
    assert!(holds(b, vm).await.unwrap_or(false), "the target holds it");
    // The target runs it from there: start it and see it running.
    ok(b, Method::POST, &format!("/api/v1/vms/{vm}/start"), None).await?;
    eventually(
        "the moved VM running at the target",
        Duration::from_secs(30),
        || async {
            let v = ok(b, Method::GET, &format!("/api/v1/vms/{vm}"), None)
                .await
                .ok()?;
            (v["state"] == "running").then_some(())
        },
    )
    .await?;
    assert!(dst_disk.exists());
    Ok(())
}

/// Copies at 64 KiB/s so the cut lands mid-copy: the source resumes once the target is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_mid_copy_resumes_when_the_target_site_returns() -> Result<()> {
    let a = site("hq", tuning(Some(64 * 1024), 60_000)).await?;
    let mut b = site("edge", tuning(Some(64 * 1024), 60_000)).await?;
    let (vm, sha) = linked_with_a_stopped_vm(&a, &b).await?;
    let src_disk = a.nodes[0]
        .dir
        .join("images/vms")
        .join(&vm)
        .join("root.qcow2");
    let op = start_move(&a, &vm).await?;
    let staged = b.nodes[0]
        .dir
        .join("images/site-moves")
        .join(format!("{op}.part"));
    let at_cut = eventually("the copy under way", Duration::from_secs(30), || async {
        let len = std::fs::metadata(&staged).ok()?.len();
        (len > 0).then_some(len)
    })
    .await?;
    // The target site's only node dies mid-copy and comes back from its disk.
    b.kill(0)?;
    b.restart(0).await?;
    let finished = finished(&a, &op).await?;
    assert_eq!(finished["state"], "succeeded", "{finished}");
    println!("cut after {at_cut} bytes were staged; the copy resumed");
    let moved = assert_moved(&a, &b, &vm, &sha, &src_disk).await;
    if moved.is_err() {
        a.dump_logs();
    }
    moved
}

/// The target stays away longer than the link timeout: the move rolls back, the VM stays at
/// the source (and takes actions again), and once the target is back nothing of it is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_longer_than_the_timeout_rolls_back_to_the_source() -> Result<()> {
    let a = site("hq", tuning(Some(64 * 1024), 2_000)).await?;
    let mut b = site("edge", tuning(Some(64 * 1024), 2_000)).await?;
    let (vm, sha) = linked_with_a_stopped_vm(&a, &b).await?;
    let src_disk = a.nodes[0]
        .dir
        .join("images/vms")
        .join(&vm)
        .join("root.qcow2");
    let op = start_move(&a, &vm).await?;
    let staged = b.nodes[0]
        .dir
        .join("images/site-moves")
        .join(format!("{op}.part"));
    eventually("the copy under way", Duration::from_secs(30), || async {
        (std::fs::metadata(&staged).ok()?.len() > 0).then_some(())
    })
    .await?;
    b.kill(0)?;
    let finished = finished(&a, &op).await?;
    assert_eq!(finished["state"], "failed", "{finished}");
    // The VM is at the source only, as it was, unlocked.
    let here = ok(&a, Method::GET, &format!("/api/v1/vms/{vm}"), None).await?;
    assert_eq!(here["desired_state"], "stopped", "{here}");
    assert_eq!(sha256_of(&src_disk).as_deref(), Some(sha.as_str()));
    ok(&a, Method::POST, &format!("/api/v1/vms/{vm}/start"), None).await?;
    // Back, the target is told to abort: no VM, no staged bytes.
    b.restart(0).await?;
    eventually(
        "the abort to reach the target",
        Duration::from_secs(60),
        || async {
            let dst_disk = b.nodes[0]
                .dir
                .join("images/vms")
                .join(&vm)
                .join("root.qcow2");
            (!holds(&b, &vm).await? && !staged.exists() && !dst_disk.exists()).then_some(())
        },
    )
    .await
    .inspect_err(|_| {
        a.dump_logs();
        b.dump_logs();
    })?;
    assert!(holds(&a, &vm).await.unwrap_or(false), "the source holds it");
    Ok(())
}

/// A running tiny guest (real QEMU under the system libvirtd) moves between two sites: it is
/// stopped, its disk copied, and it boots at the target from the copy. Runs when CI provides
/// libvirt and the guest (see real_vm.rs); elsewhere it prints SKIP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_tiny_guest_moves_and_boots_at_the_target_site() -> Result<()> {
    let Some(env) =
        crate::real_vm::real_env("a_running_tiny_guest_moves_and_boots_at_the_target_site")
    else {
        return Ok(());
    };
    let _turn = crate::real_vm::daemon_turn();
    let vars = [
        ("NOVACRON_LIBVIRT_URI", env.uri.as_str()),
        ("NOVACRON_GUEST_KERNEL", env.kernel.as_str()),
        ("NOVACRON_GUEST_INITRD", env.initrd.as_str()),
        ("NOVACRON_DOMAIN_TYPE", "qemu"),
    ];
    let a = site_with("hq", tuning(None, 60_000), &vars).await?;
    let b = site_with("edge", tuning(None, 60_000), &vars).await?;
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
            json!({"name": "tiny", "vcpus": 1, "memory_mib": 128, "disk_gib": 1,
                    "image": "tiny", "tenant": tenant}),
        ),
    )
    .await?;
    let vm = created["vm"]["id"]
        .as_str()
        .ok_or_else(|| anyhow!("no VM id in {created}"))?
        .to_string();
    eventually(
        "the guest running at the source",
        Duration::from_secs(120),
        || async {
            let v = ok(&a, Method::GET, &format!("/api/v1/vms/{vm}"), None)
                .await
                .ok()?;
            (v["state"] == "running").then_some(())
        },
    )
    .await?;
    crate::real_vm::console_shows(&a, &vm, &env.marker).await?;
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
    let op = start_move(&a, &vm).await?;
    let finished = finished(&a, &op).await?;
    assert_eq!(finished["state"], "succeeded", "{finished}");
    let sha = finished["result"]["disk"]["sha256"]
        .as_str()
        .ok_or_else(|| anyhow!("no disk checksum in {finished}"))?
        .to_string();
    // It runs at the target (it ran before the move), booted from the copied disk's node.
    eventually(
        "the guest running at the target",
        Duration::from_secs(120),
        || async {
            let v = ok(&b, Method::GET, &format!("/api/v1/vms/{vm}"), None)
                .await
                .ok()?;
            (v["state"] == "running").then_some(())
        },
    )
    .await?;
    crate::real_vm::console_shows(&b, &vm, &env.marker).await?;
    let dst_disk = b.nodes[0]
        .dir
        .join("images/vms")
        .join(&vm)
        .join("root.qcow2");
    assert!(
        dst_disk.exists(),
        "the copied disk is the VM's disk at the target"
    );
    // The guest may have written to its disk since it booted there; the copy it started from
    // matched (checked by the target before commit). Nothing is left at the source.
    let src_disk = a.nodes[0]
        .dir
        .join("images/vms")
        .join(&vm)
        .join("root.qcow2");
    eventually(
        "nothing left at the source",
        Duration::from_secs(60),
        || async { (!holds(&a, &vm).await? && !src_disk.exists()).then_some(()) },
    )
    .await?;
    println!("moved {vm}: disk sha256 {sha}");
    // The guest lives in the shared system libvirtd: delete it through its new site.
    let del = ok(&b, Method::DELETE, &format!("/api/v1/vms/{vm}"), None).await?;
    let op = del["operation"]["id"]
        .as_str()
        .ok_or_else(|| anyhow!("no operation in {del}"))?
        .to_string();
    eventually(
        "the guest deleted at the target",
        Duration::from_secs(60),
        || async {
            let v = ok(&b, Method::GET, &format!("/api/v1/operations/{op}"), None)
                .await
                .ok()?;
            (v["state"] == "succeeded").then_some(())
        },
    )
    .await?;
    eventually("the domain gone", Duration::from_secs(30), || async {
        let out = std::process::Command::new("virsh")
            .args(["-q", "-c", &env.uri, "dominfo", &format!("nc-{vm}")])
            .output()
            .ok()?;
        (!out.status.success()).then_some(())
    })
    .await?;
    Ok(())
}

/// At a site of two nodes, the import goes to the least-loaded one, even when the other node
/// answers first: its disk calls find their node through the failover between addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_moves_to_the_least_loaded_node_of_the_target_site() -> Result<()> {
    let a = site("hq", tuning(None, 60_000)).await?;
    let mut b = site("edge", tuning(None, 60_000)).await?;
    b.add_node(false).await?;
    // b's first node gets a VM of its own, so its second node is the least loaded.
    let own = ok(
        &b,
        Method::POST,
        "/api/v1/tenants",
        Some(json!({"name": "local"})),
    )
    .await?["id"]
        .as_str()
        .ok_or_else(|| anyhow!("no tenant id"))?
        .to_string();
    ok(
        &b,
        Method::POST,
        "/api/v1/vms",
        Some(
            json!({"name": "resident", "vcpus": 1, "memory_mib": 128, "tenant": own,
                    "start": false, "placement": {"node": "n1"}}),
        ),
    )
    .await?;
    eventually(
        "b's resident VM placed",
        Duration::from_secs(30),
        || async {
            let v = ok(&b, Method::GET, "/api/v1/vms?limit=500", None)
                .await
                .ok()?;
            v["items"]
                .as_array()?
                .iter()
                .any(|x| x["name"] == "resident" && !x["node"].is_null())
                .then_some(())
        },
    )
    .await?;
    let (vm, sha) = linked_with_a_stopped_vm(&a, &b).await?;
    let op = start_move(&a, &vm).await?;
    let finished = finished(&a, &op).await?;
    assert_eq!(finished["state"], "succeeded", "{finished}");
    let there = ok(&b, Method::GET, &format!("/api/v1/vms/{vm}"), None).await?;
    let dst_disk = b.nodes[1]
        .dir
        .join("images/vms")
        .join(&vm)
        .join("root.qcow2");
    assert_eq!(
        sha256_of(&dst_disk).as_deref(),
        Some(sha.as_str()),
        "the disk is on b's second node: {there}"
    );
    assert_eq!(finished["result"]["target_node"], there["node"], "{there}");
    Ok(())
}
