//! No acknowledged write is lost: after healing, every node's final read of every key reflects
//! the latest acknowledged writes.
//!
//! A write `w` is *superseded* when an acknowledged write was invoked after `w` completed: that
//! later write certainly took effect after `w`. The final value of a key on a node must therefore
//! come from a write that is not superseded (an acknowledged one, or one of unknown outcome, which
//! may have landed last), or be the initial state if nothing was acknowledged. A final value from
//! a superseded write means the acknowledged writes after it were lost; a value nobody wrote is a
//! phantom. When the reads carry versions and the key was never deleted, a final version below
//! the highest acknowledged one is a loss too (versions only grow while an object lives).
//!
//! Final reads use the read shape of [`super::linearizable`]: `null` for absent, or
//! `{"value": v, "version"?: n}`; a key missing from a node's map is absent.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::{canonical, CheckResult, Interval, Verdict, MAX_DETAILS};
use crate::history::{Func, Operation, Outcome};

/// What each node returned for each key in the final read: node -> key -> read-shaped value.
pub type FinalReads = BTreeMap<String, BTreeMap<String, Value>>;

/// Why a final value is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// The value was written, but acknowledged writes after it are missing.
    Superseded,
    /// No operation in the history wrote this value.
    Phantom,
    /// The version is below a version an acknowledged write produced.
    VersionRegressed,
}

/// One key on one node whose final state does not reflect acknowledged writes.
#[derive(Debug, Clone, Serialize)]
pub struct LostWrite {
    pub node: String,
    pub key: String,
    pub kind: LossKind,
    /// What the node returned.
    pub found: Value,
    /// The latest acknowledged writes, one of which (or a later unknown one) the node should show.
    pub expected_one_of: Vec<Operation>,
}

impl LostWrite {
    pub fn describe(&self) -> String {
        let expected: Vec<String> = self
            .expected_one_of
            .iter()
            .map(Operation::describe)
            .collect();
        format!(
            "node {} key {}: {:?}, found {}; latest acknowledged: {}",
            self.node,
            self.key,
            self.kind,
            self.found,
            expected.join("; ")
        )
    }
}

/// The result of the check.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Acknowledged mutations in the history.
    pub acknowledged: usize,
    /// (node, key) pairs compared.
    pub compared: usize,
    pub lost: Vec<LostWrite>,
}

impl Report {
    pub fn verdict(&self) -> Verdict {
        if self.lost.is_empty() {
            Verdict::Pass
        } else {
            Verdict::Fail
        }
    }

    pub fn to_result(&self) -> CheckResult {
        CheckResult {
            checker: "lost_writes".into(),
            verdict: self.verdict(),
            summary: format!(
                "{} acknowledged writes, {} final reads compared: {} lost",
                self.acknowledged,
                self.compared,
                self.lost.len()
            ),
            details: self
                .lost
                .iter()
                .take(MAX_DETAILS)
                .map(LostWrite::describe)
                .collect(),
        }
    }
}

/// A mutation that may have taken effect, with the state it leaves.
struct Write<'a> {
    op: &'a Operation,
    interval: Interval,
    /// Canonical text of the value written; `None` for a delete.
    value: Option<String>,
    acknowledged: bool,
}

fn written_value(op: &Operation) -> Option<String> {
    match op.f {
        Func::Write | Func::Create => Some(canonical(&op.input)),
        Func::Cas => Some(canonical(op.input.get("value").unwrap_or(&Value::Null))),
        Func::Delete | Func::Read => None,
    }
}

/// The value a read-shaped observation shows (`None` for absent) and its version.
fn observed(read: &Value) -> (Option<String>, Option<u64>) {
    match read {
        Value::Null => (None, None),
        other => (
            Some(canonical(other.get("value").unwrap_or(&Value::Null))),
            other.get("version").and_then(Value::as_u64),
        ),
    }
}

/// Checks the final reads of every node against the acknowledged writes of the history.
///
/// `initial` holds keys that existed before the history with their value (not read-shaped).
pub fn check(
    ops: &[Operation],
    final_reads: &FinalReads,
    initial: &BTreeMap<String, Value>,
) -> Report {
    let mut by_key: BTreeMap<&str, Vec<Write<'_>>> = BTreeMap::new();
    for op in ops {
        if !op.f.is_mutation() || op.outcome == Outcome::Fail {
            continue;
        }
        by_key.entry(op.key.as_str()).or_default().push(Write {
            op,
            interval: Interval {
                invoke_ns: op.invoke_ns,
                complete_ns: match op.outcome {
                    Outcome::Ok => op.complete_ns,
                    Outcome::Fail | Outcome::Info => None,
                },
            },
            value: written_value(op),
            acknowledged: op.outcome == Outcome::Ok,
        });
    }
    let acknowledged = by_key.values().flatten().filter(|w| w.acknowledged).count();
    let mut lost = Vec::new();
    let mut compared = 0;
    for (key, writes) in &by_key {
        let acked: Vec<&Write<'_>> = writes.iter().filter(|w| w.acknowledged).collect();
        let superseded = |w: &Write<'_>| {
            acked
                .iter()
                .any(|a| w.interval.certainly_before(&a.interval))
        };
        // The latest acknowledged writes: those no other acknowledged write supersedes.
        let latest: Vec<Operation> = acked
            .iter()
            .filter(|w| !superseded(w))
            .map(|w| w.op.clone())
            .collect();
        // Versions only grow while the object lives; a delete and a re-create start again at
        // one, so the version rule applies only to keys never (possibly) deleted.
        let max_acked_version = if writes.iter().any(|w| w.op.f == Func::Delete) {
            None
        } else {
            acked
                .iter()
                .filter_map(|w| w.op.output.get("version").and_then(Value::as_u64))
                .max()
        };
        let initial_value = initial.get(*key).map(canonical);
        for (node, reads) in final_reads {
            compared += 1;
            let found = reads.get(*key).cloned().unwrap_or(Value::Null);
            let (value, version) = observed(&found);
            let from_current = writes.iter().any(|w| !superseded(w) && w.value == value)
                || (acked.is_empty() && value == initial_value);
            let kind = if !from_current {
                let written_ever =
                    writes.iter().any(|w| w.value == value) || value == initial_value;
                Some(if written_ever {
                    LossKind::Superseded
                } else {
                    LossKind::Phantom
                })
            } else if matches!((version, max_acked_version), (Some(v), Some(m)) if v < m) {
                Some(LossKind::VersionRegressed)
            } else {
                None
            };
            if let Some(kind) = kind {
                lost.push(LostWrite {
                    node: node.clone(),
                    key: (*key).to_string(),
                    kind,
                    found,
                    expected_one_of: latest.clone(),
                });
            }
        }
    }
    Report {
        acknowledged,
        compared,
        lost,
    }
}
