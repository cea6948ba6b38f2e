//! Every node converges to the same state: after healing, all state-machine digests are equal.
//!
//! Nodes that report the same applied index with different digests have *diverged*: the
//! deterministic `apply` produced two states from one log, the worst possible bug. Different
//! digests at different indices mean a node is *lagging*, which after healing and waiting is a
//! liveness failure rather than a safety one; the report says which.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{CheckResult, Verdict};

/// What one node reported about its state machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDigest {
    pub node: String,
    /// The log index the digest was taken at, when the node reports it.
    pub applied_index: Option<u64>,
    pub digest: String,
}

/// How the nodes relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Every node has the same digest.
    Converged,
    /// Digests differ, and no two nodes at one applied index disagree.
    Lagging,
    /// Two nodes at the same applied index (or without indices) have different digests.
    Diverged,
    /// No node reported.
    NoEvidence,
}

/// The result of the check.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub state: State,
    /// Digest -> the nodes that reported it.
    pub groups: BTreeMap<String, Vec<String>>,
}

impl Report {
    pub fn verdict(&self) -> Verdict {
        match self.state {
            State::Converged => Verdict::Pass,
            State::Lagging | State::Diverged => Verdict::Fail,
            State::NoEvidence => Verdict::Unknown,
        }
    }

    pub fn to_result(&self) -> CheckResult {
        let nodes: usize = self.groups.values().map(Vec::len).sum();
        CheckResult {
            checker: "convergence".into(),
            verdict: self.verdict(),
            summary: format!(
                "{nodes} nodes, {} distinct digests: {:?}",
                self.groups.len(),
                self.state
            ),
            details: if self.groups.len() > 1 {
                self.groups
                    .iter()
                    .map(|(digest, nodes)| format!("{digest}: {}", nodes.join(", ")))
                    .collect()
            } else {
                Vec::new()
            },
        }
    }
}

/// Compares the digests of all nodes.
pub fn check(digests: &[NodeDigest]) -> Report {
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in digests {
        groups
            .entry(d.digest.clone())
            .or_default()
            .push(d.node.clone());
    }
    let state = if digests.is_empty() {
        State::NoEvidence
    } else if groups.len() == 1 {
        State::Converged
    } else {
        let mut at_index: BTreeMap<Option<u64>, &str> = BTreeMap::new();
        let mut diverged = false;
        for d in digests {
            // Without an index there is nothing to excuse a difference, so unknown indices
            // compare with each other as if equal.
            if let Some(other) = at_index.insert(d.applied_index, d.digest.as_str()) {
                diverged |= other != d.digest;
            }
        }
        if diverged {
            State::Diverged
        } else {
            State::Lagging
        }
    };
    Report { state, groups }
}
