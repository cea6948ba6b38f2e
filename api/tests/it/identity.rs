//! Identity: API keys, logout, JWT key rotation and the TOTP second factor.

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

fn now_secs() -> u64 {
    api::now_ms() / 1000
}

#[tokio::test]
async fn api_keys_are_scoped_shown_once_and_revoked_at_once() {
    let t = TestApi::new().await;
    let admin = t.login("admin", ADMIN_PASSWORD).await;
    let a = tenant(&t, &admin, "a").await;
    let b = tenant(&t, &admin, "b").await;
    let viewer = t.user("va", &a, Role::Viewer).await;
    let ta = t.user("ta", &a, Role::TenantAdmin).await;
    let other = t.user("tb", &b, Role::TenantAdmin).await;

    // Validation, auth failure, and a scope above the creator's role.
    let (s, _) = t
        .call(
            "POST",
            "/api/v1/api-keys",
            Some(&viewer),
            Some(json!({"name": ""})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = t
        .call(
            "POST",
            "/api/v1/api-keys",
            None,
            Some(json!({"name": "ci"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = t
        .call(
            "POST",
            "/api/v1/api-keys",
            Some(&viewer),
            Some(json!({"name": "ci", "role": "operator"})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = t
        .call(
            "POST",
            "/api/v1/api-keys",
            Some(&viewer),
            Some(json!({"name": "ci", "expires_at": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    let (s, v) = t
        .call(
            "POST",
            "/api/v1/api-keys",
            Some(&viewer),
            Some(json!({"name": "ci"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let key = v["key"].as_str().unwrap().to_string();
    let id = v["id"].as_str().unwrap().to_string();
    assert!(key.starts_with(&format!("nck_{id}_")));
    assert_eq!(
        (v["role"].as_str(), v["tenant"].as_str()),
        (Some("viewer"), Some(a.as_str()))
    );

    // The key authenticates as its owner; it cannot mint further keys.
    let (s, v) = t.call("GET", "/api/v1/users/va-id", Some(&key), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _) = t
        .call(
            "POST",
            "/api/v1/api-keys",
            Some(&key),
            Some(json!({"name": "x"})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // Lists never show secrets or hashes; other tenants see nothing, tenant-admins see theirs.
    let (s, v) = t.call("GET", "/api/v1/api-keys", Some(&ta), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    assert!(!v.to_string().contains("secret"), "{v}");
    let (_, v) = t.call("GET", "/api/v1/api-keys", Some(&other), None).await;
    assert!(v["items"].as_array().unwrap().is_empty(), "{v}");
    let (s, _) = t
        .call(
            "DELETE",
            &format!("/api/v1/api-keys/{id}"),
            Some(&other),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let (s, _) = t
        .call(
            "DELETE",
            &format!("/api/v1/api-keys/{id}"),
            Some(&viewer),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = t.call("GET", "/api/v1/users/va-id", Some(&key), None).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("bad_token"))
    );
    let (s, _) = t
        .call("GET", "/api/v1/users/va-id", Some("nck_nope_x"), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_demoted_owner_takes_its_keys_down_with_it() {
    let t = TestApi::new().await;
    let admin = t.login("admin", ADMIN_PASSWORD).await;
    let a = tenant(&t, &admin, "a").await;
    let ta = t.user("ta", &a, Role::TenantAdmin).await;
    let (_, v) = t
        .call(
            "POST",
            "/api/v1/api-keys",
            Some(&ta),
            Some(json!({"name": "ci"})),
        )
        .await;
    let key = v["key"].as_str().unwrap().to_string();
    let (s, _) = t.call("GET", "/api/v1/users", Some(&key), None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = t
        .call(
            "PATCH",
            "/api/v1/users/ta-id",
            Some(&admin),
            Some(json!({"role": "viewer"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = t.call("GET", "/api/v1/users", Some(&key), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn logout_revokes_the_token_and_rotation_keeps_old_tokens_valid() {
    let t = TestApi::new().await;
    let admin = t.login("admin", ADMIN_PASSWORD).await;
    let a = tenant(&t, &admin, "a").await;
    let viewer = t.user("va", &a, Role::Viewer).await;

    let (s, _) = t
        .call(
            "POST",
            "/api/v1/cluster/rotate-jwt-key",
            Some(&viewer),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = t
        .call("POST", "/api/v1/cluster/rotate-jwt-key", None, None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, v) = t
        .call("POST", "/api/v1/cluster/rotate-jwt-key", Some(&admin), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Issued under the old key, still accepted; a new login signs with the new key.
    let (s, _) = t
        .call("GET", "/api/v1/users/va-id", Some(&viewer), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let fresh = t.login("va", "pw").await;

    let (s, _) = t
        .call("POST", "/api/v1/auth/logout", Some(&viewer), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = t
        .call("GET", "/api/v1/users/va-id", Some(&viewer), None)
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("bad_token"))
    );
    // Only that token: the other session lives on.
    let (s, _) = t
        .call("GET", "/api/v1/users/va-id", Some(&fresh), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = t.call("POST", "/api/v1/auth/logout", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // An API key is revoked by deletion, not by logout.
    let (_, v) = t
        .call(
            "POST",
            "/api/v1/api-keys",
            Some(&fresh),
            Some(json!({"name": "ci"})),
        )
        .await;
    let key = v["key"].as_str().unwrap().to_string();
    let (s, _) = t
        .call("POST", "/api/v1/auth/logout", Some(&key), None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn totp_enrolment_then_login_with_a_real_code() {
    let t = TestApi::new().await;
    let admin = t.login("admin", ADMIN_PASSWORD).await;
    let a = tenant(&t, &admin, "a").await;
    let ann = t.user("ann", &a, Role::Operator).await;
    let bob = t.user("bob", &a, Role::Viewer).await;

    // Only the user itself enrols; another tenant member does not even see the user.
    let (s, _) = t
        .call("POST", "/api/v1/users/ann-id/totp", Some(&bob), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = t
        .call("POST", "/api/v1/users/ann-id/totp", Some(&admin), None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = t
        .call("POST", "/api/v1/users/ann-id/totp", None, None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    let (s, v) = t
        .call("POST", "/api/v1/users/ann-id/totp", Some(&ann), None)
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert!(v["otpauth_url"]
        .as_str()
        .unwrap()
        .starts_with("otpauth://totp/"));
    let secret = api::totp::secret_from_base32(v["secret"].as_str().unwrap()).unwrap();

    let confirm = |code: String| json!({ "code": code });
    let (s, _) = t
        .call(
            "POST",
            "/api/v1/users/ann-id/totp/confirm",
            Some(&ann),
            Some(confirm("12ab".into())),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // Confirming needs a right code; until then login needs no second factor.
    let wrong = api::totp::code_at(&secret, "ann", now_secs() + 3600).unwrap();
    let (s, _) = t
        .call(
            "POST",
            "/api/v1/users/ann-id/totp/confirm",
            Some(&ann),
            Some(confirm(wrong)),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    t.login("ann", "pw").await;
    let code = api::totp::code_at(&secret, "ann", now_secs()).unwrap();
    let (s, v) = t
        .call(
            "POST",
            "/api/v1/users/ann-id/totp/confirm",
            Some(&ann),
            Some(confirm(code.clone())),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");

    let login = |totp: Option<String>| json!({"username": "ann", "password": "pw", "totp": totp});
    let (s, v) = t
        .call("POST", "/api/v1/auth/login", None, Some(login(None)))
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("totp_required"))
    );
    // The code used to confirm cannot be replayed.
    let (s, _) = t
        .call("POST", "/api/v1/auth/login", None, Some(login(Some(code))))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // The next step's code is within the allowed skew and is accepted once.
    let next = api::totp::code_at(&secret, "ann", now_secs() + 30).unwrap();
    let (s, v) = t
        .call(
            "POST",
            "/api/v1/auth/login",
            None,
            Some(login(Some(next.clone()))),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _) = t
        .call("POST", "/api/v1/auth/login", None, Some(login(Some(next))))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // A confirmed enrolment cannot be replaced with a new secret.
    let (s, _) = t
        .call("POST", "/api/v1/users/ann-id/totp", Some(&ann), None)
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
}

#[tokio::test]
async fn an_admin_can_require_totp_and_the_user_must_enrol_first() {
    let t = TestApi::new().await;
    let admin = t.login("admin", ADMIN_PASSWORD).await;
    let a = tenant(&t, &admin, "a").await;
    let b = tenant(&t, &admin, "b").await;
    t.user("cat", &a, Role::Viewer).await;
    let ta = t.user("ta", &a, Role::TenantAdmin).await;
    let op = t.user("op", &a, Role::Operator).await;
    let tb = t.user("tb", &b, Role::TenantAdmin).await;
    let req = |r: bool| Some(json!({ "required": r }));

    let (s, _) = t
        .call(
            "PUT",
            "/api/v1/users/cat-id/totp/required",
            Some(&op),
            req(true),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = t
        .call(
            "PUT",
            "/api/v1/users/cat-id/totp/required",
            Some(&tb),
            req(true),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = t
        .call(
            "PUT",
            "/api/v1/users/cat-id/totp/required",
            Some(&ta),
            Some(json!({"required": "yes"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, _) = t
        .call(
            "PUT",
            "/api/v1/users/cat-id/totp/required",
            Some(&admin),
            req(true),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    let (s, v) = t
        .call(
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"username": "cat", "password": "pw"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["totp_enrollment_required"], true);
    let limited = v["token"].as_str().unwrap().to_string();
    // The token opens nothing but enrolment.
    let (s, v) = t
        .call("GET", "/api/v1/users/cat-id", Some(&limited), None)
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("totp_required"))
    );
    let (s, v) = t
        .call("POST", "/api/v1/users/cat-id/totp", Some(&limited), None)
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let secret = api::totp::secret_from_base32(v["secret"].as_str().unwrap()).unwrap();
    let code = api::totp::code_at(&secret, "cat", now_secs()).unwrap();
    let (s, _) = t
        .call(
            "POST",
            "/api/v1/users/cat-id/totp/confirm",
            Some(&limited),
            Some(json!({"code": code})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let next = api::totp::code_at(&secret, "cat", now_secs() + 30).unwrap();
    let (s, v) = t
        .call(
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"username": "cat", "password": "pw", "totp": next})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v.get("totp_enrollment_required").is_none(), "{v}");
}
