//! The agent's decision: desired VMs (from the local replica) against observed domains (from
//! libvirt), as a pure function tested over tables of cases.
//!
//! Fencing: a domain runs here only while the replica places its VM on this node at the epoch
//! the domain was started with, and never for an epoch older than one this agent already acted
//! on (a lagging replica cannot make it act on the past).
//!
//! Leases: without a valid lease (partitioned, no quorum, leader gone) this node destroys its
//! HA VMs at once (it cannot know whether the leader will restart them elsewhere) and starts
//! nothing until it holds a lease again. Non-HA VMs keep running: nobody restarts them.

use std::collections::{BTreeMap, BTreeSet};

use hypervisor::{DomainInfo, DomainState};
use raft::model::{DesiredState, NodeId, Vm, VmState};

pub use crate::liveness::LeaseStatus;

/// One thing to do to the local hypervisor or to report through Raft.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Define (or redefine at a new epoch) the domain of this VM.
    Define {
        vm: String,
        epoch: u64,
    },
    Start {
        vm: String,
    },
    /// Graceful stop with a timeout, then destroy.
    Shutdown {
        vm: String,
    },
    /// Immediate power-off, definition kept (fencing: the lease lapsed).
    Destroy {
        vm: String,
    },
    /// Stop at once and remove the definition and the VM's files (deleted or placed elsewhere).
    Remove {
        domain: String,
    },
    /// Tell the cluster what this VM is doing now.
    Report {
        vm: String,
        epoch: u64,
        state: VmState,
    },
    /// The VM is deleted and nothing of it is left here.
    Purge {
        vm: String,
        epoch: u64,
    },
}

/// What the cluster's state says about one VM assigned to this node.
pub fn observed_state(d: Option<&DomainInfo>) -> VmState {
    match d.map(|d| d.state) {
        None => VmState::Stopped,
        Some(
            DomainState::Running
            | DomainState::Blocked
            | DomainState::Paused
            | DomainState::PmSuspended,
        ) => VmState::Running,
        Some(DomainState::ShuttingDown) => VmState::Stopping,
        Some(DomainState::Crashed) => VmState::Failed,
        Some(DomainState::Shutoff | DomainState::NoState) => VmState::Stopped,
    }
}

/// Decides what to do. `acted` holds the highest epoch this agent acted on per VM; VMs whose
/// replica epoch is below it are skipped (and reported in `refused`). `lease` says whether
/// this node may run VMs now.
pub fn plan(
    me: NodeId,
    owner: &str,
    vms: &[Vm],
    domains: &[DomainInfo],
    acted: &BTreeMap<String, u64>,
    lease: LeaseStatus,
) -> (Vec<Action>, Vec<String>) {
    let leased = lease == LeaseStatus::Held;
    // Fencing destroys go first, before any report (a report may wait on an unreachable
    // leader until it times out).
    let mut fence = Vec::new();
    let mut actions = Vec::new();
    let mut refused = Vec::new();
    // Only domains this agent defined count: another node or cluster sharing this libvirtd
    // keeps its own.
    let by_vm: BTreeMap<&str, &DomainInfo> = domains
        .iter()
        .filter(|d| d.owner.as_deref() == Some(owner))
        .filter_map(|d| hypervisor::spec::vm_id_of(&d.name).map(|id| (id, d)))
        .collect();
    let mut wanted_here: BTreeSet<&str> = BTreeSet::new();

    for vm in vms.iter().filter(|v| v.node == Some(me)) {
        if acted.get(&vm.id).is_some_and(|e| vm.epoch < *e) {
            refused.push(vm.id.clone());
            wanted_here.insert(&vm.id);
            continue;
        }
        let domain = by_vm.get(vm.id.as_str()).copied();
        if vm.state == VmState::Deleting {
            if let Some(d) = domain {
                actions.push(Action::Remove {
                    domain: d.name.clone(),
                });
            }
            actions.push(Action::Purge {
                vm: vm.id.clone(),
                epoch: vm.epoch,
            });
            continue;
        }
        wanted_here.insert(&vm.id);
        let mut observed = observed_state(domain);
        // Fencing first: an HA VM may run elsewhere once this lease is over, so it stops now,
        // hard (a graceful shutdown could outlive the margin the leader waits).
        if !leased && vm.ha && domain.is_some_and(|d| d.state.is_active()) {
            fence.push(Action::Destroy { vm: vm.id.clone() });
            if vm.state != VmState::Stopped {
                actions.push(Action::Report {
                    vm: vm.id.clone(),
                    epoch: vm.epoch,
                    state: VmState::Stopped,
                });
            }
            continue;
        }
        // A domain from an older epoch is redefined under the current one before it may run.
        let stale_definition = domain.is_some_and(|d| d.epoch != Some(vm.epoch));
        if domain.is_none() || stale_definition {
            if domain.is_some_and(|d| d.state.is_active()) {
                actions.push(Action::Shutdown { vm: vm.id.clone() });
            }
            actions.push(Action::Define {
                vm: vm.id.clone(),
                epoch: vm.epoch,
            });
        }
        match vm.desired_state {
            // Without a lease nothing starts; what is observed is still reported.
            DesiredState::Running if !leased => {}
            DesiredState::Running => {
                if observed != VmState::Running || stale_definition {
                    actions.push(Action::Start { vm: vm.id.clone() });
                    observed = VmState::Starting;
                }
            }
            DesiredState::Stopped => {
                if observed == VmState::Running {
                    actions.push(Action::Shutdown { vm: vm.id.clone() });
                    observed = VmState::Stopping;
                }
            }
        }
        if observed != vm.state {
            actions.push(Action::Report {
                vm: vm.id.clone(),
                epoch: vm.epoch,
                state: observed,
            });
        }
    }

    // Domains of ours that this node must not run: deleted, or placed elsewhere (fenced).
    for (vm_id, d) in &by_vm {
        if !wanted_here.contains(vm_id) && !vms.iter().any(|v| v.id == *vm_id && v.node == Some(me))
        {
            actions.push(Action::Remove {
                domain: d.name.clone(),
            });
        }
    }
    fence.extend(actions);
    (fence, refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(id: &str, node: Option<NodeId>, epoch: u64, desired: DesiredState, state: VmState) -> Vm {
        Vm {
            id: id.into(),
            name: id.into(),
            tenant: "t".into(),
            vcpus: 1,
            memory_mib: 128,
            disk_gib: 0,
            image: None,
            labels: Default::default(),
            node,
            desired_state: desired,
            state,
            ha: false,
            anti_affinity_group: None,
            epoch,
            created_at: 0,
            updated_at: 0,
            version: 1,
            placement: Default::default(),
        }
    }

    fn dom(id: &str, state: DomainState, epoch: u64) -> DomainInfo {
        DomainInfo {
            name: hypervisor::spec::domain_name(id),
            uuid: String::new(),
            state,
            epoch: Some(epoch),
            owner: Some(OWNER.into()),
        }
    }

    const OWNER: &str = "c/1";

    use DesiredState::{Running as WantRun, Stopped as WantStop};

    #[test]
    fn reconcile_table() {
        let acted = BTreeMap::new();
        let n = |s: &str| hypervisor::spec::domain_name(s);
        #[allow(clippy::type_complexity)]
        let cases: Vec<(&str, Vec<Vm>, Vec<DomainInfo>, Vec<Action>)> = vec![
            (
                "new VM is defined, started and reported starting",
                vec![vm("a", Some(1), 1, WantRun, VmState::Scheduled)],
                vec![],
                vec![
                    Action::Define {
                        vm: "a".into(),
                        epoch: 1,
                    },
                    Action::Start { vm: "a".into() },
                    Action::Report {
                        vm: "a".into(),
                        epoch: 1,
                        state: VmState::Starting,
                    },
                ],
            ),
            (
                "running as wanted: nothing to do",
                vec![vm("a", Some(1), 1, WantRun, VmState::Running)],
                vec![dom("a", DomainState::Running, 1)],
                vec![],
            ),
            (
                "running, state not yet reported",
                vec![vm("a", Some(1), 1, WantRun, VmState::Starting)],
                vec![dom("a", DomainState::Running, 1)],
                vec![Action::Report {
                    vm: "a".into(),
                    epoch: 1,
                    state: VmState::Running,
                }],
            ),
            (
                "destroyed behind our back while wanted running: restarted",
                vec![vm("a", Some(1), 1, WantRun, VmState::Running)],
                vec![dom("a", DomainState::Shutoff, 1)],
                vec![
                    Action::Start { vm: "a".into() },
                    Action::Report {
                        vm: "a".into(),
                        epoch: 1,
                        state: VmState::Starting,
                    },
                ],
            ),
            (
                "crashed while wanted stopped: reported, not restarted",
                vec![vm("a", Some(1), 1, WantStop, VmState::Stopped)],
                vec![dom("a", DomainState::Crashed, 1)],
                vec![Action::Report {
                    vm: "a".into(),
                    epoch: 1,
                    state: VmState::Failed,
                }],
            ),
            (
                "stop requested",
                vec![vm("a", Some(1), 1, WantStop, VmState::Running)],
                vec![dom("a", DomainState::Running, 1)],
                vec![
                    Action::Shutdown { vm: "a".into() },
                    Action::Report {
                        vm: "a".into(),
                        epoch: 1,
                        state: VmState::Stopping,
                    },
                ],
            ),
            (
                "placed elsewhere (fenced): removed here",
                vec![vm("a", Some(2), 2, WantRun, VmState::Running)],
                vec![dom("a", DomainState::Running, 1)],
                vec![Action::Remove { domain: n("a") }],
            ),
            (
                "deleted: removed and purged",
                vec![vm("a", Some(1), 1, WantStop, VmState::Deleting)],
                vec![dom("a", DomainState::Running, 1)],
                vec![
                    Action::Remove { domain: n("a") },
                    Action::Purge {
                        vm: "a".into(),
                        epoch: 1,
                    },
                ],
            ),
            (
                "deleted and already gone: purged",
                vec![vm("a", Some(1), 1, WantStop, VmState::Deleting)],
                vec![],
                vec![Action::Purge {
                    vm: "a".into(),
                    epoch: 1,
                }],
            ),
            (
                "orphan domain of ours with no VM: removed",
                vec![],
                vec![dom("z", DomainState::Running, 4)],
                vec![Action::Remove { domain: n("z") }],
            ),
            (
                "domain from an older epoch is redefined and restarted",
                vec![vm("a", Some(1), 3, WantRun, VmState::Scheduled)],
                vec![dom("a", DomainState::Shutoff, 1)],
                vec![
                    Action::Define {
                        vm: "a".into(),
                        epoch: 3,
                    },
                    Action::Start { vm: "a".into() },
                    Action::Report {
                        vm: "a".into(),
                        epoch: 3,
                        state: VmState::Starting,
                    },
                ],
            ),
        ];
        for (name, vms, doms, expected) in cases {
            let (actions, refused) = plan(1, OWNER, &vms, &doms, &acted, LeaseStatus::Held);
            assert_eq!(actions, expected, "case: {name}");
            assert!(refused.is_empty(), "case: {name}");
        }
    }

    #[test]
    fn foreign_domains_are_left_alone() {
        let foreign = DomainInfo {
            name: "someone-elses-vm".into(),
            uuid: String::new(),
            state: DomainState::Running,
            epoch: None,
            owner: None,
        };
        let (actions, _) = plan(
            1,
            OWNER,
            &[],
            &[foreign],
            &BTreeMap::new(),
            LeaseStatus::Held,
        );
        assert!(actions.is_empty());
        // Ours by name, but defined by another node sharing this libvirtd: left alone too.
        let mut other = dom("z", DomainState::Running, 1);
        other.owner = Some("c/2".into());
        let (actions, _) = plan(1, OWNER, &[], &[other], &BTreeMap::new(), LeaseStatus::Held);
        assert!(actions.is_empty(), "{actions:?}");
    }

    #[test]
    fn a_stale_epoch_is_refused() {
        let mut acted = BTreeMap::new();
        acted.insert("a".to_string(), 5);
        let vms = vec![vm("a", Some(1), 4, WantRun, VmState::Scheduled)];
        let (actions, refused) = plan(1, OWNER, &vms, &[], &acted, LeaseStatus::Held);
        assert!(actions.is_empty(), "{actions:?}");
        assert_eq!(refused, vec!["a".to_string()]);
    }

    fn ha(mut v: Vm) -> Vm {
        v.ha = true;
        v
    }

    #[test]
    fn lease_table() {
        let acted = BTreeMap::new();
        let n = |s: &str| hypervisor::spec::domain_name(s);
        use LeaseStatus::{Held, Lapsed};
        #[allow(clippy::type_complexity)]
        let cases: Vec<(&str, LeaseStatus, Vec<Vm>, Vec<DomainInfo>, Vec<Action>)> = vec![
            (
                "lapsed: a running HA VM is destroyed at once and reported stopped",
                Lapsed,
                vec![ha(vm("a", Some(1), 1, WantRun, VmState::Running))],
                vec![dom("a", DomainState::Running, 1)],
                vec![
                    Action::Destroy { vm: "a".into() },
                    Action::Report {
                        vm: "a".into(),
                        epoch: 1,
                        state: VmState::Stopped,
                    },
                ],
            ),
            (
                "lapsed: every HA VM is destroyed before anything is reported",
                Lapsed,
                vec![
                    ha(vm("a", Some(1), 1, WantRun, VmState::Running)),
                    ha(vm("b", Some(1), 1, WantRun, VmState::Running)),
                ],
                vec![
                    dom("a", DomainState::Running, 1),
                    dom("b", DomainState::Running, 1),
                ],
                vec![
                    Action::Destroy { vm: "a".into() },
                    Action::Destroy { vm: "b".into() },
                    Action::Report {
                        vm: "a".into(),
                        epoch: 1,
                        state: VmState::Stopped,
                    },
                    Action::Report {
                        vm: "b".into(),
                        epoch: 1,
                        state: VmState::Stopped,
                    },
                ],
            ),
            (
                "lapsed: a paused HA VM still holds its memory: destroyed",
                Lapsed,
                vec![ha(vm("a", Some(1), 1, WantRun, VmState::Stopped))],
                vec![dom("a", DomainState::Paused, 1)],
                vec![Action::Destroy { vm: "a".into() }],
            ),
            (
                "lapsed: a non-HA VM keeps running (nobody restarts it elsewhere)",
                Lapsed,
                vec![vm("b", Some(1), 1, WantRun, VmState::Running)],
                vec![dom("b", DomainState::Running, 1)],
                vec![],
            ),
            (
                "lapsed: a new VM is defined but not started, nor reported starting",
                Lapsed,
                vec![vm("c", Some(1), 1, WantRun, VmState::Scheduled)],
                vec![],
                vec![
                    Action::Define {
                        vm: "c".into(),
                        epoch: 1,
                    },
                    Action::Report {
                        vm: "c".into(),
                        epoch: 1,
                        state: VmState::Stopped,
                    },
                ],
            ),
            (
                "lapsed: a fenced HA VM is not restarted",
                Lapsed,
                vec![ha(vm("a", Some(1), 1, WantRun, VmState::Stopped))],
                vec![dom("a", DomainState::Shutoff, 1)],
                vec![],
            ),
            (
                "lapsed: a stop request is still honoured",
                Lapsed,
                vec![vm("b", Some(1), 1, WantStop, VmState::Running)],
                vec![dom("b", DomainState::Running, 1)],
                vec![
                    Action::Shutdown { vm: "b".into() },
                    Action::Report {
                        vm: "b".into(),
                        epoch: 1,
                        state: VmState::Stopping,
                    },
                ],
            ),
            (
                "held again: the fenced HA VM starts",
                Held,
                vec![ha(vm("a", Some(1), 1, WantRun, VmState::Stopped))],
                vec![dom("a", DomainState::Shutoff, 1)],
                vec![
                    Action::Start { vm: "a".into() },
                    Action::Report {
                        vm: "a".into(),
                        epoch: 1,
                        state: VmState::Starting,
                    },
                ],
            ),
            (
                "back after an HA restart elsewhere (higher epoch on node 2): removed here, \
                 lease or not",
                Held,
                vec![ha(vm("a", Some(2), 2, WantRun, VmState::Running))],
                vec![dom("a", DomainState::Running, 1)],
                vec![Action::Remove { domain: n("a") }],
            ),
            (
                "back, VM marked unknown while away and still placed here: state reported",
                Held,
                vec![vm("b", Some(1), 1, WantRun, VmState::Unknown)],
                vec![dom("b", DomainState::Running, 1)],
                vec![Action::Report {
                    vm: "b".into(),
                    epoch: 1,
                    state: VmState::Running,
                }],
            ),
        ];
        for (name, lease, vms, doms, expected) in cases {
            let (actions, refused) = plan(1, OWNER, &vms, &doms, &acted, lease);
            assert_eq!(actions, expected, "case: {name}");
            assert!(refused.is_empty(), "case: {name}");
        }
    }

    #[test]
    fn back_after_an_ha_restart_a_stale_replica_cannot_revive_the_vm() {
        // The agent already defined the VM at epoch 2 (it was restarted here) and its replica
        // lags at epoch 1: it refuses to act, whatever its lease.
        let mut acted = BTreeMap::new();
        acted.insert("a".to_string(), 2);
        let vms = vec![ha(vm("a", Some(1), 1, WantRun, VmState::Running))];
        for lease in [LeaseStatus::Held, LeaseStatus::Lapsed] {
            let (actions, refused) = plan(1, OWNER, &vms, &[], &acted, lease);
            assert!(actions.is_empty(), "{actions:?}");
            assert_eq!(refused, vec!["a".to_string()]);
        }
    }
}
