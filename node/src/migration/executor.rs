//! The source agent's transfer of a guest to the target (live through libvirt and the tunnel, or
//! a hand-off on hypervisors that cannot migrate), and the target's side of it, answered as
//! extension RPCs: prepare and resume a hand-off, clean up an aborted one, report libvirt's
//! statistics of a completed live migration, and say whether the guest arrived.

use std::time::Instant;

use hypervisor::{Hypervisor, MigrateFlags, MigrateRequest, MigrationReport};
use raft::migration::{Migration, MigrationMode, MigrationPhase, PhaseChange};
use raft::net::ExtensionError;
use raft::Command;

use super::{active, SharedEnv, TUNNEL_PREFIX};

/// Target side: define the arriving VM paused (hand-off). Body: the migration id.
pub const PREPARE: &str = "migration.prepare";
/// Target side: let the handed-off VM run. Body: the migration id.
pub const RESUME: &str = "migration.resume";
/// Target side: remove what a failed hand-off left. Body: the migration id.
pub const ABORT: &str = "migration.abort";
/// Target side: libvirt's statistics of the completed live migration (JSON). Body: the id.
pub const STATS: &str = "migration.stats";
/// Target side: `running`, `paused` or `absent`: where the guest of a migration is.
pub const PROBE: &str = "migration.probe";

/// The outcome of a transfer, before it is committed.
struct Transferred {
    mode: MigrationMode,
    report: MigrationReport,
}

/// Performs the transfer of migration `m` (phase `Migrating`, this node its source) and commits
/// its outcome: `Switching` when the guest runs on the target, `RolledBack` otherwise.
pub async fn run(env: SharedEnv, hv: std::sync::Arc<dyn Hypervisor>, m: Migration) {
    let started = Instant::now();
    let name = hypervisor::spec::domain_name(&m.vm_id);
    let here = matches!(hv.state(&name).await, Ok(Some(s)) if s.is_active());
    let outcome = if !here {
        // A restarted source finds the guest already gone: it either arrived on the target
        // before this node went down, or it was lost; only the target can say which.
        match call(&env, &m, PROBE).await.as_deref() {
            Ok(b"running") => Ok(Transferred {
                mode: if env.live {
                    MigrationMode::Live
                } else {
                    MigrationMode::Handoff
                },
                report: MigrationReport::default(),
            }),
            _ => Err("the guest is not running on the source".to_string()),
        }
    } else if env.live {
        live(&env, hv.as_ref(), &m).await
    } else {
        handoff(&env, hv.as_ref(), &m).await
    };
    let mode_name = |m: MigrationMode| match m {
        MigrationMode::Live => "live",
        MigrationMode::Handoff => "handoff",
    };
    let metrics = &env.metrics;
    match &outcome {
        Ok(t) => {
            let mode = mode_name(t.mode);
            metrics
                .outcomes
                .with_label_values(&["succeeded", mode])
                .inc();
            metrics
                .total_seconds
                .with_label_values(&[mode])
                .observe(t.report.total_ms as f64 / 1000.0);
            if let Some(d) = t.report.downtime_ms {
                metrics
                    .downtime_seconds
                    .with_label_values(&[mode])
                    .observe(d as f64 / 1000.0);
            }
            metrics
                .bytes
                .with_label_values(&[mode])
                .inc_by(t.report.bytes);
        }
        Err(_) => {
            let mode = if env.live { "live" } else { "handoff" };
            metrics.outcomes.with_label_values(&["failed", mode]).inc();
        }
    }
    let change = match outcome {
        Ok(t) => {
            tracing::info!(vm = %m.vm_id, mode = ?t.mode, total_ms = t.report.total_ms,
                downtime_ms = ?t.report.downtime_ms, bytes = t.report.bytes,
                took = ?started.elapsed(), "migration transferred");
            PhaseChange::Switching {
                mode: t.mode,
                total_ms: t.report.total_ms,
                downtime_ms: t.report.downtime_ms,
                bytes: t.report.bytes,
            }
        }
        Err(error) => {
            tracing::warn!(vm = %m.vm_id, %error, "migration failed; the VM stays here");
            PhaseChange::RolledBack { error }
        }
    };
    let cmd = Command::AdvanceMigration {
        id: m.id.clone(),
        from: MigrationPhase::Migrating,
        to: change,
    };
    if let Err(e) = env.commit(cmd).await {
        // The leader's controller finds the migration stuck and probes where the guest is.
        tracing::warn!(vm = %m.vm_id, error = %e, "cannot commit the migration's outcome");
    }
}

async fn live(env: &SharedEnv, hv: &dyn Hypervisor, m: &Migration) -> Result<Transferred, String> {
    let target = m.target.ok_or("no target chosen")?;
    let link = env.dir().join(format!("{TUNNEL_PREFIX}{target}"));
    ensure_symlink(&link)?;
    // libvirt needs a host name in the URI (any name: the command does the connecting) and
    // checks the destination is another host by its UUID.
    let req = MigrateRequest {
        dest_uri: format!(
            "qemu+ext://novacron-node-{target}/system?command={}",
            link.display()
        ),
        flags: MigrateFlags::default(),
        dest_epoch: m.source_epoch + 1,
        dest_owner: env.owner_of(target),
        bandwidth_mib_s: m.bandwidth_mib_s,
    };
    let name = hypervisor::spec::domain_name(&m.vm_id);
    let mut report = hv
        .migrate(&name, &req, None)
        .await
        .map_err(|e| format!("live migration to node {target} failed: {e}"))?;
    // Downtime is only known on the destination, once the job completed there.
    if let Ok(addr) = env.peer_addr(target).await {
        if let Ok(body) = env
            .transport
            .call_extension(addr, STATS, m.id.as_bytes().to_vec())
            .await
        {
            if let Ok(dest) = serde_json::from_slice::<MigrationReport>(&body) {
                report.downtime_ms = dest.downtime_ms;
                report.bytes = report.bytes.max(dest.bytes);
            }
        }
    }
    Ok(Transferred {
        mode: MigrationMode::Live,
        report,
    })
}

fn ensure_symlink(link: &std::path::Path) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find our binary: {e}"))?;
    if let Some(dir) = link.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    if std::fs::read_link(link).ok().as_deref() == Some(exe.as_path()) {
        return Ok(());
    }
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(&exe, link)
        .map_err(|e| format!("cannot link {}: {e}", link.display()))
}

async fn call(env: &SharedEnv, m: &Migration, kind: &str) -> Result<Vec<u8>, String> {
    let target = m.target.ok_or("no target chosen")?;
    let addr = env.peer_addr(target).await?;
    env.transport
        .call_extension(addr, kind, m.id.as_bytes().to_vec())
        .await
        .map_err(|e| format!("node {target}: {e}"))
}

/// Never two running: the target holds a paused copy before the source stops, and resumes only
/// after the source's copy is gone.
async fn handoff(
    env: &SharedEnv,
    hv: &dyn Hypervisor,
    m: &Migration,
) -> Result<Transferred, String> {
    let started = Instant::now();
    call(env, m, PREPARE).await?;
    let name = hypervisor::spec::domain_name(&m.vm_id);
    let stopped = Instant::now();
    let removed = async {
        hv.destroy(&name).await?;
        hv.undefine(&name).await
    }
    .await;
    if let Err(e) = removed {
        let _ = call(env, m, ABORT).await;
        return Err(format!("cannot stop the source copy: {e}"));
    }
    let mut resumed = call(env, m, RESUME).await;
    for _ in 0..5 {
        if resumed.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        resumed = call(env, m, RESUME).await;
    }
    if let Err(e) = resumed {
        // The only copy is on the target now; going forward is the only honest way.
        tracing::warn!(vm = %m.vm_id, error = %e, "target did not resume; its agent will");
    }
    let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Ok(Transferred {
        mode: MigrationMode::Handoff,
        report: MigrationReport {
            total_ms: ms(started.elapsed()),
            downtime_ms: Some(ms(stopped.elapsed())),
            bytes: 0,
        },
    })
}

/// Target side of the extension RPCs above.
pub async fn handle(env: &SharedEnv, kind: &str, body: Vec<u8>) -> Result<Vec<u8>, ExtensionError> {
    let refuse = |m: String| ExtensionError::Refused(m);
    let id = String::from_utf8(body).map_err(|_| refuse("bad migration id".into()))?;
    // The caller acted on a phase its replica applied; give ours the chance to catch up.
    if kind == PREPARE {
        super::caught_up(&env.reader, |ms| {
            ms.iter()
                .any(|m| m.id == id && m.phase == MigrationPhase::Migrating)
        })
        .await;
    }
    let m = active(&env.reader)
        .map_err(|e| refuse(e.to_string()))?
        .into_iter()
        .find(|m| m.id == id);
    let hv = env
        .hv
        .get()
        .ok_or_else(|| refuse("this node's hypervisor is not connected".into()))?;
    let name = |m: &Migration| hypervisor::spec::domain_name(&m.vm_id);
    let ours = |m: &Option<Migration>| -> Result<Migration, ExtensionError> {
        match m {
            Some(m) if m.target == Some(env.me) => Ok(m.clone()),
            _ => Err(refuse(format!(
                "no migration {id} to this node is in progress"
            ))),
        }
    };
    match kind {
        PREPARE => {
            let m = ours(&m)?;
            if m.phase != MigrationPhase::Migrating {
                return Err(refuse("the migration is not migrating".into()));
            }
            let vm = env
                .reader
                .vm(&m.vm_id)
                .map_err(|e| refuse(e.to_string()))?
                .ok_or_else(|| refuse("the VM is gone".into()))?;
            let caps = hv.capabilities().await.map_err(|e| refuse(e.to_string()))?;
            let mut spec =
                crate::agent::build_spec(&vm, &env.owner_of(env.me), caps.domain_type, &env.agent)
                    .map_err(|e| refuse(e.to_string()))?;
            spec.epoch = m.source_epoch + 1;
            hv.define(&spec).await.map_err(|e| refuse(e.to_string()))?;
            match hv.start_paused(&name(&m)).await {
                Ok(()) => Ok(Vec::new()),
                // libvirt's test driver cannot start paused: the copy stays defined and off
                // until the source's copy is gone, which keeps "never two running" all the same.
                Err(hypervisor::HypervisorError::Invalid { message }) => {
                    tracing::debug!(%message, "cannot start paused; the hand-off starts on resume");
                    Ok(Vec::new())
                }
                Err(e) => Err(refuse(e.to_string())),
            }
        }
        RESUME => {
            let m = ours(&m)?;
            match hv
                .state(&name(&m))
                .await
                .map_err(|e| refuse(e.to_string()))?
            {
                Some(hypervisor::DomainState::Paused) => {
                    hv.resume(&name(&m))
                        .await
                        .map_err(|e| refuse(e.to_string()))?;
                    Ok(Vec::new())
                }
                Some(s) if s.is_active() => Ok(Vec::new()),
                Some(_) => {
                    hv.start(&name(&m))
                        .await
                        .map_err(|e| refuse(e.to_string()))?;
                    Ok(Vec::new())
                }
                None => Err(refuse("nothing to resume".into())),
            }
        }
        ABORT => {
            let m = ours(&m)?;
            let _ = hv.destroy(&name(&m)).await;
            let _ = hv.undefine(&name(&m)).await;
            Ok(Vec::new())
        }
        STATS => {
            // Asked by the source right after libvirt's job succeeded, before it commits.
            let m = env
                .reader
                .get::<Migration>(&raft::keys::migration(&id))
                .map_err(|e| refuse(e.to_string()))?
                .filter(|m| m.target == Some(env.me) && m.phase == MigrationPhase::Migrating)
                .ok_or_else(|| refuse(format!("no migration {id} to this node is finishing")))?;
            // libvirt's statistics of the completed job exist once the guest arrived (see
            // `completed_migration`); asking before would find none.
            match hv.state(&name(&m)).await {
                Ok(Some(s)) if s.is_active() => {}
                _ => return Err(refuse("the guest has not arrived".into())),
            }
            let report = hv
                .completed_migration(&name(&m))
                .await
                .map_err(|e| refuse(e.to_string()))?
                .unwrap_or_default();
            serde_json::to_vec(&report).map_err(|e| refuse(e.to_string()))
        }
        PROBE => {
            let m = ours(&m)?;
            let state = hv
                .state(&name(&m))
                .await
                .map_err(|e| refuse(e.to_string()))?;
            let answer = match state {
                Some(hypervisor::DomainState::Paused) => "paused",
                Some(s) if s.is_active() => "running",
                _ => "absent",
            };
            Ok(answer.as_bytes().to_vec())
        }
        other => Err(ExtensionError::UnknownKind(other.to_string())),
    }
}
