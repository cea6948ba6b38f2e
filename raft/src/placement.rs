//! Placement data kept in the replicated state: what a node can hold ([`NodeCapacity`]), what a
//! VM asks of its node ([`PlacementConstraints`]), the leader's batched placement decisions
//! ([`PlacementEntry`], committed by `Command::PlaceBatch`) and the stored explanation of each
//! decision ([`PlacementExplanation`], under the `p/` keys) so that any node can answer "why
//! there" and "why not elsewhere".
//!
//! The scheduler that produces these lives in the `node` crate; this module is data only.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::command::RejectCode;
use crate::model::{Millis, NodeId};

/// What a node can hold, as its agent read it from the hypervisor.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct NodeCapacity {
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Size of the filesystem that holds VM disks; `None` when unknown (disk is then not
    /// checked by the scheduler).
    pub disk_gib: Option<u64>,
}

/// What a VM asks of the node it runs on, besides room for its vCPUs, memory and disk.
/// The anti-affinity group is [`crate::model::Vm::anti_affinity_group`].
#[derive(
    Debug,
    Clone,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct PlacementConstraints {
    /// The VM must run on this node (the scheduler still checks that it fits).
    #[serde(default)]
    pub node: Option<NodeId>,
    /// Every pair must be among the node's labels.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// VMs of the same tenant and group run on the same node.
    #[serde(default)]
    pub affinity_group: Option<String>,
}

/// Why a node was not eligible for a VM. One variant per scheduler filter, in the order the
/// filters run (the first that refuses is the one reported).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum FilterKind {
    /// The node is suspect or down.
    NodeNotUp,
    /// The node is drained (or was removed).
    Unschedulable,
    /// The node has not reported its capacity yet.
    CapacityUnknown,
    /// The VM requires another node.
    RequiredNode,
    /// The node lacks a label of the VM's node selector.
    NodeSelector,
    /// Not enough vCPUs, with the CPU overcommit ratio applied.
    Cpu,
    /// Not enough memory, with the memory overcommit ratio applied.
    Memory,
    Disk,
    /// The node already runs a VM of the VM's anti-affinity group.
    AntiAffinity,
    /// The VM's affinity group already runs on another node.
    Affinity,
}

impl FilterKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FilterKind::NodeNotUp => "node_not_up",
            FilterKind::Unschedulable => "unschedulable",
            FilterKind::CapacityUnknown => "capacity_unknown",
            FilterKind::RequiredNode => "required_node",
            FilterKind::NodeSelector => "node_selector",
            FilterKind::Cpu => "cpu",
            FilterKind::Memory => "memory",
            FilterKind::Disk => "disk",
            FilterKind::AntiAffinity => "anti_affinity",
            FilterKind::Affinity => "affinity",
        }
    }
}

/// What the scheduler concluded about one node for one VM.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Refused by a filter; `detail` says by how much or which label.
    Filtered { filter: FilterKind, detail: String },
    /// Eligible, with this score (higher is better, 0 to 1000).
    Scored { score: u32 },
}

#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct NodeVerdict {
    pub node: NodeId,
    #[serde(flatten)]
    pub verdict: Verdict,
}

/// The stored answer to "why is this VM where it is" (or "why is it nowhere").
///
/// Compact on purpose: with many nodes, `verdicts` keeps the chosen node, the best scored
/// others and a few examples per filter, while `filtered` counts every refused node by filter
/// and `eligible` counts every node that passed, so nothing is silently lost.
#[derive(
    Debug,
    Clone,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct PlacementExplanation {
    pub vm: String,
    /// When the decision was made (the proposer's clock).
    pub at: Millis,
    /// The node chosen, `None` when the VM fits nowhere.
    pub chosen: Option<NodeId>,
    /// `spread` or `pack`.
    pub strategy: String,
    /// Nodes the scheduler looked at.
    pub nodes_considered: u32,
    /// Nodes that passed every filter.
    pub eligible: u32,
    /// Refused nodes per filter (`FilterKind::as_str`).
    pub filtered: BTreeMap<String, u32>,
    /// Per-node verdicts, possibly truncated (see `truncated`).
    pub verdicts: Vec<NodeVerdict>,
    /// Verdicts left out of `verdicts` to keep the record small.
    pub truncated: u32,
}

/// One placement of a `Command::PlaceBatch`.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct PlacementEntry {
    pub vm: String,
    /// `None`: the VM fits nowhere; only the explanation is stored and the VM is unchanged.
    pub node: Option<NodeId>,
    /// Compare-and-set: the entry is refused unless the VM is still at this version.
    pub expected_version: u64,
    pub explanation: PlacementExplanation,
}

/// The outcome of one entry of a `Command::PlaceBatch`.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub enum PlacementOutcome {
    /// The VM is now on `node` at `epoch` (version `version`).
    Placed {
        vm: String,
        node: NodeId,
        epoch: u64,
        version: u64,
    },
    /// The VM fits nowhere; its explanation was stored.
    NotPlaced { vm: String },
    /// The entry was stale or invalid and changed nothing.
    Refused {
        vm: String,
        code: RejectCode,
        message: String,
    },
}
