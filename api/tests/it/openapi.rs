//! The OpenAPI document: the committed file is current, it is served unauthenticated, every
//! operation documents its errors and security, and the mirror schemas of `raft::model` types
//! have exactly the fields those types serialize.

use std::collections::BTreeSet;

use axum::http::StatusCode;
use raft::model::{
    AuditEntry, DesiredState, Member, NodeRecord, NodeState, Operation, OperationState, Quota,
    Tenant, Usage, Vm, VmState,
};
use serde_json::Value;

use crate::fake::TestApi;

fn generated() -> Value {
    serde_json::from_str(&api::openapi::document_json().unwrap()).unwrap()
}

#[test]
fn committed_document_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
    let now = api::openapi::document_json().unwrap();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(path, &now).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == now,
        "api/openapi.json is out of date: run `UPDATE_OPENAPI=1 cargo test -p api openapi`"
    );
}

#[tokio::test]
async fn served_without_credentials() {
    let t = TestApi::new().await;
    let (s, v) = t.call("GET", "/openapi.json", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v, generated());
    assert!(v["openapi"].as_str().unwrap().starts_with("3.1"));
}

#[test]
fn every_operation_documents_errors_and_security() {
    let doc = generated();
    let public = [
        ("post", "/api/v1/auth/login"),
        ("post", "/api/v1/cluster/join"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
    ];
    let mut count = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            count += 1;
            let responses = op["responses"].as_object().unwrap();
            assert!(
                responses.keys().any(|s| s.starts_with('2')),
                "{method} {path} has no success response"
            );
            // The probes answer plain text, 503 included.
            let statuses: &[&str] = if path.starts_with("/api/v1/") {
                &["400", "403", "404", "429", "500", "503"]
            } else {
                &["400", "500"]
            };
            for status in statuses {
                assert!(
                    responses[*status]["content"]["application/problem+json"]["schema"]["$ref"]
                        == "#/components/schemas/Problem",
                    "{method} {path} lacks a problem response for {status}"
                );
            }
            let secured = op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("bearer").is_some()));
            let is_public = public.contains(&(method.as_str(), path.as_str()));
            assert_eq!(secured, !is_public, "{method} {path}: bearer security");
            assert_eq!(
                responses.contains_key("401"),
                secured,
                "{method} {path}: 401"
            );
        }
    }
    // The router of api/src/routes/mod.rs: 58 operations.
    assert_eq!(count, 58);
}

/// Property names of a component schema.
fn properties(doc: &Value, name: &str) -> BTreeSet<String> {
    doc["components"]["schemas"][name]["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("no schema {name}"))
        .keys()
        .cloned()
        .collect()
}

fn assert_mirrors(doc: &Value, name: &str, value: impl serde::Serialize) {
    let v = serde_json::to_value(value).unwrap();
    let keys: BTreeSet<String> = v.as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        properties(doc, name),
        keys,
        "schema {name} vs the model type"
    );
    for r in doc["components"]["schemas"][name]["required"]
        .as_array()
        .into_iter()
        .flatten()
    {
        assert!(keys.contains(r.as_str().unwrap()), "{name}.{r} is required");
    }
}

#[test]
fn mirror_schemas_match_the_model() {
    let doc = generated();
    let member = Member {
        name: "n1".into(),
        api_addr: "127.0.0.1:1".into(),
        peer_addr: "127.0.0.1:2".into(),
    };
    assert_mirrors(&doc, "Member", &member);
    assert_mirrors(&doc, "Quota", Quota::default());
    assert_mirrors(&doc, "Usage", Usage::default());
    assert_mirrors(
        &doc,
        "Tenant",
        Tenant {
            id: "t".into(),
            name: "t".into(),
            quota: Quota::default(),
            usage: Usage::default(),
            created_at: 0,
            updated_at: 0,
            version: 0,
        },
    );
    assert_mirrors(
        &doc,
        "Vm",
        Vm {
            id: "v".into(),
            name: "v".into(),
            tenant: "t".into(),
            vcpus: 1,
            memory_mib: 64,
            disk_gib: 0,
            image: None,
            labels: Default::default(),
            node: None,
            desired_state: DesiredState::Running,
            state: VmState::Pending,
            ha: false,
            anti_affinity_group: None,
            epoch: 0,
            created_at: 0,
            updated_at: 0,
            version: 0,
            placement: Default::default(),
        },
    );
    assert_mirrors(
        &doc,
        "Operation",
        Operation {
            id: "o".into(),
            kind: "vm.create".into(),
            tenant: "t".into(),
            target: "vm/v".into(),
            state: OperationState::Pending,
            error: None,
            created_at: 0,
            updated_at: 0,
        },
    );
    assert_mirrors(
        &doc,
        "AuditEntry",
        AuditEntry {
            seq: 1,
            at: 0,
            actor: "a".into(),
            tenant: "t".into(),
            action: "vm.create".into(),
            target: "vm/v".into(),
            result: "ok".into(),
            prev_hash: String::new(),
            hash: String::new(),
        },
    );
    let node = NodeRecord {
        id: 1,
        member,
        state: NodeState::Up,
        schedulable: true,
        labels: Default::default(),
        joined_at: 0,
        updated_at: 0,
        removed: false,
        capacity: None,
    };
    assert_mirrors(&doc, "NodeRecord", &node);
    let mut view = serde_json::to_value(&node).unwrap();
    for k in ["vms", "vcpus_used", "memory_mib_used"] {
        view[k] = 0.into();
    }
    assert_mirrors(&doc, "NodeView", view);
    // Enumerations: every variant's serialized name is listed.
    let enums: [(&str, Vec<Value>); 4] = [
        (
            "VmState",
            [
                VmState::Pending,
                VmState::Scheduled,
                VmState::Starting,
                VmState::Running,
                VmState::Stopping,
                VmState::Stopped,
                VmState::Migrating,
                VmState::Failed,
                VmState::Deleting,
                VmState::Unknown,
            ]
            .iter()
            .map(|s| serde_json::to_value(s).unwrap())
            .collect(),
        ),
        (
            "OperationState",
            [
                OperationState::Pending,
                OperationState::Running,
                OperationState::Succeeded,
                OperationState::Failed,
            ]
            .iter()
            .map(|s| serde_json::to_value(s).unwrap())
            .collect(),
        ),
        (
            "NodeState",
            [NodeState::Up, NodeState::Suspect, NodeState::Down]
                .iter()
                .map(|s| serde_json::to_value(s).unwrap())
                .collect(),
        ),
        (
            "Role",
            [
                raft::model::Role::Admin,
                raft::model::Role::TenantAdmin,
                raft::model::Role::Operator,
                raft::model::Role::Viewer,
            ]
            .iter()
            .map(|s| serde_json::to_value(s).unwrap())
            .collect(),
        ),
    ];
    for (name, values) in enums {
        let listed = doc["components"]["schemas"][name]["enum"]
            .as_array()
            .unwrap();
        assert_eq!(listed, &values, "enum {name}");
    }
}
