//! An in-process mock of the few API calls the dashboard makes, shared by the `preview` example
//! and the browser test. Log in as `admin` / `admin`. It keeps VMs, tenants and users in memory,
//! completes each operation on its second poll, refuses a second VM in tenant `small` with
//! `quota_exceeded`, migrates a VM to the named (or next) node, explains placements and serves
//! a short made-up series of VM statistics, and does not offer `/api/v1/events`, `/nodes` or `/audit`, so the pages take
//! their polling and "not available" paths. `PREVIEW_NODE_DOWN=1` reports node-3 down. Only the
//! shapes the pages read are produced; it is not a model of the real API.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde_json::{json, Value};

#[derive(Default)]
struct Mock {
    vms: Vec<Value>,
    tenants: Vec<Value>,
    users: Vec<Value>,
    /// Operation id -> (operation, number of polls seen, VM id, state the VM reaches).
    ops: HashMap<String, (Value, u32, String, &'static str)>,
    seq: u64,
}

type Shared = Arc<Mutex<Mock>>;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn problem(status: StatusCode, code: &str, detail: &str) -> Response {
    let mut r = (
        status,
        Json(json!({"title": code, "status": status.as_u16(), "code": code, "detail": detail})),
    )
        .into_response();
    r.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/problem+json"),
    );
    r
}

fn authorized(headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer "))
}

fn next_id(m: &mut Mock, prefix: &str) -> String {
    m.seq += 1;
    format!("{prefix}-{:06}", m.seq)
}

async fn login(Json(body): Json<Value>) -> Response {
    if body["username"] != "admin" || body["password"] != "admin" {
        return problem(
            StatusCode::UNAUTHORIZED,
            "bad_credentials",
            "wrong user name or password",
        );
    }
    let exp = now_ms() / 1000 + 3600;
    let claims = json!({"sub": "u-admin", "name": "admin", "tenant": "t-system", "exp": exp});
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let token = format!(
        "{}.{}.preview",
        b64.encode(br#"{"alg":"none"}"#),
        b64.encode(claims.to_string())
    );
    Json(json!({"token": token, "expires_at": exp})).into_response()
}

async fn cluster(headers: HeaderMap) -> Response {
    if !authorized(&headers) {
        return problem(StatusCode::UNAUTHORIZED, "unauthenticated", "log in first");
    }
    let down = std::env::var("PREVIEW_NODE_DOWN").is_ok_and(|v| v == "1");
    let member = |id: u64, name: &str, state: &str, applied: u64| {
        json!({"id": id, "name": name, "role": "voter", "api_addr": format!("127.0.0.1:80{id}0"),
               "state": state, "matched_index": applied, "last_applied": applied})
    };
    Json(json!({
        "cluster_id": "c-7f3a9e", "leader": 1, "leader_name": "node-1", "term": 4,
        "commit_index": 1289, "last_applied": 1289,
        "members": [member(1, "node-1", "up", 1289), member(2, "node-2", "up", 1288),
                    member(3, "node-3", if down { "down" } else { "up" }, if down { 1102 } else { 1289 })]
    }))
    .into_response()
}

async fn list_vms(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if !authorized(&headers) {
        return problem(StatusCode::UNAUTHORIZED, "unauthenticated", "log in first");
    }
    let m = s.lock().expect("mock state lock is never poisoned");
    let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(100);
    let start: usize = q.get("cursor").and_then(|c| c.parse().ok()).unwrap_or(0);
    let filtered: Vec<&Value> = m
        .vms
        .iter()
        .filter(|v| q.get("state").is_none_or(|st| v["state"] == st.as_str()))
        .filter(|v| {
            q.get("q").is_none_or(|part| {
                v["name"]
                    .as_str()
                    .is_some_and(|n| n.to_lowercase().contains(&part.to_lowercase()))
            })
        })
        .filter(|v| q.get("tenant").is_none_or(|t| v["tenant"] == t.as_str()))
        .filter(|v| {
            q.get("node").is_none_or(|n| {
                v["node"]
                    .as_u64()
                    .is_some_and(|id| format!("node-{id}") == *n)
            })
        })
        .filter(|v| {
            q.get("label").is_none_or(|l| {
                l.split_once('=')
                    .is_some_and(|(k, val)| v["labels"][k] == val)
            })
        })
        .collect();
    let items: Vec<&Value> = filtered.iter().skip(start).take(limit).copied().collect();
    let next = (start + limit < filtered.len()).then(|| (start + limit).to_string());
    Json(json!({"items": items, "next_cursor": next})).into_response()
}

fn new_op(m: &mut Mock, kind: &str, vm: &str, reaches: &'static str) -> Value {
    let id = next_id(m, "op");
    let op = json!({"id": id, "kind": kind, "state": "pending", "target": vm});
    m.ops.insert(id, (op.clone(), 0, vm.to_string(), reaches));
    op
}

async fn create_vm(State(s): State<Shared>, Json(body): Json<Value>) -> Response {
    let mut m = s.lock().expect("mock state lock is never poisoned");
    let tenant = body["tenant"].as_str().unwrap_or("t-system").to_string();
    let count = m
        .vms
        .iter()
        .filter(|v| v["tenant"] == tenant.as_str())
        .count();
    if tenant == "t-small" && count >= 1 {
        return problem(
            StatusCode::CONFLICT,
            "quota_exceeded",
            "tenant small allows at most 1 VM",
        );
    }
    let id = next_id(&mut m, "vm");
    let node = 1 + m.seq % 3;
    let vm = json!({
        "id": id, "name": body["name"], "tenant": tenant, "vcpus": body["vcpus"],
        "memory_mib": body["memory_mib"], "disk_gib": body["disk_gib"].as_u64().unwrap_or(0),
        "image": body["image"], "labels": body["labels"].clone(), "node": node,
        "desired_state": if body["start"] == false { "stopped" } else { "running" },
        "state": "pending", "ha": body["ha"], "epoch": 1, "created_at": now_ms(), "updated_at": now_ms(),
    });
    m.vms.push(vm.clone());
    let reaches = if body["start"] == false {
        "stopped"
    } else {
        "running"
    };
    let op = new_op(&mut m, "vm.create", &id, reaches);
    (
        StatusCode::ACCEPTED,
        Json(json!({"vm": vm, "operation": op})),
    )
        .into_response()
}

async fn get_vm(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let m = s.lock().expect("mock state lock is never poisoned");
    match m.vms.iter().find(|v| v["id"] == id.as_str()) {
        Some(v) => Json(v.clone()).into_response(),
        None => problem(StatusCode::NOT_FOUND, "not_found", "no such VM"),
    }
}

async fn vm_action(State(s): State<Shared>, Path((id, verb)): Path<(String, String)>) -> Response {
    let mut m = s.lock().expect("mock state lock is never poisoned");
    let (desired, transient, reaches) = match verb.as_str() {
        "start" => ("running", "starting", "running"),
        "stop" => ("stopped", "stopping", "stopped"),
        "reboot" => ("running", "starting", "running"),
        _ => return problem(StatusCode::NOT_FOUND, "not_found", "no such action"),
    };
    let Some(vm) = m.vms.iter_mut().find(|v| v["id"] == id.as_str()) else {
        return problem(StatusCode::NOT_FOUND, "not_found", "no such VM");
    };
    vm["desired_state"] = json!(desired);
    vm["state"] = json!(transient);
    let op = new_op(&mut m, &format!("vm.{verb}"), &id, reaches);
    (StatusCode::ACCEPTED, Json(json!({"operation": op}))).into_response()
}

/// Moves the VM to the named node (`node-N`) or, without one, to the next node; the operation
/// ends like the others, on its second poll.
async fn migrate_vm(
    State(s): State<Shared>,
    Path(id): Path<String>,
    body: Option<Json<Value>>,
) -> Response {
    let mut m = s.lock().expect("mock state lock is never poisoned");
    let Some(vm) = m.vms.iter_mut().find(|v| v["id"] == id.as_str()) else {
        return problem(StatusCode::NOT_FOUND, "not_found", "no such VM");
    };
    let from = vm["node"].as_u64().unwrap_or(1);
    let named = body
        .as_ref()
        .and_then(|b| b["target_node"].as_str())
        .and_then(|n| n.strip_prefix("node-"))
        .and_then(|n| n.parse::<u64>().ok());
    let to = named.unwrap_or(from % 3 + 1);
    if to == from {
        return problem(
            StatusCode::CONFLICT,
            "conflict",
            "the VM already runs there",
        );
    }
    vm["node"] = json!(to);
    vm["state"] = json!("migrating");
    let op = new_op(&mut m, "vm.migrate", &id, "running");
    (StatusCode::ACCEPTED, Json(json!({"operation": op}))).into_response()
}

/// A made-up explanation: one row per node with a verdict and a reason.
async fn placement(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let m = s.lock().expect("mock state lock is never poisoned");
    let Some(vm) = m.vms.iter().find(|v| v["id"] == id.as_str()) else {
        return problem(StatusCode::NOT_FOUND, "not_found", "no such VM");
    };
    let on = vm["node"].as_u64().unwrap_or(0);
    let candidates: Vec<Value> = (1..=3u64)
        .map(|n| {
            json!({"node": format!("node-{n}"), "eligible": n != 3, "score": if n == on { 0.9 } else { 0.5 },
                   "reason": if n == 3 { "not enough free memory" } else { "fits; spread weight" }})
        })
        .collect();
    Json(json!({"vm": id, "chosen": format!("node-{on}"), "candidates": candidates}))
        .into_response()
}

/// Twelve samples, 5 s apart, ending now.
async fn metrics(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let m = s.lock().expect("mock state lock is never poisoned");
    let Some(vm) = m.vms.iter().find(|v| v["id"] == id.as_str()) else {
        return problem(StatusCode::NOT_FOUND, "not_found", "no such VM");
    };
    let now = now_ms();
    let samples: Vec<Value> = (0..12u64)
        .map(|i| {
            json!({"at_ms": now - (11 - i) * 5000, "vcpus": 1,
                   "memory_bytes": (200 + i * 3) << 20, "max_memory_bytes": 256u64 << 20,
                   "cpu_percent": if i == 0 { Value::Null } else { json!(10.0 + (i % 4) as f64 * 7.5) },
                   "net_rx_bytes_per_sec": if i == 0 { Value::Null } else { json!(1000 * i) },
                   "net_tx_bytes_per_sec": if i == 0 { Value::Null } else { json!(400 * i) }})
        })
        .collect();
    Json(json!({"vm_id": id, "node": vm["node"], "interval_ms": 5000, "samples": samples}))
        .into_response()
}

async fn delete_vm(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let mut m = s.lock().expect("mock state lock is never poisoned");
    let Some(vm) = m.vms.iter_mut().find(|v| v["id"] == id.as_str()) else {
        return problem(StatusCode::NOT_FOUND, "not_found", "no such VM");
    };
    vm["state"] = json!("deleting");
    let op = new_op(&mut m, "vm.delete", &id, "deleted");
    (StatusCode::ACCEPTED, Json(json!({"operation": op}))).into_response()
}

async fn get_op(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let mut m = s.lock().expect("mock state lock is never poisoned");
    let Some((op, polls, vm, reaches)) = m.ops.get_mut(&id) else {
        return problem(StatusCode::NOT_FOUND, "not_found", "no such operation");
    };
    *polls += 1;
    // Pending, then running, then done: enough to see progress in the page.
    let state = match *polls {
        1 => "running",
        _ => "succeeded",
    };
    op["state"] = json!(state);
    let (op, vm, reaches) = (op.clone(), vm.clone(), *reaches);
    if state == "succeeded" {
        if reaches == "deleted" {
            m.vms.retain(|v| v["id"] != vm.as_str());
        } else if let Some(v) = m.vms.iter_mut().find(|v| v["id"] == vm.as_str()) {
            v["state"] = json!(reaches);
        }
    }
    Json(op).into_response()
}

async fn list_tenants(State(s): State<Shared>) -> Response {
    let m = s.lock().expect("mock state lock is never poisoned");
    Json(json!({"items": m.tenants, "next_cursor": null})).into_response()
}

/// This site and one linked edge site whose catalog is old (stale).
async fn list_sites() -> Response {
    Json(json!({"sites": [
        {"id": "aaaaaa", "name": "main", "local": true, "health": "ok", "addrs": ["10.0.0.1:7003"], "latency_ms": null, "last_sync_at": null, "age_ms": 0, "lag_entries": 0, "error": null, "linked_at": null},
        {"id": "eeeeee", "name": "edge-1", "local": false, "health": "stale", "addrs": ["10.9.0.1:7003"], "latency_ms": 41, "last_sync_at": now_ms() - 90_000, "age_ms": 90_000, "lag_entries": 3, "error": "connection refused", "linked_at": now_ms() - 3_600_000}
    ]}))
    .into_response()
}

async fn list_users(State(s): State<Shared>) -> Response {
    let m = s.lock().expect("mock state lock is never poisoned");
    Json(json!({"items": m.users, "next_cursor": null})).into_response()
}

async fn get_user(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let m = s.lock().expect("mock state lock is never poisoned");
    match m.users.iter().find(|u| u["id"] == id.as_str()) {
        Some(u) => Json(u.clone()).into_response(),
        None => problem(StatusCode::NOT_FOUND, "not_found", "no such user"),
    }
}

fn seed() -> Mock {
    let mut m = Mock {
        tenants: vec![
            json!({"id": "t-system", "name": "system", "quota": {}, "usage": {"vms": 4, "vcpus": 6, "memory_mib": 1536, "disk_gib": 40}}),
            json!({"id": "t-acme", "name": "acme", "quota": {"max_vms": 10, "max_vcpus": 20, "max_memory_mib": 16384, "max_disk_gib": 200}, "usage": {"vms": 2, "vcpus": 3, "memory_mib": 768, "disk_gib": 20}}),
            json!({"id": "t-small", "name": "small", "quota": {"max_vms": 1}, "usage": {"vms": 0, "vcpus": 0, "memory_mib": 0, "disk_gib": 0}}),
        ],
        users: vec![
            json!({"id": "u-admin", "username": "admin", "tenant": "t-system", "role": "admin", "created_at": now_ms()}),
            json!({"id": "u-alice", "username": "alice", "tenant": "t-acme", "role": "tenant-admin", "created_at": now_ms()}),
            json!({"id": "u-bob", "username": "bob", "tenant": "t-acme", "role": "viewer", "created_at": now_ms()}),
        ],
        ..Mock::default()
    };
    let samples = [
        ("web-1", "running", "t-acme", 2, 512),
        ("web-2", "running", "t-acme", 1, 256),
        ("db-primary", "running", "t-system", 2, 1024),
        ("ci-runner", "stopped", "t-system", 1, 256),
        ("cache", "migrating", "t-system", 2, 128),
        ("batch-7", "failed", "t-system", 1, 128),
    ];
    for (name, state, tenant, vcpus, mem) in samples {
        let id = next_id(&mut m, "vm");
        let node = 1 + m.seq % 3;
        m.vms.push(json!({
            "id": id, "name": name, "tenant": tenant, "vcpus": vcpus, "memory_mib": mem, "disk_gib": 10,
            "image": "debian-12", "labels": {"env": if tenant == "t-acme" { "prod" } else { "infra" }},
            "node": node, "desired_state": if state == "stopped" { "stopped" } else { "running" },
            "state": state, "ha": true, "epoch": 3, "created_at": now_ms(), "updated_at": now_ms(),
        }));
    }
    m
}

/// The mock API plus the dashboard, as the node would merge them.
pub fn app() -> Router {
    let state: Shared = Arc::new(Mutex::new(seed()));
    let api = Router::new()
        .route("/auth/login", post(login))
        .route("/cluster", get(cluster))
        .route("/vms", get(list_vms).post(create_vm))
        .route("/vms/{id}", get(get_vm).delete(delete_vm))
        .route("/vms/{id}/migrate", post(migrate_vm))
        .route("/vms/{id}/placement", get(placement))
        .route("/vms/{id}/metrics", get(metrics))
        .route("/vms/{id}/{verb}", post(vm_action))
        .route("/operations/{id}", get(get_op))
        .route("/tenants", get(list_tenants))
        .route("/sites", get(list_sites))
        .route("/users", get(list_users))
        .route("/users/{id}", get(get_user))
        .with_state(state);
    Router::new().nest("/api/v1", api).merge(web::router())
}
