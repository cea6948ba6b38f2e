//! A quota is never exceeded, checked two ways.
//!
//! 1. **Samples**: a tenant read from any node (usage and quota from one consistent read of the
//!    tenant object) never shows usage above its limit.
//! 2. **Acknowledged claims**: from the clients' own evidence, a lower bound of what a tenant uses
//!    can be computed at every instant: every acknowledged create certainly holds its resources
//!    from its completion on, and a release (delete) may free them as early as its invocation.
//!    When that lower bound exceeds every limit that may be in force at that instant, the cluster
//!    admitted more than the quota allowed, whatever order it applied things in.
//!
//! A limit change may be in force at `t` when it was invoked by `t` and no acknowledged change
//! completed by `t` was invoked after it completed (the same "superseded" rule as lost writes).
//! Workloads must not lower a limit below current usage: the samples check would report it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{CheckResult, Interval, Verdict, MAX_DETAILS};
use crate::history::Outcome;

/// A quota dimension of a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    Vms,
    Vcpus,
    MemoryMib,
    DiskGib,
}

/// One observation of a tenant's usage and limit, read from one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageSample {
    pub time_ns: u64,
    pub node: String,
    pub tenant: String,
    pub resource: Resource,
    pub usage: u64,
    /// `None`: unlimited.
    pub limit: Option<u64>,
}

/// A client's attempt to change a tenant's limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LimitChange {
    pub tenant: String,
    pub resource: Resource,
    /// `None`: unlimited.
    pub limit: Option<u64>,
    pub invoke_ns: u64,
    pub complete_ns: Option<u64>,
    pub outcome: Outcome,
}

/// Whether a claim takes or gives back resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// A create: holds `amount` from its acknowledgement on.
    Acquire,
    /// A delete: may free `amount` from its invocation on.
    Release,
}

/// A client operation that changes usage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    pub tenant: String,
    pub resource: Resource,
    pub direction: Direction,
    pub amount: u64,
    pub invoke_ns: u64,
    pub complete_ns: Option<u64>,
    pub outcome: Outcome,
    /// The operation in the history, for the report.
    pub op_id: Option<u64>,
}

/// The evidence the checker reads.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Evidence {
    pub samples: Vec<UsageSample>,
    /// Limits in force before the run, per tenant and resource (absent: unlimited).
    pub initial_limits: BTreeMap<String, BTreeMap<Resource, u64>>,
    /// Usage before the run, per tenant and resource (absent: zero).
    pub initial_usage: BTreeMap<String, BTreeMap<Resource, u64>>,
    pub limit_changes: Vec<LimitChange>,
    pub claims: Vec<Claim>,
}

/// One way the quota was exceeded.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Overshoot {
    /// A node showed usage above the limit.
    Sample(UsageSample),
    /// Acknowledged creates alone prove usage above every possible limit.
    Admitted {
        tenant: String,
        resource: Resource,
        time_ns: u64,
        /// The least the tenant certainly used at `time_ns`.
        usage_at_least: u64,
        /// The highest limit that may have been in force then.
        limit_at_most: u64,
        /// The create whose acknowledgement crossed the limit.
        op_id: Option<u64>,
    },
}

impl Overshoot {
    pub fn describe(&self) -> String {
        match self {
            Overshoot::Sample(s) => format!(
                "tenant {} {:?}: node {} showed usage {} above limit {} at {} ns",
                s.tenant,
                s.resource,
                s.node,
                s.usage,
                s.limit.map(|l| l.to_string()).unwrap_or_default(),
                s.time_ns
            ),
            Overshoot::Admitted {
                tenant,
                resource,
                time_ns,
                usage_at_least,
                limit_at_most,
                op_id,
            } => format!(
                "tenant {tenant} {resource:?}: acknowledged creates hold at least {usage_at_least} \
                 at {time_ns} ns but the limit was at most {limit_at_most} (crossed by op {})",
                op_id.map(|i| i.to_string()).unwrap_or_else(|| "?".into())
            ),
        }
    }
}

/// The result of the check.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub samples: usize,
    pub acknowledged_claims: usize,
    pub overshoots: Vec<Overshoot>,
}

impl Report {
    pub fn verdict(&self) -> Verdict {
        if self.overshoots.is_empty() {
            Verdict::Pass
        } else {
            Verdict::Fail
        }
    }

    pub fn to_result(&self) -> CheckResult {
        CheckResult {
            checker: "quota".into(),
            verdict: self.verdict(),
            summary: format!(
                "{} usage samples, {} acknowledged claims: {} overshoots",
                self.samples,
                self.acknowledged_claims,
                self.overshoots.len()
            ),
            details: self
                .overshoots
                .iter()
                .take(MAX_DETAILS)
                .map(Overshoot::describe)
                .collect(),
        }
    }
}

fn interval(invoke_ns: u64, complete_ns: Option<u64>, outcome: Outcome) -> Interval {
    Interval {
        invoke_ns,
        complete_ns: match outcome {
            Outcome::Ok => complete_ns,
            Outcome::Fail | Outcome::Info => None,
        },
    }
}

/// The highest limit that may be in force at `t`; `None` when it may be unlimited.
fn max_possible_limit(changes: &[&LimitChange], initial: Option<u64>, t: u64) -> Option<u64> {
    let acked_by_t: Vec<Interval> = changes
        .iter()
        .filter(|c| c.outcome == Outcome::Ok && c.complete_ns.is_some_and(|done| done <= t))
        .map(|c| interval(c.invoke_ns, c.complete_ns, c.outcome))
        .collect();
    let mut candidates: Vec<Option<u64>> = changes
        .iter()
        .filter(|c| c.invoke_ns <= t)
        .filter(|c| {
            let me = interval(c.invoke_ns, c.complete_ns, c.outcome);
            !acked_by_t.iter().any(|a| me.certainly_before(a))
        })
        .map(|c| c.limit)
        .collect();
    if acked_by_t.is_empty() {
        candidates.push(initial);
    }
    // Unlimited beats any number; with no candidate at all nothing constrains usage.
    if candidates.is_empty() || candidates.iter().any(Option::is_none) {
        return None;
    }
    candidates.into_iter().flatten().max()
}

/// The claims and limit changes of one tenant's resource.
type Group<'a> = (Vec<&'a Claim>, Vec<&'a LimitChange>);

/// Checks samples and acknowledged claims against the limits.
pub fn check(evidence: &Evidence) -> Report {
    let mut overshoots: Vec<Overshoot> = evidence
        .samples
        .iter()
        .filter(|s| s.limit.is_some_and(|limit| s.usage > limit))
        .cloned()
        .map(Overshoot::Sample)
        .collect();

    let mut groups: BTreeMap<(&str, Resource), Group<'_>> = BTreeMap::new();
    for claim in evidence
        .claims
        .iter()
        .filter(|c| c.outcome != Outcome::Fail)
    {
        groups
            .entry((claim.tenant.as_str(), claim.resource))
            .or_default()
            .0
            .push(claim);
    }
    for change in evidence
        .limit_changes
        .iter()
        .filter(|c| c.outcome != Outcome::Fail)
    {
        groups
            .entry((change.tenant.as_str(), change.resource))
            .or_default()
            .1
            .push(change);
    }
    let acknowledged_claims = evidence
        .claims
        .iter()
        .filter(|c| c.outcome == Outcome::Ok)
        .count();
    for ((tenant, resource), (claims, changes)) in groups {
        let initial_limit = evidence
            .initial_limits
            .get(tenant)
            .and_then(|m| m.get(&resource))
            .copied();
        let base = evidence
            .initial_usage
            .get(tenant)
            .and_then(|m| m.get(&resource))
            .copied()
            .unwrap_or(0);
        // Check at every acknowledgement of an acquire: that is when the lower bound grows.
        for claim in claims.iter().filter(|c| {
            c.direction == Direction::Acquire && c.outcome == Outcome::Ok && c.complete_ns.is_some()
        }) {
            let Some(t) = claim.complete_ns else { continue };
            let held: u64 = claims
                .iter()
                .filter(|c| c.direction == Direction::Acquire && c.outcome == Outcome::Ok)
                .filter(|c| c.complete_ns.is_some_and(|done| done <= t))
                .map(|c| c.amount)
                .sum();
            let maybe_freed: u64 = claims
                .iter()
                .filter(|c| c.direction == Direction::Release && c.invoke_ns <= t)
                .map(|c| c.amount)
                .sum();
            let at_least = (base + held).saturating_sub(maybe_freed);
            if let Some(limit) = max_possible_limit(&changes, initial_limit, t) {
                if at_least > limit {
                    overshoots.push(Overshoot::Admitted {
                        tenant: tenant.to_string(),
                        resource,
                        time_ns: t,
                        usage_at_least: at_least,
                        limit_at_most: limit,
                        op_id: claim.op_id,
                    });
                }
            }
        }
    }
    Report {
        samples: evidence.samples.len(),
        acknowledged_claims,
        overshoots,
    }
}
