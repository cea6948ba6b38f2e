//! The permission matrix: every served route, driven through the router without sockets, with
//! no credentials, a bad one, each role and a narrowly scoped API key, plus malformed and
//! invalid bodies and queries.
//!
//! The table is checked against the routes the router serves (taken from the generated OpenAPI
//! document), so a new route fails this test until it has a row. Each case runs on its own fork
//! of one prepared world, so a case that deletes or changes an object does not affect the next.

use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::fake::ADMIN_PASSWORD;
use crate::world::{self, has_query_param, send, Payload, Reply, TenantWorld, World};

/// The callers of a row's expectations, in order: the cluster admin, then the tenant's
/// tenant-admin, operator, viewer and a viewer-scoped API key of its tenant-admin.
const CALLERS: [&str; 5] = [
    "admin",
    "tenant-admin",
    "operator",
    "viewer",
    "viewer-scoped API key",
];

/// A body for the tenant the callers belong to.
pub type BodyFn = fn(&TenantWorld) -> Value;

pub struct Row {
    pub method: &'static str,
    pub path: &'static str,
    /// A valid body, for routes that take one.
    pub body: Option<BodyFn>,
    /// A valid payload that is not JSON (an upload chunk), for routes that take one.
    pub raw: Option<fn(&TenantWorld) -> Payload>,
    /// A well-formed body the handler must refuse as invalid (400 validation_failed).
    invalid: Option<BodyFn>,
    /// `None` for routes that need a bearer credential; otherwise what an anonymous call gets.
    public: Option<&'static str>,
    /// One expectation per caller of [`CALLERS`]: `STATUS` or `STATUS:code`.
    expect: &'static str,
    /// The route's purpose is to hand out the stored secrets (the admin's backup).
    carries_secrets: bool,
}

const fn row(method: &'static str, path: &'static str, expect: &'static str) -> Row {
    Row {
        method,
        path,
        body: None,
        raw: None,
        invalid: None,
        public: None,
        expect,
        carries_secrets: false,
    }
}

impl Row {
    const fn body(mut self, body: BodyFn, invalid: Option<BodyFn>) -> Row {
        self.body = Some(body);
        self.invalid = invalid;
        self
    }
    const fn public(mut self, anonymous: &'static str) -> Row {
        self.public = Some(anonymous);
        self
    }
    const fn carries_secrets(mut self) -> Row {
        self.carries_secrets = true;
        self
    }
    const fn raw(mut self, payload: fn(&TenantWorld) -> Payload) -> Row {
        self.raw = Some(payload);
        self
    }
    /// What a call of this row sends for the objects of `tw`.
    pub fn payload(&self, tw: &TenantWorld) -> Payload {
        match (self.body, self.raw) {
            (Some(f), _) => Payload::Json(f(tw)),
            (None, Some(f)) => f(tw),
            (None, None) => Payload::None,
        }
    }
}

pub fn table() -> Vec<Row> {
    vec![
        // Identity.
        row("POST", "/api/v1/auth/login", "200 200 200 200 200")
            .body(
                |_| json!({"username": "admin", "password": ADMIN_PASSWORD}),
                Some(|_| json!({"username": "", "password": "x"})),
            )
            .public("200"),
        // Logout ends a login token; an API key is revoked instead.
        row("POST", "/api/v1/auth/logout", "204 204 204 204 400"),
        row("GET", "/api/v1/api-keys", "200 200 200 200 200"),
        // Any user mints keys for itself; a key never mints keys.
        row("POST", "/api/v1/api-keys", "201 201 201 201 403").body(
            |_| json!({"name": "new-key"}),
            Some(|_| json!({"name": "not a name"})),
        ),
        // The target is the operator's key: its owner, the tenant-admin and the admin see it.
        row("DELETE", "/api/v1/api-keys/{id}", "204 204 204 404 404"),
        // TOTP of the tenant's viewer: only the user itself enrols and confirms; admins are
        // refused, users who may not see the viewer get 404.
        row("POST", "/api/v1/users/{id}/totp", "403 403 404 201 404"),
        row(
            "POST",
            "/api/v1/users/{id}/totp/confirm",
            "403 403 404 204 404",
        )
        .body(
            |tw| json!({"code": world::viewer_code(tw)}),
            Some(|_| json!({"code": "12"})),
        ),
        row(
            "PUT",
            "/api/v1/users/{id}/totp/required",
            "204 204 404 403 404",
        )
        .body(|_| json!({"required": true}), None),
        row("GET", "/api/v1/users", "200 200 403 403 403"),
        row("POST", "/api/v1/users", "201 201 403 403 403").body(
            |tw| {
                json!({"username": "new-user", "password": "long-enough", "tenant": tw.id,
                       "role": "viewer"})
            },
            Some(|tw| {
                json!({"username": "new-user", "password": "short", "tenant": tw.id,
                       "role": "viewer"})
            }),
        ),
        // The target is the tenant's viewer, who may read itself but not change its role.
        row("GET", "/api/v1/users/{id}", "200 200 404 200 404"),
        row("PATCH", "/api/v1/users/{id}", "200 200 404 403 404").body(
            |_| json!({"role": "operator"}),
            Some(|_| json!({"password": "short"})),
        ),
        row("DELETE", "/api/v1/users/{id}", "204 204 404 403 404"),
        // Audit.
        row("GET", "/api/v1/audit", "200 200 403 403 403"),
        row("GET", "/api/v1/audit/verify", "200 403 403 403 403"),
        row("GET", "/api/v1/events", "200 200 200 200 200"),
        // Cluster.
        row("GET", "/api/v1/cluster", "200 200 200 200 200"),
        // Day-2, admins only. A backup holds every password hash and key (a restore needs them): it is the one
        // answer allowed to carry stored secrets.
        row("GET", "/api/v1/backup", "200 403 403 403 403").carries_secrets(),
        row(
            "GET",
            "/api/v1/cluster/upgrade-check",
            "200 403 403 403 403",
        ),
        row(
            "POST",
            "/api/v1/cluster/rotate-jwt-key",
            "200 403 403 403 403",
        ),
        // The join token in the body is the credential; the in-memory cluster refuses every
        // join, so reaching it proves the route is open (real joins: node's tests).
        row(
            "POST",
            "/api/v1/cluster/join",
            "403:join_refused 403:join_refused 403:join_refused 403:join_refused 403:join_refused",
        )
        .body(|_| join_body("n9"), Some(|_| join_body("")))
        .public("403:join_refused"),
        // Tenants: admins manage them; tenant users read their own.
        row("GET", "/api/v1/tenants", "200 200 200 200 200"),
        row("POST", "/api/v1/tenants", "201 403 403 403 403").body(
            |_| json!({"name": "new-tenant"}),
            Some(|_| json!({"name": "no spaces"})),
        ),
        row("GET", "/api/v1/tenants/{id}", "200 200 200 200 200"),
        row("PATCH", "/api/v1/tenants/{id}", "200 403 403 403 403")
            .body(|_| json!({"quota": {"max_vms": 9}}), None),
        // The tenant holds users and a VM: even an admin may not delete it (409).
        row("DELETE", "/api/v1/tenants/{id}", "409 403 403 403 403"),
        // Nodes: everyone reads, admins act (the target has nothing placed on it).
        row("GET", "/api/v1/nodes", "200 200 200 200 200"),
        row("DELETE", "/api/v1/nodes/{id}", "204 403 403 403 403"),
        row("POST", "/api/v1/nodes/{id}/drain", "200 403 403 403 403"),
        row("POST", "/api/v1/nodes/{id}/undrain", "200 403 403 403 403"),
        // VMs: operators act, viewers read.
        row("GET", "/api/v1/vms", "200 200 200 200 200"),
        row("POST", "/api/v1/vms", "202 202 202 403 403").body(
            |_| json!({"name": "new-vm", "vcpus": 1, "memory_mib": 128}),
            Some(|_| json!({"name": "new-vm", "vcpus": 0, "memory_mib": 128})),
        ),
        row("GET", "/api/v1/vms/{id}", "200 200 200 200 200"),
        row("DELETE", "/api/v1/vms/{id}", "202 202 202 403 403"),
        row("POST", "/api/v1/vms/{id}/start", "202 202 202 403 403"),
        row("POST", "/api/v1/vms/{id}/stop", "202 202 202 403 403"),
        row("POST", "/api/v1/vms/{id}/reboot", "202 202 202 403 403"),
        row("GET", "/api/v1/vms/{id}/console", "200 200 200 403 403"),
        // Everyone who sees the VM reads its statistics and why it was placed where it is.
        row("GET", "/api/v1/vms/{id}/metrics", "200 200 200 200 200"),
        row("GET", "/api/v1/vms/{id}/placement", "200 200 200 200 200"),
        // Admins only. The in-memory control plane has no scheduler, so the admin gets 501;
        // a simulation's success is tested against a real cluster (node/tests/it/scheduler.rs).
        row(
            "POST",
            "/api/v1/scheduler/simulate",
            "501:unsupported 403 403 403 403",
        )
        .body(
            |_| json!({"kind": "drain", "node": "n1"}),
            Some(|_| json!({"kind": "drain", "node": ""})),
        ),
        // Operators move VMs between sites. The in-memory control plane has no other site, so
        // the move answers 501; moves are tested against real sites (node/tests/it/site_move.rs).
        row(
            "POST",
            "/api/v1/vms/{id}/move",
            "501:unsupported 501:unsupported 501:unsupported 403 403",
        )
        .body(|_| json!({"site": "b"}), Some(|_| json!({"site": ""}))),
        row("POST", "/api/v1/vms/{id}/migrate", "202 202 202 403 403").body(
            |_| json!({"target_node": "n2", "bandwidth_mib_s": 100}),
            Some(|_| json!({"bandwidth_mib_s": 0})),
        ),
        // Images: operators upload and delete, everyone in the tenant reads. Chunks go to a
        // half-uploaded image (the row sends its last chunk); the other routes address one
        // whose bytes are complete, not yet finished and used by no VM.
        row("GET", "/api/v1/images", "200 200 200 200 200"),
        row("POST", "/api/v1/images", "201 201 201 403 403").body(
            |_| json!({"name": "new-image", "size_bytes": 4, "sha256": "ab".repeat(32)}),
            Some(|_| json!({"name": "new-image", "size_bytes": 4, "sha256": "not-hex"})),
        ),
        row("GET", "/api/v1/images/{id}", "200 200 200 200 200"),
        row("DELETE", "/api/v1/images/{id}", "204 204 204 403 403"),
        row("GET", "/api/v1/images/{id}/upload", "200 200 200 200 200"),
        row("PUT", "/api/v1/images/{id}/upload", "200 200 200 403 403").raw(world::last_chunk),
        row("POST", "/api/v1/images/{id}/finish", "200 200 200 403 403").body(
            |tw| json!({"sha256": world::image_sha256(&tw.prefix)}),
            None,
        ),
        row("GET", "/api/v1/operations/{id}", "200 200 200 200 200"),
        // Federation: everyone sees the sites, admins link and unlink. The in-memory control
        // plane has no site links, so linking gets 501; node/tests/it/federation.rs links
        // real sites.
        row("GET", "/api/v1/sites", "200 200 200 200 200"),
        row("POST", "/api/v1/sites", "501:unsupported 403 403 403 403").body(
            |_| json!({"token": world::LINK_TOKEN, "addrs": ["192.0.2.1:7003"]}),
            Some(|_| json!({"token": "nft1.not-a-token", "addrs": ["192.0.2.1:7003"]})),
        ),
        row(
            "DELETE",
            "/api/v1/sites/{site}",
            "404:not_found 403 403 403 403",
        ),
        row("POST", "/api/v1/federation/tokens", "201 403 403 403 403"),
        // Probes and the document are open to everyone.
        row("GET", "/healthz", "200 200 200 200 200").public("200"),
        row("GET", "/readyz", "200 200 200 200 200").public("200"),
        row("GET", "/metrics", "200 200 200 200 200").public("200"),
        row("GET", "/openapi.json", "200 200 200 200 200").public("200"),
    ]
}

fn join_body(name: &str) -> Value {
    json!({
        "token": "nct_not-a-token",
        "csr_pem": "-----BEGIN CERTIFICATE REQUEST-----",
        "member": {"name": name, "api_addr": "127.0.0.1:1", "peer_addr": "127.0.0.1:2"},
    })
}

/// The stable code each error status carries unless a row names another.
fn default_code(status: u16) -> &'static str {
    match status {
        400 => "validation_failed",
        401 => "unauthenticated",
        403 => "forbidden",
        404 => "not_found",
        409 => "conflict",
        412 => "precondition_failed",
        415 => "unsupported_media_type",
        422 => "invalid_body",
        other => panic!("no default code for {other}"),
    }
}

/// Parses `STATUS` or `STATUS:code`.
fn parse(expect: &str) -> (u16, Option<&str>) {
    match expect.split_once(':') {
        Some((s, code)) => (s.parse().unwrap(), Some(code)),
        None => {
            let s: u16 = expect.parse().unwrap();
            (s, (s >= 400).then(|| default_code(s)))
        }
    }
}

/// Compares a reply with an expectation; an error must be problem+json with its stable code.
fn check(failures: &mut Vec<String>, what: &str, reply: &Reply, expect: &str) {
    let (status, code) = parse(expect);
    if reply.status.as_u16() != status {
        failures.push(format!(
            "{what}: expected {status}, got {} {}",
            reply.status, reply.text
        ));
        return;
    }
    if let Some(code) = code {
        if !reply.is_problem() || reply.code() != Some(code) {
            failures.push(format!(
                "{what}: expected problem+json with code {code:?}, got {:?} {}",
                reply.headers.get("content-type"),
                reply.text
            ));
        }
    }
}

fn report(failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

async fn world() -> (World, TenantWorld) {
    let w = World::new().await;
    let tw = w.tenant("acme").await;
    (w, tw)
}

#[tokio::test]
async fn every_served_route_has_a_row_and_every_row_a_route() {
    let rows: std::collections::BTreeSet<(String, String)> = table()
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    let served = world::served_routes();
    let untested: Vec<_> = served.difference(&rows).collect();
    let stale: Vec<_> = rows.difference(&served).collect();
    assert!(
        untested.is_empty(),
        "routes without a row in the permission table: {untested:?}"
    );
    assert!(stale.is_empty(), "rows for routes not served: {stale:?}");
    assert_eq!(rows.len(), table().len(), "a route has two rows");
}

#[tokio::test]
async fn each_role_gets_what_the_permission_table_says() {
    let (w, tw) = world().await;
    let tokens = [
        w.admin.as_str(),
        tw.tenant_admin.as_str(),
        tw.operator.as_str(),
        tw.viewer.as_str(),
        tw.narrow_key.as_str(),
    ];
    let mut failures = Vec::new();
    let mut cases = 0;
    for r in table() {
        let expects: Vec<&str> = r.expect.split_whitespace().collect();
        assert_eq!(expects.len(), CALLERS.len(), "{} {}", r.method, r.path);
        assert!(
            // 409: the call was authorized and reached `apply` (see admin_deletes_an_empty_tenant);
            // joins, simulations, site links and moves are refused by the in-memory cluster (their
            // success is tested against real nodes).
            expects
                .iter()
                .any(|e| parse(e).0 < 300 || parse(e).0 == 409)
                || r.path.ends_with("/join")
                || r.path.ends_with("/simulate")
                || r.path.ends_with("/move")
                || (r.path.starts_with("/api/v1/sites") && r.method != "GET"),
            "{} {}: no caller succeeds, so success is untested",
            r.method,
            r.path
        );
        let path = w.fill(&tw, r.path);
        let documented = world::documented_statuses(r.method, r.path);
        for ((caller, token), expect) in CALLERS.iter().zip(tokens).zip(&expects) {
            let fork = w.t.fork();
            let payload = r.payload(&tw);
            let reply = send(&fork, r.method, &path, Some(token), &payload).await;
            let what = format!("{} {} as {caller}", r.method, r.path);
            // What the route answers is what its document promises (schemathesis checks the
            // bodies against a live node).
            if let Some(statuses) = &documented {
                if !statuses.contains(&reply.status.as_u16()) {
                    failures.push(format!("{what}: {} is not documented", reply.status));
                }
            }
            // Stored secrets never leave the server, whatever the route and caller.
            for secret in ["$argon2", "password_hash", "secret_sha256", "totp_secret"] {
                if reply.text.contains(secret) && !(r.carries_secrets && reply.status.is_success())
                {
                    failures.push(format!("{what}: the answer contains {secret:?}"));
                }
            }
            check(&mut failures, &what, &reply, expect);
            cases += 1;
        }
    }
    println!("{cases} cases");
    report(failures);
}

#[tokio::test]
async fn missing_and_bad_credentials_answer_401() {
    let (w, tw) = world().await;
    let mut failures = Vec::new();
    for r in table() {
        let path = w.fill(&tw, r.path);
        let payload = r.payload(&tw);
        let t = w.t.fork();
        let anonymous = send(&t, r.method, &path, None, &payload).await;
        let what = format!("{} {} without credentials", r.method, r.path);
        check(
            &mut failures,
            &what,
            &anonymous,
            r.public.unwrap_or("401:unauthenticated"),
        );
        if r.public.is_none() {
            for (label, bearer) in [
                ("a garbage token", "garbage"),
                ("a forged API key", "nck_0123_deadbeef"),
            ] {
                let reply = send(&t, r.method, &path, Some(bearer), &payload).await;
                check(
                    &mut failures,
                    &format!("{} {} with {label}", r.method, r.path),
                    &reply,
                    "401:bad_token",
                );
            }
            // Not a bearer credential at all.
            let reply = send_basic(&t, r.method, &path).await;
            check(
                &mut failures,
                &format!("{} {} with basic auth", r.method, r.path),
                &reply,
                "401:unauthenticated",
            );
        }
    }
    report(failures);
}

async fn send_basic(t: &crate::fake::TestApi, method: &str, path: &str) -> Reply {
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let req = axum::http::Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", "Basic YWRtaW46YWRtaW4=")
        .body(Body::empty())
        .unwrap();
    let resp = t.app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        text: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// The first caller a row allows, with its token (anonymous for public rows).
fn allowed_caller<'a>(r: &Row, tokens: &[&'a str; 5]) -> Option<&'a str> {
    if r.public.is_some() {
        return None;
    }
    // A route the in-memory cluster cannot serve (501) still checks its body first.
    r.expect
        .split_whitespace()
        .position(|e| parse(e).0 < 300 || parse(e).0 == 501)
        .map(|i| tokens[i])
}

#[tokio::test]
async fn malformed_and_invalid_bodies_are_problems_with_stable_codes() {
    let (w, tw) = world().await;
    let tokens = [
        w.admin.as_str(),
        tw.tenant_admin.as_str(),
        tw.operator.as_str(),
        tw.viewer.as_str(),
        tw.narrow_key.as_str(),
    ];
    let mut failures = Vec::new();
    let mut bodies = 0;
    for r in table().iter().filter(|r| r.body.is_some()) {
        bodies += 1;
        let path = w.fill(&tw, r.path);
        let token = allowed_caller(r, &tokens);
        let cases = [
            (
                "a body that is not JSON",
                Payload::Raw("application/json", "{not json"),
                "400:malformed_body",
            ),
            (
                "a body of the wrong shape",
                Payload::Json(json!({"unexpected_field": true})),
                "422:invalid_body",
            ),
            (
                "a body of the wrong type",
                Payload::Json(json!([1, 2, 3])),
                "422:invalid_body",
            ),
            (
                "a body without a JSON content type",
                Payload::Raw("text/plain", "{}"),
                "415:unsupported_media_type",
            ),
        ];
        for (label, payload, expect) in cases {
            let reply = send(&w.t.fork(), r.method, &path, token, &payload).await;
            check(
                &mut failures,
                &format!("{} {} with {label}", r.method, r.path),
                &reply,
                expect,
            );
        }
        if let Some(invalid) = r.invalid {
            let payload = Payload::Json(invalid(&tw));
            let reply = send(&w.t.fork(), r.method, &path, token, &payload).await;
            check(
                &mut failures,
                &format!("{} {} with an invalid body", r.method, r.path),
                &reply,
                "400:validation_failed",
            );
        }
    }
    assert!(bodies >= 10, "only {bodies} routes take a body?");
    report(failures);
}

#[tokio::test]
async fn paginated_lists_refuse_bad_queries_as_problems() {
    let (w, tw) = world().await;
    let tokens = [
        w.admin.as_str(),
        tw.tenant_admin.as_str(),
        tw.operator.as_str(),
        tw.viewer.as_str(),
        tw.narrow_key.as_str(),
    ];
    let mut failures = Vec::new();
    let mut lists = 0;
    for r in table()
        .iter()
        .filter(|r| r.method == "GET" && has_query_param(r.method, r.path, "limit"))
    {
        lists += 1;
        let token = allowed_caller(r, &tokens);
        for query in ["limit=0", "limit=501", "limit=many", "consistency=eventual"] {
            let path = format!("{}?{query}", w.fill(&tw, r.path));
            let reply = send(&w.t, "GET", &path, token, &Payload::None).await;
            check(
                &mut failures,
                &format!("GET {path}"),
                &reply,
                "400:validation_failed",
            );
        }
    }
    assert!(lists >= 5, "only {lists} paginated lists?");
    report(failures);
}

/// Every read that takes a `consistency` refuses an unknown one as a problem, not as the
/// framework's plain text (lists are covered above; this reaches single objects too).
#[tokio::test]
async fn reads_refuse_an_unknown_consistency_as_a_problem() {
    let (w, tw) = world().await;
    let mut failures = Vec::new();
    let mut reads = 0;
    for r in table()
        .iter()
        .filter(|r| r.method == "GET" && has_query_param(r.method, r.path, "consistency"))
    {
        reads += 1;
        let path = format!("{}?consistency=eventual", w.fill(&tw, r.path));
        let reply = send(&w.t, "GET", &path, Some(&w.admin), &Payload::None).await;
        check(
            &mut failures,
            &format!("GET {path}"),
            &reply,
            "400:validation_failed",
        );
    }
    assert!(reads >= 8, "only {reads} reads take a consistency?");
    report(failures);
}

/// Deleting an empty tenant succeeds (the table's target holds objects, so it answers 409).
#[tokio::test]
async fn admin_deletes_an_empty_tenant() {
    let (w, _) = world().await;
    let (s, v) =
        w.t.call(
            "POST",
            "/api/v1/tenants",
            Some(&w.admin),
            Some(json!({"name": "empty"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let path = format!("/api/v1/tenants/{}", v["id"].as_str().unwrap());
    let (s, v) = w.t.call("DELETE", &path, Some(&w.admin), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let (s, _) = w.t.call("GET", &path, Some(&w.admin), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// A narrowly scoped key acts with its scope only: it may not change its owner's account
/// (password, second factor), which would hand out the owner's full role.
#[tokio::test]
async fn a_scoped_api_key_cannot_change_its_owners_account() {
    let (w, tw) = world().await;
    let own = format!("/api/v1/users/{}", tw.tenant_admin_id);
    let reply = send(
        &w.t,
        "PATCH",
        &own,
        Some(&tw.narrow_key),
        &Payload::Json(json!({"password": "taken-over-pw"})),
    )
    .await;
    let mut failures = Vec::new();
    check(
        &mut failures,
        "PATCH own password with a key",
        &reply,
        "403",
    );
    for route in ["totp", "totp/confirm"] {
        let payload = if route == "totp" {
            Payload::None
        } else {
            Payload::Json(json!({"code": "123456"}))
        };
        let reply = send(
            &w.t,
            "POST",
            &format!("{own}/{route}"),
            Some(&tw.narrow_key),
            &payload,
        )
        .await;
        check(
            &mut failures,
            &format!("POST own {route} with a key"),
            &reply,
            "403",
        );
    }
    // The owner's password still works; with its login token the owner may change it.
    let token = w.t.login("acme-ta", "pw").await;
    let reply = send(
        &w.t,
        "PATCH",
        &own,
        Some(&token),
        &Payload::Json(json!({"password": "a-new-password"})),
    )
    .await;
    check(
        &mut failures,
        "PATCH own password with a login",
        &reply,
        "200",
    );
    report(failures);
}
