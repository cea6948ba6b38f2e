//! The driver of a cross-site move: what each side does at each committed phase of the saga
//! (`raft::site_move`), independent of how commands reach a site's log and how the link
//! carries calls, so the same code runs over Raft and gRPC in the node and over in-memory
//! sites in tests.
//!
//! The source side is driven by [`step`]: one step from the move's committed phase, safe to
//! run again by any node (a new leader, a restarted source node) since every change is a
//! compare-and-set on the phase and every call to the target is idempotent:
//!
//! - `Requested`: ask the VM to stop (`Stopping`).
//! - `Stopping`: once the VM is off, measure its disk (size, sha256) and record it (`Copying`).
//! - `Copying`: begin the import at the target (which chooses the node and reserves quota),
//!   stream the disk to that node (resuming after cuts), have it verified there, then commit
//!   the decision (`Committing`). A link down longer than the timeout, or a target refusing
//!   the import, rolls the move back.
//! - `Committing`: tell the target to import (retried until it says so), then `Done`, which
//!   hands the source's copy to the delete path (the agent removes domain and disk).
//! - `RolledBack`: tell the target to abort (its reservation, staged and placed bytes go).
//!
//! The target side is [`LocalTarget`]: what a site does when a peer asks it to import.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use raft::model::{NodeId, Vm, VmState};
use raft::site_move::{
    DiskDigest, ImportPhase, ImportSettle, MoveChange, MovePhase, SiteImport, SiteMove,
};
use raft::{Command, RejectCode, Response};

use crate::transfer::{self, DiskSink, RetryPolicy, SendOptions, TransferError, TransferSpec};

#[derive(Debug, thiserror::Error)]
pub enum SagaError {
    /// The site's log could not be written or read now (no leader, timeout); retry.
    #[error("site log: {0}")]
    Log(String),
    /// The link to the other site failed; retry.
    #[error("link: {0}")]
    Link(String),
    /// The other site or this one refused, deterministically.
    #[error("refused ({code:?}): {message}")]
    Refused { code: RejectCode, message: String },
    #[error(transparent)]
    Transfer(#[from] TransferError),
    #[error("{0}")]
    Disk(String),
    #[error("move {0} not found")]
    NotFound(String),
}

/// One site's replicated state, as the saga reads and writes it.
#[async_trait]
pub trait SiteLog: Send + Sync {
    /// Proposes `command` and returns its committed outcome.
    async fn write(&self, command: Command) -> Result<Response, SagaError>;
    fn site_move(&self, id: &str) -> Result<Option<SiteMove>, SagaError>;
    fn import(&self, id: &str) -> Result<Option<SiteImport>, SagaError>;
    fn vm(&self, id: &str) -> Result<Option<Vm>, SagaError>;
}

/// Where VM disks are on the nodes of a site.
pub trait DiskLocator: Send + Sync {
    /// The disk file of `vm_id` on `node`, if the VM has one there.
    fn disk_path(&self, node: NodeId, vm_id: &str) -> Option<PathBuf>;
}

/// The target site, as the source reaches it over the link.
#[async_trait]
pub trait TargetSite: Send + Sync {
    /// Begins (or finds, when retried) the import: the target chooses the node that receives
    /// the disk, checks and reserves what the VM needs, and answers the node.
    async fn begin_import(&self, import: SiteImport) -> Result<NodeId, SagaError>;
    async fn import_phase(&self, id: &str) -> Result<Option<ImportPhase>, SagaError>;
    /// Settles the import (idempotent); an abort also drops the bytes received.
    async fn settle(&self, id: &str, vm_id: &str, to: ImportSettle) -> Result<(), SagaError>;
    /// The receiver of the disk on the target's chosen node.
    fn disk_sink(&self, id: &str, node: NodeId) -> Arc<dyn DiskSink>;
}

/// How the source drives a move.
#[derive(Debug, Clone, Default)]
pub struct MoveSettings {
    pub send: SendOptions,
    /// How long the link may fail, during the copy, before the move rolls back.
    pub retry: RetryPolicy,
}

/// What a step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The move advanced to this phase.
    Advanced(MovePhase),
    /// Nothing to do until something else happens (the agent stops the VM, ...).
    Waiting(&'static str),
    /// The move is settled at both sites.
    Settled(MovePhase),
}

fn refused(r: Response) -> Result<(), SagaError> {
    match r {
        Response::Rejected { code, message } => Err(SagaError::Refused { code, message }),
        _ => Ok(()),
    }
}

async fn advance(
    log: &dyn SiteLog,
    id: &str,
    from: MovePhase,
    to: MoveChange,
) -> Result<Progress, SagaError> {
    let phase = to.phase();
    let r = log
        .write(Command::AdvanceSiteMove {
            id: id.to_string(),
            from,
            to,
        })
        .await?;
    match r {
        // Another driver moved it first: the next step starts from what it committed.
        Response::Rejected {
            code: RejectCode::VersionMismatch,
            ..
        } => Ok(Progress::Waiting("another driver advanced the move")),
        other => {
            refused(other)?;
            Ok(Progress::Advanced(phase))
        }
    }
}

/// One step of the source side of move `id`.
pub async fn step(
    log: &dyn SiteLog,
    target: &dyn TargetSite,
    disks: &dyn DiskLocator,
    settings: &MoveSettings,
    id: &str,
) -> Result<Progress, SagaError> {
    let m = log
        .site_move(id)?
        .ok_or_else(|| SagaError::NotFound(id.to_string()))?;
    match m.phase {
        MovePhase::Requested => advance(log, id, m.phase, MoveChange::Stopping).await,
        MovePhase::Stopping => {
            let Some(vm) = log.vm(&m.vm_id)? else {
                return rollback(log, &m, "the VM is gone".into()).await;
            };
            if vm.node.is_some() && vm.state != VmState::Stopped {
                return Ok(Progress::Waiting("the VM is stopping"));
            }
            let disk = match vm.node.and_then(|n| disks.disk_path(n, &vm.id)) {
                Some(path) if path.exists() => {
                    let (size, sha256) = transfer::sha256_file(&path).await?;
                    Some(DiskDigest { size, sha256 })
                }
                _ => None,
            };
            let change = MoveChange::Copying {
                source_node: vm.node,
                disk,
            };
            advance(log, id, m.phase, change).await
        }
        MovePhase::Copying => copy(log, target, disks, settings, &m).await,
        MovePhase::Committing => {
            // Past the decision: only forward. The target cannot refuse (it reserved all at
            // begin), so a failure here is the link's and the next step tries again.
            target
                .settle(&m.id, &m.vm_id, ImportSettle::Imported)
                .await?;
            advance(log, id, m.phase, MoveChange::Done).await
        }
        MovePhase::RolledBack => {
            let reason = m.reason.clone().unwrap_or_default();
            target
                .settle(&m.id, &m.vm_id, ImportSettle::Aborted { reason })
                .await?;
            Ok(Progress::Settled(MovePhase::RolledBack))
        }
        MovePhase::Done => Ok(Progress::Settled(MovePhase::Done)),
    }
}

async fn rollback(log: &dyn SiteLog, m: &SiteMove, reason: String) -> Result<Progress, SagaError> {
    tracing::warn!(site_move = %m.id, vm = %m.vm_id, %reason, "site move rolls back");
    advance(log, &m.id, m.phase, MoveChange::RolledBack { reason }).await
}

async fn copy(
    log: &dyn SiteLog,
    target: &dyn TargetSite,
    disks: &dyn DiskLocator,
    settings: &MoveSettings,
    m: &SiteMove,
) -> Result<Progress, SagaError> {
    let Some(mut vm) = log.vm(&m.vm_id)? else {
        return rollback(log, m, "the VM is gone".into()).await;
    };
    // The VM arrives wanting what it wanted before the move stopped it.
    vm.desired_state = m.previous_desired;
    let import = SiteImport {
        id: m.id.clone(),
        vm_id: m.vm_id.clone(),
        vm: Some(vm),
        source_site: m.source_site.clone(),
        node: 0,
        disk: m.disk.clone(),
        phase: ImportPhase::Importing,
        reason: None,
        created_at: 0,
        updated_at: 0,
    };
    let node = match begin_with_retry(target, import, &settings.retry).await {
        Ok(node) => node,
        Err(SagaError::Refused { message, .. }) => {
            return rollback(log, m, format!("the target site refused: {message}")).await
        }
        Err(SagaError::Link(e)) => {
            return rollback(log, m, format!("the target site is unreachable: {e}")).await
        }
        Err(e) => return Err(e),
    };
    if let Some(disk) = &m.disk {
        let path = m
            .source_node
            .and_then(|n| disks.disk_path(n, &m.vm_id))
            .ok_or_else(|| SagaError::Disk(format!("the disk of VM {} is not here", m.vm_id)))?;
        let spec = TransferSpec {
            id: m.id.clone(),
            size: disk.size,
            sha256: disk.sha256.clone(),
        };
        let sink = target.disk_sink(&m.id, node);
        match transfer::send(&path, &spec, sink.as_ref(), &settings.send, &settings.retry).await {
            Ok(report) => {
                tracing::info!(site_move = %m.id, bytes = report.bytes_sent, attempts = report.attempts, "disk copied");
            }
            Err(
                e @ (TransferError::LinkTimeout { .. } | TransferError::ChecksumMismatch { .. }),
            ) => return rollback(log, m, format!("the disk copy failed: {e}")).await,
            Err(e) => return Err(e.into()),
        }
    }
    advance(
        log,
        &m.id,
        MovePhase::Copying,
        MoveChange::Committing { target_node: node },
    )
    .await
}

async fn begin_with_retry(
    target: &dyn TargetSite,
    import: SiteImport,
    retry: &RetryPolicy,
) -> Result<NodeId, SagaError> {
    let start = tokio::time::Instant::now();
    let mut backoff = retry.backoff;
    loop {
        match target.begin_import(import.clone()).await {
            Err(SagaError::Link(e)) if start.elapsed() < retry.link_timeout => {
                tracing::debug!(error = %e, "target site unreachable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(retry.max_backoff);
            }
            other => return other,
        }
    }
}

/// Drives move `id` until it is settled at both sites, retrying failed steps after `pause`.
/// Used by tests and by a node that drives one move alone; the node's controller calls
/// [`step`] from its own loop instead.
pub async fn drive(
    log: &dyn SiteLog,
    target: &dyn TargetSite,
    disks: &dyn DiskLocator,
    settings: &MoveSettings,
    id: &str,
    pause: Duration,
) -> Result<MovePhase, SagaError> {
    loop {
        match step(log, target, disks, settings, id).await {
            Ok(Progress::Settled(phase)) => return Ok(phase),
            Ok(Progress::Advanced(_)) => {}
            Ok(Progress::Waiting(why)) => {
                tracing::debug!(site_move = %id, why, "waiting");
                tokio::time::sleep(pause).await;
            }
            Err(e @ (SagaError::Log(_) | SagaError::Link(_))) => {
                tracing::debug!(site_move = %id, error = %e, "step failed; retrying");
                tokio::time::sleep(pause).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Chooses the node of this site that receives an imported VM.
pub type ChooseNode = Arc<dyn Fn(&Vm) -> Result<NodeId, SagaError> + Send + Sync>;
/// The disk receiver of a node of this site.
pub type ReceiverOf = Arc<dyn Fn(NodeId) -> Arc<transfer::Receiver> + Send + Sync>;

/// The target side of moves: what a site does when a linked site asks it to import a VM.
pub struct LocalTarget {
    pub log: Arc<dyn SiteLog>,
    /// Chooses the node that receives a VM (the scheduler's choice, or least loaded).
    pub choose_node: ChooseNode,
    /// The disk receiver of each node of this site.
    pub receivers: ReceiverOf,
    /// Where disks live, to remove a placed disk when an import aborts.
    pub disks: Arc<dyn DiskLocator>,
}

impl std::fmt::Debug for LocalTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTarget").finish_non_exhaustive()
    }
}

#[async_trait]
impl TargetSite for LocalTarget {
    async fn begin_import(&self, mut import: SiteImport) -> Result<NodeId, SagaError> {
        if let Some(existing) = self.log.import(&import.id)? {
            if existing.phase == ImportPhase::Importing {
                return Ok(existing.node);
            }
            return Err(SagaError::Refused {
                code: RejectCode::AlreadyExists,
                message: format!("import {} is {:?}", import.id, existing.phase),
            });
        }
        let vm = import
            .vm
            .as_ref()
            .ok_or_else(|| SagaError::Disk("an import carries its VM".into()))?;
        import.node = (self.choose_node)(vm)?;
        let node = import.node;
        refused(self.log.write(Command::BeginSiteImport { import }).await?)?;
        Ok(node)
    }

    async fn import_phase(&self, id: &str) -> Result<Option<ImportPhase>, SagaError> {
        Ok(self.log.import(id)?.map(|i| i.phase))
    }

    async fn settle(&self, id: &str, vm_id: &str, to: ImportSettle) -> Result<(), SagaError> {
        let aborted = matches!(to, ImportSettle::Aborted { .. });
        let before = self.log.import(id)?;
        refused(
            self.log
                .write(Command::SettleSiteImport {
                    id: id.to_string(),
                    vm_id: vm_id.to_string(),
                    to,
                })
                .await?,
        )?;
        if aborted {
            // Nothing of the VM may stay: neither the staged bytes nor a disk already placed.
            if let Some(imp) = before.filter(|i| i.vm.is_some()) {
                let rx = (self.receivers)(imp.node);
                rx.abort(id).await?;
                if let Some(path) = self.disks.disk_path(imp.node, vm_id) {
                    match tokio::fs::remove_file(&path).await {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(SagaError::Disk(format!("{}: {e}", path.display()))),
                    }
                }
            }
        }
        Ok(())
    }

    fn disk_sink(&self, _id: &str, node: NodeId) -> Arc<dyn DiskSink> {
        (self.receivers)(node)
    }
}

#[cfg(test)]
mod tests;
