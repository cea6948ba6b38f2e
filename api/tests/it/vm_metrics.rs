//! `GET /api/v1/vms/{id}/metrics` through the router: tenant scoping, `since`, placement.

use api::control::VmSample;
use api::ControlPlane;
use axum::http::StatusCode;
use raft::model::{Member, Role};
use raft::{Command, Request};
use serde_json::json;

use crate::fake::{TestApi, ADMIN_PASSWORD};

async fn tenant(t: &TestApi, admin: &str, name: &str) -> String {
    let (s, v) = t
        .call(
            "POST",
            "/api/v1/tenants",
            Some(admin),
            Some(json!({ "name": name })),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v["id"].as_str().unwrap().to_string()
}

async fn create_vm(t: &TestApi, token: &str, name: &str) -> serde_json::Value {
    let (s, v) = t
        .call(
            "POST",
            "/api/v1/vms",
            Some(token),
            Some(json!({"name": name, "vcpus": 1, "memory_mib": 128})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    v["vm"].clone()
}

#[tokio::test]
async fn metrics_are_tenant_scoped_filtered_by_since_and_need_a_placed_vm() {
    let t = TestApi::new().await;
    let admin = t.login("admin", ADMIN_PASSWORD).await;
    let a = tenant(&t, &admin, "a").await;
    let b = tenant(&t, &admin, "b").await;
    let viewer_a = t.user("va", &a, Role::Operator).await;
    let viewer_b = t.user("vb", &b, Role::Operator).await;

    // No node exists yet: the VM stays unplaced, and has no statistics anywhere.
    let unplaced = create_vm(&t, &viewer_a, "early").await;
    let (s, v) = t
        .call(
            "GET",
            &format!("/api/v1/vms/{}/metrics", unplaced["id"].as_str().unwrap()),
            Some(&viewer_a),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");

    let member = Member {
        name: "n1".into(),
        api_addr: "127.0.0.1:1".into(),
        peer_addr: "127.0.0.1:2".into(),
    };
    t.cp.write(Request::new(1, "test", Command::RegisterNode { member }))
        .await
        .unwrap();
    let vm = create_vm(&t, &viewer_a, "web").await;
    let id = vm["id"].as_str().unwrap();
    // Placement is the leader's scheduler's job; here it is done by hand.
    t.place(id, 1).await;
    *t.cp.samples.lock().unwrap() = (1..=3)
        .map(|i| VmSample {
            at_ms: i * 1_000,
            vcpus: 1,
            cpu_time_ns: i * 1_000_000,
            ..VmSample::default()
        })
        .collect();

    let (s, v) = t
        .call(
            "GET",
            &format!("/api/v1/vms/{id}/metrics"),
            Some(&viewer_a),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["vm_id"], id);
    assert_eq!(v["samples"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(v["samples"][2]["cpu_time_ns"], 3_000_000);

    let (s, v) = t
        .call(
            "GET",
            &format!("/api/v1/vms/{id}/metrics?since=1000"),
            Some(&viewer_a),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let at: Vec<u64> = v["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["at_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(at, [2_000, 3_000]);

    // Another tenant cannot learn the VM exists; the admin sees every tenant.
    let (s, v) = t
        .call(
            "GET",
            &format!("/api/v1/vms/{id}/metrics"),
            Some(&viewer_b),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["code"], "not_found");
    let (s, _) = t
        .call(
            "GET",
            &format!("/api/v1/vms/{id}/metrics"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = t
        .call("GET", "/api/v1/vms/nope/metrics", Some(&viewer_a), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = t
        .call("GET", &format!("/api/v1/vms/{id}/metrics"), None, None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}
