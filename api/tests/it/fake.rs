//! An in-memory `ControlPlane` for router tests: commands go through the real `apply` over
//! `MemState`, so refusals and versions behave as in a cluster; there is no Raft here.

use std::sync::{Arc, Mutex};

use api::control::{ClusterStatus, JoinRequest, JoinResponse};
use api::{ApiConfig, AppState, ClusterError, Consistency, ControlPlane};
use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request as HttpRequest, StatusCode};
use http_body_util::BodyExt;
use raft::apply::{apply, MemState, StateTx};
use raft::model::{ClusterSecrets, Role, User, SYSTEM_TENANT};
use raft::{Command, Request, Response};
use serde_json::Value;
use tower::ServiceExt;

pub struct FakeCluster {
    state: Mutex<MemState>,
    index: Mutex<u64>,
    applied: tokio::sync::broadcast::Sender<raft::store::Applied>,
    /// The statistics every VM "has" in this fake: the same series for each.
    pub samples: Mutex<Vec<api::control::VmSample>>,
    /// Upload bytes per image id, as the upload node's store would hold them.
    pub uploads: Mutex<std::collections::BTreeMap<String, Vec<u8>>>,
    /// Linked sites by id: a forwarded call runs through the peer's router, as the federation
    /// endpoint of a real node does; an absent peer is unreachable.
    pub peers: Mutex<std::collections::BTreeMap<String, axum::Router>>,
}

impl FakeCluster {
    /// Overwrites a stored value behind `apply`'s back, as an attacker with disk access would.
    pub fn put_raw(&self, key: &[u8], value: Vec<u8>) {
        self.state.lock().unwrap().put(key, value).unwrap();
    }
    pub fn get_raw(&self, key: &[u8]) -> Vec<u8> {
        self.state.lock().unwrap().get(key).unwrap().unwrap()
    }
    pub fn remove_raw(&self, key: &[u8]) {
        self.state.lock().unwrap().remove(key).unwrap();
    }
}

#[async_trait]
impl ControlPlane for FakeCluster {
    async fn forward_to_site(
        &self,
        site: &str,
        call: api::control::ForwardedCall,
    ) -> Result<api::control::ForwardedReply, ClusterError> {
        let Some(router) = self.peers.lock().unwrap().get(site).cloned() else {
            return Err(ClusterError::Unavailable(format!("site {site} is cut off")));
        };
        let mut req = HttpRequest::builder()
            .method(call.method.as_str())
            .uri(call.path_and_query.as_str())
            .header("content-type", "application/json");
        if let Some(k) = &call.idempotency_key {
            req = req.header("idempotency-key", k);
        }
        let mut req = req.body(Body::from(call.body)).unwrap();
        req.extensions_mut().insert(api::auth::ForwardedPrincipal {
            site: "caller".into(),
            user_id: call.user_id,
        });
        let (parts, body) = router.oneshot(req).await.unwrap().into_parts();
        let header = |n: &str| {
            parts
                .headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (content_type, etag) = (header("content-type"), header("etag"));
        let status = parts.status.as_u16();
        let body = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap()
            .to_vec();
        Ok(api::control::ForwardedReply {
            status,
            content_type,
            etag,
            body,
        })
    }

    async fn write(&self, req: Request) -> Result<(u64, Response), ClusterError> {
        let st = self.state.lock().unwrap();
        let mut idx = self.index.lock().unwrap();
        *idx += 1;
        let r = apply(&*st, &req, *idx).map_err(|e| ClusterError::Internal(e.to_string()))?;
        // Published in log order while the state lock is held, as the store does.
        let _ = self.applied.send(raft::store::Applied {
            index: *idx,
            request: req,
            response: r.clone(),
        });
        Ok((*idx, r))
    }
    async fn read_barrier(&self, _c: Consistency) -> Result<(), ClusterError> {
        Ok(())
    }
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ClusterError> {
        Ok(self.state.lock().unwrap().get(key).unwrap())
    }
    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<raft::store::RawRows, ClusterError> {
        let st = self.state.lock().unwrap();
        let map = st.map.borrow();
        Ok(map
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .filter(|(k, _)| after.is_none_or(|a| k.as_slice() > a))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
    async fn status(&self) -> Result<ClusterStatus, ClusterError> {
        // Read once: a guard in a struct literal lives to the end of it, so locking three
        // times in one expression would deadlock.
        let index = *self.index.lock().unwrap();
        Ok(ClusterStatus {
            cluster_id: "fake".into(),
            node_id: 1,
            node_name: "n1".into(),
            leader: Some(1),
            leader_name: Some("n1".into()),
            term: 1,
            commit_index: index,
            last_applied: index,
            last_log_index: index,
            members: vec![],
        })
    }
    async fn join(&self, _req: JoinRequest) -> Result<JoinResponse, ClusterError> {
        Err(ClusterError::JoinRefused("no joins in router tests".into()))
    }
    async fn console(&self, _vm_id: &str) -> Result<api::control::ConsoleStream, ClusterError> {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![Ok(b"TINYVM BOOTED\n".to_vec())];
        Ok(Box::pin(futures::stream::iter(chunks)))
    }
    async fn vm_metrics(
        &self,
        vm_id: &str,
        since_ms: Option<u64>,
    ) -> Result<api::control::VmMetrics, ClusterError> {
        let samples = self
            .samples
            .lock()
            .unwrap()
            .iter()
            .filter(|s| since_ms.is_none_or(|t| s.at_ms > t))
            .cloned()
            .collect();
        Ok(api::control::VmMetrics {
            vm_id: vm_id.to_string(),
            node: 1,
            interval_ms: 1_000,
            samples,
        })
    }
    async fn image_upload_offset(
        &self,
        image: &raft::image::Image,
    ) -> Result<u64, api::control::ImageBytesError> {
        let uploads = self.uploads.lock().unwrap();
        Ok(uploads.get(&image.id).map_or(0, |b| b.len() as u64))
    }
    async fn image_write_chunk(
        &self,
        image: &raft::image::Image,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<u64, api::control::ImageBytesError> {
        let mut uploads = self.uploads.lock().unwrap();
        let bytes = uploads.entry(image.id.clone()).or_default();
        if offset != bytes.len() as u64 {
            return Err(api::control::ImageBytesError::OffsetMismatch {
                expected: bytes.len() as u64,
                got: offset,
            });
        }
        bytes.extend_from_slice(&data);
        Ok(bytes.len() as u64)
    }
    async fn image_finish_upload(
        &self,
        image: &raft::image::Image,
    ) -> Result<(), api::control::ImageBytesError> {
        use sha2::Digest;
        let mut uploads = self.uploads.lock().unwrap();
        let actual = hex::encode(sha2::Sha256::digest(
            uploads
                .get(&image.id)
                .map(Vec::as_slice)
                .unwrap_or_default(),
        ));
        if actual != image.sha256 {
            uploads.remove(&image.id);
            return Err(api::control::ImageBytesError::ChecksumMismatch {
                expected: image.sha256.clone(),
                actual,
            });
        }
        Ok(())
    }
    fn ready(&self) -> bool {
        true
    }
    fn metrics_text(&self) -> String {
        String::new()
    }
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<raft::store::Applied> {
        self.applied.subscribe()
    }
    async fn backup(&self) -> Result<api::control::BackupBlob, ClusterError> {
        // The whole state in the real file format, as a node's export would give it.
        let st = self.state.lock().unwrap();
        let last_applied_index = *self.index.lock().unwrap();
        let pairs = st
            .map
            .borrow()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let body = raft::backup::BackupBody {
            cluster_id: "fake".into(),
            taken_at: api::now_ms(),
            last_applied_index,
            pairs,
        };
        let (bytes, sha256) =
            raft::backup::encode(&body).map_err(|e| ClusterError::Internal(e.to_string()))?;
        Ok(api::control::BackupBlob {
            bytes,
            sha256,
            last_applied_index,
        })
    }
    async fn upgrade_check(&self) -> Result<api::control::UpgradeReport, ClusterError> {
        // One node of the current release: nothing blocks.
        Ok(api::control::UpgradeReport {
            release: env!("CARGO_PKG_VERSION").into(),
            members: vec![],
            blockers: vec![],
            gated_commands: vec![],
            ok: true,
        })
    }
}

pub struct TestApi {
    pub cp: Arc<FakeCluster>,
    pub app: axum::Router,
    config: ApiConfig,
}

pub const ADMIN_PASSWORD: &str = "admin-pw";

impl TestApi {
    pub async fn new() -> TestApi {
        // Router tests log in often from one (unknown) address: limits are tested on their own.
        let mut config = ApiConfig::default();
        config.rate_limits.login_per_ip.per_second = 0.0;
        config.rate_limits.per_user.per_second = 0.0;
        config.rate_limits.per_tenant.per_second = 0.0;
        TestApi::with_config(config).await
    }

    pub async fn with_config(config: ApiConfig) -> TestApi {
        let cp = Arc::new(FakeCluster {
            state: Mutex::new(MemState::default()),
            index: Mutex::new(0),
            applied: tokio::sync::broadcast::channel(1024).0,
            samples: Mutex::new(Vec::new()),
            uploads: Mutex::new(Default::default()),
            peers: Mutex::new(Default::default()),
        });
        let admin = User {
            id: "admin-id".into(),
            username: "admin".into(),
            password_hash: api::auth::hash_password(ADMIN_PASSWORD).unwrap(),
            tenant: SYSTEM_TENANT.into(),
            role: Role::Admin,
            created_at: 0,
            updated_at: 0,
            version: 0,
        };
        // A real CA: federation tokens carry its fingerprint.
        let ca = raft::tls::generate_ca("fake").unwrap();
        let secrets = ClusterSecrets {
            cluster_id: "fake".into(),
            ca_cert_pem: ca.cert_pem.clone(),
            ca_key_pem: ca.key_pem.clone(),
            jwt_keys: vec![b"test-key-0123456789".to_vec()],
            join_secret_sha256: String::new(),
            created_at: 0,
        };
        cp.write(Request::new(
            1,
            "init",
            Command::InitCluster { secrets, admin },
        ))
        .await
        .unwrap();
        let app = api::router(AppState::new(cp.clone(), config.clone()));
        TestApi { cp, app, config }
    }

    /// An independent copy of this API and its state: tokens and ids stay valid, and what a
    /// request changes in the copy leaves the original untouched. Tables of cases run each
    /// case on a fork of one prepared world instead of rebuilding it.
    pub fn fork(&self) -> TestApi {
        let map = self.cp.state.lock().unwrap().map.borrow().clone();
        let cp = Arc::new(FakeCluster {
            state: Mutex::new(MemState {
                map: std::cell::RefCell::new(map),
            }),
            index: Mutex::new(*self.cp.index.lock().unwrap()),
            applied: tokio::sync::broadcast::channel(1024).0,
            samples: Mutex::new(self.cp.samples.lock().unwrap().clone()),
            uploads: Mutex::new(self.cp.uploads.lock().unwrap().clone()),
            peers: Mutex::new(self.cp.peers.lock().unwrap().clone()),
        });
        let app = api::router(AppState::new(cp.clone(), self.config.clone()));
        TestApi {
            cp,
            app,
            config: self.config.clone(),
        }
    }

    /// Adds a user directly through `apply` and returns a token for it.
    /// Places VM `vm_id` on `node` the way the leader's scheduler does (a `PlaceBatch` entry
    /// with its explanation) and returns the VM's new epoch.
    pub async fn place(&self, vm_id: &str, node: u64) -> u64 {
        use raft::placement::{PlacementEntry, PlacementExplanation, PlacementOutcome};
        let bytes = self.cp.get(&raft::keys::vm(vm_id)).unwrap().unwrap();
        let vm: raft::model::Vm = raft::codec::decode(&bytes).unwrap();
        let explanation = PlacementExplanation {
            vm: vm_id.to_string(),
            chosen: Some(node),
            ..Default::default()
        };
        let (_, r) = self
            .cp
            .write(Request::new(
                1,
                "node:1",
                Command::PlaceBatch {
                    placements: vec![PlacementEntry {
                        vm: vm_id.to_string(),
                        node: Some(node),
                        expected_version: vm.version,
                        explanation,
                    }],
                },
            ))
            .await
            .unwrap();
        let Response::Placements(outcomes) = r else {
            panic!("{r:?}")
        };
        assert!(
            matches!(outcomes.as_slice(), [PlacementOutcome::Placed { .. }]),
            "{outcomes:?}"
        );
        let bytes = self.cp.get(&raft::keys::vm(vm_id)).unwrap().unwrap();
        let vm: raft::model::Vm = raft::codec::decode(&bytes).unwrap();
        vm.epoch
    }

    pub async fn user(&self, name: &str, tenant: &str, role: Role) -> String {
        let user = User {
            id: format!("{name}-id"),
            username: name.into(),
            password_hash: api::auth::hash_password("pw").unwrap(),
            tenant: tenant.into(),
            role,
            created_at: 0,
            updated_at: 0,
            version: 0,
        };
        let (_, r) = self
            .cp
            .write(Request::new(1, "test", Command::CreateUser { user }))
            .await
            .unwrap();
        assert!(matches!(r, Response::User(_)), "{r:?}");
        self.login(name, "pw").await
    }

    pub async fn login(&self, user: &str, password: &str) -> String {
        let (s, v) = self
            .call(
                "POST",
                "/api/v1/auth/login",
                None,
                Some(serde_json::json!({"username": user, "password": password})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["token"].as_str().unwrap().to_string()
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (s, _, v) = self.call_full(method, path, token, body, &[]).await;
        (s, v)
    }

    pub async fn call_full(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let mut req = HttpRequest::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(b.to_string()))
                .unwrap(),
            None => req.body(Body::empty()).unwrap(),
        };
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, headers, v)
    }
}
