//! Serial consoles across the cluster: the API of any node streams the console of a VM from the
//! node that runs it, over a mutually authenticated QUIC tunnel.
//!
//! Tunnel protocol: the caller writes one line `console <vm id>\n`; the hosting node checks the
//! VM is placed on it, then copies the console's bytes until either side closes. A line
//! `image <id> <offset>\n` fetches image bytes instead (see `images`).
//! `migrate <source node id>\n` opens a migration tunnel instead (see `migration::tunnel`), and
//! extension RPCs named `migration.*` are the target's side of a migration.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::StreamExt;
use hypervisor::Hypervisor;
use raft::model::NodeId;
use raft::net::{ExtensionError, ExtensionHandler};
use raft::store::StateReader;
use tokio::sync::OnceCell;

/// The hypervisor, once the agent has connected to it.
pub type SharedHypervisor = Arc<OnceCell<Arc<dyn Hypervisor>>>;

const MAX_REQUEST: usize = 256;

/// Extension RPC: "answer once you have applied this index" (8 bytes, big-endian).
pub const WAIT_APPLIED: &str = "wait-applied";

/// Extension RPC: the statistics series of a VM hosted here (JSON [`VmMetricsRequest`] in,
/// JSON `api::control::VmMetrics` out).
pub const VM_METRICS: &str = "vm-metrics";

/// The body of a [`VM_METRICS`] call.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct VmMetricsRequest {
    pub vm_id: String,
    pub since_ms: Option<u64>,
}
/// Extension RPC: run a scheduler simulation on this node's (the leader's) replica; JSON
/// `SimulateRequest` in, JSON `SimulateResult` out.
pub const SIMULATE: &str = "scheduler-simulate";

/// Serves console tunnels (and, later, other node-to-node streams).
pub struct NodeExtensions {
    pub me: NodeId,
    pub reader: StateReader,
    pub hv: SharedHypervisor,
    pub stats: crate::stats::VmStatsStore,
    pub images: Arc<crate::images::NodeImages>,
    /// Answers heartbeats (while this node leads).
    pub liveness: Arc<crate::liveness::Liveness>,
    /// Present once the node takes part in migrations.
    pub migration: Option<crate::migration::SharedEnv>,
    /// The scheduler policy used for simulations asked of this node.
    pub policy: crate::scheduler::Policy,
}

/// The local console of `vm_id` as a stream of chunks.
pub async fn local_console(
    hv: &SharedHypervisor,
    vm_id: &str,
) -> Result<api::control::ConsoleStream, String> {
    let hv = hv.get().ok_or("this node's hypervisor is not connected")?;
    let stream = hv
        .console(&hypervisor::spec::domain_name(vm_id))
        .await
        .map_err(|e| e.to_string())?;
    Ok(stream
        .map(|r| r.map(|b| b.to_vec()).map_err(std::io::Error::other))
        .boxed())
}

impl ExtensionHandler for NodeExtensions {
    fn handle<'a>(
        &'a self,
        kind: &'a str,
        body: Vec<u8>,
    ) -> BoxFuture<'a, Result<Vec<u8>, ExtensionError>> {
        Box::pin(async move {
            match kind {
                WAIT_APPLIED => {
                    let bytes: [u8; 8] = body
                        .as_slice()
                        .try_into()
                        .map_err(|_| ExtensionError::Refused("index must be 8 bytes".into()))?;
                    let index = u64::from_be_bytes(bytes);
                    self.reader
                        .wait_applied(index, std::time::Duration::from_secs(3))
                        .await
                        .map_err(|e| ExtensionError::Refused(e.to_string()))?;
                    Ok(Vec::new())
                }
                crate::images::IMAGE_BYTES => self.images.handle_rpc(body).await,
                VM_METRICS => {
                    let req: VmMetricsRequest = serde_json::from_slice(&body)
                        .map_err(|e| ExtensionError::Refused(format!("bad request: {e}")))?;
                    // Only the hosting node answers, so a caller with a stale idea of the
                    // placement gets an error instead of an empty series.
                    let placed_here = matches!(self.reader.vm(&req.vm_id), Ok(Some(vm)) if vm.node == Some(self.me));
                    if !placed_here {
                        return Err(ExtensionError::Refused(format!(
                            "vm {} is not placed on node {}",
                            req.vm_id, self.me
                        )));
                    }
                    let metrics = self.stats.metrics(&req.vm_id, req.since_ms);
                    serde_json::to_vec(&metrics).map_err(|e| ExtensionError::Refused(e.to_string()))
                }
                crate::liveness::HEARTBEAT => {
                    let hb: crate::liveness::Heartbeat = serde_json::from_slice(&body)
                        .map_err(|e| ExtensionError::Refused(format!("bad heartbeat: {e}")))?;
                    serde_json::to_vec(&self.liveness.handle(hb))
                        .map_err(|e| ExtensionError::Refused(e.to_string()))
                }
                other if other.starts_with("migration.") => match &self.migration {
                    Some(env) => crate::migration::executor::handle(env, other, body).await,
                    None => Err(ExtensionError::UnknownKind(other.to_string())),
                },
                SIMULATE => {
                    let req: api::scheduler::SimulateRequest = serde_json::from_slice(&body)
                        .map_err(|e| ExtensionError::Refused(e.to_string()))?;
                    let result = crate::placement::simulate(&self.reader, self.policy, &req)
                        .map_err(|e| ExtensionError::Refused(e.to_string()))?;
                    serde_json::to_vec(&result).map_err(|e| ExtensionError::Refused(e.to_string()))
                }
                other => Err(ExtensionError::UnknownKind(other.to_string())),
            }
        })
    }

    fn tunnel(
        &self,
        peer: SocketAddr,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> BoxFuture<'static, ()> {
        let me = self.me;
        let reader = self.reader.clone();
        let hv = self.hv.clone();
        let images = self.images.clone();
        let migration = self.migration.clone();
        Box::pin(async move {
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while line.len() < MAX_REQUEST {
                match recv.read(&mut byte).await {
                    Ok(Some(1)) if byte[0] == b'\n' => break,
                    Ok(Some(1)) => line.push(byte[0]),
                    _ => return,
                }
            }
            let text = std::str::from_utf8(&line).unwrap_or_default();
            if let Some(request) = text.strip_prefix("image ") {
                images.serve_fetch(request, send).await;
                return;
            }
            if let Some(source) = text.strip_prefix("migrate ") {
                match (source.trim().parse(), migration) {
                    (Ok(source), Some(env)) => {
                        crate::migration::tunnel::serve_target(env, source, send, recv).await
                    }
                    _ => tracing::warn!(%peer, "refused a migration tunnel"),
                }
                return;
            }
            let Some(vm_id) = text.strip_prefix("console ").map(str::to_string) else {
                tracing::warn!(%peer, "malformed tunnel request");
                return;
            };
            let placed_here = matches!(reader.vm(&vm_id), Ok(Some(vm)) if vm.node == Some(me));
            if !placed_here {
                return;
            }
            let mut stream = match local_console(&hv, &vm_id).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(vm = %vm_id, error = %e, "console unavailable");
                    return;
                }
            };
            while let Some(Ok(chunk)) = stream.next().await {
                if send.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            let _ = send.finish();
        })
    }
}
