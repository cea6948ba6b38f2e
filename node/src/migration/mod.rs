//! Live migration on the node side: the tunnel that carries libvirt's migration stream over the
//! cluster's QUIC connections (`tunnel`), the source agent's transfer of a guest and the target's
//! answers (`executor`), and the leader's controller that drives every migration's phases
//! through Raft, including drains (`controller`).
//!
//! The replicated state machine itself (phases, compare-and-set, the owner switch) lives in
//! `raft::migration`; nothing here decides a phase without committing it first.

pub mod controller;
pub mod executor;
pub mod metrics;
pub mod tunnel;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use raft::migration::Migration;
use raft::model::NodeId;
use raft::net::{Cluster, Transport};
use raft::store::{StateReader, StoreError};
use raft::{keys, Command, Request, Response};

use crate::agent::AgentConfig;
use crate::console::SharedHypervisor;

/// The name under which libvirt runs our binary as its `qemu+ext` transport: one symlink per
/// target node, the node id after the prefix (libvirt passes the command no arguments).
pub const TUNNEL_PREFIX: &str = "novacron-tunnel-";
/// The sub-directory of the data dir holding the symlinks and the local tunnel socket.
pub const DIR: &str = "migration";
/// The local socket the tunnel command connects to (in [`DIR`]).
pub const SOCKET: &str = "tunnel.sock";

/// Everything a node needs to take part in migrations, as source or as target.
pub struct MigrationEnv {
    pub me: NodeId,
    pub cluster_id: String,
    pub data_dir: PathBuf,
    pub reader: StateReader,
    pub transport: Transport,
    pub cluster: Cluster,
    pub hv: SharedHypervisor,
    pub agent: AgentConfig,
    /// Whether this node's libvirt migrates live (a real hypervisor) or only hands off (the
    /// test driver, which cannot migrate).
    pub live: bool,
    /// The local libvirtd's socket, where incoming migration tunnels are spliced.
    pub libvirt_socket: PathBuf,
    pub metrics: metrics::MigrationMetrics,
}

impl MigrationEnv {
    /// The owner string written in the domains of node `id`.
    pub fn owner_of(&self, id: NodeId) -> String {
        format!("{}/{id}", self.cluster_id)
    }

    pub fn dir(&self) -> PathBuf {
        self.data_dir.join(DIR)
    }

    /// Commits `command` as this node, retrying through leader changes for up to `attempts`.
    pub async fn commit(&self, command: Command) -> Result<Response, String> {
        let mut last = String::new();
        for attempt in 0..20u32 {
            let req = Request::new(api::now_ms(), format!("node:{}", self.me), command.clone());
            match self.cluster.write(req).await {
                Ok((_, r)) => return Ok(r),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(std::time::Duration::from_millis(
                200 * u64::from(attempt + 1),
            ))
            .await;
        }
        Err(last)
    }

    /// The QUIC address of node `id`, from the replica.
    pub async fn peer_addr(&self, id: NodeId) -> Result<std::net::SocketAddr, String> {
        let rec = self
            .reader
            .node(id)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("node {id} is unknown"))?;
        Transport::resolve(&rec.member.peer_addr)
            .await
            .map_err(|e| e.to_string())
    }
}

pub type SharedEnv = Arc<MigrationEnv>;

/// The migrations in progress (not done, not rolled back), from the local replica.
pub fn active(reader: &StateReader) -> Result<Vec<Migration>, StoreError> {
    let mut out = Vec::new();
    for (_, id) in reader.scan::<String>(b"g/v/", None, usize::MAX)? {
        if let Some(m) = reader.get::<Migration>(&keys::migration(&id))? {
            if !m.phase.is_terminal() {
                out.push(m);
            }
        }
    }
    Ok(out)
}

/// How long a node waits for its replica to catch up with a phase another node already acted
/// on (the source applied `Migrating` and calls the target, whose replica may lag behind).
pub const CATCH_UP: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits until `cond` holds on the local replica, re-checking after every applied entry, for at
/// most [`CATCH_UP`].
pub async fn caught_up(reader: &StateReader, mut cond: impl FnMut(&[Migration]) -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + CATCH_UP;
    let mut applied = reader.applied_watch();
    loop {
        if active(reader).is_ok_and(|ms| cond(&ms)) {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return false,
            r = applied.changed() => if r.is_err() { return false },
        }
    }
}

/// The libvirt socket a `qemu:///system` (or `qemu+unix:///system?socket=...`) URI reaches.
pub fn libvirt_socket_of(uri: &str) -> PathBuf {
    uri.split_once("socket=")
        .map(|(_, s)| PathBuf::from(s.split('&').next().unwrap_or(s)))
        .unwrap_or_else(|| Path::new("/run/libvirt/libvirt-sock").to_path_buf())
}
