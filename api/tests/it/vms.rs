//! VMs through the router: validation, quotas, tenancy, operations.

use api::ControlPlane;
use axum::http::StatusCode;
use raft::model::Role;
use serde_json::json;

use crate::fake::{TestApi, ADMIN_PASSWORD};

async fn setup() -> (TestApi, String, String, String) {
    let t = TestApi::new().await;
    let admin = t.login("admin", ADMIN_PASSWORD).await;
    let (_, a) = t
        .call(
            "POST",
            "/api/v1/tenants",
            Some(&admin),
            Some(json!({"name": "a", "quota": {"max_vms": 2}})),
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
    let ops_a = t
        .user("opa", a["id"].as_str().unwrap(), Role::Operator)
        .await;
    let ops_b = t
        .user("opb", b["id"].as_str().unwrap(), Role::Operator)
        .await;
    (t, admin, ops_a, ops_b)
}

#[tokio::test]
async fn create_returns_an_operation_and_validates() {
    let (t, _, a, _) = setup().await;
    let (s, v) = t
        .call(
            "POST",
            "/api/v1/vms",
            Some(&a),
            Some(json!({"name": "web-1", "vcpus": 1, "memory_mib": 128, "labels": {"app": "web"}})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["vm"]["desired_state"], "running");
    assert_eq!(v["operation"]["kind"], "vm.create");
    let op = v["operation"]["id"].as_str().unwrap();
    let (s, o) = t
        .call("GET", &format!("/api/v1/operations/{op}"), Some(&a), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(o["state"], "pending");
    for bad in [
        json!({"name": "x", "vcpus": 0, "memory_mib": 128}),
        json!({"name": "x", "vcpus": 1, "memory_mib": 1}),
        json!({"name": "bad name", "vcpus": 1, "memory_mib": 128}),
    ] {
        let (s, v) = t
            .call("POST", "/api/v1/vms", Some(&a), Some(bad.clone()))
            .await;
        assert_eq!(
            (s, v["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("validation_failed")),
            "{bad}"
        );
    }
    let (s, _) = t
        .call(
            "POST",
            "/api/v1/vms",
            Some(&a),
            Some(json!({"name": "web-1", "vcpus": 1, "memory_mib": 128})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
}

#[tokio::test]
async fn quota_is_enforced_and_freed_by_delete() {
    let (t, _, a, _) = setup().await;
    let mut ids = Vec::new();
    for k in 0..2 {
        let (s, v) = t
            .call(
                "POST",
                "/api/v1/vms",
                Some(&a),
                Some(json!({"name": format!("v{k}"), "vcpus": 1, "memory_mib": 128})),
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED);
        ids.push(v["vm"]["id"].as_str().unwrap().to_string());
    }
    let (s, v) = t
        .call(
            "POST",
            "/api/v1/vms",
            Some(&a),
            Some(json!({"name": "v2", "vcpus": 1, "memory_mib": 128})),
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::CONFLICT, Some("quota_exceeded"))
    );
    let (s, _) = t
        .call("DELETE", &format!("/api/v1/vms/{}", ids[0]), Some(&a), None)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (s, _) = t
        .call(
            "POST",
            "/api/v1/vms",
            Some(&a),
            Some(json!({"name": "v2", "vcpus": 1, "memory_mib": 128})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn another_tenants_vm_is_invisible() {
    let (t, admin, a, b) = setup().await;
    let (_, v) = t
        .call(
            "POST",
            "/api/v1/vms",
            Some(&a),
            Some(json!({"name": "secret", "vcpus": 1, "memory_mib": 128})),
        )
        .await;
    let id = v["vm"]["id"].as_str().unwrap().to_string();
    let op = v["operation"]["id"].as_str().unwrap().to_string();
    for (method, path) in [
        ("GET", format!("/api/v1/vms/{id}")),
        ("DELETE", format!("/api/v1/vms/{id}")),
        ("POST", format!("/api/v1/vms/{id}/start")),
        ("POST", format!("/api/v1/vms/{id}/stop")),
        ("POST", format!("/api/v1/vms/{id}/reboot")),
        ("GET", format!("/api/v1/operations/{op}")),
    ] {
        let (s, _) = t.call(method, &path, Some(&b), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{method} {path}");
    }
    let (_, list) = t.call("GET", "/api/v1/vms", Some(&b), None).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
    // A user cannot create in another tenant by naming it.
    let (_, ta) = t
        .call("GET", "/api/v1/tenants?limit=10", Some(&admin), None)
        .await;
    let a_id = ta["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "a")
        .unwrap()["id"]
        .clone();
    let (s, _) = t
        .call(
            "POST",
            "/api/v1/vms",
            Some(&b),
            Some(json!({"name": "x", "vcpus": 1, "memory_mib": 128, "tenant": a_id})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Admins see both tenants' VMs; filters narrow the list.
    let (_, all) = t
        .call("GET", "/api/v1/vms?state=pending", Some(&admin), None)
        .await;
    assert_eq!(all["items"].as_array().unwrap().len(), 1);
    let (_, none) = t
        .call("GET", "/api/v1/vms?state=running", Some(&admin), None)
        .await;
    assert_eq!(none["items"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn viewers_cannot_change_vms() {
    let (t, admin, a, _) = setup().await;
    let (_, ta) = t
        .call("GET", "/api/v1/tenants?limit=10", Some(&admin), None)
        .await;
    let a_id = ta["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "a")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let viewer = t.user("va", &a_id, Role::Viewer).await;
    let (_, v) = t
        .call(
            "POST",
            "/api/v1/vms",
            Some(&a),
            Some(json!({"name": "v", "vcpus": 1, "memory_mib": 128})),
        )
        .await;
    let id = v["vm"]["id"].as_str().unwrap();
    assert_eq!(
        t.call("GET", &format!("/api/v1/vms/{id}"), Some(&viewer), None)
            .await
            .0,
        StatusCode::OK
    );
    let (s, _) = t
        .call(
            "POST",
            &format!("/api/v1/vms/{id}/stop"),
            Some(&viewer),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = t
        .call(
            "POST",
            "/api/v1/vms",
            Some(&viewer),
            Some(json!({"name": "w", "vcpus": 1, "memory_mib": 128})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn name_search_and_pages_walk_every_vm_once() {
    let (t, admin, _, _) = setup().await;
    for name in ["web-1", "Web-2", "db-1", "web-3", "cache"] {
        let (s, body) = t
            .call(
                "POST",
                "/api/v1/vms",
                Some(&admin),
                Some(json!({"name": name, "vcpus": 1, "memory_mib": 128, "start": false})),
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{body}");
    }
    let names = |page: &serde_json::Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect()
    };
    // Any case, any part of the name; the search pages like the other filters.
    let (s, page) = t
        .call("GET", "/api/v1/vms?q=WEB&limit=2", Some(&admin), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{page}");
    let mut found = names(&page);
    let cursor = page["next_cursor"]
        .as_str()
        .expect("a second page")
        .to_string();
    let (_, page) = t
        .call(
            "GET",
            &format!("/api/v1/vms?q=web&limit=2&cursor={cursor}"),
            Some(&admin),
            None,
        )
        .await;
    found.extend(names(&page));
    assert!(page["next_cursor"].is_null(), "{page}");
    found.sort();
    assert_eq!(found, ["Web-2", "web-1", "web-3"]);
    // Unfiltered pages of every size visit each VM exactly once and end with no cursor.
    for limit in 1..=6 {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("/api/v1/vms?limit={limit}&cursor={c}"),
                None => format!("/api/v1/vms?limit={limit}"),
            };
            let (_, page) = t.call("GET", &path, Some(&admin), None).await;
            let got = names(&page);
            assert!(got.len() <= limit);
            seen.extend(got);
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
        }
        seen.sort();
        assert_eq!(
            seen,
            ["Web-2", "cache", "db-1", "web-1", "web-3"],
            "limit {limit}"
        );
    }
}

#[tokio::test]
async fn placement_explanations_are_scoped_like_their_vm() {
    use raft::placement::{NodeVerdict, PlacementEntry, PlacementExplanation, Verdict};
    let (t, admin, a, b) = setup().await;
    let (_, r) =
        t.cp.write(raft::Request::new(
            1,
            "node:1",
            raft::Command::RegisterNode {
                member: raft::Member {
                    name: "n1".into(),
                    api_addr: "a".into(),
                    peer_addr: "p".into(),
                },
            },
        ))
        .await
        .unwrap();
    assert!(matches!(r, raft::Response::Node(_)), "{r:?}");
    // The node named in the request becomes a constraint; the handler places nothing.
    let (s, v) = t
        .call(
            "POST",
            "/api/v1/vms",
            Some(&a),
            Some(json!({"name": "web-1", "vcpus": 1, "memory_mib": 128, "placement": {"node": "n1", "affinity_group": "web"}})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["vm"]["node"], serde_json::Value::Null);
    assert_eq!(v["vm"]["placement"]["node"], 1);
    assert_eq!(v["vm"]["placement"]["affinity_group"], "web");
    let id = v["vm"]["id"].as_str().unwrap().to_string();
    let (s, _) = t
        .call(
            "POST",
            "/api/v1/vms",
            Some(&a),
            Some(json!({"name": "web-2", "vcpus": 1, "memory_mib": 128, "placement": {"node": "nope"}})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // Not decided yet: 404.
    let path = format!("/api/v1/vms/{id}/placement");
    let (s, _) = t.call("GET", &path, Some(&a), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let explanation = PlacementExplanation {
        vm: id.clone(),
        at: 7,
        chosen: Some(1),
        strategy: "spread".into(),
        nodes_considered: 1,
        eligible: 1,
        verdicts: vec![NodeVerdict {
            node: 1,
            verdict: Verdict::Scored { score: 900 },
        }],
        ..Default::default()
    };
    let (_, r) =
        t.cp.write(raft::Request::new(
            2,
            "node:1",
            raft::Command::PlaceBatch {
                placements: vec![PlacementEntry {
                    vm: id.clone(),
                    node: Some(1),
                    expected_version: 1,
                    explanation,
                }],
            },
        ))
        .await
        .unwrap();
    assert!(matches!(r, raft::Response::Placements(_)), "{r:?}");
    let (s, v) = t.call("GET", &path, Some(&a), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["chosen"], 1);
    assert_eq!(v["chosen_name"], "n1");
    assert_eq!(v["verdicts"][0]["verdict"], "scored");
    assert_eq!(v["verdicts"][0]["score"], 900);
    assert_eq!(
        t.call("GET", &path, Some(&admin), None).await.0,
        StatusCode::OK
    );
    // Another tenant: the VM and its explanation do not exist.
    assert_eq!(
        t.call("GET", &path, Some(&b), None).await.0,
        StatusCode::NOT_FOUND
    );

    // Simulation is for administrators, and this control plane has no scheduler.
    let body = json!({"kind": "drain", "node": "n1"});
    let (s, _) = t
        .call(
            "POST",
            "/api/v1/scheduler/simulate",
            Some(&a),
            Some(body.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, v) = t
        .call(
            "POST",
            "/api/v1/scheduler/simulate",
            Some(&admin),
            Some(body),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_IMPLEMENTED, "{v}");
    assert_eq!(v["code"], "unsupported");
}
