//! Cluster-level API guarantees on real processes: an idempotent create survives the loss of
//! its response to a leader kill, a revoked API key is refused by every node at once, and one
//! tenant never sees another's objects on any node (lists, gets, events, audit).

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::harness::{eventually, fast_tuning, TestCluster};

/// One request with an explicit bearer and extra headers; the harness's `request` always uses
/// the admin token.
async fn call(
    c: &TestCluster,
    i: usize,
    bearer: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> Result<(u16, Value)> {
    let mut req = c
        .http
        .request(method, format!("{}{}", c.nodes[i].url(), path))
        .bearer_auth(bearer);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await?;
    let status = r.status().as_u16();
    let text = r.text().await?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

fn admin(c: &TestCluster) -> Result<String> {
    c.token.clone().context("the harness logged in as admin")
}

/// Every VM visible to `bearer` through node `i` (linearizable read, all pages).
async fn list_vms(c: &TestCluster, i: usize, bearer: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = "/api/v1/vms?limit=500&consistency=linearizable".to_string();
        if let Some(cur) = &cursor {
            path.push_str(&format!("&cursor={cur}"));
        }
        let (s, v) = call(c, i, bearer, reqwest::Method::GET, &path, None, &[]).await?;
        ensure!(s == 200, "list VMs on node {i}: HTTP {s} {v}");
        out.extend(v["items"].as_array().cloned().unwrap_or_default());
        match v["next_cursor"].as_str() {
            Some(cur) => cursor = Some(cur.to_string()),
            None => return Ok(out),
        }
    }
}

/// Writes a whole HTTP/1.1 request on a fresh connection and returns without reading the
/// answer: the caller then kills the server, so the client never learns whether it committed.
async fn send_unread(
    addr: &str,
    token: &str,
    path: &str,
    key: &str,
    body: &Value,
) -> Result<tokio::net::TcpStream> {
    let body = body.to_string();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Idempotency-Key: {key}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(req.as_bytes()).await?;
    s.flush().await?;
    Ok(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_retried_across_a_leader_kill_creates_one_vm() -> Result<()> {
    let mut c = TestCluster::start(3, fast_tuning(60_000, 10_000, 1_000)).await?;
    let token = admin(&c)?;
    // Joiners are promoted to voters once caught up; before that, killing the leader would
    // leave no quorum at all.
    c.wait_voters(3).await?;
    let leader = c.wait_leader(0, None).await?;
    let body = json!({"name": "once", "vcpus": 1, "memory_mib": 64, "start": false});
    // The socket stays open until the kill, so the server never sees a cancelled request.
    let unread = send_unread(&c.nodes[leader].api, &token, "/api/v1/vms", "k1", &body).await?;
    c.kill(leader)?;
    drop(unread);

    let survivor = (leader + 1) % 3;
    let last = std::sync::Mutex::new(String::new());
    let first = eventually(
        "the retried create to succeed on a survivor",
        Duration::from_secs(60),
        || {
            let (c, token, body, last) = (&c, &token, body.clone(), &last);
            async move {
                let (s, v) = call(
                    c,
                    survivor,
                    token,
                    reqwest::Method::POST,
                    "/api/v1/vms",
                    Some(body),
                    &[("Idempotency-Key", "k1")],
                )
                .await
                .map_err(|e| *last.lock().unwrap() = format!("{e:?}"))
                .ok()?;
                *last.lock().unwrap() = format!("HTTP {s} {v}");
                (s == 202).then_some(v)
            }
        },
    )
    .await;
    let first = match first {
        Ok(v) => v,
        Err(e) => {
            c.dump_logs();
            bail!("{e}; last answer: {}", last.lock().unwrap());
        }
    };
    let id = first["vm"]["id"].as_str().context("vm id")?.to_string();

    // Two more retries through the other survivor return the same VM.
    let other = (leader + 2) % 3;
    for _ in 0..2 {
        let (s, v) = call(
            &c,
            other,
            &token,
            reqwest::Method::POST,
            "/api/v1/vms",
            Some(body.clone()),
            &[("Idempotency-Key", "k1")],
        )
        .await?;
        ensure!(s == 202, "retry: HTTP {s} {v}");
        ensure!(
            v["vm"]["id"] == id.as_str(),
            "retry returned another VM: {v}"
        );
    }
    for i in [survivor, other] {
        let vms = list_vms(&c, i, &token).await?;
        let named: Vec<&Value> = vms.iter().filter(|v| v["name"] == "once").collect();
        ensure!(
            named.len() == 1,
            "node {i} lists {} VMs named once: {vms:?}",
            named.len()
        );
        ensure!(named[0]["id"] == id.as_str());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_api_key_fails_on_every_node_at_once() -> Result<()> {
    let c = TestCluster::start(3, fast_tuning(60_000, 10_000, 1_000)).await?;
    let token = admin(&c)?;
    let (s, created) = call(
        &c,
        0,
        &token,
        reqwest::Method::POST,
        "/api/v1/api-keys",
        Some(json!({"name": "automation"})),
        &[],
    )
    .await?;
    ensure!(s == 201, "create key: HTTP {s} {created}");
    let key = created["key"].as_str().context("key")?.to_string();
    let id = created["id"].as_str().context("id")?.to_string();

    // Followers learn of the key through replication; wait until each accepts it.
    for i in 0..3 {
        eventually(
            &format!("node {i} to accept the key"),
            Duration::from_secs(30),
            || async {
                let (s, _) = call(&c, i, &key, reqwest::Method::GET, "/api/v1/vms", None, &[])
                    .await
                    .ok()?;
                (s == 200).then_some(())
            },
        )
        .await?;
    }

    let (s, v) = call(
        &c,
        1,
        &token,
        reqwest::Method::DELETE,
        &format!("/api/v1/api-keys/{id}"),
        None,
        &[],
    )
    .await?;
    ensure!(s == 204, "revoke: HTTP {s} {v}");
    // No waiting: the DELETE has returned, so every node must refuse the key now.
    for i in 0..3 {
        let (s, v) = call(&c, i, &key, reqwest::Method::GET, "/api/v1/vms", None, &[]).await?;
        ensure!(
            s == 401,
            "node {i} still accepts a revoked key: HTTP {s} {v}"
        );
    }
    Ok(())
}

struct Tenant {
    id: String,
    token_per_node: Vec<String>,
    vm_id: String,
}

async fn tenant_with_vm(c: &TestCluster, name: &str) -> Result<Tenant> {
    let token = admin(c)?;
    let t = c.create_tenant(0, name).await?;
    let id = t["id"].as_str().context("tenant id")?.to_string();
    let user = format!("{name}-admin");
    let password = "correct-horse-battery";
    let (s, v) = call(
        c,
        0,
        &token,
        reqwest::Method::POST,
        "/api/v1/users",
        Some(json!({"username": user, "password": password, "tenant": id, "role": "tenant-admin"})),
        &[],
    )
    .await?;
    ensure!(s == 201, "create user: HTTP {s} {v}");
    let mut token_per_node = Vec::new();
    for i in 0..c.nodes.len() {
        // A follower may not have applied the user yet.
        let tok = eventually(
            &format!("{user} to log in on node {i}"),
            Duration::from_secs(30),
            || async { c.login(i, &user, password).await.ok() },
        )
        .await?;
        token_per_node.push(tok);
    }
    let (s, v) = call(
        c,
        1,
        &token_per_node[1],
        reqwest::Method::POST,
        "/api/v1/vms",
        Some(json!({"name": format!("{name}-vm"), "vcpus": 1, "memory_mib": 64, "start": false})),
        &[],
    )
    .await?;
    ensure!(s == 202, "create VM in {name}: HTTP {s} {v}");
    let vm_id = v["vm"]["id"].as_str().context("vm id")?.to_string();
    Ok(Tenant {
        id,
        token_per_node,
        vm_id,
    })
}

/// Opens the event stream of node `i`. The handler subscribes before it answers, so every
/// change applied after this returns is offered to the stream.
async fn open_events(c: &TestCluster, i: usize, bearer: &str) -> Result<reqwest::Response> {
    let r = c
        .http
        .get(format!("{}/api/v1/events", c.nodes[i].url()))
        .bearer_auth(bearer)
        .timeout(Duration::from_secs(60))
        .send()
        .await?;
    ensure!(r.status() == 200, "events on node {i}: HTTP {}", r.status());
    Ok(r)
}

/// Reads an event stream until `until` appears, returning everything read.
async fn read_events_until(mut r: reqwest::Response, until: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut text = String::new();
    while !text.contains(until) {
        if Instant::now() > deadline {
            bail!("no event mentioning {until}; got {text}");
        }
        match tokio::time::timeout(Duration::from_secs(30), r.chunk()).await?? {
            Some(bytes) => text.push_str(&String::from_utf8_lossy(&bytes)),
            None => bail!("event stream closed"),
        }
    }
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated_on_every_node() -> Result<()> {
    let c = TestCluster::start(3, fast_tuning(60_000, 10_000, 1_000)).await?;
    let token = admin(&c)?;
    let red = tenant_with_vm(&c, "red").await?;
    let blue = tenant_with_vm(&c, "blue").await?;

    for i in 0..3 {
        let tok = &red.token_per_node[i];
        let vms = list_vms(&c, i, tok).await?;
        ensure!(
            vms.iter().all(|v| v["tenant"] == red.id.as_str()),
            "node {i} shows red another tenant's VMs: {vms:?}"
        );
        ensure!(
            vms.iter().any(|v| v["id"] == red.vm_id.as_str()),
            "red's own VM is listed"
        );
        // A filter naming the other tenant does not widen the view either.
        let (s, v) = call(
            &c,
            i,
            tok,
            reqwest::Method::GET,
            &format!("/api/v1/vms?tenant={}&consistency=linearizable", blue.id),
            None,
            &[],
        )
        .await?;
        ensure!(
            s != 200 || !v.to_string().contains(&blue.vm_id),
            "node {i}: tenant filter leaks blue's VM: {v}"
        );
        let (s, v) = call(
            &c,
            i,
            tok,
            reqwest::Method::GET,
            &format!("/api/v1/vms/{}?consistency=linearizable", blue.vm_id),
            None,
            &[],
        )
        .await?;
        ensure!(s == 404, "node {i}: blue's VM answers HTTP {s} {v} to red");
        let (s, v) = call(
            &c,
            i,
            tok,
            reqwest::Method::POST,
            &format!("/api/v1/vms/{}/stop", blue.vm_id),
            None,
            &[],
        )
        .await?;
        ensure!(
            s == 404,
            "node {i}: stopping blue's VM answers HTTP {s} {v} to red"
        );
        let (s, v) = call(
            &c,
            i,
            tok,
            reqwest::Method::GET,
            "/api/v1/audit?limit=500&consistency=linearizable",
            None,
            &[],
        )
        .await?;
        ensure!(s == 200, "audit on node {i}: HTTP {s} {v}");
        let items = v["items"].as_array().cloned().unwrap_or_default();
        ensure!(!items.is_empty(), "red's own actions are audited");
        ensure!(
            items.iter().all(|e| e["tenant"] == red.id.as_str()),
            "node {i}: audit shows another tenant's entries: {items:?}"
        );
        ensure!(
            !v.to_string().contains(&blue.vm_id),
            "node {i}: audit leaks blue's VM"
        );
    }

    // Events: each node's stream, opened by red, carries a blue change and then a red change;
    // by the time the red one arrives, the blue one must have been filtered out.
    for i in 0..3 {
        let stream = open_events(&c, i, &red.token_per_node[i]).await?;
        for (tenant, name) in [
            (&blue.id, format!("blue-late-{i}")),
            (&red.id, format!("red-late-{i}")),
        ] {
            let (s, v) = call(
                &c,
                0,
                &token,
                reqwest::Method::POST,
                "/api/v1/vms",
                Some(json!({"name": name, "vcpus": 1, "memory_mib": 64, "start": false, "tenant": tenant})),
                &[],
            )
            .await?;
            ensure!(s == 202, "admin create {name}: HTTP {s} {v}");
        }
        let text = read_events_until(stream, &format!("red-late-{i}")).await?;
        ensure!(
            !text.contains("blue") && !text.contains(&blue.id),
            "node {i}: red's event stream shows blue's changes: {text}"
        );
    }
    Ok(())
}
