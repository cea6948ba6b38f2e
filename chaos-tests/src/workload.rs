//! The client workload of a real-process run: concurrent REST clients against random nodes,
//! every invocation and completion recorded in the JSONL history.
//!
//! - **Register clients** treat each tenant as a register keyed by its name (names are chosen by
//!   the client and unique, ids by the server): create, linearizable read, CAS (`PATCH` quota with
//!   `If-Match`), unconditional write (`PATCH` without it) and delete with `If-Match`. The
//!   register's value is the tenant's `quota.max_vms`, unique per write so reads identify their
//!   writer.
//! - **Quota clients** create VMs for a tenant with `max_vms = 5` through different nodes at once,
//!   moving to the next such tenant as time passes; a VM create is recorded as a `create` of key
//!   `vm/<name>` whose value is the tenant's name.
//! - A **sampler** reads the quota tenants' usage from every node (stale reads) for the quota
//!   checker.
//!
//! Outcomes: a 2xx is `ok`; a 4xx is `fail` (the API refused before or in `apply`, nothing took
//! effect); a 5xx, a timeout or a broken connection is `info` (the write may still commit).

use std::io::BufWriter;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde_json::{json, Value};

use crate::checker::quota::{Resource, UsageSample};
use crate::cluster::{Client, Reply};
use crate::history::{Clock, Func, HistoryError, HistoryWriter, Kind, OpId, Record};

/// Appends history records from many tasks, flushing each so a crash keeps them.
pub struct Recorder {
    clock: Clock,
    next: AtomicU64,
    out: Mutex<HistoryWriter<BufWriter<std::fs::File>>>,
    /// The first write error, reported at the end rather than from every client.
    error: Mutex<Option<HistoryError>>,
}

impl Recorder {
    pub fn new(clock: Clock, file: std::fs::File) -> Self {
        Self {
            clock,
            next: AtomicU64::new(1),
            out: Mutex::new(HistoryWriter::new(BufWriter::new(file))),
            error: Mutex::new(None),
        }
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    fn append(&self, record: &Record) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let result = out.append(record).and_then(|()| out.flush());
        if let Err(e) = result {
            let mut slot = self.error.lock().unwrap_or_else(|e| e.into_inner());
            slot.get_or_insert(e);
        }
    }

    /// Records an invocation now and returns its id.
    pub fn invoke(&self, process: u64, f: Func, key: &str, value: Value, node: &str) -> Pending {
        let op_id = self.next.fetch_add(1, Ordering::Relaxed);
        let record = Record {
            process,
            op_id,
            kind: Kind::Invoke,
            f,
            key: key.to_string(),
            value,
            time_ns: self.clock.now_ns(),
            node: Some(node.to_string()),
            error: None,
        };
        self.append(&record);
        Pending { record }
    }

    /// Records the completion of `pending` now.
    pub fn complete(&self, pending: Pending, outcome: Completion) {
        let mut record = pending.record;
        record.time_ns = self.clock.now_ns();
        let (kind, value, error) = match outcome {
            Completion::Ok(v) => (Kind::Ok, v, None),
            Completion::Fail(e) => (Kind::Fail, Value::Null, Some(e)),
            Completion::Info(e) => (Kind::Info, Value::Null, Some(e)),
        };
        record.kind = kind;
        record.value = value;
        record.error = error;
        self.append(&record);
    }

    /// The first error writing the history, if any.
    pub fn take_error(&self) -> Option<HistoryError> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// An invocation waiting for its completion.
pub struct Pending {
    record: Record,
}

impl Pending {
    pub fn op_id(&self) -> OpId {
        self.record.op_id
    }
}

/// How an operation ended, with what the client observed.
#[derive(Debug)]
pub enum Completion {
    Ok(Value),
    Fail(String),
    Info(String),
}

/// Classifies a reply that is not the expected success.
fn unexpected(result: &Result<Reply, reqwest::Error>) -> Completion {
    match result {
        Ok(r) if (400..500).contains(&r.status) => Completion::Fail(format!(
            "HTTP {} {}",
            r.status,
            r.body["code"].as_str().unwrap_or_default()
        )),
        Ok(r) => Completion::Info(format!(
            "HTTP {} {}",
            r.status,
            r.body["code"].as_str().unwrap_or_default()
        )),
        // No connection means no request reached the node: nothing can have taken effect.
        Err(e) if e.is_connect() => Completion::Fail("cannot connect".into()),
        Err(e) if e.is_timeout() => Completion::Info("timeout".into()),
        Err(e) => Completion::Info(format!("no response: {e}")),
    }
}

/// A tenant used as a register.
#[derive(Debug, Clone)]
struct RegKey {
    name: String,
    id: String,
    /// The latest version any client saw, the `If-Match` of the next CAS or delete.
    version: u64,
    deleted: bool,
    /// Operations issued on this key so far; see [`OPS_PER_KEY`].
    ops: usize,
}

/// A tenant with `max_vms = 5` that quota clients fill.
#[derive(Debug, Clone)]
pub struct QuotaTenant {
    pub name: String,
    pub id: String,
}

/// Everything the clients share.
pub struct Workload {
    pub recorder: Arc<Recorder>,
    pub client: Client,
    /// (node name, API URL) of every node.
    pub nodes: Vec<(String, String)>,
    pub quota_tenants: Vec<QuotaTenant>,
    /// How long the workload runs, to spread the quota tenants over it.
    pub planned: Duration,
    pub stop: AtomicBool,
    registers: Mutex<Vec<RegKey>>,
    samples: Mutex<Vec<UsageSample>>,
    seed: u64,
}

/// How many live register tenants the clients keep around.
const LIVE_REGISTERS: usize = 6;

/// Operations per register before clients move on to a fresh one. The linearizability search
/// is exponential in the operations of unknown outcome pending on one key; bounding each key's
/// history keeps every key decidable within the budget while faults still hit every key.
const OPS_PER_KEY: usize = 40;

impl Workload {
    pub fn new(
        recorder: Arc<Recorder>,
        client: Client,
        nodes: Vec<(String, String)>,
        quota_tenants: Vec<QuotaTenant>,
        planned: Duration,
        seed: u64,
    ) -> Self {
        Self {
            recorder,
            client,
            nodes,
            quota_tenants,
            planned,
            stop: AtomicBool::new(false),
            registers: Mutex::new(Vec::new()),
            samples: Mutex::new(Vec::new()),
            seed,
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// The usage samples taken so far.
    pub fn samples(&self) -> Vec<UsageSample> {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn pick_node(&self, rng: &mut StdRng) -> (String, String) {
        self.nodes[rng.gen_range(0..self.nodes.len())].clone()
    }

    fn registers(&self) -> std::sync::MutexGuard<'_, Vec<RegKey>> {
        self.registers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn observe_version(&self, name: &str, version: u64, deleted: bool) {
        let mut regs = self.registers();
        if let Some(r) = regs.iter_mut().find(|r| r.name == name) {
            r.version = r.version.max(version);
            r.deleted |= deleted;
        }
    }

    /// One register client: `process` numbers it in the history.
    pub async fn register_client(self: Arc<Self>, process: u64) {
        let mut rng = StdRng::seed_from_u64(self.seed ^ (process << 32) ^ 0x5eed);
        while !self.stopped() {
            let (node, url) = self.pick_node(&mut rng);
            let live: Vec<RegKey> = self
                .registers()
                .iter()
                .filter(|r| !r.deleted && r.ops < OPS_PER_KEY)
                .cloned()
                .collect();
            if live.len() < LIVE_REGISTERS && (live.is_empty() || rng.gen_bool(0.3)) {
                self.create_register(process, &node, &url, &mut rng).await;
                continue;
            }
            let key = live[rng.gen_range(0..live.len())].clone();
            if let Some(r) = self.registers().iter_mut().find(|r| r.name == key.name) {
                r.ops += 1;
            }
            let dice = rng.gen_range(0..100);
            let tenant_url = format!("{url}/api/v1/tenants/{}", key.id);
            // Values are unique per write so each read names its writer.
            let value = 1000 + rng.gen_range(0..1_000_000u64);
            if dice < 45 {
                self.read_register(process, &node, &tenant_url, &key).await;
            } else if dice < 75 {
                let input = json!({"expect": key.version, "value": value});
                self.patch(
                    process,
                    &node,
                    &tenant_url,
                    &key,
                    Func::Cas,
                    input,
                    value,
                    Some(key.version),
                )
                .await;
            } else if dice < 95 {
                self.patch(
                    process,
                    &node,
                    &tenant_url,
                    &key,
                    Func::Write,
                    json!(value),
                    value,
                    None,
                )
                .await;
            } else {
                let pending = self.recorder.invoke(
                    process,
                    Func::Delete,
                    &key.name,
                    json!({"expect": key.version}),
                    &node,
                );
                let result = self
                    .client
                    .call(Method::DELETE, &tenant_url, None, Some(key.version))
                    .await;
                let outcome = match &result {
                    Ok(r) if r.status == 204 => {
                        self.observe_version(&key.name, key.version, true);
                        Completion::Ok(Value::Null)
                    }
                    _ => unexpected(&result),
                };
                self.recorder.complete(pending, outcome);
            }
        }
    }

    async fn create_register(&self, process: u64, node: &str, url: &str, rng: &mut StdRng) {
        let value = 1000 + rng.gen_range(0..1_000_000u64);
        let name = format!("r{}-{}", process, rng.gen_range(0..u32::MAX));
        let pending = self
            .recorder
            .invoke(process, Func::Create, &name, json!(value), node);
        let body = json!({"name": name, "quota": {"max_vms": value}});
        let result = self
            .client
            .call(
                Method::POST,
                &format!("{url}/api/v1/tenants"),
                Some(&body),
                None,
            )
            .await;
        let outcome = match &result {
            Ok(r) if r.status == 201 => match (r.body["id"].as_str(), r.body["version"].as_u64()) {
                (Some(id), Some(version)) => {
                    self.registers().push(RegKey {
                        name: name.clone(),
                        id: id.to_string(),
                        version,
                        deleted: false,
                        ops: 0,
                    });
                    Completion::Ok(json!({"version": version}))
                }
                // Created, but the client cannot tell what it got: unknown to the checker.
                _ => Completion::Info(format!("unexpected body {}", r.body)),
            },
            _ => unexpected(&result),
        };
        self.recorder.complete(pending, outcome);
    }

    async fn read_register(&self, process: u64, node: &str, tenant_url: &str, key: &RegKey) {
        let pending = self
            .recorder
            .invoke(process, Func::Read, &key.name, Value::Null, node);
        let result = self
            .client
            .call(
                Method::GET,
                &format!("{tenant_url}?consistency=linearizable"),
                None,
                None,
            )
            .await;
        let outcome = match &result {
            Ok(r) if r.status == 200 => match r.body["version"].as_u64() {
                Some(version) => {
                    self.observe_version(&key.name, version, false);
                    Completion::Ok(json!({"value": r.body["quota"]["max_vms"], "version": version}))
                }
                None => Completion::Info(format!("unexpected body {}", r.body)),
            },
            Ok(r) if r.status == 404 => Completion::Ok(Value::Null),
            _ => unexpected(&result),
        };
        self.recorder.complete(pending, outcome);
    }

    #[allow(clippy::too_many_arguments)] // one call site per function; a struct would only rename them
    async fn patch(
        &self,
        process: u64,
        node: &str,
        tenant_url: &str,
        key: &RegKey,
        f: Func,
        input: Value,
        value: u64,
        if_match: Option<u64>,
    ) {
        let pending = self.recorder.invoke(process, f, &key.name, input, node);
        let body = json!({"quota": {"max_vms": value}});
        let result = self
            .client
            .call(Method::PATCH, tenant_url, Some(&body), if_match)
            .await;
        let outcome = match &result {
            Ok(r) if r.status == 200 => match r.body["version"].as_u64() {
                Some(version) => {
                    self.observe_version(&key.name, version, false);
                    Completion::Ok(json!({"version": version}))
                }
                None => Completion::Info(format!("unexpected body {}", r.body)),
            },
            _ => unexpected(&result),
        };
        self.recorder.complete(pending, outcome);
    }

    /// The quota tenant clients fill at this point of the run.
    fn current_quota_tenant(&self) -> Option<&QuotaTenant> {
        let n = self.quota_tenants.len();
        if n == 0 {
            return None;
        }
        let elapsed = Duration::from_nanos(self.recorder.clock().now_ns());
        let slot = elapsed.as_secs_f64() / self.planned.as_secs_f64().max(0.001) * n as f64;
        self.quota_tenants.get((slot as usize).min(n - 1))
    }

    /// One quota client: creates VMs for the current quota tenant through random nodes.
    pub async fn quota_client(self: Arc<Self>, process: u64) {
        let mut rng = StdRng::seed_from_u64(self.seed ^ (process << 32) ^ 0x9a07a);
        let mut ticker = tokio::time::interval(Duration::from_millis(20));
        while !self.stopped() {
            // Paced so that quota clients do not drown the register history in refusals.
            ticker.tick().await;
            let Some(tenant) = self.current_quota_tenant().cloned() else {
                return;
            };
            let (node, url) = self.pick_node(&mut rng);
            let name = format!("v{}-{}", process, rng.gen_range(0..u32::MAX));
            let pending = self.recorder.invoke(
                process,
                Func::Create,
                &format!("vm/{name}"),
                json!(tenant.name),
                &node,
            );
            let body = json!({"name": name, "vcpus": 1, "memory_mib": 128, "tenant": tenant.id});
            let result = self
                .client
                .call(
                    Method::POST,
                    &format!("{url}/api/v1/vms"),
                    Some(&body),
                    None,
                )
                .await;
            let outcome = match &result {
                Ok(r) if (200..300).contains(&r.status) => Completion::Ok(Value::Null),
                _ => unexpected(&result),
            };
            self.recorder.complete(pending, outcome);
        }
    }

    /// Samples the current quota tenant's usage on every node until stopped.
    pub async fn sampler(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(Duration::from_millis(250));
        while !self.stopped() {
            ticker.tick().await;
            let Some(tenant) = self.current_quota_tenant().cloned() else {
                return;
            };
            for (node, url) in &self.nodes {
                let result = self
                    .client
                    .call(
                        Method::GET,
                        &format!("{url}/api/v1/tenants/{}?consistency=stale", tenant.id),
                        None,
                        None,
                    )
                    .await;
                let Ok(r) = result else { continue };
                let Some(usage) = r.body["usage"]["vms"].as_u64() else {
                    continue;
                };
                let sample = UsageSample {
                    time_ns: self.recorder.clock().now_ns(),
                    node: node.clone(),
                    tenant: tenant.name.clone(),
                    resource: Resource::Vms,
                    usage,
                    limit: r.body["quota"]["max_vms"].as_u64(),
                };
                self.samples
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(sample);
            }
        }
    }
}

/// Flushes a writer, for the end of a run.
pub fn flush(recorder: &Recorder) -> Result<(), HistoryError> {
    let mut out = recorder.out.lock().unwrap_or_else(|e| e.into_inner());
    out.flush()
}
