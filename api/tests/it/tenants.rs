//! Login, tenants and their access rules, through the router.

use axum::http::StatusCode;
use raft::model::Role;
use serde_json::json;

use crate::fake::{TestApi, ADMIN_PASSWORD};

#[tokio::test]
async fn login_succeeds_and_fails_with_problem_json() {
    let t = TestApi::new().await;
    let token = t.login("admin", ADMIN_PASSWORD).await;
    assert!(!token.is_empty());
    let (s, h, v) = t
        .call_full(
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"username": "admin", "password": "nope"})),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["code"], "bad_credentials");
    assert_eq!(h["content-type"], "application/problem+json");
    // Unknown users fail the same way (no user enumeration).
    let (s, v) = t
        .call(
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"username": "ghost", "password": "x"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["code"], "bad_credentials");
}

#[tokio::test]
async fn routes_need_a_valid_token() {
    let t = TestApi::new().await;
    let (s, v) = t.call("GET", "/api/v1/tenants", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["code"], "unauthenticated");
    let (s, v) = t
        .call("GET", "/api/v1/tenants", Some("garbage"), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["code"], "bad_token");
    let (s, _) = t
        .call("GET", "/api/v1/cluster", Some("garbage"), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn admin_manages_tenants_with_etags_and_pagination() {
    let t = TestApi::new().await;
    let admin = t.login("admin", ADMIN_PASSWORD).await;
    let (s, h, v) = t
        .call_full(
            "POST",
            "/api/v1/tenants",
            Some(&admin),
            Some(json!({"name": "acme", "quota": {"max_vms": 3}})),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(h["etag"], "\"1\"");
    assert_eq!(v["quota"]["max_vms"], 3);
    let id = v["id"].as_str().unwrap().to_string();

    // Duplicate names conflict; bad names are validation errors.
    let (s, v) = t
        .call(
            "POST",
            "/api/v1/tenants",
            Some(&admin),
            Some(json!({"name": "acme"})),
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::CONFLICT, Some("conflict"))
    );
    let (s, v) = t
        .call(
            "POST",
            "/api/v1/tenants",
            Some(&admin),
            Some(json!({"name": "no spaces"})),
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("validation_failed"))
    );
    let (s, _) = t
        .call(
            "POST",
            "/api/v1/tenants",
            Some(&admin),
            Some(json!({"name": "x", "bogus": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);

    // If-Match: a stale version is refused, the current one accepted.
    let (s, _, v) = t
        .call_full(
            "PATCH",
            &format!("/api/v1/tenants/{id}"),
            Some(&admin),
            Some(json!({"quota": {"max_vms": 5}})),
            &[("if-match", "\"7\"")],
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::PRECONDITION_FAILED, Some("precondition_failed"))
    );
    let (s, h, v) = t
        .call_full(
            "PATCH",
            &format!("/api/v1/tenants/{id}"),
            Some(&admin),
            Some(json!({"quota": {"max_vms": 5}})),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(h["etag"], "\"2\"");

    // Pagination walks every tenant exactly once.
    for k in 0..5 {
        let (s, _) = t
            .call(
                "POST",
                "/api/v1/tenants",
                Some(&admin),
                Some(json!({"name": format!("t{k}")})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/tenants?limit=2&cursor={c}"),
            None => "/api/v1/tenants?limit=2".to_string(),
        };
        let (s, v) = t.call("GET", &path, Some(&admin), None).await;
        assert_eq!(s, StatusCode::OK);
        for item in v["items"].as_array().unwrap() {
            seen.push(item["name"].as_str().unwrap().to_string());
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    seen.sort();
    assert_eq!(seen, ["acme", "system", "t0", "t1", "t2", "t3", "t4"]);
    let (s, _) = t
        .call("GET", "/api/v1/tenants?limit=0", Some(&admin), None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn tenant_users_see_only_their_tenant_and_cannot_manage_tenants() {
    let t = TestApi::new().await;
    let admin = t.login("admin", ADMIN_PASSWORD).await;
    let (_, a) = t
        .call(
            "POST",
            "/api/v1/tenants",
            Some(&admin),
            Some(json!({"name": "a"})),
        )
        .await;
    let (_, b) = t
        .call(
            "POST",
            "/api/v1/tenants",
            Some(&admin),
            Some(json!({"name": "b"})),
        )
        .await;
    let a_id = a["id"].as_str().unwrap();
    let b_id = b["id"].as_str().unwrap();
    let alice = t.user("alice", a_id, Role::TenantAdmin).await;

    let (s, v) = t.call("GET", "/api/v1/tenants", Some(&alice), None).await;
    assert_eq!(s, StatusCode::OK);
    let names: Vec<_> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].clone())
        .collect();
    assert_eq!(names, [json!("a")]);
    let (s, _) = t
        .call(
            "GET",
            &format!("/api/v1/tenants/{a_id}"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    // Another tenant's id answers 404, exactly like an id that does not exist.
    let (s, v) = t
        .call(
            "GET",
            &format!("/api/v1/tenants/{b_id}"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (s2, v2) = t
        .call("GET", "/api/v1/tenants/does-not-exist", Some(&alice), None)
        .await;
    assert_eq!(s2, StatusCode::NOT_FOUND);
    assert_eq!(v["title"], v2["title"]);

    for (method, path, body) in [
        (
            "POST",
            "/api/v1/tenants".to_string(),
            Some(json!({"name": "c"})),
        ),
        (
            "PATCH",
            format!("/api/v1/tenants/{a_id}"),
            Some(json!({"quota": {}})),
        ),
        ("DELETE", format!("/api/v1/tenants/{a_id}"), None),
    ] {
        let (s, v) = t.call(method, &path, Some(&alice), body).await;
        assert_eq!(
            (s, v["code"].as_str()),
            (StatusCode::FORBIDDEN, Some("forbidden")),
            "{method} {path}"
        );
    }
}

#[tokio::test]
async fn idempotency_key_creates_once() {
    let t = TestApi::new().await;
    let admin = t.login("admin", ADMIN_PASSWORD).await;
    let (s1, _, v1) = t
        .call_full(
            "POST",
            "/api/v1/tenants",
            Some(&admin),
            Some(json!({"name": "once"})),
            &[("idempotency-key", "k-1")],
        )
        .await;
    let (s2, _, v2) = t
        .call_full(
            "POST",
            "/api/v1/tenants",
            Some(&admin),
            Some(json!({"name": "once"})),
            &[("idempotency-key", "k-1")],
        )
        .await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::CREATED));
    assert_eq!(v1["id"], v2["id"]);
}

#[tokio::test]
async fn probes_and_metrics_are_open() {
    let t = TestApi::new().await;
    assert_eq!(
        t.call("GET", "/healthz", None, None).await.0,
        StatusCode::OK
    );
    assert_eq!(t.call("GET", "/readyz", None, None).await.0, StatusCode::OK);
    let _ = t.call("GET", "/healthz", None, None).await;
    let (s, v) = t.call("GET", "/metrics", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(v.as_str().unwrap().contains("novacron_http_requests_total"));
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    let t = TestApi::new().await;
    let admin = t.login("admin", ADMIN_PASSWORD).await;
    let big = "x".repeat(2 * 1024 * 1024);
    let (s, _) = t
        .call(
            "POST",
            "/api/v1/tenants",
            Some(&admin),
            Some(json!({"name": big})),
        )
        .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
}

/// One Idempotency-Key reused by the same user for two different calls: each call gets its own
/// outcome (schemathesis found the second answering 500 with the first call's object).
#[tokio::test]
async fn one_idempotency_key_on_two_different_calls() {
    let t = TestApi::new().await;
    let admin = t.login("admin", ADMIN_PASSWORD).await;
    let (s, _, tenant) = t
        .call_full(
            "POST",
            "/api/v1/tenants",
            Some(&admin),
            Some(json!({"name": "reused"})),
            &[("idempotency-key", "same")],
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{tenant}");
    let (s, _, key) = t
        .call_full(
            "POST",
            "/api/v1/api-keys",
            Some(&admin),
            Some(json!({"name": "reused"})),
            &[("idempotency-key", "same")],
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{key}");
    assert!(key["key"].as_str().is_some(), "{key}");
    // The same call again still replays its own first outcome.
    let (s, _, again) = t
        .call_full(
            "POST",
            "/api/v1/tenants",
            Some(&admin),
            Some(json!({"name": "reused"})),
            &[("idempotency-key", "same")],
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{again}");
    assert_eq!(again["id"], tenant["id"]);
}
