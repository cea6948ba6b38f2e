//! The node agent: a level-triggered loop that makes the local hypervisor match the VMs the
//! replica assigns to this node, and reports what it observes back through Raft (only changes).
//!
//! Each pass reads the local replica and the hypervisor afresh, so a missed event, a libvirtd
//! restart or a VM changed behind our back is corrected on the next pass. The decision itself
//! is the pure [`plan::plan`].

pub mod plan;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hypervisor::{DirectBoot, DomainType, Hypervisor, VmSpec};
use raft::model::{NodeId, Operation, OperationState, Vm, VmState};
use raft::net::Cluster;
use raft::store::StateReader;
use raft::{keys, Command, Request, Response};
use tokio::sync::watch;

use plan::Action;

/// The domain spec of `vm` as node `owner` defines it.
pub fn build_spec(
    vm: &Vm,
    owner: &str,
    domain_type: DomainType,
    config: &AgentConfig,
) -> Result<VmSpec, AgentError> {
    let uuid = uuid::Uuid::parse_str(&vm.id).map_err(|_| AgentError::BadId(vm.id.clone()))?;
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
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            guest_kernel: None,
            guest_initrd: None,
            shutdown_timeout: Duration::from_secs(30),
            resync: Duration::from_secs(2),
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
}

pub struct Agent {
    pub me: NodeId,
    /// `<cluster id>/<node id>`, written into every domain this agent defines.
    pub owner: String,
    pub hv: Arc<dyn Hypervisor>,
    pub reader: StateReader,
    pub cluster: Cluster,
    pub config: AgentConfig,
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
    ) -> Self {
        Self {
            me,
            owner,
            hv,
            reader,
            cluster,
            config,
            acted: BTreeMap::new(),
            domain_type: None,
            migration: None,
            transfers: Arc::default(),
        }
    }

    /// Runs passes until `shutdown` fires: after every applied change, and at least every
    /// `resync`.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut applied = self.reader.applied_watch();
        loop {
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %e, "agent pass failed; retrying");
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = applied.changed() => {}
                _ = tokio::time::sleep(self.config.resync) => {}
            }
        }
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
        self.cluster
            .write(req)
            .await
            .map(|(_, r)| r)
            .map_err(|e| AgentError::Report(e.to_string()))
    }

    /// One reconcile pass.
    pub async fn pass(&mut self) -> Result<(), AgentError> {
        let domain_type = match self.domain_type {
            Some(t) => t,
            None => {
                let caps = self.hv.capabilities().await?;
                tracing::info!(domain_type = ?caps.domain_type, reason = %caps.reason, "hypervisor detected");
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
        let (actions, refused) = plan::plan(self.me, &self.owner, &vms, &domains, &self.acted);
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
                let spec = self.spec(v, domain_type)?;
                self.hv.define(&spec).await?;
                self.acted.insert(vm.clone(), *epoch);
            }
            Action::Start { vm } => self.hv.start(&name(vm)).await?,
            Action::Shutdown { vm } => {
                self.hv
                    .shutdown(&name(vm), self.config.shutdown_timeout)
                    .await?;
            }
            Action::Remove { domain } => {
                match self.hv.destroy(domain).await {
                    Ok(()) | Err(hypervisor::HypervisorError::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                match self.hv.undefine(domain).await {
                    Ok(()) | Err(hypervisor::HypervisorError::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
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
