//! Rate limits answer 429 with Retry-After; CORS is off unless origins are configured.

use axum::http::StatusCode;
use serde_json::json;

use crate::fake::{TestApi, ADMIN_PASSWORD};

#[tokio::test]
async fn users_over_their_rate_get_429_with_retry_after() {
    let mut config = api::ApiConfig::default();
    config.rate_limits.per_user = api::limits::Rate {
        per_second: 0.01,
        burst: 3,
    };
    config.rate_limits.login_per_ip.per_second = 0.0;
    let t = TestApi::with_config(config).await;
    let admin = t.login("admin", ADMIN_PASSWORD).await;
    for _ in 0..3 {
        let (s, _) = t.call("GET", "/api/v1/tenants", Some(&admin), None).await;
        assert_eq!(s, StatusCode::OK);
    }
    let (s, h, v) = t
        .call_full("GET", "/api/v1/tenants", Some(&admin), None, &[])
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited"))
    );
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=100).contains(&retry), "{retry}");
}

#[tokio::test]
async fn tenants_share_a_budget() {
    let mut config = api::ApiConfig::default();
    config.rate_limits.per_user.per_second = 0.0;
    config.rate_limits.per_tenant = api::limits::Rate {
        per_second: 0.01,
        burst: 2,
    };
    config.rate_limits.login_per_ip.per_second = 0.0;
    let t = TestApi::with_config(config).await;
    let admin = t.login("admin", ADMIN_PASSWORD).await;
    let (s, _) = t.call("GET", "/api/v1/tenants", Some(&admin), None).await;
    assert_eq!(s, StatusCode::OK);
    // Another user of the same (system) tenant draws from the same budget.
    let other = t
        .user("ops", raft::model::SYSTEM_TENANT, raft::model::Role::Viewer)
        .await;
    let (s, _) = t
        .call("GET", "/api/v1/users/ops-id", Some(&other), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = t
        .call("GET", "/api/v1/users/ops-id", Some(&other), None)
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn logins_are_limited_per_address() {
    let mut config = api::ApiConfig::default();
    config.rate_limits.login_per_ip = api::limits::Rate {
        per_second: 0.01,
        burst: 2,
    };
    let t = TestApi::with_config(config).await;
    let body = || Some(json!({"username": "admin", "password": "wrong"}));
    for _ in 0..2 {
        let (s, _) = t.call("POST", "/api/v1/auth/login", None, body()).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    let (s, h, _) = t
        .call_full("POST", "/api/v1/auth/login", None, body(), &[])
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert!(h.contains_key("retry-after"));
}

#[tokio::test]
async fn cors_is_off_by_default_and_follows_the_allow_list() {
    let t = TestApi::new().await;
    let origin = [("origin", "https://ui.example")];
    let (_, h, _) = t.call_full("GET", "/healthz", None, None, &origin).await;
    assert!(!h.contains_key("access-control-allow-origin"));

    let config = api::ApiConfig {
        cors_allow_origins: vec!["https://ui.example".into()],
        ..Default::default()
    };
    let t = TestApi::with_config(config).await;
    let (_, h, _) = t.call_full("GET", "/healthz", None, None, &origin).await;
    assert_eq!(h["access-control-allow-origin"], "https://ui.example");
    let (_, h, _) = t
        .call_full(
            "GET",
            "/healthz",
            None,
            None,
            &[("origin", "https://evil.example")],
        )
        .await;
    assert!(!h.contains_key("access-control-allow-origin"));
}
