//! The node agent: a level-triggered loop that makes the local hypervisor match the VMs the
//! replica assigns to this node, and reports what it observes back through Raft (only changes).
//!
//! Each pass reads the local replica and the hypervisor afresh, so a missed event, a libvirtd
//! restart or a VM changed behind our back is corrected on the next pass. The decision itself
//! is the pure [`plan::plan`], which takes this node's fencing lease as an input.
//!
//! Reports to the cluster are bounded by the lease: a pass stuck on a write while the node is
//! partitioned ends by the time the lease does, so the next pass fences on time.

pub mod plan;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypervisor::{DirectBoot, DomainType, Hypervisor, VmSpec};
use raft::model::{NodeId, Operation, OperationState, Vm, VmState};
use raft::net::Cluster;
use raft::store::StateReader;
use raft::{keys, Command, Request, Response};
use tokio::sync::watch;

use plan::Action;

use crate::liveness::{Capacity, LeaseStatus, Liveness, ObservedDomain};
/// The libvirt UUID of a VM's domain: its id, without the home-site prefix ids made since
/// federation carry (`<site id>-<uuid>`; a VM moved between sites keeps it).
pub fn domain_uuid(vm_id: &str) -> Result<uuid::Uuid, AgentError> {
    uuid::Uuid::parse_str(raft::federation::uuid_part(vm_id))
        .map_err(|_| AgentError::BadId(vm_id.to_string()))
}

/// The domain spec of `vm` as node `owner` defines it.
pub fn build_spec(
    vm: &Vm,
    owner: &str,
    domain_type: DomainType,
    config: &AgentConfig,
) -> Result<VmSpec, AgentError> {
    let uuid = domain_uuid(&vm.id)?;
    let boot = match (&vm.image, &config.guest_kernel) {
        (Some(img), Some(kernel)) if img == "tiny" => Some(DirectBoot {
            kernel: kernel.clone(),
            initrd: config.guest_initrd.clone(),
            cmdline: Some("console=ttyS0 panic=-1".into()),
        }),
        _ => None,
    };
    Ok(VmSpec {
        vm_id: vm.id.clone(),
        uuid,
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        domain_type,
        boot,
        disks: vec![],
        nics: vec![],
        serial_console: true,
        epoch: vm.epoch,
        owner: owner.to_string(),
    })
}

/// How this node runs guests.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Direct-boot kernel and initrd for VMs whose image is `tiny` (the test guest).
    pub guest_kernel: Option<PathBuf>,
    pub guest_initrd: Option<PathBuf>,
    /// Longest wait for a guest to power off before it is destroyed.
    pub shutdown_timeout: Duration,
    /// Pass interval when nothing changes in the replica.
    pub resync: Duration,
    /// Where VMs booting from an uploaded image get it (fetched from another node if needed)
    /// and their copy-on-write root disk.
    pub images: Option<Arc<crate::images::NodeImages>>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            guest_kernel: None,
            guest_initrd: None,
            shutdown_timeout: Duration::from_secs(30),
            resync: Duration::from_secs(2),
            images: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::HypervisorError),
    #[error(transparent)]
    Store(#[from] raft::store::StoreError),
    #[error("cannot report to the cluster: {0}")]
    Report(String),
    #[error("VM {0} has an invalid id")]
    BadId(String),
    #[error(transparent)]
    Image(#[from] crate::images::FetchError),
    #[error(transparent)]
    ImageStore(#[from] hypervisor::ImageError),
    #[error("report not committed within {0:?}")]
    ReportTimeout(Duration),
}

pub struct Agent {
    pub me: NodeId,
    /// `<cluster id>/<node id>`, written into every domain this agent defines.
    pub owner: String,
    pub hv: Arc<dyn Hypervisor>,
    pub reader: StateReader,
    pub cluster: Cluster,
    pub config: AgentConfig,
    /// This node's lease and the published view of its domains.
    pub liveness: Arc<Liveness>,
    /// Highest epoch acted on per VM (fencing against a lagging replica).
    acted: BTreeMap<String, u64>,
    domain_type: Option<DomainType>,
    migration: Option<crate::migration::SharedEnv>,
    /// Migrations whose transfer this agent is running (by migration id).
    transfers: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

impl Agent {
    pub fn new(
        me: NodeId,
        owner: String,
        hv: Arc<dyn Hypervisor>,
        reader: StateReader,
        cluster: Cluster,
        config: AgentConfig,
        liveness: Arc<Liveness>,
    ) -> Self {
        Self {
            me,
            owner,
            hv,
            reader,
            cluster,
            config,
            liveness,
            acted: BTreeMap::new(),
            domain_type: None,
            migration: None,
            transfers: Arc::default(),
        }
    }

    /// Runs passes until `shutdown` fires: after every applied change, when the lease ends or
    /// is regained, and at least every `resync`.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut applied = self.reader.applied_watch();
        let mut regained = self.liveness.local.subscribe_regained();
        loop {
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %e, "agent pass failed; retrying");
            }
            let now = Instant::now();
            let lease_end = self.liveness.local.lease_end().filter(|e| *e > now);
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = applied.changed() => {}
                _ = regained.changed() => {}
                _ = tokio::time::sleep(self.config.resync) => {}
                // Wakes exactly when the lease would end; if it was renewed meanwhile, the
                // pass finds it held and changes nothing.
                _ = tokio::time::sleep_until(lease_end.unwrap_or(now).into()), if lease_end.is_some() => {}
            }
        }
    }

    /// The root disk of a VM booting from an uploaded image: the image made local (fetched
    /// from a node that has it, checksum verified, the new copy announced), then a
    /// copy-on-write overlay for this VM on top of it. A VM without an image but with a disk
    /// size gets an empty disk of that size.
    async fn root_disk(&self, vm: &Vm) -> Result<Option<hypervisor::DiskSpec>, AgentError> {
        let Some(images) = &self.config.images else {
            return Ok(None);
        };
        let image = vm.image.as_deref().filter(|i| *i != "tiny");
        let Some(image) = image else {
            // A VM without an image (or booting the test guest's kernel directly) still gets
            // the disk its size asks for (empty), so that it has bytes to keep, back up or
            // move to another site.
            if vm.disk_gib == 0 {
                return Ok(None);
            }
            let path = images.store.create_blank(&vm.id, vm.disk_gib).await?;
            return Ok(Some(hypervisor::DiskSpec {
                path,
                format: hypervisor::DiskFormat::Qcow2,
                target_dev: "vda".into(),
                readonly: false,
            }));
        };
        let (image, fetched) = images.ensure_local(image).await?;
        if fetched {
            self.report(Command::ImageStored {
                id: image.id.clone(),
                node: self.me,
            })
            .await?;
        }
        let size = (vm.disk_gib > 0).then_some(vm.disk_gib);
        let path = images.store.create_overlay(&image.id, &vm.id, size).await?;
        Ok(Some(hypervisor::DiskSpec {
            path,
            format: hypervisor::DiskFormat::Qcow2,
            target_dev: "vda".into(),
            readonly: false,
        }))
    }

    fn spec(&self, vm: &Vm, domain_type: DomainType) -> Result<VmSpec, AgentError> {
        build_spec(vm, &self.owner, domain_type, &self.config)
    }

    /// Lets this agent take part in migrations (as source: it runs the transfers).
    pub fn with_migration(mut self, env: crate::migration::SharedEnv) -> Self {
        self.migration = Some(env);
        self
    }

    async fn report(&self, command: Command) -> Result<Response, AgentError> {
        let req = Request::new(api::now_ms(), format!("node:{}", self.me), command);
        // Never wait past the lease: the pass after its end must run on time to fence.
        let now = Instant::now();
        // With a running lease, up to its end exactly; without one (its HA VMs are already
        // destroyed: fencing actions run first), a short bounded try.
        let left = self
            .liveness
            .local
            .lease_end()
            .map_or(Duration::ZERO, |e| e.saturating_duration_since(now));
        let wait = if left.is_zero() {
            Duration::from_millis(500)
        } else {
            left
        };
        match tokio::time::timeout(wait, self.cluster.write(req)).await {
            Ok(r) => r
                .map(|(_, r)| r)
                .map_err(|e| AgentError::Report(e.to_string())),
            Err(_) => Err(AgentError::ReportTimeout(wait)),
        }
    }

    /// Whether this node may run VMs now: a running lease, and a replica at least as fresh as
    /// the leader's when it granted it.
    fn lease_status(&self) -> LeaseStatus {
        let applied = *self.reader.applied_watch().borrow();
        self.liveness.local.lease_status(Instant::now(), applied)
    }

    /// Publishes the domains of ours just listed (with what their VMs reserve).
    fn publish(&self, vms: &[Vm], domains: &[hypervisor::DomainInfo]) {
        let observed = domains
            .iter()
            .filter(|d| d.owner.as_deref() == Some(self.owner.as_str()))
            .filter_map(|d| {
                let id = hypervisor::spec::vm_id_of(&d.name)?;
                let vm = vms.iter().find(|v| v.id == id);
                Some((
                    id.to_string(),
                    ObservedDomain {
                        epoch: d.epoch,
                        active: d.state.is_active(),
                        vcpus: vm.map_or(0, |v| v.vcpus),
                        memory_mib: vm.map_or(0, |v| v.memory_mib),
                    },
                ))
            })
            .collect();
        self.liveness.local.set_domains(observed);
    }

    /// One reconcile pass.
    pub async fn pass(&mut self) -> Result<(), AgentError> {
        let domain_type = match self.domain_type {
            Some(t) => t,
            None => {
                let caps = self.hv.capabilities().await?;
                tracing::info!(domain_type = ?caps.domain_type, reason = %caps.reason, "hypervisor detected");
                self.liveness.local.set_capacity(Capacity {
                    vcpus: u64::from(caps.cpus),
                    memory_mib: caps.memory_mib,
                });
                self.domain_type = Some(caps.domain_type);
                caps.domain_type
            }
        };
        let vms: Vec<Vm> = self
            .reader
            .scan::<Vm>(keys::VM_PREFIX, None, usize::MAX)?
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        let mut domains = self.hv.list().await?;
        self.publish(&vms, &domains);
        let lease = self.lease_status();
        // A VM whose guest may be between hosts belongs to its migration: the source must not
        // restart a guest that left, the target must not remove one that arrived before the
        // owner switch. Both sides drop it from the plan until the migration is over.
        let mut vms = vms;
        let in_flight: BTreeMap<String, raft::migration::Migration> =
            crate::migration::active(&self.reader)?
                .into_iter()
                .filter(|m| m.phase.in_flight())
                .map(|m| (m.vm_id.clone(), m))
                .collect();
        if !in_flight.is_empty() {
            self.start_transfers(&in_flight, &vms);
            vms.retain(|v| !in_flight.contains_key(&v.id));
            domains.retain(|d| {
                hypervisor::spec::vm_id_of(&d.name).is_none_or(|id| !in_flight.contains_key(id))
            });
        }
        let (actions, refused) =
            plan::plan(self.me, &self.owner, &vms, &domains, &self.acted, lease);
        if lease == LeaseStatus::Lapsed
            && actions.iter().any(|a| matches!(a, Action::Destroy { .. }))
        {
            tracing::warn!("no valid lease: destroying this node's HA VMs");
        }
        for id in refused {
            tracing::warn!(vm = %id, "refusing to act on a stale epoch");
        }
        let by_id: BTreeMap<&str, &Vm> = vms.iter().map(|v| (v.id.as_str(), v)).collect();
        for action in actions {
            tracing::debug!(?action, "agent action");
            let result = self.act(&action, &by_id, domain_type).await;
            if let Err(e) = result {
                tracing::warn!(?action, error = %e, "agent action failed");
                if let Action::Start { vm } | Action::Define { vm, .. } = &action {
                    if let Some(v) = by_id.get(vm.as_str()) {
                        let _ = self
                            .report(Command::ReportVm {
                                id: vm.clone(),
                                node: self.me,
                                epoch: v.epoch,
                                state: VmState::Failed,
                                error: Some(e.to_string()),
                            })
                            .await;
                    }
                }
            }
        }
        self.finish_operations(&vms).await
    }

    /// Starts the transfer of every `Migrating` migration from this node not yet running.
    fn start_transfers(
        &self,
        in_flight: &BTreeMap<String, raft::migration::Migration>,
        vms: &[Vm],
    ) {
        let Some(env) = &self.migration else {
            return;
        };
        for m in in_flight.values() {
            if m.source != self.me || m.phase != raft::migration::MigrationPhase::Migrating {
                continue;
            }
            if !vms.iter().any(|v| v.id == m.vm_id) {
                continue;
            }
            {
                let mut running = self.transfers.lock().unwrap_or_else(|p| p.into_inner());
                if !running.insert(m.id.clone()) {
                    continue;
                }
            }
            let (env, hv, m) = (env.clone(), self.hv.clone(), m.clone());
            // The id stays in the set after the transfer: if committing its outcome failed,
            // running it again would act on a guest that may already have left.
            tokio::spawn(crate::migration::executor::run(env, hv, m));
        }
    }

    async fn act(
        &mut self,
        action: &Action,
        vms: &BTreeMap<&str, &Vm>,
        domain_type: DomainType,
    ) -> Result<(), AgentError> {
        let name = |id: &str| hypervisor::spec::domain_name(id);
        match action {
            Action::Define { vm, epoch } => {
                let Some(v) = vms.get(vm.as_str()) else {
                    return Ok(());
                };
                let mut spec = self.spec(v, domain_type)?;
                spec.disks.extend(self.root_disk(v).await?);
                self.hv.define(&spec).await?;
                self.acted.insert(vm.clone(), *epoch);
            }
            Action::Start { vm } => {
                // The lease may have ended since the plan was made (a slow earlier action).
                if self.lease_status() == LeaseStatus::Lapsed {
                    return Ok(());
                }
                self.hv.start(&name(vm)).await?;
                self.liveness.local.mark(vm, true);
            }
            Action::Shutdown { vm } => {
                // An HA VM's graceful stop never outlives the lease: at its end the VM is
                // destroyed, as fencing requires, instead of waiting for the guest.
                let mut wait = self.config.shutdown_timeout;
                if vms.get(vm.as_str()).is_some_and(|v| v.ha) {
                    let left = self.liveness.local.lease_end().map_or(Duration::ZERO, |e| {
                        e.saturating_duration_since(Instant::now())
                    });
                    wait = wait.min(left);
                }
                self.hv.shutdown(&name(vm), wait).await?;
                self.liveness.local.mark(vm, false);
            }
            Action::Destroy { vm } => {
                match self.hv.destroy(&name(vm)).await {
                    Ok(()) | Err(hypervisor::HypervisorError::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                self.liveness.local.mark(vm, false);
                tracing::warn!(%vm, "HA VM destroyed: this node holds no lease");
            }
            Action::Remove { domain } => {
                match self.hv.destroy(domain).await {
                    Ok(()) | Err(hypervisor::HypervisorError::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                if let Some(id) = hypervisor::spec::vm_id_of(domain) {
                    self.liveness.local.mark(id, false);
                }
                match self.hv.undefine(domain).await {
                    Ok(()) | Err(hypervisor::HypervisorError::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                // The VM's overlay goes with its domain, so nothing is left behind.
                if let (Some(images), Some(vm_id)) =
                    (&self.config.images, hypervisor::spec::vm_id_of(domain))
                {
                    images.store.remove_vm_files(vm_id).await?;
                }
            }
            Action::Report { vm, epoch, state } => {
                self.report(Command::ReportVm {
                    id: vm.clone(),
                    node: self.me,
                    epoch: *epoch,
                    state: *state,
                    error: None,
                })
                .await?;
            }
            Action::Purge { vm, epoch } => {
                // Its files go too, also when the domain was already gone (no `Remove`
                // before): a deleted VM, or one moved to another site, leaves no disk here.
                if let Some(images) = &self.config.images {
                    images.store.remove_vm_files(vm).await?;
                }
                self.report(Command::PurgeVm {
                    id: vm.clone(),
                    epoch: *epoch,
                })
                .await?;
                self.acted.remove(vm);
            }
        }
        Ok(())
    }

    /// Finishes the pending operations of VMs on this node whose effect is now observed.
    async fn finish_operations(&mut self, vms: &[Vm]) -> Result<(), AgentError> {
        let ops = self
            .reader
            .scan::<Operation>(keys::OPERATION_PREFIX, None, usize::MAX)?;
        for (_, op) in ops {
            if !matches!(op.state, OperationState::Pending | OperationState::Running) {
                continue;
            }
            let Some(vm_id) = op.target.strip_prefix("vm/") else {
                continue;
            };
            let vm = vms.iter().find(|v| v.id == vm_id);
            let outcome = match (op.kind.as_str(), vm) {
                ("vm.delete", None) => Some((OperationState::Succeeded, None)),
                (_, None) => None,
                (_, Some(v)) if v.node != Some(self.me) => None,
                (_, Some(v)) if v.state == VmState::Failed => Some((
                    OperationState::Failed,
                    Some("the VM failed on its node".to_string()),
                )),
                ("vm.create" | "vm.start", Some(v)) => match (v.desired_state, v.state) {
                    (raft::model::DesiredState::Running, VmState::Running) => {
                        Some((OperationState::Succeeded, None))
                    }
                    (raft::model::DesiredState::Stopped, VmState::Stopped) => {
                        Some((OperationState::Succeeded, None))
                    }
                    _ => None,
                },
                ("vm.stop", Some(v)) => {
                    (v.state == VmState::Stopped).then_some((OperationState::Succeeded, None))
                }
                ("vm.reboot", Some(v)) if v.state == VmState::Running => {
                    self.hv
                        .reboot(&hypervisor::spec::domain_name(&v.id))
                        .await?;
                    Some((OperationState::Succeeded, None))
                }
                _ => None,
            };
            if let Some((state, error)) = outcome {
                self.report(Command::FinishOperation {
                    id: op.id.clone(),
                    state,
                    error,
                })
                .await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_id_with_a_site_prefix_names_its_domain_by_the_uuid_part() {
        let plain = "0b3e5f1c-1111-2222-3333-444444444444";
        assert_eq!(domain_uuid(plain).unwrap().to_string(), plain);
        let sited = format!("ab12cd-{plain}");
        assert_eq!(domain_uuid(&sited).unwrap().to_string(), plain);
        assert!(domain_uuid("ab12cd-not-a-uuid").is_err());
    }
}
