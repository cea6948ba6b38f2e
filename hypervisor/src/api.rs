//! The `Hypervisor` trait the node agent programs against, and the plain data it returns.
//! The trait is object safe (`Arc<dyn Hypervisor>`): the libvirt driver implements it, and tests
//! can substitute their own.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::error::HypervisorError;
use crate::migrate::{MigrateRequest, MigrationProgress, MigrationReport};
use crate::spec::{DomainType, VmSpec};

/// What the hypervisor says a domain is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainState {
    Running,
    /// Blocked on a resource; still running as far as the control plane is concerned.
    Blocked,
    Paused,
    /// Being shut down.
    ShuttingDown,
    Shutoff,
    Crashed,
    /// Suspended by guest power management.
    PmSuspended,
    /// The hypervisor did not say.
    NoState,
}

impl DomainState {
    /// Whether a guest process exists (running, blocked, paused, shutting down, suspended).
    pub fn is_active(self) -> bool {
        !matches!(
            self,
            DomainState::Shutoff | DomainState::Crashed | DomainState::NoState
        )
    }
}

/// One domain as listed by the hypervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainInfo {
    pub name: String,
    pub uuid: String,
    pub state: DomainState,
    /// The epoch in our metadata; `None` for domains not defined by us (or by a version that did
    /// not write one).
    pub epoch: Option<u64>,
    /// The owner in our metadata (`<cluster id>/<node id>`), if any.
    pub owner: Option<String>,
}

/// Cumulative counters of one domain, sampled at one instant. Counters only grow while the
/// domain runs; a restart resets them (the sampler must treat a decrease as a reset).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainStats {
    pub cpu_time_ns: u64,
    /// Memory currently assigned to the guest.
    pub memory_bytes: u64,
    pub max_memory_bytes: u64,
    pub vcpus: u32,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

/// What this host can run, as reported to the scheduler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// The domain type VMs on this host are defined with.
    pub domain_type: DomainType,
    /// Why that domain type was chosen, for humans.
    pub reason: String,
    pub cpus: u32,
    pub memory_mib: u64,
}

/// How a `shutdown` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownOutcome {
    /// The domain was not running.
    AlreadyOff,
    /// The guest powered off after the ACPI request.
    Graceful,
    /// The guest ignored the request until the timeout and was destroyed.
    Forced,
}

/// The serial console of a running domain as a stream of byte chunks. It ends when the console
/// closes (domain stopped) and yields an error if reading failed.
pub struct ConsoleStream {
    rx: mpsc::Receiver<Result<Bytes, HypervisorError>>,
}

impl ConsoleStream {
    /// Wraps the receiving end of a pump; the sender side ends the stream by being dropped.
    pub fn new(rx: mpsc::Receiver<Result<Bytes, HypervisorError>>) -> Self {
        ConsoleStream { rx }
    }

    /// The next chunk, or `None` once the console is closed.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, HypervisorError>> {
        self.rx.recv().await
    }
}

impl futures::Stream for ConsoleStream {
    type Item = Result<Bytes, HypervisorError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// The operations the node agent performs on its local hypervisor. All take domain names
/// (`nc-<vm id>`); all are safe to call concurrently.
#[async_trait::async_trait]
pub trait Hypervisor: Send + Sync {
    /// Defines (or redefines, for the same name and UUID) a persistent domain from `spec`.
    async fn define(&self, spec: &VmSpec) -> Result<(), HypervisorError>;
    /// Starts a defined domain; a domain that is already active is left as it is.
    async fn start(&self, name: &str) -> Result<(), HypervisorError>;
    /// Asks the guest to power off (ACPI), and destroys it if it is still up after `timeout`.
    async fn shutdown(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<ShutdownOutcome, HypervisorError>;
    /// Stops a domain at once; a domain that is not active is left as it is.
    async fn destroy(&self, name: &str) -> Result<(), HypervisorError>;
    /// Asks the guest to reboot.
    async fn reboot(&self, name: &str) -> Result<(), HypervisorError>;
    /// Pauses the vCPUs of a running domain.
    async fn pause(&self, name: &str) -> Result<(), HypervisorError>;
    /// Resumes a paused domain.
    async fn resume(&self, name: &str) -> Result<(), HypervisorError>;
    /// Removes the definition, with its managed save image and NVRAM. Stop the domain first:
    /// an active transient leftover would keep running.
    async fn undefine(&self, name: &str) -> Result<(), HypervisorError>;
    /// Every domain on this host, ours and others (see `spec::vm_id_of`).
    async fn list(&self) -> Result<Vec<DomainInfo>, HypervisorError>;
    /// The state of one domain, `None` if it does not exist.
    async fn state(&self, name: &str) -> Result<Option<DomainState>, HypervisorError>;
    /// Cumulative counters of one domain.
    async fn stats(&self, name: &str) -> Result<DomainStats, HypervisorError>;
    /// What this host runs VMs with.
    async fn capabilities(&self) -> Result<Capabilities, HypervisorError>;
    /// The serial console of a running domain.
    async fn console(&self, name: &str) -> Result<ConsoleStream, HypervisorError>;
    /// Migrates a running domain to another host as `req` says, returning once libvirt's job
    /// ended. While it runs, the job's progress is sent on `progress` (if given). On failure
    /// libvirt leaves the domain running here and nothing on the destination.
    async fn migrate(
        &self,
        name: &str,
        req: &MigrateRequest,
        progress: Option<tokio::sync::watch::Sender<MigrationProgress>>,
    ) -> Result<MigrationReport, HypervisorError>;
    /// On the destination of a finished migration: libvirt's statistics of the completed job
    /// (downtime, total time, bytes), `None` when it kept none.
    async fn completed_migration(
        &self,
        name: &str,
    ) -> Result<Option<MigrationReport>, HypervisorError>;
    /// Starts a defined domain with its vCPUs paused (the receiving half of a hand-off between
    /// hosts that cannot migrate live); `resume` lets it run.
    async fn start_paused(&self, name: &str) -> Result<(), HypervisorError>;
}
