//! Day-2 operations on real processes: backup and restore into a new cluster, feature gates
//! during a rolling upgrade, a two-node site with a witness, and quorum-loss recovery.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::{eventually, fast_tuning, TestCluster, BIN};

/// Runs the CLI and returns (success, stdout + stderr).
fn cli(args: &[&str], env: &[(&str, &str)]) -> Result<(bool, String)> {
    let out = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

async fn post(c: &TestCluster, i: usize, path: &str, body: Value) -> Result<(u16, Value)> {
    c.request(i, Method::POST, path, Some(body)).await
}

/// Tenants, users and VMs through different nodes; returns the tenant names.
async fn populate(c: &TestCluster) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for k in 0..3 {
        let name = format!("tenant-{k}");
        let t = c.create_tenant_eventually(k % c.nodes.len(), &name).await?;
        let id = t["id"].as_str().ok_or_else(|| anyhow!("no id in {t}"))?;
        let (s, v) = post(
            c,
            (k + 1) % c.nodes.len(),
            "/api/v1/users",
            json!({"username": format!("user-{k}"), "password": "correct horse battery", "tenant": id, "role": "operator"}),
        )
        .await?;
        if s != 201 {
            bail!("create user: HTTP {s} {v}");
        }
        let (s, v) = post(
            c,
            (k + 2) % c.nodes.len(),
            "/api/v1/vms",
            json!({"name": format!("vm-{k}"), "vcpus": 1, "memory_mib": 64, "tenant": id, "start": false}),
        )
        .await?;
        if s != 202 {
            bail!("create vm: HTTP {s} {v}");
        }
        names.push(name);
    }
    Ok(names)
}

/// Keys that name the cluster (identity, CA, keys) or its members: they differ between a
/// cluster and the one restored from its backup by design.
fn is_identity_or_membership(key: &[u8]) -> bool {
    key == raft::keys::SECRETS
        || key == raft::keys::NEXT_NODE_ID
        || key == raft::keys::AUDIT_HEAD
        || key.starts_with(raft::keys::NODE_PREFIX)
        || key.starts_with(b"nn/")
        || key.starts_with(raft::keys::NODE_TRAITS_PREFIX)
        || is_member_change_feed(key)
}

/// The federation change feed's entries for node records (`f/x/<index>/n/…`, `f/xk/n/…`):
/// the restored cluster's members publish their own records.
fn is_member_change_feed(key: &[u8]) -> bool {
    key.starts_with(b"f/xk/n/")
        || raft::federation::parse_feed_key(key)
            .is_some_and(|(_, object)| object.starts_with(raft::keys::NODE_PREFIX))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_restores_into_a_new_cluster() -> Result<()> {
    let tuning = fast_tuning(30_000, 10_000, 1_000);
    let c = TestCluster::start(3, tuning.clone()).await?;
    let tenants = populate(&c).await?;
    let token = c.token.clone().unwrap_or_default();
    let file = c.root.path().join("cluster.backup");
    let file_s = file.display().to_string();

    // Only admins may take a backup: it holds every password hash and the CA key.
    let operator = c.login(1, "user-0", "correct horse battery").await?;
    let resp = c
        .http
        .get(format!("{}/api/v1/backup", c.nodes[1].url()))
        .bearer_auth(&operator)
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 403, "an operator took a backup");

    let (ok, out) = cli(
        &[
            "backup",
            "create",
            "--out",
            &file_s,
            "--url",
            &c.nodes[1].url(),
            "--token",
            &token,
        ],
        &[],
    )?;
    assert!(ok, "backup create: {out}");
    let original = raft::backup::decode(&std::fs::read(&file)?)?;
    let old_status = c.status(0).await?;

    // A fresh 3-node cluster from the backup: restore into an empty dir, start, join two.
    let mut r = TestCluster::empty(tuning)?;
    let dir = r.root.path().join("r1");
    let (ok, out) = cli(
        &[
            "backup",
            "restore",
            "--file",
            &file_s,
            "--data-dir",
            &dir.display().to_string(),
            "--name",
            "r1",
            "--api-addr",
            "127.0.0.1:0",
            "--peer-addr",
            "127.0.0.1:0",
        ],
        &[],
    )?;
    assert!(ok, "backup restore: {out}");
    r.adopt("r1", dir).await?;
    // Users and their passwords are objects of the backup: the old admin password works.
    let password = std::fs::read_to_string(c.nodes[0].dir.join("admin-password"))?;
    r.token = Some(r.login(0, "admin", password.trim()).await?);
    r.add_node(false).await?;
    r.add_node(false).await?;
    for i in 0..3 {
        r.wait_has_tenants(i, &tenants).await?;
    }
    let new_status = r.status(2).await?;
    assert_ne!(new_status["cluster_id"], old_status["cluster_id"]);
    // Tokens of the old cluster are not valid in the new one (new signing key).
    let resp = r
        .http
        .get(format!("{}/api/v1/tenants", r.nodes[0].url()))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 401, "an old token must not work");

    let new_token = r.token.clone().unwrap_or_default();
    let file2 = r.root.path().join("restored.backup");
    let (ok, out) = cli(
        &[
            "backup",
            "create",
            "--out",
            &file2.display().to_string(),
            "--url",
            &r.nodes[2].url(),
            "--token",
            &new_token,
        ],
        &[],
    )?;
    assert!(ok, "second backup: {out}");
    let restored = raft::backup::decode(&std::fs::read(&file2)?)?;

    // Every object of the original is in the restored cluster, byte for byte. The restored
    // cluster's own later history (its members joining, in audit entries after the original
    // head) is not part of the comparison.
    let original_keys: std::collections::BTreeSet<&Vec<u8>> =
        original.pairs.iter().map(|(k, _)| k).collect();
    let pick = |pairs: &Vec<(Vec<u8>, Vec<u8>)>, only_original_audit: bool| {
        pairs
            .iter()
            .filter(|(k, _)| !is_identity_or_membership(k))
            .filter(|(k, _)| {
                !only_original_audit
                    || !k.starts_with(raft::keys::AUDIT_PREFIX)
                    || original_keys.contains(k)
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<Vec<u8>, Vec<u8>>>()
    };
    let a = pick(&original.pairs, false);
    let b = pick(&restored.pairs, true);
    let digest = |m: &BTreeMap<Vec<u8>, Vec<u8>>| {
        raft::store::digest_of(m.iter().map(|(k, v)| (&k[..], &v[..])))
    };
    if digest(&a) != digest(&b) {
        let only_a: Vec<String> = a
            .keys()
            .filter(|k| b.get(*k) != a.get(*k))
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        let only_b: Vec<String> = b
            .keys()
            .filter(|k| !a.contains_key(*k))
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        panic!("state digests differ: changed or missing {only_a:?}, extra {only_b:?}");
    }
    assert!(a.keys().any(|k| k.starts_with(raft::keys::VM_PREFIX)));
    assert!(a.keys().any(|k| k.starts_with(raft::keys::USER_PREFIX)));

    // A corrupted file is refused before anything is written.
    let mut bytes = std::fs::read(&file)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    let bad = c.root.path().join("bad.backup");
    std::fs::write(&bad, bytes)?;
    let bad_dir = c.root.path().join("bad-restore");
    let (ok, out) = cli(
        &[
            "backup",
            "restore",
            "--file",
            &bad.display().to_string(),
            "--data-dir",
            &bad_dir.display().to_string(),
        ],
        &[],
    )?;
    assert!(
        !ok && out.contains("checksum"),
        "corrupt backup accepted: {out}"
    );
    assert!(!bad_dir.join("db").exists());
    Ok(())
}

/// `upgrade-check` as JSON through the CLI: (exit success, report).
fn upgrade_check(c: &TestCluster, i: usize) -> Result<(bool, Value)> {
    let token = c.token.clone().unwrap_or_default();
    let out = Command::new(BIN)
        .args([
            "cluster",
            "upgrade-check",
            "-o",
            "json",
            "--url",
            &c.nodes[i].url(),
            "--token",
            &token,
        ])
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    Ok((out.status.success(), v))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn feature_gate_refuses_new_command_until_upgrade() -> Result<()> {
    let old = [("NOVACRON_SIMULATE_MISSING_FEATURES", "api_key.create")];
    let mut c = TestCluster::start(2, fast_tuning(30_000, 10_000, 1_000)).await?;
    let n3 = c.add_node_with(false, &[], &old).await?;

    // n3 becomes a voter and advertises its (older) feature set.
    eventually(
        "n3 to be a voter advertising an older release",
        Duration::from_secs(60),
        || async {
            let (_, v) = upgrade_check(&c, 0).ok()?;
            let m = v["members"]
                .as_array()?
                .iter()
                .find(|m| m["name"] == "n3")?
                .clone();
            (m["role"] == "voter" && m["missing"] == json!(["api_key.create"])).then_some(())
        },
    )
    .await?;
    let (ok, report) = upgrade_check(&c, 1)?;
    assert!(
        !ok,
        "upgrade-check must fail while a voter is older: {report}"
    );
    assert_eq!(report["gated_commands"], json!(["api_key.create"]));

    // The new command type is refused, clearly, through any node...
    for via in [0, 2] {
        let (s, v) = post(&c, via, "/api/v1/api-keys", json!({"name": "k"})).await?;
        assert_eq!(s, 409, "{v}");
        assert_eq!(v["code"], "feature_unavailable", "{v}");
        assert!(
            v["detail"].as_str().unwrap_or_default().contains("n3"),
            "{v}"
        );
    }
    // ...and everything else keeps working.
    c.create_tenant(1, "during-upgrade").await?;

    // n3 "upgrades": restarted without the simulation, it advertises the full set.
    c.stop(n3)?;
    c.restart(n3).await?;
    c.wait_ready(n3).await?;
    eventually("upgrade-check to pass", Duration::from_secs(60), || async {
        let (ok, _) = upgrade_check(&c, 0).ok()?;
        ok.then_some(())
    })
    .await?;
    let (s, v) = post(&c, 2, "/api/v1/api-keys", json!({"name": "k"})).await?;
    assert_eq!(s, 201, "after the upgrade: {v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn witness_keeps_two_node_site_writable() -> Result<()> {
    let mut c = TestCluster::start(1, fast_tuning(60_000, 10_000, 1_000)).await?;
    let w = c.add_node_with(false, &["--witness"], &[]).await?;
    // One membership change at a time, as an operator would: the witness is a voter first.
    eventually(
        "the witness to be a voter",
        Duration::from_secs(60),
        || async {
            let v = c.status(0).await.ok()?;
            v["members"]
                .as_array()?
                .iter()
                .any(|m| m["name"] == "n2" && m["role"] == "witness")
                .then_some(())
        },
    )
    .await?;
    let d2 = c.add_node(false).await?;
    eventually(
        "two data voters and a witness",
        Duration::from_secs(60),
        || async {
            let v = c.status(0).await.ok()?;
            let roles: BTreeMap<String, String> = v["members"]
                .as_array()?
                .iter()
                .map(|m| {
                    (
                        m["name"].as_str().unwrap_or("").to_string(),
                        m["role"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect();
            (roles.get("n1").map(String::as_str) == Some("voter")
                && roles.get("n2").map(String::as_str) == Some("witness")
                && roles.get("n3").map(String::as_str) == Some("voter"))
            .then_some(())
        },
    )
    .await?;
    // Never schedulable: it runs no agent.
    eventually(
        "the witness to be unschedulable",
        Duration::from_secs(30),
        || async {
            let (_, v) = c
                .request(0, Method::GET, "/api/v1/nodes", None)
                .await
                .ok()?;
            let items = v["items"].as_array().or(v.as_array())?.clone();
            let node = items
                .iter()
                .find(|n| n["name"] == "n2" || n["member"]["name"] == "n2")?;
            (node["schedulable"] == false).then_some(())
        },
    )
    .await?;

    // An HA VM on one of the two data nodes.
    let (s, v) = c
        .request(
            0,
            Method::POST,
            "/api/v1/vms",
            Some(serde_json::json!({"name": "ha1", "vcpus": 1, "memory_mib": 64, "ha": true})),
        )
        .await?;
    assert_eq!(s, 202, "{v}");
    let vm_id = v["vm"]["id"].as_str().unwrap_or_default().to_string();
    let first = eventually("the HA VM to run", Duration::from_secs(60), || {
        ha_vm_host(&c, 0, &vm_id)
    })
    .await?;
    // Node ids: n1 is 1 (index 0), the witness n2 is 2, n3 is 3 (index d2).
    let index_of = |id: u64| if id == 1 { 0usize } else { d2 };
    let mut host = index_of(first);

    // Lose either data node: the other keeps serving writes with the witness' vote, and
    // restarts the HA VM that ran on the lost one.
    for (lost, survivor) in [(0usize, d2), (d2, 0usize)] {
        if host == lost {
            c.kill(lost)?;
            let now_on = eventually(
                "the survivor to restart the HA VM",
                Duration::from_secs(90),
                || async {
                    let node = ha_vm_host(&c, survivor, &vm_id).await?;
                    (index_of(node) == survivor).then_some(node)
                },
            )
            .await?;
            host = index_of(now_on);
        } else {
            c.kill(lost)?;
        }
        c.create_tenant_eventually(survivor, &format!("after-losing-{lost}"))
            .await?;
        let via_witness = c.tenant_names(w, "linearizable").await?;
        assert!(via_witness.contains(&format!("after-losing-{lost}")));
        c.restart(lost).await?;
        c.wait_ready(lost).await?;
        c.wait_has_tenants(lost, &[format!("after-losing-{lost}")])
            .await?;
    }
    Ok(())
}

/// The node the VM runs on, as node `via` sees it, once it is running.
async fn ha_vm_host(c: &TestCluster, via: usize, vm_id: &str) -> Option<u64> {
    let v = crate::vms::vm(c, via, vm_id).await?;
    (v["state"] == "running")
        .then(|| v["node"].as_u64())
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recover_after_losing_two_of_three() -> Result<()> {
    let mut c = TestCluster::start(3, fast_tuning(60_000, 10_000, 1_000)).await?;
    // Recovery runs on a voter: wait until the joiners have been promoted.
    c.wait_voters(3).await?;
    let acknowledged = populate(&c).await?;
    let (s, vms) = c
        .request(0, Method::GET, "/api/v1/vms?limit=100", None)
        .await?;
    assert_eq!(s, 200);
    let epochs: BTreeMap<String, u64> = vms["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            (
                v["id"].as_str().unwrap_or("").to_string(),
                v["epoch"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(epochs.len(), 3);
    let survivor = 2;
    let dir = c.nodes[survivor].dir.display().to_string();
    // Recovery keeps what the survivor holds: the operator picks the most up-to-date one
    // (highest last_applied in `cluster status`). Here: wait until it holds every write.
    c.wait_has_tenants(survivor, &acknowledged).await?;
    eventually(
        "the survivor to hold every VM",
        Duration::from_secs(30),
        || async {
            let (_, v) = c
                .request(
                    survivor,
                    Method::GET,
                    "/api/v1/vms?limit=100&consistency=stale",
                    None,
                )
                .await
                .ok()?;
            (v["items"].as_array()?.len() == 3).then_some(())
        },
    )
    .await?;

    // While a quorum still answers, recovery refuses (the survivor itself is stopped).
    c.stop(survivor)?;
    let (ok, out) = cli(&["cluster", "recover", "--force", "--data-dir", &dir], &[])?;
    assert!(!ok && out.contains("quorum"), "recover must refuse: {out}");
    let (ok, out) = cli(&["cluster", "recover", "--data-dir", &dir], &[])?;
    assert!(
        !ok && out.contains("--force"),
        "recover needs --force: {out}"
    );

    // Lose two of three for good, then recover the survivor.
    c.kill(0)?;
    c.kill(1)?;
    let (ok, out) = cli(&["cluster", "recover", "--force", "--data-dir", &dir], &[])?;
    assert!(ok, "recover: {out}");
    c.restart(survivor).await?;
    c.wait_ready(survivor).await?;

    let have = c.tenant_names(survivor, "linearizable").await?;
    for t in &acknowledged {
        assert!(have.contains(t), "acknowledged tenant {t} lost: {have:?}");
    }
    let (_, vms) = c
        .request(survivor, Method::GET, "/api/v1/vms?limit=100", None)
        .await?;
    for v in vms["items"].as_array().into_iter().flatten() {
        let id = v["id"].as_str().unwrap_or("");
        assert!(
            v["epoch"].as_u64().unwrap_or(0) > epochs[id],
            "epoch of {id} not raised: {v}"
        );
    }
    c.create_tenant_eventually(survivor, "after-recovery")
        .await?;
    let status = c.status(survivor).await?;
    let members = status["members"].as_array().cloned().unwrap_or_default();
    assert_eq!(members.len(), 1, "{status}");

    // An old data dir comes back: it cannot join the new incarnation (its certificate is from
    // the old CA), so nothing written through it commits, while the new cluster goes on.
    c.restart(0).await?;
    let url = format!("{}/healthz", c.nodes[0].url());
    eventually(
        "the old node's API to answer",
        Duration::from_secs(30),
        || async { c.http.get(&url).send().await.ok().map(|_| ()) },
    )
    .await?;
    let via_old = c.create_tenant(0, "through-the-old-node").await;
    assert!(
        via_old.is_err(),
        "a write through the old node committed: {via_old:?}"
    );
    c.create_tenant(survivor, "while-the-old-node-is-back")
        .await?;
    let have = c.tenant_names(survivor, "linearizable").await?;
    assert!(
        !have.iter().any(|t| t == "through-the-old-node"),
        "{have:?}"
    );
    let status = c.status(survivor).await?;
    assert_eq!(
        status["members"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
    Ok(())
}
