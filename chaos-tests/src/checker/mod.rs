//! The checkers, one module per invariant, and the verdict type they share.
//!
//! Every checker is a pure function of recorded evidence (a history, samples, final reads) to a
//! typed report; none of them talks to a cluster. Each report converts into a [`CheckResult`]
//! for the run report.

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod convergence;
pub mod linearizable;
pub mod lost_writes;
pub mod quota;
pub mod single_runner;

/// The answer of one checker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The invariant held on all the evidence.
    Pass,
    /// The invariant was violated; the details name the evidence.
    Fail,
    /// The checker could not decide (for example its time budget ran out).
    Unknown,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "FAIL",
            Verdict::Unknown => "unknown",
        }
    }

    /// Combines two verdicts: any failure fails, else any unknown is unknown.
    pub fn and(self, other: Verdict) -> Verdict {
        match (self, other) {
            (Verdict::Fail, _) | (_, Verdict::Fail) => Verdict::Fail,
            (Verdict::Unknown, _) | (_, Verdict::Unknown) => Verdict::Unknown,
            (Verdict::Pass, Verdict::Pass) => Verdict::Pass,
        }
    }
}

/// One checker's verdict in a form the run report can print.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    /// The checker's name, for example `linearizable`.
    pub checker: String,
    pub verdict: Verdict,
    /// One line: what was checked and the outcome.
    pub summary: String,
    /// The offending evidence, one item per line (bounded by each checker).
    pub details: Vec<String>,
}

/// How many offending items a report lists before summarising the rest.
pub(crate) const MAX_DETAILS: usize = 20;

/// A write-like event with an interval, as used by the "possibly current" rule.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Interval {
    pub invoke_ns: u64,
    /// `None`: unknown outcome, possibly applied at any time after invocation.
    pub complete_ns: Option<u64>,
}

impl Interval {
    /// Whether `later` certainly took effect after `self`: it was invoked after `self` completed.
    pub fn certainly_before(&self, later: &Interval) -> bool {
        matches!(self.complete_ns, Some(c) if later.invoke_ns > c)
    }
}

/// Serialises JSON with object keys sorted, so equal values compare equal as text whatever
/// their key order (and whatever map features serde_json was built with).
pub(crate) fn canonical(value: &Value) -> String {
    let mut out = String::new();
    write_sorted(value, &mut out);
    out
}

fn write_sorted(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_sorted(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_sorted(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}
