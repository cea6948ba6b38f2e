//! `LibvirtHypervisor`: the `Hypervisor` trait on libvirt through the `virt` crate.
//!
//! libvirt's API blocks, so every call runs on tokio's blocking pool (`spawn_blocking`), and the
//! console is pumped by a dedicated thread. One connection is cached and shared; when a call
//! fails because the connection is gone (libvirtd restarted), the cache is dropped and the next
//! call opens a new one, so callers only ever see one `Unavailable` per outage.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::stream::Stream;

use crate::api::{
    Capabilities, ConsoleStream, DomainInfo, DomainState, DomainStats, Hypervisor, ShutdownOutcome,
};
use crate::error::HypervisorError;
use crate::migrate::{with_metadata, MigrateRequest, MigrationProgress, MigrationReport};
use crate::spec::{DomainType, VmSpec};
use crate::xml::{device_targets, domain_xml, parse_epoch, parse_owner, METADATA_NAMESPACE};

/// How often a running migration's progress is polled.
const MIGRATION_POLL: Duration = Duration::from_millis(250);
/// How often `shutdown` looks whether the guest has powered off.
const SHUTDOWN_POLL: Duration = Duration::from_millis(100);
/// Console chunks buffered before the pump waits for the reader.
const CONSOLE_BUFFER: usize = 64;

/// Where and how to reach libvirt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtConfig {
    /// `qemu:///system` in production, `test:///default` in fast tests.
    pub uri: String,
    /// Skip detection and define every domain with this type (this machine's `/dev/kvm` exists
    /// but hangs Linux guests, so detection alone would pick wrongly).
    pub force_domain_type: Option<DomainType>,
    /// The KVM device that must be openable for `kvm` to be chosen.
    pub kvm_device: PathBuf,
}

impl LibvirtConfig {
    /// A configuration with detection on and the usual KVM device.
    pub fn new(uri: impl Into<String>) -> Self {
        LibvirtConfig {
            uri: uri.into(),
            force_domain_type: None,
            kvm_device: PathBuf::from("/dev/kvm"),
        }
    }
}

struct Inner {
    config: LibvirtConfig,
    conn: Mutex<Option<Connect>>,
}

impl Inner {
    /// The cached connection if it is still alive, else a new one.
    fn connection(&self) -> Result<Connect, HypervisorError> {
        // A panic while holding this lock cannot leave the Option half-written.
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(conn) = guard.as_ref() {
            if conn.is_alive().unwrap_or(false) {
                return Ok(conn.clone());
            }
            tracing::warn!(uri = %self.config.uri, "libvirt connection lost; reconnecting");
        }
        *guard = None;
        let conn =
            Connect::open(Some(&self.config.uri)).map_err(|e| HypervisorError::Unavailable {
                message: format!("cannot open {}: {}", self.config.uri, e.message()),
            })?;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    fn invalidate(&self) {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        *guard = None;
    }
}

/// The libvirt driver. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct LibvirtHypervisor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LibvirtHypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtHypervisor")
            .field("config", &self.inner.config)
            .finish()
    }
}

static SILENCE_LIBVIRT: Once = Once::new();

impl LibvirtHypervisor {
    /// Connects to `uri` with domain-type detection on.
    pub async fn connect(uri: &str) -> Result<Self, HypervisorError> {
        Self::connect_with(LibvirtConfig::new(uri)).await
    }

    /// Connects with a full configuration. The connection is opened here so a wrong URI fails
    /// at start-up rather than on the first VM.
    pub async fn connect_with(config: LibvirtConfig) -> Result<Self, HypervisorError> {
        // libvirt's default handler prints every error to stderr, including the expected ones
        // (a lookup of a missing domain); we report errors through our own types instead.
        SILENCE_LIBVIRT.call_once(virt::error::clear_error_callback);
        let hv = LibvirtHypervisor {
            inner: Arc::new(Inner {
                config,
                conn: Mutex::new(None),
            }),
        };
        hv.with_conn(|_| Ok(())).await?;
        Ok(hv)
    }

    /// The configuration this driver was built with.
    pub fn config(&self) -> &LibvirtConfig {
        &self.inner.config
    }

    /// Runs `f` with a live connection on the blocking pool, dropping the connection if `f`
    /// reports it unusable.
    async fn with_conn<T, F>(&self, f: F) -> Result<T, HypervisorError>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> Result<T, HypervisorError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let conn = inner.connection()?;
            let result = f(&conn);
            if matches!(&result, Err(e) if e.is_unavailable()) {
                inner.invalidate();
            }
            result
        })
        .await
        .map_err(|e| HypervisorError::Unavailable {
            message: format!("libvirt worker task failed: {e}"),
        })?
    }

    /// Runs `f` on the named domain.
    async fn with_domain<T, F>(&self, name: &str, f: F) -> Result<T, HypervisorError>
    where
        T: Send + 'static,
        F: FnOnce(&Domain) -> Result<T, HypervisorError> + Send + 'static,
    {
        let name = name.to_string();
        self.with_conn(move |conn| {
            let dom = conn.lookup_domain_by_name(&name)?;
            f(&dom)
        })
        .await
    }
}

fn map_state(state: virt::domain::DomainStateEnum) -> DomainState {
    use virt::domain::DomainState as S;
    match state {
        virt::enumutil::Enum::Known(s) => match s {
            S::NoState => DomainState::NoState,
            S::Running => DomainState::Running,
            S::Blocked => DomainState::Blocked,
            S::Paused => DomainState::Paused,
            S::Shutdown => DomainState::ShuttingDown,
            S::Shutoff => DomainState::Shutoff,
            S::Crashed => DomainState::Crashed,
            S::PMSuspended => DomainState::PmSuspended,
        },
        virt::enumutil::Enum::Unknown(_) => DomainState::NoState,
    }
}

fn domain_state(dom: &Domain) -> Result<DomainState, HypervisorError> {
    let (state, _reason) = dom.state()?;
    Ok(map_state(state))
}

/// The epoch and owner in our metadata element; `None`s when the domain has none.
fn domain_metadata(dom: &Domain) -> Result<(Option<u64>, Option<String>), HypervisorError> {
    match dom.metadata(
        virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
        Some(METADATA_NAMESPACE),
        0,
    ) {
        Ok(xml) => Ok((parse_epoch(&xml), parse_owner(&xml))),
        Err(e)
            if e.code()
                == virt::enumutil::Enum::Known(virt::error::ErrorNumber::NoDomainMetadata) =>
        {
            Ok((None, None))
        }
        Err(e) => Err(e.into()),
    }
}

/// Picks kvm only when the device opens for read and write AND libvirt offers kvm domains.
fn detect_domain_type(conn: &Connect, config: &LibvirtConfig) -> (DomainType, String) {
    if let Some(forced) = config.force_domain_type {
        return (
            forced,
            format!("domain type {} forced by configuration", forced.as_str()),
        );
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&config.kvm_device)
    {
        return (
            DomainType::Qemu,
            format!(
                "{} is not usable ({e}); using emulation (TCG)",
                config.kvm_device.display()
            ),
        );
    }
    match conn.domain_capabilities(None, Some("x86_64"), None, Some("kvm"), 0) {
        Ok(xml) if xml.contains("<domain>kvm</domain>") => (
            DomainType::Kvm,
            format!(
                "{} is usable and libvirt offers kvm domains",
                config.kvm_device.display()
            ),
        ),
        Ok(_) => (
            DomainType::Qemu,
            "libvirt's domain capabilities do not offer kvm; using emulation (TCG)".to_string(),
        ),
        Err(e) => (
            DomainType::Qemu,
            format!(
                "libvirt offers no kvm domains ({}); using emulation (TCG)",
                e.message()
            ),
        ),
    }
}

/// libvirt reports -1 for counters a driver does not keep.
fn counter(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[async_trait::async_trait]
impl Hypervisor for LibvirtHypervisor {
    async fn define(&self, spec: &VmSpec) -> Result<(), HypervisorError> {
        spec.validate()?;
        let xml = domain_xml(spec);
        let name = spec.domain_name();
        let uuid = spec.uuid.hyphenated().to_string();
        self.with_conn(move |conn| {
            // libvirt reports a clash of name or UUID as a generic "operation failed"; look first
            // so the caller gets a typed answer. Same name and UUID is a redefinition: allowed.
            let clash = |found: Result<Domain, virt::error::Error>| -> Result<(), HypervisorError> {
                match found {
                    Ok(existing) => {
                        let (ename, euuid) = (existing.name()?, existing.uuid_string()?);
                        if ename != name || euuid != uuid {
                            return Err(HypervisorError::AlreadyExists {
                                message: format!("domain {ename} has uuid {euuid}"),
                            });
                        }
                        Ok(())
                    }
                    Err(e) => match HypervisorError::from(e) {
                        HypervisorError::NotFound { .. } => Ok(()),
                        other => Err(other),
                    },
                }
            };
            clash(conn.lookup_domain_by_name(&name))?;
            clash(conn.lookup_domain_by_uuid_string(&uuid))?;
            conn.define_domain_xml(&xml)?;
            Ok(())
        })
        .await
    }

    async fn start(&self, name: &str) -> Result<(), HypervisorError> {
        self.with_domain(name, |dom| {
            if dom.is_active()? {
                return Ok(());
            }
            dom.create()?;
            Ok(())
        })
        .await
    }

    async fn shutdown(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<ShutdownOutcome, HypervisorError> {
        let requested = self
            .with_domain(name, |dom| {
                if !dom.is_active()? {
                    return Ok(false);
                }
                dom.shutdown()?;
                Ok(true)
            })
            .await?;
        if !requested {
            return Ok(ShutdownOutcome::AlreadyOff);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.state(name).await? {
                None => return Ok(ShutdownOutcome::Graceful),
                Some(state) if !state.is_active() => return Ok(ShutdownOutcome::Graceful),
                Some(_) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(SHUTDOWN_POLL).await;
        }
        tracing::info!(
            domain = name,
            ?timeout,
            "guest ignored shutdown; destroying"
        );
        self.destroy(name).await?;
        Ok(ShutdownOutcome::Forced)
    }

    async fn destroy(&self, name: &str) -> Result<(), HypervisorError> {
        self.with_domain(name, |dom| {
            if !dom.is_active()? {
                return Ok(());
            }
            match dom.destroy() {
                Ok(()) => Ok(()),
                // It may have stopped by itself between the check and the call.
                Err(e) if !dom.is_active().unwrap_or(true) => {
                    tracing::debug!(error = %e, "domain stopped before destroy");
                    Ok(())
                }
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    async fn reboot(&self, name: &str) -> Result<(), HypervisorError> {
        self.with_domain(name, |dom| Ok(dom.reboot(0)?)).await
    }

    async fn pause(&self, name: &str) -> Result<(), HypervisorError> {
        self.with_domain(name, |dom| Ok(dom.suspend()?)).await
    }

    async fn resume(&self, name: &str) -> Result<(), HypervisorError> {
        self.with_domain(name, |dom| Ok(dom.resume()?)).await
    }

    async fn undefine(&self, name: &str) -> Result<(), HypervisorError> {
        self.with_domain(name, |dom| {
            use virt::sys;
            let full = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                | sys::VIR_DOMAIN_UNDEFINE_NVRAM;
            match dom.undefine_flags(full) {
                Ok(()) => Ok(()),
                // Drivers without NVRAM or checkpoints (the test driver) reject those flags as
                // unsupported; there is then nothing of that kind to remove.
                Err(e)
                    if e.code()
                        == virt::enumutil::Enum::Known(virt::error::ErrorNumber::InvalidArg) =>
                {
                    dom.undefine_flags(
                        sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                            | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA,
                    )?;
                    Ok(())
                }
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    async fn list(&self) -> Result<Vec<DomainInfo>, HypervisorError> {
        self.with_conn(|conn| {
            let mut out = Vec::new();
            for dom in conn.list_all_domains(0)? {
                let info = (|| -> Result<DomainInfo, HypervisorError> {
                    let (epoch, owner) = domain_metadata(&dom)?;
                    Ok(DomainInfo {
                        name: dom.name()?,
                        uuid: dom.uuid_string()?,
                        state: domain_state(&dom)?,
                        epoch,
                        owner,
                    })
                })();
                match info {
                    Ok(info) => out.push(info),
                    // Undefined between listing and asking: it is simply not there any more.
                    Err(HypervisorError::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })
        .await
    }

    async fn state(&self, name: &str) -> Result<Option<DomainState>, HypervisorError> {
        match self.with_domain(name, domain_state).await {
            Ok(state) => Ok(Some(state)),
            Err(HypervisorError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn stats(&self, name: &str) -> Result<DomainStats, HypervisorError> {
        self.with_domain(name, |dom| {
            let info = dom.info()?;
            let mut stats = DomainStats {
                cpu_time_ns: info.cpu_time,
                memory_bytes: info.memory.saturating_mul(1024),
                max_memory_bytes: info.max_mem.saturating_mul(1024),
                vcpus: info.nr_virt_cpu,
                ..DomainStats::default()
            };
            // Device counters exist only while the domain runs.
            if !dom.is_active()? {
                return Ok(stats);
            }
            let (disks, nics) = device_targets(&dom.xml_desc(0)?);
            for disk in disks {
                let b = dom.block_stats(&disk)?;
                stats.disk_read_bytes += counter(b.rd_bytes);
                stats.disk_write_bytes += counter(b.wr_bytes);
            }
            for nic in nics {
                let n = dom.interface_stats(&nic)?;
                stats.net_rx_bytes += counter(n.rx_bytes);
                stats.net_tx_bytes += counter(n.tx_bytes);
            }
            Ok(stats)
        })
        .await
    }

    async fn capabilities(&self) -> Result<Capabilities, HypervisorError> {
        let config = self.inner.config.clone();
        self.with_conn(move |conn| {
            let node = conn.node_info()?;
            let (domain_type, reason) = detect_domain_type(conn, &config);
            Ok(Capabilities {
                domain_type,
                reason,
                cpus: node.cpus,
                memory_mib: node.memory / 1024,
            })
        })
        .await
    }

    async fn console(&self, name: &str) -> Result<ConsoleStream, HypervisorError> {
        let name = name.to_string();
        let (tx, rx) = mpsc::channel(CONSOLE_BUFFER);
        let stream = self
            .with_conn(move |conn| {
                let dom = conn.lookup_domain_by_name(&name)?;
                let stream = Stream::new(conn, 0)?;
                // FORCE takes the console over from a previous reader that went away without
                // closing (a dropped WebSocket), instead of failing until libvirt notices.
                dom.open_console(None, &stream, virt::sys::VIR_DOMAIN_CONSOLE_FORCE)?;
                Ok(stream)
            })
            .await?;
        std::thread::Builder::new()
            .name("console-pump".into())
            .spawn(move || pump_console(stream, tx))
            .map_err(|e| HypervisorError::Unavailable {
                message: format!("cannot start console thread: {e}"),
            })?;
        Ok(ConsoleStream::new(rx))
    }

    async fn migrate(
        &self,
        name: &str,
        req: &MigrateRequest,
        progress: Option<tokio::sync::watch::Sender<MigrationProgress>>,
    ) -> Result<MigrationReport, HypervisorError> {
        let req = req.clone();
        let started = std::time::Instant::now();
        // The job blocks its thread for the whole migration; the poller below asks libvirt for
        // the job's statistics on the same (thread-safe) connection meanwhile.
        let job = self.with_domain(name, move |dom| {
            let xml = dom.xml_desc(virt::sys::VIR_DOMAIN_XML_MIGRATABLE)?;
            let dest_xml =
                with_metadata(&xml, req.dest_epoch, &req.dest_owner).ok_or_else(|| {
                    HypervisorError::invalid(
                        "the domain carries no NovaCron metadata; not migrating it",
                    )
                })?;
            let params = virt::domain::MigrateParameters {
                dest_xml: Some(dest_xml.clone()),
                persist_xml: Some(dest_xml),
                bandwidth: req.bandwidth_mib_s,
                ..Default::default()
            };
            dom.migrate_to_uri3(Some(&req.dest_uri), params, req.flags.bits())?;
            Ok(())
        });
        tokio::pin!(job);
        let mut last = MigrationProgress::default();
        let mut tick = tokio::time::interval(MIGRATION_POLL);
        let outcome = loop {
            tokio::select! {
                r = &mut job => break r,
                _ = tick.tick() => {
                    if let Ok(Some(p)) = self.with_domain(name, |dom| Ok(job_progress(dom))).await {
                        last = p;
                        if let Some(tx) = &progress {
                            let _ = tx.send(p);
                        }
                    }
                }
            }
        };
        outcome?;
        Ok(MigrationReport {
            total_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            downtime_ms: None,
            bytes: last.data_processed,
        })
    }

    async fn completed_migration(
        &self,
        name: &str,
    ) -> Result<Option<MigrationReport>, HypervisorError> {
        self.with_domain(name, |dom| {
            // virt 0.5's `job_stats` is only sound when libvirt returns at least one parameter
            // (it builds a Vec from the returned pointer, null when there are none), so it is
            // called only here, on the destination of a migration that just succeeded, where
            // libvirt keeps the completed job's statistics; KEEP_COMPLETED keeps them for a
            // repeated question. Progress uses the always-sound `job_info`.
            let stats = dom.job_stats(
                virt::sys::VIR_DOMAIN_JOB_STATS_COMPLETED
                    | virt::sys::VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED,
            )?;
            if stats.time_elapsed.is_none() && stats.downtime.is_none() {
                return Ok(None);
            }
            Ok(Some(MigrationReport {
                total_ms: stats.time_elapsed.unwrap_or(0),
                downtime_ms: stats.downtime,
                bytes: stats.data_processed.unwrap_or(0),
            }))
        })
        .await
    }

    async fn start_paused(&self, name: &str) -> Result<(), HypervisorError> {
        self.with_domain(name, |dom| {
            if dom.is_active()? {
                return Ok(());
            }
            dom.create_with_flags(virt::sys::VIR_DOMAIN_START_PAUSED)?;
            Ok(())
        })
        .await
    }
}

/// The progress of the domain's current job, `None` when no job runs (not started yet, or over).
fn job_progress(dom: &Domain) -> Option<MigrationProgress> {
    let stats = dom.job_info().ok()?;
    if stats.r#type == virt::sys::VIR_DOMAIN_JOB_NONE as i32 {
        return None;
    }
    Some(MigrationProgress {
        elapsed_ms: stats.time_elapsed.unwrap_or(0),
        data_processed: stats.data_processed.unwrap_or(0),
        data_remaining: stats.data_remaining.unwrap_or(0),
        data_total: stats.data_total.unwrap_or(0),
    })
}

/// Copies the console stream into the channel until either side closes. The blocking `recv`
/// returns when the guest writes or the domain stops; a reader that went away is noticed at the
/// next chunk.
fn pump_console(stream: Stream, tx: mpsc::Sender<Result<Bytes, HypervisorError>>) {
    let mut buf = vec![0u8; 4096];
    loop {
        match stream.recv(&mut buf) {
            Ok(n) if n > 0 => {
                let n = usize::try_from(n).unwrap_or(0).min(buf.len());
                if tx
                    .blocking_send(Ok(Bytes::copy_from_slice(&buf[..n])))
                    .is_err()
                {
                    let _ = stream.abort();
                    return;
                }
            }
            Ok(_) => {
                let _ = stream.finish();
                return;
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(e.into()));
                let _ = stream.abort();
                return;
            }
        }
    }
}
