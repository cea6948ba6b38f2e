//! Tenant isolation: two tenants, each with users of every role and objects of every kind.
//! Tenant B's callers try every route with tenant A's ids and get exactly what a missing id
//! gets (404, never 403), change nothing of A's, and find none of A's ids or names in lists,
//! the event stream (live and replayed) or the audit log.
//!
//! Every name of tenant A starts with `alpha` and tenant B's never contain it, so a search of
//! a response for `alpha` and for A's ids finds any leak; the same searches over an admin's
//! responses must find A's data, which shows the search itself works.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use api::ControlPlane;

use crate::fake::TestApi;
use crate::matrix::table;
use crate::world::{send, served_routes, Payload, Reply, TenantWorld, World};

/// Where any of tenant A's data shows in `text`, if it does.
fn leak(a: &TenantWorld, text: &str) -> Option<String> {
    if text.contains(&a.prefix) {
        return Some(a.prefix.clone());
    }
    a.ids().into_iter().find(|id| text.contains(id.as_str()))
}

/// Tenant A's objects as an admin sees them: any change to them shows here.
async fn snapshot(t: &TestApi, admin: &str, a: &TenantWorld) -> Vec<Value> {
    let mut out = Vec::new();
    for path in [
        format!("/api/v1/tenants/{}", a.id),
        format!("/api/v1/vms/{}", a.vm_id),
        format!("/api/v1/operations/{}", a.operation_id),
        format!("/api/v1/users?tenant={}", a.id),
        "/api/v1/api-keys".to_string(),
        // Upload progress lives outside the replicated state (on the upload node).
        format!("/api/v1/images/{}", a.image_id),
        format!("/api/v1/images/{}/upload", a.image_id),
        format!("/api/v1/images/{}/upload", a.upload_id),
        "/api/v1/images".to_string(),
    ] {
        let r = send(t, "GET", &path, Some(admin), &Payload::None).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text);
        out.push(r.body);
    }
    // A migration changes nothing of the VM until it runs: its record is the change to see.
    let migrations: Vec<String> =
        t.cp.scan(raft::keys::MIGRATION_PREFIX, None, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
            .collect();
    out.push(json!(migrations));
    out
}

fn same_answer(a: &Reply, b: &Reply) -> bool {
    a.status == b.status && a.body["code"] == b.body["code"] && a.body["title"] == b.body["title"]
}

#[tokio::test]
async fn another_tenants_ids_answer_like_missing_ones_and_change_nothing() {
    let w = World::new().await;
    let a = w.tenant("alpha").await;
    let b = w.tenant("bravo").await;
    let before = snapshot(&w.t, &w.admin, &a).await;
    let mut failures = Vec::new();
    let mut cases = 0;
    for r in table() {
        // Objects of a tenant are addressed by id in the path, or by tenant id in the body.
        let by_path = r.path.contains("{id}") && a.target(r.path).is_some();
        let by_body = r.method == "POST" && r.path == "/api/v1/users";
        if !by_path && !by_body {
            continue;
        }
        let payload = |tw: &TenantWorld| r.payload(tw);
        for (caller, token) in b.callers() {
            // Each attempt on its own fork, so one that wrongly succeeded cannot hide another.
            let t = w.t.fork();
            let theirs = send(&t, r.method, &w.fill(&a, r.path), Some(token), &payload(&a)).await;
            let missing_path = r.path.replace("{id}", "no-such-id");
            let mut missing_body = payload(&a);
            if let Payload::Json(v) = &mut missing_body {
                if v.get("tenant").is_some() {
                    v["tenant"] = json!("no-such-tenant");
                }
            }
            let missing = send(&t, r.method, &missing_path, Some(token), &missing_body).await;
            let what = format!("{} {} as tenant B's {caller}", r.method, r.path);
            if theirs.status != StatusCode::NOT_FOUND || theirs.code() != Some("not_found") {
                failures.push(format!(
                    "{what} with A's id: expected 404 not_found, got {} {}",
                    theirs.status, theirs.text
                ));
            }
            if !same_answer(&theirs, &missing) {
                failures.push(format!(
                    "{what}: A's id answers {} {} but a missing id {} {}",
                    theirs.status, theirs.text, missing.status, missing.text
                ));
            }
            // The answer may repeat the id that was asked for; anything else of A's is a leak.
            let asked = if by_path {
                a.target(r.path).unwrap_or_default()
            } else {
                a.id.clone()
            };
            if let Some(found) = leak(&a, &theirs.text.replace(&asked, "")) {
                failures.push(format!("{what}: the answer shows {found:?}"));
            }
            if snapshot(&t, &w.admin, &a).await != before {
                failures.push(format!("{what}: tenant A's objects changed"));
            }
            cases += 1;
        }
    }
    // Creating a VM in tenant A by naming it.
    for (caller, token) in b.callers() {
        let t = w.t.fork();
        let body = Payload::Json(
            json!({"name": "bravo-in-a", "vcpus": 1, "memory_mib": 128, "tenant": a.id}),
        );
        let reply = send(&t, "POST", "/api/v1/vms", Some(token), &body).await;
        if reply.status != StatusCode::NOT_FOUND {
            failures.push(format!(
                "POST /api/v1/vms into tenant A as tenant B's {caller}: {} {}",
                reply.status, reply.text
            ));
        }
        if snapshot(&t, &w.admin, &a).await != before {
            failures.push(format!("POST /api/v1/vms as {caller}: tenant A changed"));
        }
        cases += 1;
    }
    println!("{cases} attempts");
    assert!(cases >= 60, "only {cases} attempts: routes went missing?");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn lists_show_nothing_of_another_tenant() {
    let w = World::new().await;
    let a = w.tenant("alpha").await;
    let b = w.tenant("bravo").await;
    let lists: Vec<String> = served_routes()
        .into_iter()
        .filter(|(m, p)| m == "GET" && !p.contains('{') && p != "/api/v1/events")
        .map(|(_, p)| p)
        .collect();
    let mut failures = Vec::new();
    for path in &lists {
        // Asking for tenant A by name is no way around the filter either.
        for query in ["", "?tenant=A", "?tenant=A&limit=500"] {
            let path = format!("{path}{}", query.replace('A', &a.id));
            for (caller, token) in b.callers() {
                let r = send(&w.t, "GET", &path, Some(token), &Payload::None).await;
                if let Some(found) = leak(&a, &r.text) {
                    failures.push(format!(
                        "GET {path} as tenant B's {caller} shows {found:?}: {}",
                        r.text
                    ));
                }
            }
        }
    }
    // The node list counts only what the caller may see: both tenants have one VM on n1.
    for (caller, token) in b.callers() {
        let r = send(&w.t, "GET", "/api/v1/nodes", Some(token), &Payload::None).await;
        let n1 = r.body.as_array().and_then(|ns| {
            ns.iter()
                .find(|n| n["id"].as_u64() == Some(w.busy_node))
                .cloned()
        });
        let counted = n1
            .as_ref()
            .map(|n| (n["vms"].clone(), n["vcpus_used"].clone()));
        if counted != Some((json!(1), json!(1))) {
            failures.push(format!(
                "GET /api/v1/nodes as tenant B's {caller} counts {counted:?} on n1, not B's one VM"
            ));
        }
    }
    // The same searches find A's data in what an admin sees.
    for path in [
        "/api/v1/vms",
        "/api/v1/users",
        "/api/v1/api-keys",
        "/api/v1/audit",
        "/api/v1/images",
    ] {
        let r = send(&w.t, "GET", path, Some(&w.admin), &Payload::None).await;
        assert!(
            leak(&a, &r.text).is_some(),
            "admin's {path} lacks A: {}",
            r.text
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// An open event stream, read event by event.
struct Events {
    body: Body,
    buf: String,
}

impl Events {
    async fn open(t: &TestApi, token: &str, last_id: Option<u64>) -> Events {
        let mut req =
            Request::get("/api/v1/events").header("authorization", format!("Bearer {token}"));
        if let Some(id) = last_id {
            req = req.header("last-event-id", id.to_string());
        }
        let resp = t
            .app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        Events {
            body: resp.into_body(),
            buf: String::new(),
        }
    }

    /// The raw text of the next event (keep-alive comments skipped); fails after 10 s.
    async fn next(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                if block.lines().all(|l| l.starts_with(':') || l.is_empty()) {
                    continue;
                }
                return block;
            }
            let frame = tokio::time::timeout(Duration::from_secs(10), self.body.frame())
                .await
                .expect("an event within 10 s")
                .expect("stream open")
                .unwrap();
            if let Ok(data) = frame.into_data() {
                self.buf.push_str(&String::from_utf8_lossy(&data));
            }
        }
    }

    /// Every event up to and including the one that carries `marker`.
    async fn until(&mut self, marker: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let e = self.next().await;
            let done = e.contains(marker);
            seen.push(e);
            if done {
                return seen;
            }
        }
    }
}

/// Changes to tenant A of every kind: users, roles, keys, VMs, operations, quota, logins.
async fn tenant_a_activity(w: &World, a: &TenantWorld) {
    let t = &w.t;
    let ok = |s: StatusCode, v: &Value, what: &str| assert!(s.is_success(), "{what}: {s} {v}");
    let (s, v) = t
        .call(
            "PATCH",
            &format!("/api/v1/users/{}", a.viewer_id),
            Some(&a.tenant_admin),
            Some(json!({"role": "operator"})),
        )
        .await;
    ok(s, &v, "role change");
    let (s, v) = t
        .call(
            "POST",
            &format!("/api/v1/vms/{}/stop", a.vm_id),
            Some(&a.operator),
            None,
        )
        .await;
    ok(s, &v, "stop");
    let (s, v) = t
        .call(
            "PATCH",
            &format!("/api/v1/tenants/{}", a.id),
            Some(&w.admin),
            Some(json!({"quota": {"max_vms": 5}})),
        )
        .await;
    ok(s, &v, "quota");
    let (s, v) = t
        .call(
            "DELETE",
            &format!("/api/v1/api-keys/{}", a.operator_key_id),
            Some(&a.tenant_admin),
            None,
        )
        .await;
    ok(s, &v, "revoke");
    let (s, v) = t
        .call(
            "POST",
            "/api/v1/vms",
            Some(&a.operator),
            Some(json!({"name": "alpha-vm-2", "vcpus": 2, "memory_mib": 256})),
        )
        .await;
    ok(s, &v, "second VM");
    let (s, v) = t
        .call(
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"username": "alpha-op", "password": "wrong-password"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    t.login("alpha-ta", "pw").await;
}

#[tokio::test]
async fn events_and_audit_show_nothing_of_another_tenant() {
    let w = World::new().await;
    let b = w.tenant("bravo").await;
    // Streams opened before tenant A exists see its whole life go by.
    let start = w.t.cp.status().await.unwrap().commit_index;
    let mut live = Vec::new();
    for (caller, token) in b.callers() {
        live.push((caller, Events::open(&w.t, token, None).await));
    }
    let mut admin_live = Events::open(&w.t, &w.admin, None).await;
    let a = w.tenant("alpha").await;
    tenant_a_activity(&w, &a).await;
    // The marker: a change every member of tenant B may see, after all of A's.
    let (s, v) =
        w.t.call(
            "PATCH",
            &format!("/api/v1/tenants/{}", b.id),
            Some(&w.admin),
            Some(json!({"quota": {"max_vms": 4242}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let marker = "4242";

    let mut failures = Vec::new();
    for (caller, mut events) in live {
        for e in events.until(marker).await {
            if let Some(found) = leak(&a, &e) {
                failures.push(format!("live event to B's {caller} shows {found:?}: {e}"));
            }
        }
    }
    // Resumed from before A existed, the replay is filtered the same way.
    for (caller, token) in b.callers() {
        let mut replay = Events::open(&w.t, token, Some(start)).await;
        for e in replay.until(marker).await {
            if let Some(found) = leak(&a, &e) {
                failures.push(format!(
                    "replayed event to B's {caller} shows {found:?}: {e}"
                ));
            }
        }
    }
    // The admin's stream carries A's changes: the search would have found them.
    let admin_events = admin_live.until(marker).await.join("\n");
    assert!(leak(&a, &admin_events).is_some(), "{admin_events}");

    // Audit: B's tenant-admin reads its tenant's entries, with and without filters, and none
    // of A's; the admin's log has A's.
    for query in [
        "",
        "?action=vm.",
        "?action=auth.login",
        "?tenant=A",
        "?actor=alpha-ta-id",
    ] {
        let path = format!("/api/v1/audit{}", query.replace('A', &a.id));
        let r = send(&w.t, "GET", &path, Some(&b.tenant_admin), &Payload::None).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text);
        if let Some(found) = leak(&a, &r.text) {
            failures.push(format!("GET {path} as B's tenant-admin shows {found:?}"));
        }
        let items = r.body["items"].as_array().unwrap();
        if query.is_empty() && items.is_empty() {
            failures.push("B's tenant-admin sees no audit entry of its own tenant".into());
        }
        if let Some(e) = items.iter().find(|e| e["tenant"] != json!(b.id)) {
            failures.push(format!("GET {path} as B's tenant-admin shows {e}"));
        }
    }
    let r = send(
        &w.t,
        "GET",
        "/api/v1/audit?limit=500",
        Some(&w.admin),
        &Payload::None,
    )
    .await;
    assert!(leak(&a, &r.text).is_some(), "{}", r.text);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Outcomes remembered for an Idempotency-Key are the caller's own: tenant B reusing the key
/// tenant A used gets a VM of its own (or its own refusal), never A's.
#[tokio::test]
async fn an_idempotency_key_used_by_another_tenant_replays_nothing() {
    let w = World::new().await;
    let a = w.tenant("alpha").await;
    let b = w.tenant("bravo").await;
    let create = |token: String, name: &'static str| {
        let t = &w.t;
        async move {
            let body = json!({"name": name, "vcpus": 1, "memory_mib": 128});
            let headers = [("idempotency-key", "shared-key")];
            let (s, _, v) = t
                .call_full("POST", "/api/v1/vms", Some(&token), Some(body), &headers)
                .await;
            (s, v)
        }
    };
    let (s, first) = create(a.operator.clone(), "alpha-keyed").await;
    assert_eq!(s, StatusCode::ACCEPTED, "{first}");
    // The control: the same caller does get its first outcome back.
    let (s, again) = create(a.operator.clone(), "alpha-keyed").await;
    assert_eq!(s, StatusCode::ACCEPTED, "{again}");
    assert_eq!(first["vm"]["id"], again["vm"]["id"]);
    for (caller, token) in b.callers() {
        let (s, theirs) = create(token.to_string(), "bravo-keyed").await;
        let what = format!("tenant B's {caller} with A's Idempotency-Key");
        assert!(
            leak(&a, &theirs.to_string()).is_none(),
            "{what} got A's data: {theirs}"
        );
        match s {
            StatusCode::ACCEPTED => assert_eq!(theirs["vm"]["tenant"], json!(b.id), "{what}"),
            // Viewers may not create; a second B caller meets B's own VM of that name.
            StatusCode::FORBIDDEN | StatusCode::CONFLICT => {}
            other => panic!("{what}: {other} {theirs}"),
        }
    }
}
