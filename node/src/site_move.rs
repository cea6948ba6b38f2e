//! Cross-site moves of VMs on a node: the request (`ControlPlane::move_vm`), the runner that
//! drives each move's saga from the committed phase, and the adapters that let the saga of
//! `federation::site_move` write through Raft and find disks in the node's image store.
//!
//! Who drives which step: the node holding the VM's disk (its node while placed) runs
//! `Stopping` and `Copying`, since it measures and streams the disk; the leader runs every
//! other phase (and all of them for a VM that was never placed). Every step is a
//! compare-and-set on the committed phase, so a driver that lost its role (a deposed
//! leader, a node that restarted) at worst loses a race.
//!
//! The target site is reached through a [`Targets`] function: the federation link's client
//! when the site is linked and reachable, [`Unreachable`] otherwise (a move then rolls back
//! once the link timeout has passed, leaving the VM at its source).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::ClusterError;
use async_trait::async_trait;
use federation::site_move::{DiskLocator, MoveSettings, Progress, SagaError, SiteLog, TargetSite};
use federation::transfer::DiskSink;
use raft::federation::{SiteIdentity, SiteLink, LINK_PREFIX};
use raft::model::{DesiredState, NodeId, Operation, OperationState, Vm};
use raft::net::Cluster;
use raft::site_move::{
    ImportPhase, ImportSettle, MovePhase, SiteImport, SiteMove, MOVE_PREFIX, OPERATION_KIND,
};
use raft::store::StateReader;
use raft::{Command, Request, Response};
use tokio::sync::watch;

/// Builds the request that starts moving `vm_id` to the linked site `target` (name or id).
pub fn move_request(
    reader: &StateReader,
    vm_id: &str,
    target: &str,
    actor: &str,
    now: u64,
) -> Result<Request, ClusterError> {
    let internal = |e: raft::store::StoreError| ClusterError::Internal(e.to_string());
    let vm = reader
        .vm(vm_id)
        .map_err(internal)?
        .ok_or_else(|| ClusterError::Invalid(format!("VM {vm_id} not found")))?;
    if vm.image.as_deref().is_some_and(|i| i != "tiny") {
        // The base image is this site's; the target would need it too.
        return Err(ClusterError::Invalid(
            "a VM booting from an uploaded image cannot move between sites yet".into(),
        ));
    }
    let own = own_site(reader)?;
    let link = reader
        .scan::<SiteLink>(LINK_PREFIX, None, usize::MAX)
        .map_err(internal)?
        .into_iter()
        .map(|(_, l)| l)
        .find(|l| l.site.name == target || l.site.id == target)
        .ok_or_else(|| ClusterError::Invalid(format!("site {target:?} is not linked")))?;
    let id = format!("{}-{}", own.id, uuid::Uuid::new_v4());
    let operation = Operation {
        id: id.clone(),
        kind: OPERATION_KIND.to_string(),
        tenant: vm.tenant.clone(),
        target: format!("vm/{}", vm.id),
        state: OperationState::Pending,
        error: None,
        created_at: now,
        updated_at: now,
    };
    let site_move = SiteMove {
        id,
        vm_id: vm.id.clone(),
        tenant: vm.tenant.clone(),
        source_site: own.id,
        target_site: link.site.id,
        phase: MovePhase::Requested,
        // Set by apply from the VM as committed.
        previous_desired: DesiredState::Stopped,
        source_node: None,
        disk: None,
        target_node: None,
        reason: None,
        created_at: now,
        updated_at: now,
    };
    Ok(Request::new(
        now,
        actor,
        Command::RequestSiteMove {
            site_move,
            operation,
        },
    ))
}

/// This site's identity (`default`, derived from the cluster id, when never set).
pub fn own_site(reader: &StateReader) -> Result<SiteIdentity, ClusterError> {
    let internal = |e: raft::store::StoreError| ClusterError::Internal(e.to_string());
    if let Some(site) = reader
        .get::<SiteIdentity>(raft::federation::SITE)
        .map_err(internal)?
    {
        return Ok(site);
    }
    let secrets = reader
        .secrets()
        .map_err(internal)?
        .ok_or_else(|| ClusterError::Internal("the cluster is not initialised".into()))?;
    Ok(SiteIdentity::implicit(&secrets.cluster_id))
}

/// The saga's view of this site: writes through Raft, reads from the local replica.
pub struct RaftSiteLog {
    pub me: NodeId,
    pub cluster: Cluster,
    pub reader: StateReader,
}

fn store_err(e: raft::store::StoreError) -> SagaError {
    SagaError::Log(e.to_string())
}

#[async_trait]
impl SiteLog for RaftSiteLog {
    async fn write(&self, command: Command) -> Result<Response, SagaError> {
        let req = Request::new(api::now_ms(), format!("node:{}", self.me), command);
        self.cluster
            .write(req)
            .await
            .map(|(_, r)| r)
            .map_err(|e| SagaError::Log(e.to_string()))
    }
    fn site_move(&self, id: &str) -> Result<Option<SiteMove>, SagaError> {
        self.reader
            .get(&raft::site_move::move_key(id))
            .map_err(store_err)
    }
    fn import(&self, id: &str) -> Result<Option<SiteImport>, SagaError> {
        self.reader
            .get(&raft::site_move::import_key(id))
            .map_err(store_err)
    }
    fn vm(&self, id: &str) -> Result<Option<Vm>, SagaError> {
        self.reader.vm(id).map_err(store_err)
    }
}

/// VM disks in this node's image store; other nodes' disks are not reachable from here.
pub struct NodeDisks {
    pub me: NodeId,
    pub images: Arc<crate::images::NodeImages>,
}

impl DiskLocator for NodeDisks {
    fn disk_path(&self, node: NodeId, vm_id: &str) -> Option<PathBuf> {
        (node == self.me)
            .then(|| self.images.store.vm_disk_path(vm_id).ok())
            .flatten()
    }
}

/// The target site of a move, by site id.
pub type Targets = Arc<dyn Fn(&str) -> Arc<dyn TargetSite> + Send + Sync>;

/// A site this node has no transport to: every call fails as a link failure would.
#[derive(Debug)]
pub struct Unreachable(pub String);

#[async_trait]
impl TargetSite for Unreachable {
    async fn begin_import(&self, _import: SiteImport) -> Result<NodeId, SagaError> {
        Err(SagaError::Link(format!("no link to site {}", self.0)))
    }
    async fn import_phase(&self, _id: &str) -> Result<Option<ImportPhase>, SagaError> {
        Err(SagaError::Link(format!("no link to site {}", self.0)))
    }
    async fn settle(&self, _id: &str, _vm_id: &str, _to: ImportSettle) -> Result<(), SagaError> {
        Err(SagaError::Link(format!("no link to site {}", self.0)))
    }
    fn disk_sink(&self, _id: &str, _node: NodeId) -> Arc<dyn DiskSink> {
        Arc::new(UnreachableSink(self.0.clone()))
    }
}

struct UnreachableSink(String);

#[async_trait]
impl DiskSink for UnreachableSink {
    async fn offer(
        &self,
        _spec: &federation::transfer::TransferSpec,
    ) -> Result<u64, federation::transfer::TransferError> {
        Err(federation::transfer::TransferError::Link(format!(
            "no link to site {}",
            self.0
        )))
    }
    async fn push(
        &self,
        _chunks: federation::transfer::ChunkStream,
    ) -> Result<u64, federation::transfer::TransferError> {
        Err(federation::transfer::TransferError::Link(format!(
            "no link to site {}",
            self.0
        )))
    }
    async fn commit(
        &self,
        _spec: &federation::transfer::TransferSpec,
    ) -> Result<(), federation::transfer::TransferError> {
        Err(federation::transfer::TransferError::Link(format!(
            "no link to site {}",
            self.0
        )))
    }
}

/// The target sites of moves, over their links; a site not linked (any more) is
/// [`Unreachable`].
pub fn link_targets(reader: StateReader, peers: Arc<federation::client::Peers>) -> Targets {
    Arc::new(move |site: &str| -> Arc<dyn TargetSite> {
        match reader.get::<SiteLink>(&raft::federation::link_key(site)) {
            Ok(Some(link)) => Arc::new(federation::move_rpc::GrpcTarget {
                peers: peers.clone(),
                link,
            }),
            _ => Arc::new(Unreachable(site.to_string())),
        }
    })
}

/// The target side of moves on this node: an import goes to the least-loaded node of the site
/// (which receives the disk and runs the VM; disk calls reaching another node are answered
/// UNAVAILABLE so the caller tries the next address), disks are staged under the image
/// store's `site-moves/` and committed to the VM's disk path.
pub fn move_service(ctl: &crate::control::NodeControl) -> federation::move_rpc::MoveService {
    let me = ctl.id;
    let log = Arc::new(RaftSiteLog {
        me,
        cluster: ctl.cluster.clone(),
        reader: ctl.reader.clone(),
    });
    let images = ctl.images.clone();
    let receiver = {
        let (reader, images) = (ctl.reader.clone(), images.clone());
        Arc::new(federation::transfer::Receiver::new(
            images.store.root().join("site-moves"),
            Arc::new(move |spec: &federation::transfer::TransferSpec| {
                let unknown = || federation::transfer::TransferError::Unknown(spec.id.clone());
                let imp = reader
                    .get::<SiteImport>(&raft::site_move::import_key(&spec.id))
                    .ok()
                    .flatten()
                    .ok_or_else(unknown)?;
                images
                    .store
                    .vm_disk_path(&imp.vm_id)
                    .map_err(|e| federation::transfer::TransferError::Invalid(e.to_string()))
            }),
        ))
    };
    let target = Arc::new(federation::site_move::LocalTarget {
        log,
        choose_node: {
            let reader = ctl.reader.clone();
            Arc::new(move |_vm: &Vm| {
                let nodes = reader.nodes().map_err(store_err)?;
                let vms = reader.vms().map_err(store_err)?;
                Ok(least_loaded(&nodes, &vms).unwrap_or(me))
            })
        },
        receivers: {
            let receiver = receiver.clone();
            Arc::new(move |_node| receiver.clone())
        },
        disks: Arc::new(NodeDisks { me, images }),
    });
    federation::move_rpc::MoveService {
        me,
        reader: ctl.reader.clone(),
        target,
        receiver,
    }
}

/// How moves copy disks, from the node's tuning.
pub fn settings(tuning: &crate::config::Tuning) -> MoveSettings {
    let chunk = 256 * 1024;
    MoveSettings {
        send: federation::transfer::SendOptions {
            // A cap smaller than a chunk would let each chunk out in one burst.
            chunk_size: tuning
                .site_move_bytes_per_sec
                .map_or(chunk, |r| (r as usize / 4).clamp(4096, chunk)),
            rate: tuning.site_move_bytes_per_sec,
            burst: tuning
                .site_move_bytes_per_sec
                .map_or(chunk as u64, |r| (r / 4).clamp(4096, chunk as u64)),
        },
        retry: federation::transfer::RetryPolicy {
            link_timeout: Duration::from_millis(tuning.site_move_link_timeout_ms),
            ..Default::default()
        },
    }
}

/// The node of this site that receives an imported VM: the up, schedulable node with the
/// fewest VMs placed on it (ties to the lowest id), like the HA restart's choice. Its disk
/// calls reach it through the caller's failover between the site's addresses.
pub fn least_loaded(nodes: &[raft::model::NodeRecord], vms: &[Vm]) -> Option<NodeId> {
    nodes
        .iter()
        .filter(|n| !n.removed && n.schedulable && n.state == raft::model::NodeState::Up)
        .min_by_key(|n| (vms.iter().filter(|v| v.node == Some(n.id)).count(), n.id))
        .map(|n| n.id)
}

/// Who drives a move at its current phase: the node with the disk, or the leader.
pub fn driver_of(m: &SiteMove, vm: Option<&Vm>, leader: Option<NodeId>) -> Option<NodeId> {
    match m.phase {
        MovePhase::Stopping | MovePhase::Copying => match vm.and_then(|v| v.node) {
            Some(node) => Some(node),
            None => leader,
        },
        MovePhase::Done => None,
        _ => leader,
    }
}

/// Everything the runner needs.
pub struct Runner {
    pub me: NodeId,
    pub raft: raft::Raft,
    pub log: Arc<RaftSiteLog>,
    pub disks: Arc<dyn DiskLocator>,
    pub targets: Targets,
    pub settings: MoveSettings,
    pub tick: Duration,
}

/// Runs while the process lives: drives every move this node is the driver of.
pub async fn run(runner: Runner, mut shutdown: watch::Receiver<bool>) {
    let runner = Arc::new(runner);
    // Moves with a driver task on this node, and rolled-back moves whose target has confirmed
    // the abort (so they are not told again on every tick).
    let running: Arc<Mutex<BTreeSet<String>>> = Default::default();
    let settled: Arc<Mutex<BTreeSet<String>>> = Default::default();
    let mut interval = tokio::time::interval(runner.tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => return,
        }
        let moves = match runner
            .log
            .reader
            .scan::<SiteMove>(MOVE_PREFIX, None, usize::MAX)
        {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read site moves");
                continue;
            }
        };
        let leader = runner.raft.metrics().borrow().current_leader;
        for (_, m) in moves {
            if m.phase == MovePhase::Done {
                continue;
            }
            if lock(&settled).contains(&m.id) {
                continue;
            }
            let vm = runner.log.reader.vm(&m.vm_id).ok().flatten();
            if driver_of(&m, vm.as_ref(), leader) != Some(runner.me) {
                continue;
            }
            if !lock(&running).insert(m.id.clone()) {
                continue;
            }
            let (runner, running, settled) = (runner.clone(), running.clone(), settled.clone());
            tokio::spawn(async move {
                let id = m.id.clone();
                let target = (runner.targets)(&m.target_site);
                let outcome = federation::site_move::step(
                    runner.log.as_ref(),
                    target.as_ref(),
                    runner.disks.as_ref(),
                    &runner.settings,
                    &id,
                )
                .await;
                match outcome {
                    Ok(Progress::Settled(phase)) => {
                        tracing::info!(site_move = %id, ?phase, "site move settled");
                        lock(&settled).insert(id.clone());
                    }
                    Ok(p) => tracing::debug!(site_move = %id, ?p, "site move step"),
                    // A link that stays down is expected for a while (the copy resumes, or the
                    // move rolls back after its timeout): not worth a warning on every tick.
                    Err(e @ SagaError::Link(_)) => {
                        tracing::debug!(site_move = %id, error = %e, "site move step failed")
                    }
                    Err(e) => tracing::warn!(site_move = %id, error = %e, "site move step failed"),
                }
                lock(&running).remove(&id);
            });
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(phase: MovePhase) -> SiteMove {
        SiteMove {
            id: "m".into(),
            vm_id: "v".into(),
            tenant: "t".into(),
            source_site: "aaaaaa".into(),
            target_site: "bbbbbb".into(),
            phase,
            previous_desired: DesiredState::Running,
            source_node: None,
            disk: None,
            target_node: None,
            reason: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    fn vm(node: Option<NodeId>) -> Vm {
        Vm {
            id: "v".into(),
            name: "v".into(),
            tenant: "t".into(),
            vcpus: 1,
            memory_mib: 64,
            disk_gib: 1,
            image: None,
            labels: Default::default(),
            node,
            desired_state: DesiredState::Stopped,
            state: raft::model::VmState::Stopped,
            ha: false,
            anti_affinity_group: None,
            epoch: 1,
            created_at: 0,
            updated_at: 0,
            version: 1,
            placement: Default::default(),
        }
    }

    #[test]
    fn an_import_goes_to_the_least_loaded_up_schedulable_node() {
        let node = |id: NodeId, up: bool, schedulable: bool| raft::model::NodeRecord {
            id,
            member: Default::default(),
            state: if up {
                raft::model::NodeState::Up
            } else {
                raft::model::NodeState::Down
            },
            schedulable,
            labels: Default::default(),
            joined_at: 0,
            updated_at: 0,
            removed: false,
            capacity: None,
        };
        let nodes = [
            node(1, true, true),
            node(2, true, true),
            node(3, false, true),
            node(4, true, false),
        ];
        let vms = [vm(Some(1)), vm(Some(1)), vm(Some(2))];
        assert_eq!(least_loaded(&nodes, &vms), Some(2));
        assert_eq!(least_loaded(&nodes, &[]), Some(1));
        assert_eq!(least_loaded(&nodes[2..], &[]), None);
    }

    #[test]
    fn the_node_with_the_disk_copies_it_and_the_leader_does_the_rest() {
        let placed = vm(Some(3));
        let unplaced = vm(None);
        for phase in [MovePhase::Stopping, MovePhase::Copying] {
            assert_eq!(driver_of(&m(phase), Some(&placed), Some(1)), Some(3));
            assert_eq!(driver_of(&m(phase), Some(&unplaced), Some(1)), Some(1));
        }
        for phase in [
            MovePhase::Requested,
            MovePhase::Committing,
            MovePhase::RolledBack,
        ] {
            assert_eq!(driver_of(&m(phase), Some(&placed), Some(1)), Some(1));
        }
        assert_eq!(driver_of(&m(MovePhase::Done), Some(&placed), Some(1)), None);
        assert_eq!(driver_of(&m(MovePhase::Requested), None, None), None);
    }
}
