//! Federation on real processes: sites link with a one-time token over gRPC with mutual TLS,
//! pull each other's catalogs, keep syncing through another node when a site's leader dies,
//! forward calls as the calling user, and refuse certificates of sites not linked.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::{eventually, fast_tuning, TestCluster};

/// Short federation timers: a pull every 200 ms, a committed heartbeat every 500 ms.
fn tuning() -> String {
    let mut t: Value = serde_json::from_str(&fast_tuning(30_000, 10_000, 1_000)).unwrap();
    t["federation_sync_ms"] = json!(200);
    t["federation_heartbeat_ms"] = json!(500);
    t.to_string()
}

/// A site of `n` nodes whose cluster was created with `--site name`.
async fn site(name: &str, n: usize) -> Result<TestCluster> {
    let mut c = TestCluster::empty(tuning())?;
    c.add_node_with(true, &["--site", name], &[]).await?;
    let password = std::fs::read_to_string(c.nodes[0].dir.join("admin-password"))?;
    c.token = Some(c.login(0, "admin", password.trim()).await?);
    for _ in 1..n {
        c.add_node(false).await?;
    }
    Ok(c)
}

/// Runs the CLI against node `i` of `c` as its admin.
fn cli(c: &TestCluster, i: usize, args: &[&str]) -> Result<(bool, String)> {
    let out = std::process::Command::new(crate::harness::BIN)
        .args(args)
        .env("NOVACRON_URL", c.nodes[i].url())
        .env("NOVACRON_TOKEN", c.token.as_deref().unwrap_or_default())
        .env("HOME", c.root.path())
        .output()?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

async fn call(
    c: &TestCluster,
    i: usize,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    c.request(i, method, path, body).await
}

/// `GET /api/v1/sites` on node `i`.
async fn sites(c: &TestCluster, i: usize) -> Result<Value> {
    let (s, v) = call(c, i, Method::GET, "/api/v1/sites", None).await?;
    if s != 200 {
        bail!("sites: HTTP {s} {v}");
    }
    Ok(v)
}

/// This site's id and its nodes' federation addresses, once all `n` have advertised one.
async fn identity(c: &TestCluster, n: usize) -> Result<(String, Vec<String>)> {
    eventually(
        "every node's federation address",
        Duration::from_secs(30),
        || async {
            let v = sites(c, 0).await.ok()?;
            let own = &v["sites"][0];
            let addrs: Vec<String> = own["addrs"]
                .as_array()?
                .iter()
                .filter_map(|a| a.as_str().map(str::to_string))
                .collect();
            (addrs.len() == n).then(|| (own["id"].as_str().unwrap_or_default().to_string(), addrs))
        },
    )
    .await
}

/// The object keys of `site`'s catalog held by node `i`'s replica (from a backup).
async fn catalog(c: &TestCluster, i: usize, site: &str) -> Result<BTreeSet<String>> {
    let r = c
        .http
        .get(format!("{}/api/v1/backup", c.nodes[i].url()))
        .bearer_auth(c.token.as_deref().unwrap_or_default())
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("backup: HTTP {}", r.status());
    }
    let body = raft::backup::decode(&r.bytes().await?)?;
    let prefix = raft::federation::catalog_prefix(site);
    Ok(body
        .pairs
        .iter()
        .filter_map(|(k, _)| k.strip_prefix(prefix.as_slice()))
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect())
}

async fn wait_catalog(
    c: &TestCluster,
    i: usize,
    site: &str,
    what: &str,
    f: impl Fn(&BTreeSet<String>) -> bool,
) -> Result<BTreeSet<String>> {
    eventually(what, Duration::from_secs(30), || async {
        let keys = catalog(c, i, site).await.ok()?;
        f(&keys).then_some(keys)
    })
    .await
}

async fn create(c: &TestCluster, i: usize, path: &str, body: Value) -> Result<Value> {
    let (s, v) = call(c, i, Method::POST, path, Some(body)).await?;
    if !(200..300).contains(&s) {
        bail!("POST {path}: HTTP {s} {v}");
    }
    Ok(v)
}

fn id_of(v: &Value) -> Result<String> {
    v["id"]
        .as_str()
        .or(v["vm"]["id"].as_str())
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no id in {v}"))
}

/// The last successful sync of `peer` as seen by node `i`.
async fn last_sync(c: &TestCluster, i: usize, peer: &str) -> Result<u64> {
    let v = sites(c, i).await?;
    v["sites"]
        .as_array()
        .and_then(|s| s.iter().find(|x| x["id"] == peer))
        .map(|x| x["last_sync_at"].as_u64().unwrap_or(0))
        .ok_or_else(|| anyhow!("{peer} not in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sites_share_catalogs_forward_calls_and_survive_a_leader_loss() -> Result<()> {
    let mut a = site("a", 3).await?;
    let b = site("b", 1).await?;
    let (a_id, a_addrs) = identity(&a, 3).await?;
    let (b_id, _) = identity(&b, 1).await?;
    assert_ne!(a_id, b_id);

    // A token from a; a wrong secret is refused at b and consumes nothing.
    let t = create(&a, 0, "/api/v1/federation/tokens", json!(null)).await?;
    let token = t["token"]
        .as_str()
        .ok_or_else(|| anyhow!("no token in {t}"))?
        .to_string();
    let addrs = t["addrs"].clone();
    assert_eq!(addrs.as_array().map(Vec::len), Some(3), "{t}");
    let mut wrong = token.clone();
    let last = if wrong.ends_with('0') { '1' } else { '0' };
    wrong.pop();
    wrong.push(last);
    let (s, v) = call(
        &b,
        0,
        Method::POST,
        "/api/v1/sites",
        Some(json!({"token": wrong, "addrs": addrs})),
    )
    .await?;
    assert!(s >= 400, "a wrong secret linked: {s} {v}");
    let linked = create(
        &b,
        0,
        "/api/v1/sites",
        json!({"token": token, "addrs": addrs}),
    )
    .await?;
    assert_eq!(linked["id"], a_id, "{linked}");
    // The token is spent.
    let (s, v) = call(
        &b,
        0,
        Method::POST,
        "/api/v1/sites",
        Some(json!({"token": token, "addrs": addrs})),
    )
    .await?;
    assert!(s >= 400, "a used token linked again: {s} {v}");

    // Objects of each site reach the other's catalog: tenants, users, nodes, VMs.
    let ta = create(&a, 0, "/api/v1/tenants", json!({"name": "ta"})).await?;
    let ta = id_of(&ta)?;
    let gone = id_of(&create(&a, 0, "/api/v1/tenants", json!({"name": "gone"})).await?)?;
    let va = id_of(
        &create(
            &a,
            0,
            "/api/v1/vms",
            json!({"name": "va", "vcpus": 1, "memory_mib": 128, "tenant": ta}),
        )
        .await?,
    )?;
    assert!(
        va.starts_with(&format!("{a_id}-")),
        "ids carry the home site: {va}"
    );
    let tb = id_of(&create(&b, 0, "/api/v1/tenants", json!({"name": "tb"})).await?)?;
    let started = std::time::Instant::now();
    let at_b = wait_catalog(&b, 0, &a_id, "a's objects at b", |k| {
        k.contains(&format!("t/{ta}"))
            && k.contains(&format!("v/{va}"))
            && k.iter().filter(|k| k.starts_with("n/")).count() == 3
            && k.iter().any(|k| k.starts_with("u/"))
    })
    .await?;
    println!(
        "a's catalog reached b in {:?}: {} objects",
        started.elapsed(),
        at_b.len()
    );
    wait_catalog(&a, 1, &b_id, "b's objects at a (read on a follower)", |k| {
        k.contains(&format!("t/{tb}")) && k.iter().any(|k| k.starts_with("n/"))
    })
    .await?;
    // Deleting at a removes the entry at b.
    let (s, v) = call(
        &a,
        0,
        Method::DELETE,
        &format!("/api/v1/tenants/{gone}"),
        None,
    )
    .await?;
    assert!((200..300).contains(&s), "delete tenant: {s} {v}");
    wait_catalog(
        &b,
        0,
        &a_id,
        "the deleted tenant to leave b's catalog",
        |k| !k.contains(&format!("t/{gone}")),
    )
    .await?;
    // Every site's VMs are listed at b with their site.
    let (s, list) = call(&b, 0, Method::GET, "/api/v1/vms?site=all", None).await?;
    assert_eq!(s, 200, "{list}");
    assert!(
        list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|v| v["id"] == va.as_str() && v["site"]["name"] == "a"),
        "{list}"
    );

    // Forwarding: b's admin creates at a; a viewer of b cannot.
    let fwd = create(
        &b,
        0,
        "/api/v1/vms",
        json!({"name": "from-b", "vcpus": 1, "memory_mib": 128, "tenant": ta, "site": "a"}),
    )
    .await?;
    let from_b = id_of(&fwd)?;
    assert!(
        from_b.starts_with(&format!("{a_id}-")),
        "created by a: {fwd}"
    );
    wait_catalog(&b, 0, &a_id, "the forwarded VM in a's catalog at b", |k| {
        k.contains(&format!("v/{from_b}"))
    })
    .await?;
    let viewer = id_of(&create(&b, 0, "/api/v1/users", json!({"username": "vera", "password": "correct-horse-1", "tenant": tb, "role": "viewer"})).await?)?;
    wait_catalog(&a, 0, &b_id, "the viewer known at a", |k| {
        k.contains(&format!("u/{viewer}"))
    })
    .await?;
    let vera = b.login(0, "vera", "correct-horse-1").await?;
    let r = b
        .http
        .post(format!("{}/api/v1/vms", b.nodes[0].url()))
        .bearer_auth(&vera)
        .json(&json!({"name": "nope", "vcpus": 1, "memory_mib": 128, "site": "a"}))
        .send()
        .await?;
    let status = r.status().as_u16();
    assert!(
        status == 403 || status == 404,
        "a viewer created through the link: {status} {}",
        r.text().await?
    );

    // A certificate of a site a never linked is refused on Changes and Forward; b's is served.
    let a_ca = std::fs::read_to_string(a.nodes[0].dir.join("tls/ca.pem"))?;
    let link_to_a = raft::federation::SiteLink {
        site: raft::federation::SiteIdentity {
            id: a_id.clone(),
            name: "a".into(),
        },
        ca_cert_pem: a_ca,
        addrs: a_addrs.clone(),
        created_at: 0,
        updated_at: 0,
    };
    let b_identity = raft::tls::NodeIdentity::load(&b.nodes[0].dir.join("tls"))?;
    let as_b = federation::client::Peers::new(b_identity);
    let (page, _) = as_b.changes(&link_to_a, 0, 10).await?;
    assert!(!page.changes.is_empty());
    // Forward as b: runs as the given user at a; only /api/v1/ is reachable that way.
    let fwd = |path: &str| api::control::ForwardedCall {
        method: "GET".into(),
        path_and_query: path.into(),
        body: vec![],
        user_id: viewer.clone(),
        idempotency_key: None,
        if_match: None,
    };
    let listed = as_b.forward(&link_to_a, fwd("/api/v1/vms")).await?;
    assert_eq!(
        listed.status,
        200,
        "{}",
        String::from_utf8_lossy(&listed.body)
    );
    let outside = as_b.forward(&link_to_a, fwd("/metrics")).await;
    assert!(
        matches!(
            outside,
            Err(federation::client::CallError::Refused { ref message, .. }) if message.contains("/api/v1/")
        ),
        "{outside:?}"
    );
    let stranger_ca = raft::tls::generate_ca("stranger")?;
    let stranger = raft::tls::NodeIdentity::issue(&stranger_ca, "x1")?;
    let mut as_stranger = federation::client::Peers::new(stranger);
    as_stranger.rounds = 1;
    let refused = as_stranger.changes(&link_to_a, 0, 10).await;
    assert!(refused.is_err(), "an unlinked site read a's changes");
    let forwarded = as_stranger
        .forward(
            &link_to_a,
            api::control::ForwardedCall {
                method: "GET".into(),
                path_and_query: "/api/v1/vms".into(),
                body: vec![],
                user_id: viewer.clone(),
                idempotency_key: None,
                if_match: None,
            },
        )
        .await;
    assert!(
        forwarded.is_err(),
        "an unlinked site forwarded a call: {forwarded:?}"
    );

    // A third, single-node edge site linked to a: a VM created there through a node of a
    // runs at the edge and is listed at a with its site.
    let edge = site("edge", 1).await?;
    let (edge_id, _) = identity(&edge, 1).await?;
    // Linked with the CLI: a token issued through a follower of a, used at the edge.
    let (ok, out) = cli(&a, 1, &["site", "token", "-o", "json"])?;
    assert!(ok, "site token: {out}");
    let t: Value = serde_json::from_str(&out)?;
    let a_fed_addrs: Vec<&str> = t["addrs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str())
        .collect();
    let token_text = t["token"].as_str().unwrap_or_default().to_string();
    let (ok, out) = cli(
        &edge,
        0,
        &[
            "site",
            "link",
            &token_text,
            "--addr",
            &a_fed_addrs.join(","),
        ],
    )?;
    assert!(ok, "site link: {out}");
    let (ok, out) = cli(&edge, 0, &["site", "list"])?;
    assert!(
        ok && out.contains(&a_id) && out.contains("edge"),
        "site list: {out}"
    );
    // The edge site must know a's admin before it serves calls a forwards for them.
    wait_catalog(&edge, 0, &a_id, "a's users at the edge", |k| {
        k.iter().any(|k| k.starts_with("u/"))
    })
    .await?;
    let ve = id_of(
        &create(
            &a,
            2,
            "/api/v1/vms",
            json!({"name": "at-edge", "vcpus": 1, "memory_mib": 128, "site": "edge"}),
        )
        .await?,
    )?;
    assert!(
        ve.starts_with(&format!("{edge_id}-")),
        "made by the edge: {ve}"
    );
    let running = eventually(
        "the VM to run at the edge",
        Duration::from_secs(30),
        || async {
            let (s, v) = call(&edge, 0, Method::GET, &format!("/api/v1/vms/{ve}"), None)
                .await
                .ok()?;
            (s == 200 && v["state"] == "running").then_some(())
        },
    )
    .await;
    if let Err(e) = running {
        let (_, v) = call(&edge, 0, Method::GET, &format!("/api/v1/vms/{ve}"), None).await?;
        let (_, n) = call(&edge, 0, Method::GET, "/api/v1/nodes", None).await?;
        edge.dump_logs();
        bail!("{e}: {v} on nodes {n}");
    }
    wait_catalog(&a, 0, &edge_id, "the edge VM listed at a", |k| {
        k.contains(&format!("v/{ve}"))
    })
    .await?;

    // Cutting the edge off: a records the failure once and keeps its last data.
    let mut edge = edge;
    edge.kill(0)?;
    let failing = eventually(
        "a to report the edge unreachable",
        Duration::from_secs(30),
        || async {
            let v = sites(&a, 0).await.ok()?;
            let e = v["sites"]
                .as_array()?
                .iter()
                .find(|x| x["id"] == edge_id.as_str())?
                .clone();
            e["error"].as_str().is_some().then_some(e)
        },
    )
    .await?;
    println!("edge as seen from a once cut: {failing}");
    assert!(catalog(&a, 0, &edge_id).await?.contains(&format!("v/{ve}")));
    // Many failed attempts, no more log entries: the failure is recorded only when its text
    // changes (the error above is already recorded).
    let leader = a.wait_leader(0, None).await?;
    let failures = "novacron_federation_pull_failures_total";
    let recorded = "novacron_federation_failures_recorded_total";
    let (base, base_recorded) = (
        a.metric(leader, failures).await?,
        a.metric(leader, recorded).await?,
    );
    eventually(
        "five more failed pulls of the edge",
        Duration::from_secs(30),
        || async { (a.metric(leader, failures).await.ok()? >= base + 5.0).then_some(()) },
    )
    .await?;
    assert_eq!(a.metric(leader, recorded).await?, base_recorded);

    // Killing a's leader: b keeps syncing through another node of a.
    let leader = a.wait_leader(0, None).await?;
    let other = (0..3).find(|i| *i != leader).unwrap_or(0);
    a.kill(leader)?;
    a.wait_leader(other, Some(leader)).await?;
    let before = last_sync(&b, 0, &a_id).await?;
    let after = id_of(&a.create_tenant_eventually(other, "after").await?)?;
    let started = std::time::Instant::now();
    wait_catalog(&b, 0, &a_id, "a tenant made after a's leader died", |k| {
        k.contains(&format!("t/{after}"))
    })
    .await?;
    println!(
        "after a's leader died, a change reached b in {:?}",
        started.elapsed()
    );
    eventually(
        "b's sync of a to advance",
        Duration::from_secs(20),
        || async { (last_sync(&b, 0, &a_id).await.ok()? > before).then_some(()) },
    )
    .await?;
    let metrics = b.metrics_text(0).await?;
    assert!(
        metrics.contains("novacron_federation_pulls_total"),
        "{metrics}"
    );
    Ok(())
}
