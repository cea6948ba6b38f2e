//! The simulated clients: the same register and quota workload as the real-process tier, but
//! talking to the simulated nodes the way the product's API does, and recorded in the same
//! history format so the same checkers judge it.
//!
//! A write enters through a random node; when that node is not the leader it forwards the
//! request to the leader it knows of over the simulated network (as `Cluster::write` does over
//! QUIC), retrying while no request can have been proposed. A linearizable read asks the leader
//! for a read index (`get_read_log_id`, as the product's read barrier does), waits until the
//! entry node has applied it and reads that node's state. Outcomes follow the real tier: a
//! refusal by `apply` is `fail`, a lost message or a timeout after the request may have been
//! proposed is `info`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use raft::command::{Command, Request, Response};
use raft::model::{DesiredState, Operation, OperationState, Quota, Tenant, Vm, VmState};
use raft::{keys, NodeId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::cluster::SimCluster;
use super::network::Lost;
use super::store;
use crate::checker::quota::{Resource, UsageSample};
use crate::history::{Func, Kind, Record};
use crate::workload::{Completion, QuotaTenant};

/// How long a client waits for one operation.
pub const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// Live register tenants the clients keep, and operations per register (as the real tier).
const LIVE_REGISTERS: usize = 5;
const OPS_PER_KEY: usize = 30;

/// Collects the history in memory, stamped with simulated time.
pub struct Recorder {
    cluster: Arc<SimCluster>,
    next: AtomicU64,
    records: Mutex<Vec<Record>>,
}

impl Recorder {
    pub fn new(cluster: Arc<SimCluster>) -> Self {
        Self {
            cluster,
            next: AtomicU64::new(1),
            records: Mutex::new(Vec::new()),
        }
    }

    fn records(&self) -> MutexGuard<'_, Vec<Record>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn invoke(&self, process: u64, f: Func, key: &str, value: Value, node: NodeId) -> Record {
        let record = Record {
            process,
            op_id: self.next.fetch_add(1, Ordering::Relaxed),
            kind: Kind::Invoke,
            f,
            key: key.to_string(),
            value,
            time_ns: self.cluster.observer.now_ns(),
            node: Some(format!("n{node}")),
            error: None,
        };
        self.cluster.observer.event(format_args!(
            "client p{process} op {} invoke {} {} {} via n{node}",
            record.op_id,
            f.as_str(),
            record.key,
            record.value
        ));
        self.records().push(record.clone());
        record
    }

    pub fn complete(&self, mut record: Record, outcome: Completion) {
        record.time_ns = self.cluster.observer.now_ns();
        let (kind, value, error) = match outcome {
            Completion::Ok(v) => (Kind::Ok, v, None),
            Completion::Fail(e) => (Kind::Fail, Value::Null, Some(e)),
            Completion::Info(e) => (Kind::Info, Value::Null, Some(e)),
        };
        self.cluster.observer.event(format_args!(
            "client p{} op {} {:?} {} {}",
            record.process,
            record.op_id,
            kind,
            value,
            error.as_deref().unwrap_or("")
        ));
        record.kind = kind;
        record.value = value;
        record.error = error;
        self.records().push(record);
    }

    /// Every record so far, in the order they happened.
    pub fn take(&self) -> Vec<Record> {
        std::mem::take(&mut *self.records())
    }
}

/// What became of a write.
pub enum WriteOutcome {
    /// Committed and applied with this response.
    Done(Box<Response>),
    /// Certainly never proposed.
    NotProposed(String),
    /// May or may not have been committed.
    Unknown(String),
}

/// Proposes `req` through node `via`, forwarding to the leader as the product does.
pub async fn write(cluster: &SimCluster, via: NodeId, req: Request) -> WriteOutcome {
    let deadline = Instant::now() + OP_TIMEOUT;
    let mut maybe_proposed = false;
    loop {
        if Instant::now() >= deadline {
            return if maybe_proposed {
                WriteOutcome::Unknown("timeout".into())
            } else {
                WriteOutcome::NotProposed("no leader".into())
            };
        }
        let Some(raft) = cluster.raft(via) else {
            return if maybe_proposed {
                WriteOutcome::Unknown("entry node died".into())
            } else {
                WriteOutcome::NotProposed("cannot connect".into())
            };
        };
        let leader = raft.metrics().borrow().current_leader;
        let result = match leader {
            None => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Some(l) if l == via => {
                maybe_proposed = true;
                match tokio::time::timeout_at(deadline, raft.client_write(req.clone())).await {
                    Ok(r) => r,
                    Err(_) => return WriteOutcome::Unknown("timeout".into()),
                }
            }
            Some(l) => {
                let remaining = deadline.saturating_duration_since(Instant::now());
                let forwarded = req.clone();
                let answer = cluster
                    .net
                    .call(via, l, "forward", remaining, |r| async move {
                        r.client_write(forwarded).await
                    })
                    .await;
                match answer {
                    Ok(r) => {
                        maybe_proposed = true;
                        r
                    }
                    Err(Lost::Refused) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    Err(e) => return WriteOutcome::Unknown(e.to_string()),
                }
            }
        };
        match result {
            Ok(resp) => return WriteOutcome::Done(Box::new(resp.data)),
            // Refused before proposing: safe to try again once the leader is known.
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => return WriteOutcome::Unknown(e.to_string()),
        }
    }
}

/// Why a read did not return.
#[derive(Debug)]
pub struct ReadFailed(pub String);

/// A linearizable read of `key` on node `via`: read index from the leader, wait for the local
/// apply, then read the local state.
pub async fn linearizable_read<T>(
    cluster: &SimCluster,
    via: NodeId,
    read: impl Fn(&store::Disk) -> T,
) -> Result<T, ReadFailed> {
    let deadline = Instant::now() + OP_TIMEOUT;
    let disk = cluster
        .disk(via)
        .ok_or_else(|| ReadFailed("unknown node".into()))?;
    let incarnation = store::lock(&disk).incarnation;
    loop {
        if Instant::now() >= deadline {
            return Err(ReadFailed("timeout".into()));
        }
        let Some(raft) = cluster.raft(via) else {
            return Err(ReadFailed("cannot connect".into()));
        };
        let leader = raft.metrics().borrow().current_leader;
        let index = match leader {
            None => None,
            Some(l) if l == via => {
                match tokio::time::timeout_at(deadline, raft.get_read_log_id()).await {
                    Ok(Ok((id, _))) => Some(id.map(|i| i.index).unwrap_or(0)),
                    Ok(Err(_)) => None,
                    Err(_) => return Err(ReadFailed("timeout".into())),
                }
            }
            Some(l) => {
                let remaining = deadline.saturating_duration_since(Instant::now());
                let answer = cluster
                    .net
                    .call(via, l, "read_index", remaining, |r| async move {
                        r.get_read_log_id().await
                    })
                    .await;
                match answer {
                    Ok(Ok((id, _))) => Some(id.map(|i| i.index).unwrap_or(0)),
                    Ok(Err(_)) | Err(Lost::Refused) => None,
                    Err(e) => return Err(ReadFailed(e.to_string())),
                }
            }
        };
        let Some(index) = index else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let mut metrics = raft.metrics();
        let caught_up = tokio::time::timeout_at(
            deadline,
            metrics.wait_for(|m| m.last_applied.map(|l| l.index).unwrap_or(0) >= index),
        )
        .await;
        if !matches!(caught_up, Ok(Ok(_))) {
            return Err(ReadFailed("not applied in time".into()));
        }
        let guard = store::lock(&disk);
        if guard.incarnation != incarnation {
            return Err(ReadFailed("entry node died".into()));
        }
        return Ok(read(&guard.volatile));
    }
}

/// The tenant named `name` in a node's state.
pub fn tenant_named(disk: &store::Disk, name: &str) -> Option<Tenant> {
    let id: String = raft::codec::decode(disk.state.get(&keys::tenant_name(name))?).ok()?;
    raft::codec::decode(disk.state.get(&keys::tenant(&id))?).ok()
}

/// The final-read shape of a register or VM key (`vm/<name>`) in a node's state: tenants read
/// as registers, a VM as the name of its tenant (as the real tier reads them).
pub fn final_read(disk: &store::Disk, key: &str) -> Option<Value> {
    match key.strip_prefix("vm/") {
        Some(name) => {
            let vm: Vm =
                raft::codec::decode(disk.state.get(&keys::vm(&format!("vm-{name}")))?).ok()?;
            let t: Tenant = raft::codec::decode(disk.state.get(&keys::tenant(&vm.tenant))?).ok()?;
            Some(json!({"value": t.name}))
        }
        None => tenant_named(disk, key).map(|t| register_value(&t)),
    }
}

/// The register shape of a tenant: its `max_vms` is the value.
pub fn register_value(t: &Tenant) -> Value {
    json!({"value": t.quota.max_vms, "version": t.version})
}

#[derive(Debug, Clone)]
struct RegKey {
    name: String,
    id: String,
    version: u64,
    deleted: bool,
    ops: usize,
}

/// Everything the simulated clients share.
pub struct Workload {
    pub cluster: Arc<SimCluster>,
    pub recorder: Arc<Recorder>,
    pub quota_tenants: Vec<QuotaTenant>,
    pub planned: Duration,
    pub stop: AtomicBool,
    pub samples: Mutex<Vec<UsageSample>>,
    /// Every register name ever created (for the final reads).
    pub names: Mutex<Vec<String>>,
    registers: Mutex<Vec<RegKey>>,
    seed: u64,
}

fn now_ms(cluster: &SimCluster) -> u64 {
    cluster.observer.now_ns() / 1_000_000
}

fn tenant(id: &str, name: &str, max_vms: u64) -> Tenant {
    Tenant {
        id: id.into(),
        name: name.into(),
        quota: Quota {
            max_vms: Some(max_vms),
            ..Default::default()
        },
        usage: Default::default(),
        created_at: 0,
        updated_at: 0,
        version: 0,
    }
}

fn version_of(resp: &Response) -> Option<u64> {
    match resp {
        Response::Tenant(t) => Some(t.version),
        _ => None,
    }
}

impl Workload {
    pub fn new(
        cluster: Arc<SimCluster>,
        recorder: Arc<Recorder>,
        quota_tenants: Vec<QuotaTenant>,
        planned: Duration,
        seed: u64,
    ) -> Self {
        Self {
            cluster,
            recorder,
            quota_tenants,
            planned,
            stop: AtomicBool::new(false),
            samples: Mutex::new(Vec::new()),
            names: Mutex::new(Vec::new()),
            registers: Mutex::new(Vec::new()),
            seed,
        }
    }

    fn registers(&self) -> MutexGuard<'_, Vec<RegKey>> {
        self.registers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn observe_version(&self, name: &str, version: u64, deleted: bool) {
        if let Some(r) = self.registers().iter_mut().find(|r| r.name == name) {
            r.version = r.version.max(version);
            r.deleted |= deleted;
        }
    }

    fn pick_node(&self, rng: &mut StdRng) -> NodeId {
        let ids = self.cluster.ids();
        ids[rng.gen_range(0..ids.len())]
    }

    fn request(&self, process: u64, command: Command) -> Request {
        Request::new(
            now_ms(&self.cluster),
            format!("sim-client-{process}"),
            command,
        )
    }

    /// Turns a write outcome into a completion; `ok` maps an applied response.
    fn complete_write(
        &self,
        pending: Record,
        outcome: WriteOutcome,
        ok: impl FnOnce(&Response) -> Completion,
    ) {
        let completion = match outcome {
            WriteOutcome::Done(resp) => match *resp {
                Response::Rejected { code, .. } => Completion::Fail(code.as_str().into()),
                resp => ok(&resp),
            },
            WriteOutcome::NotProposed(e) => Completion::Fail(e),
            WriteOutcome::Unknown(e) => Completion::Info(e),
        };
        self.recorder.complete(pending, completion);
    }

    /// One register client, as `workload::Workload::register_client` on real processes.
    pub async fn register_client(self: Arc<Self>, process: u64) {
        let mut rng = StdRng::seed_from_u64(self.seed ^ (process << 32) ^ 0x5eed);
        while !self.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(1..30))).await;
            let node = self.pick_node(&mut rng);
            let live: Vec<RegKey> = self
                .registers()
                .iter()
                .filter(|r| !r.deleted && r.ops < OPS_PER_KEY)
                .cloned()
                .collect();
            let value = 1000 + rng.gen_range(0..1_000_000u64);
            if live.len() < LIVE_REGISTERS && (live.is_empty() || rng.gen_bool(0.3)) {
                let name = format!("r{}-{}", process, rng.gen_range(0..u32::MAX));
                self.create_register(process, node, &name, value).await;
                continue;
            }
            let key = live[rng.gen_range(0..live.len())].clone();
            if let Some(r) = self.registers().iter_mut().find(|r| r.name == key.name) {
                r.ops += 1;
            }
            let dice = rng.gen_range(0..100);
            if dice < 45 {
                self.read_register(process, node, &key).await;
            } else if dice < 75 {
                let input = json!({"expect": key.version, "value": value});
                self.update(
                    process,
                    node,
                    &key,
                    Func::Cas,
                    input,
                    value,
                    Some(key.version),
                )
                .await;
            } else if dice < 95 {
                self.update(process, node, &key, Func::Write, json!(value), value, None)
                    .await;
            } else {
                let pending = self.recorder.invoke(
                    process,
                    Func::Delete,
                    &key.name,
                    json!({"expect": key.version}),
                    node,
                );
                let req = self.request(
                    process,
                    Command::DeleteTenant {
                        id: key.id.clone(),
                        expected_version: Some(key.version),
                    },
                );
                let outcome = write(&self.cluster, node, req).await;
                self.complete_write(pending, outcome, |_| {
                    self.observe_version(&key.name, key.version, true);
                    Completion::Ok(Value::Null)
                });
            }
        }
    }

    /// Creates a register tenant; also used for the availability probe after healing.
    pub async fn create_register(
        &self,
        process: u64,
        node: NodeId,
        name: &str,
        value: u64,
    ) -> bool {
        let id = format!("t-{name}");
        let pending = self
            .recorder
            .invoke(process, Func::Create, name, json!(value), node);
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.to_string());
        let req = self.request(
            process,
            Command::CreateTenant {
                tenant: tenant(&id, name, value),
            },
        );
        let outcome = write(&self.cluster, node, req).await;
        let mut acknowledged = false;
        self.complete_write(pending, outcome, |resp| match version_of(resp) {
            Some(version) => {
                self.registers().push(RegKey {
                    name: name.to_string(),
                    id: id.clone(),
                    version,
                    deleted: false,
                    ops: 0,
                });
                acknowledged = true;
                Completion::Ok(json!({"version": version}))
            }
            None => Completion::Info(format!("unexpected response {resp:?}")),
        });
        acknowledged
    }

    async fn read_register(&self, process: u64, node: NodeId, key: &RegKey) {
        let pending = self
            .recorder
            .invoke(process, Func::Read, &key.name, Value::Null, node);
        let name = key.name.clone();
        let result =
            linearizable_read(&self.cluster, node, move |disk| tenant_named(disk, &name)).await;
        let completion = match result {
            Ok(Some(t)) => {
                self.observe_version(&key.name, t.version, false);
                Completion::Ok(register_value(&t))
            }
            Ok(None) => Completion::Ok(Value::Null),
            Err(ReadFailed(e)) => Completion::Info(e),
        };
        self.recorder.complete(pending, completion);
    }

    #[allow(clippy::too_many_arguments)] // mirrors workload::Workload::patch
    async fn update(
        &self,
        process: u64,
        node: NodeId,
        key: &RegKey,
        f: Func,
        input: Value,
        value: u64,
        expected_version: Option<u64>,
    ) {
        let pending = self.recorder.invoke(process, f, &key.name, input, node);
        let req = self.request(
            process,
            Command::UpdateTenantQuota {
                id: key.id.clone(),
                quota: Quota {
                    max_vms: Some(value),
                    ..Default::default()
                },
                expected_version,
            },
        );
        let outcome = write(&self.cluster, node, req).await;
        self.complete_write(pending, outcome, |resp| match version_of(resp) {
            Some(version) => {
                self.observe_version(&key.name, version, false);
                Completion::Ok(json!({"version": version}))
            }
            None => Completion::Info(format!("unexpected response {resp:?}")),
        });
    }

    fn current_quota_tenant(&self) -> Option<QuotaTenant> {
        let n = self.quota_tenants.len();
        if n == 0 {
            return None;
        }
        let elapsed = self.cluster.observer.now_ns() as f64 / 1e9;
        let slot = elapsed / self.planned.as_secs_f64().max(0.001) * n as f64;
        self.quota_tenants.get((slot as usize).min(n - 1)).cloned()
    }

    /// One quota client: creates VMs for the current quota tenant (limit 5) through random nodes.
    pub async fn quota_client(self: Arc<Self>, process: u64) {
        let mut rng = StdRng::seed_from_u64(self.seed ^ (process << 32) ^ 0x9a07a);
        while !self.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(20..60))).await;
            let Some(t) = self.current_quota_tenant() else {
                return;
            };
            let node = self.pick_node(&mut rng);
            let name = format!("v{}-{}", process, rng.gen_range(0..u32::MAX));
            self.names
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("vm/{name}"));
            let pending = self.recorder.invoke(
                process,
                Func::Create,
                &format!("vm/{name}"),
                json!(t.name),
                node,
            );
            let at = now_ms(&self.cluster);
            let vm = Vm {
                id: format!("vm-{name}"),
                name: name.clone(),
                tenant: t.id.clone(),
                vcpus: 1,
                memory_mib: 128,
                disk_gib: 0,
                image: None,
                labels: BTreeMap::new(),
                node: None,
                desired_state: DesiredState::Running,
                state: VmState::Pending,
                ha: false,
                anti_affinity_group: None,
                placement: Default::default(),
                epoch: 0,
                created_at: at,
                updated_at: at,
                version: 0,
            };
            let operation = Operation {
                id: format!("op-{name}"),
                kind: "vm.create".into(),
                tenant: t.id.clone(),
                target: vm.id.clone(),
                state: OperationState::Pending,
                error: None,
                created_at: at,
                updated_at: at,
            };
            let req = self.request(process, Command::CreateVm { vm, operation });
            let outcome = write(&self.cluster, node, req).await;
            self.complete_write(pending, outcome, |_| Completion::Ok(Value::Null));
        }
    }

    /// Reads the current quota tenant's usage on every running node (stale local reads).
    pub async fn sampler(self: Arc<Self>) {
        while !self.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let Some(t) = self.current_quota_tenant() else {
                return;
            };
            for id in self.cluster.ids() {
                if self.cluster.raft(id).is_none() {
                    continue;
                }
                let Some(disk) = self.cluster.disk(id) else {
                    continue;
                };
                let found = tenant_named(&store::lock(&disk).volatile, &t.name);
                if let Some(found) = found {
                    let sample = UsageSample {
                        time_ns: self.cluster.observer.now_ns(),
                        node: format!("n{id}"),
                        tenant: t.name.clone(),
                        resource: Resource::Vms,
                        usage: found.usage.vms,
                        limit: found.quota.max_vms,
                    };
                    self.samples
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(sample);
                }
            }
        }
    }

    /// Creates a quota tenant before the faults start, retrying until it is committed.
    pub async fn setup_quota_tenant(&self, name: &str) -> Option<QuotaTenant> {
        let id = format!("q-{name}");
        for _ in 0..20 {
            let req = self.request(
                0,
                Command::CreateTenant {
                    tenant: tenant(&id, name, 5),
                },
            );
            match write(&self.cluster, 1, req).await {
                // A rejection means an earlier attempt whose answer was lost created it.
                WriteOutcome::Done(resp)
                    if matches!(*resp, Response::Tenant(_) | Response::Rejected { .. }) =>
                {
                    return Some(QuotaTenant {
                        name: name.to_string(),
                        id,
                    })
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        None
    }
}
