//! Users: who may create, see, change and delete whom.

use axum::http::StatusCode;
use raft::model::Role;
use serde_json::json;

use crate::fake::{TestApi, ADMIN_PASSWORD};

async fn tenant(t: &TestApi, admin: &str, name: &str) -> String {
    let (s, v) = t
        .call(
            "POST",
            "/api/v1/tenants",
            Some(admin),
            Some(json!({"name": name})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn users_are_created_hashed_and_can_log_in() {
    let t = TestApi::new().await;
    let admin = t.login("admin", ADMIN_PASSWORD).await;
    let a = tenant(&t, &admin, "a").await;
    let (s, v) = t
        .call("POST", "/api/v1/users", Some(&admin), Some(json!({"username": "bob", "password": "password-1", "tenant": a, "role": "operator"})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert!(v.get("password_hash").is_none(), "hash leaked: {v}");
    assert_eq!(v["role"], "operator");
    t.login("bob", "password-1").await;
    // Short passwords, unknown roles and unknown tenants are refused clearly.
    let (s, _) = t
        .call(
            "POST",
            "/api/v1/users",
            Some(&admin),
            Some(json!({"username": "c", "password": "short", "tenant": a, "role": "viewer"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = t
        .call(
            "POST",
            "/api/v1/users",
            Some(&admin),
            Some(json!({"username": "c", "password": "password-1", "tenant": a, "role": "king"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, v) = t
        .call("POST", "/api/v1/users", Some(&admin), Some(json!({"username": "c", "password": "password-1", "tenant": "nope", "role": "viewer"})))
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
}

#[tokio::test]
async fn tenant_admins_manage_only_their_tenant() {
    let t = TestApi::new().await;
    let admin = t.login("admin", ADMIN_PASSWORD).await;
    let a = tenant(&t, &admin, "a").await;
    let b = tenant(&t, &admin, "b").await;
    let ta = t.user("ta", &a, Role::TenantAdmin).await;
    let viewer = t.user("vb", &b, Role::Viewer).await;

    let (s, _) = t
        .call(
            "POST",
            "/api/v1/users",
            Some(&ta),
            Some(
                json!({"username": "a2", "password": "password-1", "tenant": a, "role": "viewer"}),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    // Not in another tenant (404: the tenant's existence does not leak), and never an admin.
    let (s, _) = t
        .call(
            "POST",
            "/api/v1/users",
            Some(&ta),
            Some(
                json!({"username": "b2", "password": "password-1", "tenant": b, "role": "viewer"}),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = t
        .call(
            "POST",
            "/api/v1/users",
            Some(&ta),
            Some(
                json!({"username": "boss", "password": "password-1", "tenant": a, "role": "admin"}),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // Lists are scoped to the caller's tenant.
    let (s, v) = t.call("GET", "/api/v1/users", Some(&ta), None).await;
    assert_eq!(s, StatusCode::OK);
    let names: Vec<_> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.iter().all(|n| n == "ta" || n == "a2"));
    // Another tenant's user is invisible.
    let (s, _) = t.call("GET", "/api/v1/users/vb-id", Some(&ta), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = t
        .call("DELETE", "/api/v1/users/vb-id", Some(&ta), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // A viewer cannot list users but can read itself and change its own password.
    assert_eq!(
        t.call("GET", "/api/v1/users", Some(&viewer), None).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        t.call("GET", "/api/v1/users/vb-id", Some(&viewer), None)
            .await
            .0,
        StatusCode::OK
    );
    let (s, _) = t
        .call(
            "PATCH",
            "/api/v1/users/vb-id",
            Some(&viewer),
            Some(json!({"password": "new-password"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    t.login("vb", "new-password").await;
    let (s, _) = t
        .call(
            "PATCH",
            "/api/v1/users/vb-id",
            Some(&viewer),
            Some(json!({"role": "operator"})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_deleted_users_token_stops_working() {
    let t = TestApi::new().await;
    let admin = t.login("admin", ADMIN_PASSWORD).await;
    let a = tenant(&t, &admin, "a").await;
    let tok = t.user("gone", &a, Role::Operator).await;
    assert_eq!(
        t.call("GET", "/api/v1/tenants", Some(&tok), None).await.0,
        StatusCode::OK
    );
    assert_eq!(
        t.call("DELETE", "/api/v1/users/gone-id", Some(&admin), None)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    let (s, v) = t.call("GET", "/api/v1/tenants", Some(&tok), None).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("bad_token"))
    );
}
