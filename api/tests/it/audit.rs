//! The audit log: filters, pagination, tenant scope, and detection of a tampered chain.

use axum::http::StatusCode;
use raft::model::{AuditEntry, Role};
use serde_json::json;

use crate::fake::{TestApi, ADMIN_PASSWORD};

#[tokio::test]
async fn audit_lists_are_filtered_paginated_and_tenant_scoped() {
    let t = TestApi::new().await;
    let admin = t.login("admin", ADMIN_PASSWORD).await;
    let mut ids = Vec::new();
    for name in ["a", "b", "c"] {
        let (_, v) = t
            .call(
                "POST",
                "/api/v1/tenants",
                Some(&admin),
                Some(json!({"name": name})),
            )
            .await;
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let ta = t.user("ta", &ids[0], Role::TenantAdmin).await;
    let op = t.user("op", &ids[0], Role::Operator).await;

    let (s, v) = t
        .call(
            "GET",
            "/api/v1/audit?action=tenant.create&limit=2",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["items"].as_array().unwrap().len(), 2);
    let cursor = v["next_cursor"].as_u64().unwrap();
    let (_, v) = t
        .call(
            "GET",
            &format!("/api/v1/audit?action=tenant.create&cursor={cursor}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    assert!(v["next_cursor"].is_null());
    let (_, v) = t
        .call(
            "GET",
            "/api/v1/audit?action=auth.&actor=admin",
            Some(&admin),
            None,
        )
        .await;
    assert!(!v["items"].as_array().unwrap().is_empty());
    let (_, v) = t
        .call(
            "GET",
            &format!("/api/v1/audit?since={}", u64::MAX / 2),
            Some(&admin),
            None,
        )
        .await;
    assert!(v["items"].as_array().unwrap().is_empty());

    // A tenant-admin sees its own tenant's entries only, whatever it asks for.
    let (s, v) = t
        .call(
            "GET",
            &format!("/api/v1/audit?tenant={}", ids[1]),
            Some(&ta),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let items = v["items"].as_array().unwrap();
    assert!(!items.is_empty());
    assert!(items.iter().all(|e| e["tenant"] == ids[0].as_str()), "{v}");

    let (s, _) = t.call("GET", "/api/v1/audit", Some(&op), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = t.call("GET", "/api/v1/audit", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = t
        .call("GET", "/api/v1/audit?limit=0", Some(&admin), None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn verification_detects_a_modified_or_removed_entry() {
    let t = TestApi::new().await;
    let admin = t.login("admin", ADMIN_PASSWORD).await;
    for name in ["a", "b"] {
        t.call(
            "POST",
            "/api/v1/tenants",
            Some(&admin),
            Some(json!({"name": name})),
        )
        .await;
    }
    let (s, v) = t
        .call("GET", "/api/v1/audit/verify", Some(&admin), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["checked"].as_u64().unwrap() >= 3);

    let ta = t
        .user("ta", raft::model::SYSTEM_TENANT, Role::TenantAdmin)
        .await;
    let (s, _) = t.call("GET", "/api/v1/audit/verify", Some(&ta), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // Rewrite who did entry 2, keeping its stored hash: the chain no longer fits there.
    let key = raft::keys::audit(2);
    let stored = t.cp.get_raw(&key);
    let mut entry: AuditEntry = raft::codec::decode(&stored).unwrap();
    entry.actor = "someone-else".into();
    t.cp.put_raw(&key, raft::codec::encode(&entry).unwrap());
    let (_, v) = t
        .call("GET", "/api/v1/audit/verify", Some(&admin), None)
        .await;
    assert_eq!(
        (v["ok"].as_bool(), v["first_broken_seq"].as_u64()),
        (Some(false), Some(2)),
        "{v}"
    );

    // Restoring it and deleting entry 3 instead is caught too.
    t.cp.put_raw(&key, stored);
    t.cp.remove_raw(&raft::keys::audit(3));
    let (_, v) = t
        .call("GET", "/api/v1/audit/verify", Some(&admin), None)
        .await;
    assert_eq!(v["first_broken_seq"].as_u64(), Some(3), "{v}");
}
