//! Reports this node's capacity to the cluster (`Command::ReportNodeCapacity`): CPUs and memory
//! as the hypervisor sees them, disk as the size of the filesystem that holds the node's data.
//! Written at start and whenever it changes, never when it does not, so the log is not filled
//! with identical reports.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hypervisor::Hypervisor;
use raft::placement::NodeCapacity;
use raft::{Command, Request, Response};
use tokio::sync::watch;

use crate::control::NodeControl;

/// How often the hypervisor is asked again (hot-plugged memory, a resized disk).
const RECHECK: Duration = Duration::from_secs(15);
/// How soon a failed report is retried (no leader yet, the node not registered yet).
const RETRY: Duration = Duration::from_millis(500);

const GIB: u64 = 1024 * 1024 * 1024;

/// What the host can hold now.
pub async fn measure(
    hv: &dyn Hypervisor,
    disk_dir: &std::path::Path,
) -> Result<NodeCapacity, String> {
    let caps = hv.capabilities().await.map_err(|e| e.to_string())?;
    // Unknown disk is reported as such (the scheduler then does not check disk) rather
    // than as zero, which would refuse every VM with a disk.
    let disk_gib = fs2::total_space(disk_dir).ok().map(|b| b / GIB);
    Ok(NodeCapacity {
        vcpus: caps.cpus,
        memory_mib: caps.memory_mib,
        disk_gib,
    })
}

/// Runs until `stop` fires.
pub async fn run(
    ctl: Arc<NodeControl>,
    hv: Arc<dyn Hypervisor>,
    disk_dir: PathBuf,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let wait = match report_once(&ctl, hv.as_ref(), &disk_dir).await {
            Ok(()) => RECHECK,
            Err(e) => {
                tracing::debug!(error = %e, "capacity not reported yet");
                RETRY
            }
        };
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn report_once(
    ctl: &NodeControl,
    hv: &dyn Hypervisor,
    disk_dir: &std::path::Path,
) -> Result<(), String> {
    let capacity = measure(hv, disk_dir).await?;
    let record = ctl.reader.node(ctl.id).map_err(|e| e.to_string())?;
    match record {
        None => return Err("this node is not registered yet".into()),
        Some(r) if r.capacity == Some(capacity) => return Ok(()),
        Some(_) => {}
    }
    let req = Request::new(
        api::now_ms(),
        format!("node:{}", ctl.id),
        Command::ReportNodeCapacity {
            id: ctl.id,
            capacity,
        },
    );
    match ctl.cluster.write(req).await.map_err(|e| e.to_string())? {
        (_, Response::Node(_)) => {
            tracing::info!(?capacity, "capacity reported");
            Ok(())
        }
        (_, other) => Err(format!("capacity report refused: {other:?}")),
    }
}
