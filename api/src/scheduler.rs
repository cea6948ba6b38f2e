//! Types of the scheduler's API: the stored placement explanation as clients see it (with node
//! names), and the request and result of a simulation. The scheduler itself runs on the leader
//! (in the node crate); the API reaches it through `ControlPlane::simulate`.

use std::collections::BTreeMap;

use raft::model::NodeId;
use raft::placement::{PlacementExplanation, Verdict};
use serde::{Deserialize, Serialize};

/// Whether the scheduler refused a node or scored it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VerdictKind {
    Filtered,
    Scored,
}

/// One node's verdict for one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VerdictView {
    pub node: NodeId,
    /// The node's name, when the node still exists.
    pub node_name: Option<String>,
    pub verdict: VerdictKind,
    /// The filter that refused the node (`filtered` only).
    #[schema(value_type = Option<crate::openapi::schemas::FilterKind>)]
    pub filter: Option<raft::placement::FilterKind>,
    /// Why, in words (`filtered` only).
    pub detail: Option<String>,
    /// 0 to 1000, higher is better (`scored` only).
    pub score: Option<u32>,
}

/// Why a VM is where it is, or why it is nowhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExplanationView {
    pub vm: String,
    /// When the decision was made (ms since the epoch; 0 in simulations).
    pub at: u64,
    /// The chosen node; null when the VM fits nowhere.
    pub chosen: Option<NodeId>,
    pub chosen_name: Option<String>,
    /// `spread` or `pack`.
    pub strategy: String,
    pub nodes_considered: u32,
    /// Nodes that passed every filter.
    pub eligible: u32,
    /// Refused nodes per filter name.
    pub filtered: BTreeMap<String, u32>,
    /// The chosen node first, then the best scored others, then examples of each filter.
    pub verdicts: Vec<VerdictView>,
    /// Verdicts left out to keep the record small (counted in `filtered` and `eligible`).
    pub truncated: u32,
}

/// The client view of a stored explanation, with node names from `names`.
pub fn explanation_view(
    e: &PlacementExplanation,
    names: &BTreeMap<NodeId, String>,
) -> ExplanationView {
    ExplanationView {
        vm: e.vm.clone(),
        at: e.at,
        chosen: e.chosen,
        chosen_name: e.chosen.and_then(|n| names.get(&n).cloned()),
        strategy: e.strategy.clone(),
        nodes_considered: e.nodes_considered,
        eligible: e.eligible,
        filtered: e.filtered.clone(),
        verdicts: e
            .verdicts
            .iter()
            .map(|v| {
                let (verdict, filter, detail, score) = match &v.verdict {
                    Verdict::Filtered { filter, detail } => (
                        VerdictKind::Filtered,
                        Some(*filter),
                        Some(detail.clone()),
                        None,
                    ),
                    Verdict::Scored { score } => (VerdictKind::Scored, None, None, Some(*score)),
                };
                VerdictView {
                    node: v.node,
                    node_name: names.get(&v.node).cloned(),
                    verdict,
                    filter,
                    detail,
                    score,
                }
            })
            .collect(),
        truncated: e.truncated,
    }
}

/// A VM that a simulation pretends to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SimulatedVm {
    /// A label for the result (default `new-<n>`).
    #[serde(default)]
    pub name: Option<String>,
    /// The tenant whose affinity groups apply (default: none shared with existing VMs).
    #[serde(default)]
    pub tenant: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u64,
    #[serde(default)]
    pub disk_gib: Option<u64>,
    /// Required node (name or id).
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub node_selector: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub anti_affinity_group: Option<String>,
    #[serde(default)]
    pub affinity_group: Option<String>,
}

/// What to simulate: creating VMs, or draining a node (its VMs move elsewhere).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SimulateRequest {
    /// "What if these VMs are created?"
    Create { vms: Vec<SimulatedVm> },
    /// "What if this node (name or id) is drained?"
    Drain { node: String },
}

/// Where one VM would go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SimulatedPlacement {
    /// VM id (drain) or the name given in the request (create).
    pub vm: String,
    /// Where the VM runs now (drain only).
    pub from: Option<NodeId>,
    pub from_name: Option<String>,
    /// Where it would go; null when it fits nowhere.
    pub to: Option<NodeId>,
    pub to_name: Option<String>,
    pub explanation: ExplanationView,
}

/// The answer of a simulation; nothing was changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SimulateResult {
    /// VMs that would be placed (or moved), in order.
    pub placed: Vec<SimulatedPlacement>,
    /// VMs that would fit nowhere.
    pub unplaced: Vec<SimulatedPlacement>,
}
