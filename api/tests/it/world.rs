//! A prepared world for the route tables of `matrix` and `isolation`: tenants holding one object
//! of every kind (users, keys, a running VM, images), a caller of every role, the served route list (from the generated OpenAPI
//! document) and a request helper that sends raw bodies and does not wait on event streams.

use std::collections::BTreeSet;

use api::ControlPlane;
use axum::body::Body;
use axum::http::{HeaderMap, Request as HttpRequest, StatusCode};
use http_body_util::BodyExt;
use raft::model::{Member, Role};
use raft::{Command, Request, Response};
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::fake::{TestApi, ADMIN_PASSWORD};

/// Every route the router serves, as `(METHOD, path template)`: the paths and methods of the
/// OpenAPI document (which the same route list generates) plus the document itself.
pub fn served_routes() -> BTreeSet<(String, String)> {
    let doc: Value = serde_json::from_str(&api::openapi::document_json().unwrap()).unwrap();
    let mut routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            routes.insert((method.to_uppercase(), path.clone()));
        }
    }
    routes.insert(("GET".to_string(), "/openapi.json".to_string()));
    routes
}

/// The statuses the document lists for a route; `None` for routes it does not describe.
pub fn documented_statuses(method: &str, path: &str) -> Option<BTreeSet<u16>> {
    let doc: Value = serde_json::from_str(&api::openapi::document_json().unwrap()).unwrap();
    let responses = doc["paths"][path][method.to_lowercase()]["responses"].as_object()?;
    Some(responses.keys().filter_map(|k| k.parse().ok()).collect())
}

/// Whether the document lists a query parameter `name` for this route.
pub fn has_query_param(method: &str, path: &str, name: &str) -> bool {
    let doc: Value = serde_json::from_str(&api::openapi::document_json().unwrap()).unwrap();
    doc["paths"][path][method.to_lowercase()]["parameters"]
        .as_array()
        .is_some_and(|ps| ps.iter().any(|p| p["in"] == "query" && p["name"] == name))
}

/// What a request body is made of.
pub enum Payload {
    None,
    Json(Value),
    /// Bytes sent as they are, with this content type.
    Raw(&'static str, &'static str),
    /// One chunk of an image upload: `application/octet-stream` with its `Content-Range`.
    Chunk {
        range: String,
        bytes: Vec<u8>,
    },
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    /// The body as text (empty for event streams, which never end).
    pub text: String,
}

impl Reply {
    pub fn code(&self) -> Option<&str> {
        self.body["code"].as_str()
    }
    pub fn is_problem(&self) -> bool {
        self.headers
            .get("content-type")
            .is_some_and(|v| v == "application/problem+json")
    }
}

pub async fn send(
    t: &TestApi,
    method: &str,
    path: &str,
    token: Option<&str>,
    payload: &Payload,
) -> Reply {
    let mut req = HttpRequest::builder().method(method).uri(path);
    if let Some(tok) = token {
        req = req.header("authorization", format!("Bearer {tok}"));
    }
    let req = match payload {
        Payload::None => req.body(Body::empty()).unwrap(),
        Payload::Json(v) => req
            .header("content-type", "application/json")
            .body(Body::from(v.to_string()))
            .unwrap(),
        Payload::Raw(ct, bytes) => req
            .header("content-type", *ct)
            .body(Body::from(*bytes))
            .unwrap(),
        Payload::Chunk { range, bytes } => req
            .header("content-type", "application/octet-stream")
            .header("content-range", range.as_str())
            .body(Body::from(bytes.clone()))
            .unwrap(),
    };
    let resp = t.app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let streaming = headers
        .get("content-type")
        .is_some_and(|v| v.to_str().unwrap_or("").starts_with("text/event-stream"));
    if streaming {
        // An event stream stays open; its status and headers are the answer here.
        return Reply {
            status,
            headers,
            body: Value::Null,
            text: String::new(),
        };
    }
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        body,
        text,
    }
}

/// The TOTP secret every tenant's viewer has enrolled (not yet confirmed).
pub const VIEWER_TOTP_SECRET: &[u8] = b"0123456789abcdefghij";

/// One tenant with a user of each role and an object of every kind, all named after `prefix`
/// so that a search for the prefix finds any of its data in a response.
pub struct TenantWorld {
    pub prefix: String,
    pub id: String,
    pub tenant_admin: String,
    pub operator: String,
    pub viewer: String,
    /// An API key of the tenant-admin, scoped down to viewer.
    pub narrow_key: String,
    pub tenant_admin_id: String,
    pub operator_id: String,
    pub viewer_id: String,
    pub viewer_name: String,
    pub narrow_key_id: String,
    /// An API key of the operator (full operator scope).
    pub operator_key_id: String,
    pub vm_id: String,
    pub operation_id: String,
    /// An image whose bytes are all uploaded but which is not finished yet; no VM uses it.
    pub image_id: String,
    /// An image whose upload lacks its last [`LAST_CHUNK`] bytes.
    pub upload_id: String,
}

impl TenantWorld {
    /// The callers of the tenant, with a label for messages: every role and a narrow key.
    pub fn callers(&self) -> [(&'static str, &str); 4] {
        [
            ("tenant-admin", self.tenant_admin.as_str()),
            ("operator", self.operator.as_str()),
            ("viewer", self.viewer.as_str()),
            ("viewer-scoped API key", self.narrow_key.as_str()),
        ]
    }

    /// Every id this tenant's objects have.
    pub fn ids(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.tenant_admin_id.clone(),
            self.operator_id.clone(),
            self.viewer_id.clone(),
            self.narrow_key_id.clone(),
            self.operator_key_id.clone(),
            self.vm_id.clone(),
            self.operation_id.clone(),
            self.image_id.clone(),
            self.upload_id.clone(),
        ]
    }

    /// The id an `{id}` in `path` stands for, for this tenant's objects; `None` for objects
    /// that belong to no tenant (nodes).
    pub fn target(&self, path: &str) -> Option<String> {
        let kind = path
            .split("/{id}")
            .next()
            .and_then(|p| p.rsplit('/').next())
            .unwrap_or("");
        match kind {
            "tenants" => Some(self.id.clone()),
            "users" => Some(self.viewer_id.clone()),
            "vms" => Some(self.vm_id.clone()),
            "operations" => Some(self.operation_id.clone()),
            "api-keys" => Some(self.operator_key_id.clone()),
            // Chunks go to the unfinished upload; finishing, reading and deleting address the
            // complete one, so each of these routes can succeed.
            "images" if path.ends_with("/upload") => Some(self.upload_id.clone()),
            "images" => Some(self.image_id.clone()),
            "nodes" => None,
            other => panic!("no object of kind {other:?} for {path}: add one to the world"),
        }
    }
}

pub struct World {
    pub t: TestApi,
    pub admin: String,
    /// A node with the tenants' VMs and one with nothing placed on it.
    pub busy_node: u64,
    pub empty_node: u64,
}

impl World {
    pub async fn new() -> World {
        let t = TestApi::new().await;
        let admin = t.login("admin", ADMIN_PASSWORD).await;
        let mut ids = Vec::new();
        for name in ["n1", "n2"] {
            let member = Member {
                name: name.into(),
                api_addr: "127.0.0.1:1".into(),
                peer_addr: "127.0.0.1:2".into(),
            };
            let (_, r) =
                t.cp.write(Request::new(1, "test", Command::RegisterNode { member }))
                    .await
                    .unwrap();
            let Response::Node(n) = r else {
                panic!("{r:?}")
            };
            ids.push(n.id);
        }
        // Every VM of the fake reports this series, so metrics routes answer with data.
        *t.cp.samples.lock().unwrap() = (1..=3)
            .map(|i| api::control::VmSample {
                at_ms: i * 1_000,
                vcpus: 1,
                cpu_time_ns: i * 1_000_000,
                ..Default::default()
            })
            .collect();
        World {
            t,
            admin,
            busy_node: ids[0],
            empty_node: ids[1],
        }
    }

    /// Fills a new tenant with users of each role, API keys, a running VM and its operation,
    /// and two images (see [`TenantWorld::image_id`] and [`TenantWorld::upload_id`]).
    pub async fn tenant(&self, prefix: &str) -> TenantWorld {
        let t = &self.t;
        let name = format!("{prefix}-tenant");
        let (s, v) = t
            .call(
                "POST",
                "/api/v1/tenants",
                Some(&self.admin),
                Some(json!({"name": name})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        let user = |role: &str| format!("{prefix}-{role}");
        let tenant_admin = t.user(&user("ta"), &id, Role::TenantAdmin).await;
        let operator = t.user(&user("op"), &id, Role::Operator).await;
        let viewer = t.user(&user("viewer"), &id, Role::Viewer).await;
        let (s, v) = t
            .call(
                "POST",
                "/api/v1/api-keys",
                Some(&tenant_admin),
                Some(json!({"name": format!("{prefix}-narrow"), "role": "viewer"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let narrow_key = v["key"].as_str().unwrap().to_string();
        let narrow_key_id = v["id"].as_str().unwrap().to_string();
        let (s, v) = t
            .call(
                "POST",
                "/api/v1/api-keys",
                Some(&operator),
                Some(json!({"name": format!("{prefix}-opkey")})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let operator_key_id = v["id"].as_str().unwrap().to_string();

        let (s, v) = t
            .call(
                "POST",
                "/api/v1/vms",
                Some(&operator),
                Some(json!({
                    "name": format!("{prefix}-vm"), "vcpus": 1, "memory_mib": 128,
                    "labels": {"owner": format!("{prefix}-label")},
                    "placement": {"node": "n1"},
                })),
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        let vm_id = v["vm"]["id"].as_str().unwrap().to_string();
        let operation_id = v["operation"]["id"].as_str().unwrap().to_string();
        // The leader's scheduler places it on the node it asked for.
        let epoch = t.place(&vm_id, self.busy_node).await;
        // The node's agent reports the VM running, so its console can be opened.
        let (_, r) =
            t.cp.write(Request::new(
                1,
                "agent",
                Command::ReportVm {
                    id: vm_id.clone(),
                    node: self.busy_node,
                    epoch,
                    state: raft::model::VmState::Running,
                    error: None,
                },
            ))
            .await
            .unwrap();
        assert!(matches!(r, Response::Vm { .. }), "{r:?}");
        let viewer_id = format!("{}-id", user("viewer"));
        let (_, r) =
            t.cp.write(Request::new(
                1,
                viewer_id.clone(),
                Command::EnrollTotp {
                    user_id: viewer_id.clone(),
                    secret: VIEWER_TOTP_SECRET.to_vec(),
                },
            ))
            .await
            .unwrap();
        assert!(!matches!(r, Response::Rejected { .. }), "{r:?}");
        let image_id = self.image(prefix, "image", &operator, 0).await;
        let upload_id = self.image(prefix, "upload", &operator, LAST_CHUNK).await;
        TenantWorld {
            prefix: prefix.into(),
            id,
            tenant_admin,
            operator,
            viewer,
            narrow_key,
            tenant_admin_id: format!("{}-id", user("ta")),
            operator_id: format!("{}-id", user("op")),
            viewer_name: user("viewer"),
            viewer_id,
            narrow_key_id,
            operator_key_id,
            vm_id,
            operation_id,
            image_id,
            upload_id,
        }
    }

    /// Creates the image `{prefix}-{name}` as `operator` and uploads all of its bytes but the
    /// last `missing` through the API; returns its id.
    async fn image(&self, prefix: &str, name: &str, operator: &str, missing: usize) -> String {
        let bytes = image_bytes(prefix);
        let (s, v) = self
            .t
            .call(
                "POST",
                "/api/v1/images",
                Some(operator),
                Some(json!({
                    "name": format!("{prefix}-{name}"), "size_bytes": bytes.len(),
                    "sha256": image_sha256(prefix),
                })),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        let end = bytes.len() - missing;
        let chunk = Payload::Chunk {
            range: format!("bytes 0-{}/{}", end - 1, bytes.len()),
            bytes: bytes[..end].to_vec(),
        };
        let path = format!("/api/v1/images/{id}/upload");
        let r = send(&self.t, "PUT", &path, Some(operator), &chunk).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["offset"], json!(end), "{}", r.text);
        id
    }

    /// `path` with its `{id}` replaced by the object of `tenant` it names (nodes: the empty one).
    pub fn fill(&self, tenant: &TenantWorld, path: &str) -> String {
        if !path.contains("{id}") {
            return path.to_string();
        }
        let id = tenant
            .target(path)
            .unwrap_or_else(|| self.empty_node.to_string());
        path.replace("{id}", &id)
    }
}

/// How many bytes the upload of [`TenantWorld::upload_id`] lacks.
pub const LAST_CHUNK: usize = 4;

/// The content of a tenant's images; it carries the prefix, so a leak of it shows.
pub fn image_bytes(prefix: &str) -> Vec<u8> {
    format!("{prefix}-image-bytes").into_bytes()
}

/// The hex SHA-256 of [`image_bytes`].
pub fn image_sha256(prefix: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(image_bytes(prefix)))
}

/// The chunk that completes the upload of a tenant's [`TenantWorld::upload_id`].
pub fn last_chunk(tenant: &TenantWorld) -> Payload {
    let bytes = image_bytes(&tenant.prefix);
    let start = bytes.len() - LAST_CHUNK;
    Payload::Chunk {
        range: format!("bytes {start}-{}/{}", bytes.len() - 1, bytes.len()),
        bytes: bytes[start..].to_vec(),
    }
}

/// A current TOTP code for a tenant's viewer.
pub fn viewer_code(tenant: &TenantWorld) -> String {
    api::totp::code_at(
        VIEWER_TOTP_SECRET,
        &tenant.viewer_name,
        api::now_ms() / 1000,
    )
    .unwrap()
}

/// A well-formed federation token of a site that is not linked.
pub const LINK_TOKEN: &str = "nft1.zz9zz9.0000000000000000000000000000000000000000000000000000000000000000.00000000000000000000000000000000.0000000000000000000000000000000000000000000000000000000000000000";
