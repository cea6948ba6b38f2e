//! The simulation's witness: the event trace (hashed, for replay) and the Raft invariants,
//! checked at every event that could break them.
//!
//! - **One leader per term**: every vote a node saves as committed names the leader of its term;
//!   two different leaders for one term is a violation (checked at each `save_vote`, and from
//!   every node's metrics at each step).
//! - **Committed entries never change**: the first node to apply index `i` fixes the entry at
//!   `i`; every later apply at `i`, on any node, must carry the same log id and payload, and no
//!   node may truncate an entry that some node already applied.
//! - **State machines agree on applied prefixes**: applying the entry at `i` must produce the
//!   same response and the same writes on every node; and at each step, nodes that report the
//!   same last applied index hold the same state digest.
//! - **Log matching**: at each step, any two logs holding an entry with the same index and term
//!   hold identical entries up to that index.
//!
//! The trace is every network message, fault, apply and client operation, each stamped with the
//! simulated time; its sha256 is the replay fingerprint of a seed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use openraft::{Entry, LogId, Vote};
use raft::{NodeId, Response, TypeConfig};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// How many recent trace lines are kept for the failure report.
const TAIL: usize = 60;
/// How many violations are kept (the first ones matter most).
const MAX_VIOLATIONS: usize = 50;

/// What one apply did, as reported by a store.
pub struct AppliedEntry<'a> {
    pub entry: &'a Entry<TypeConfig>,
    pub response: &'a Response,
    pub effects: &'a [(Vec<u8>, Option<Vec<u8>>)],
}

/// The fingerprint of a committed entry and of its outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CommittedEntry {
    log_id: LogId<NodeId>,
    payload: u64,
    outcome: u64,
    first_node: NodeId,
}

struct State {
    hasher: Sha256,
    events: u64,
    tail: std::collections::VecDeque<String>,
    violations: Vec<String>,
    leaders: BTreeMap<u64, NodeId>,
    committed: BTreeMap<u64, CommittedEntry>,
    applies: u64,
}

/// Shared by every node, the network and the clients of one simulated run.
pub struct Observer {
    origin: Instant,
    state: Mutex<State>,
}

/// A stable 64-bit hash (SipHash with fixed keys) of a value's JSON form.
pub fn fingerprint<T: serde::Serialize>(value: &T) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    match serde_json::to_vec(value) {
        Ok(bytes) => bytes.hash(&mut h),
        // Every type here serialises; should one fail, its debug-free hash is still stable.
        Err(_) => 0u8.hash(&mut h),
    }
    h.finish()
}

impl Observer {
    /// Starts the clock at the current (simulated) instant.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            state: Mutex::new(State {
                hasher: Sha256::new(),
                events: 0,
                tail: std::collections::VecDeque::new(),
                violations: Vec::new(),
                leaders: BTreeMap::new(),
                committed: BTreeMap::new(),
                applies: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Nanoseconds of simulated time since the run started.
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Appends one line to the trace.
    pub fn event(&self, what: std::fmt::Arguments<'_>) {
        let mut line = String::new();
        let now = self.now_ns();
        let _ = write!(
            line,
            "{:>8}.{:06} ",
            now / 1_000_000_000,
            (now / 1000) % 1_000_000
        );
        let _ = line.write_fmt(what);
        let mut st = self.lock();
        st.hasher.update(line.as_bytes());
        st.hasher.update(b"\n");
        st.events += 1;
        if st.tail.len() == TAIL {
            st.tail.pop_front();
        }
        st.tail.push_back(line);
    }

    /// Records a broken invariant (and puts it in the trace).
    pub fn violation(&self, what: String) {
        self.event(format_args!("VIOLATION {what}"));
        let mut st = self.lock();
        if st.violations.len() < MAX_VIOLATIONS {
            st.violations
                .push(format!("at {:.3}s: {what}", self.now_ns() as f64 / 1e9));
        }
    }

    /// A node saved a vote; a committed vote names the leader of its term.
    pub fn vote_saved(&self, node: NodeId, vote: &Vote<NodeId>) {
        self.event(format_args!("n{node} vote {vote}"));
        if vote.is_committed() {
            self.leader_seen(node, vote.leader_id().term, vote.leader_id().voted_for());
        }
    }

    /// Someone (`witness`) saw `leader` lead `term`.
    pub fn leader_seen(&self, witness: NodeId, term: u64, leader: Option<NodeId>) {
        let Some(leader) = leader else { return };
        let previous = {
            let mut st = self.lock();
            *st.leaders.entry(term).or_insert(leader)
        };
        if previous != leader {
            self.violation(format!(
                "two leaders in term {term}: n{previous} and n{leader} (seen by n{witness})"
            ));
        }
    }

    /// A node applied an entry: it must be the committed entry at that index, with the same
    /// outcome everywhere.
    pub fn applied(&self, node: NodeId, applied: &AppliedEntry<'_>) {
        let index = applied.entry.log_id.index;
        let this = CommittedEntry {
            log_id: applied.entry.log_id,
            payload: fingerprint(&applied.entry.payload),
            outcome: {
                let mut h = std::hash::DefaultHasher::new();
                fingerprint(applied.response).hash(&mut h);
                applied.effects.hash(&mut h);
                h.finish()
            },
            first_node: node,
        };
        self.event(format_args!(
            "n{node} apply {} payload {:016x} outcome {:016x}",
            applied.entry.log_id, this.payload, this.outcome
        ));
        let first = {
            let mut st = self.lock();
            st.applies += 1;
            *st.committed.entry(index).or_insert(this)
        };
        if first.log_id != this.log_id || first.payload != this.payload {
            self.violation(format!(
                "committed entry changed at index {index}: n{} applied {} ({:016x}), n{node} applied {} ({:016x})",
                first.first_node, first.log_id, first.payload, this.log_id, this.payload
            ));
        } else if first.outcome != this.outcome {
            self.violation(format!(
                "state machines diverge at index {index}: n{} and n{node} applied {} with different outcomes",
                first.first_node, this.log_id
            ));
        }
    }

    /// A node removed entries from the end of its log; none of them may be committed.
    pub fn truncated(&self, node: NodeId, removed: &[LogId<NodeId>]) {
        self.event(format_args!(
            "n{node} truncate {:?}",
            removed.iter().map(|l| l.index).collect::<Vec<_>>()
        ));
        let hits: Vec<String> = {
            let st = self.lock();
            removed
                .iter()
                .filter(|id| st.committed.get(&id.index).map(|c| c.log_id) == Some(**id))
                .map(|id| id.to_string())
                .collect()
        };
        if !hits.is_empty() {
            self.violation(format!(
                "n{node} truncated committed entries {}",
                hits.join(", ")
            ));
        }
    }

    /// The highest index some node has applied.
    pub fn highest_applied(&self) -> u64 {
        self.lock()
            .committed
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
    }

    /// Every violation so far.
    pub fn violations(&self) -> Vec<String> {
        self.lock().violations.clone()
    }

    /// The trace's fingerprint and length.
    pub fn fingerprint(&self) -> (String, u64) {
        let st = self.lock();
        (hex::encode(st.hasher.clone().finalize()), st.events)
    }

    /// The last lines of the trace.
    pub fn tail(&self) -> Vec<String> {
        self.lock().tail.iter().cloned().collect()
    }

    /// Entries applied (all nodes) and terms with a known leader.
    pub fn counts(&self) -> (u64, usize) {
        let st = self.lock();
        (st.applies, st.leaders.len())
    }
}

impl Default for Observer {
    fn default() -> Self {
        Self::new()
    }
}

/// Log matching over the nodes' current logs: returns a description of each violation.
///
/// Each log is given as index -> (term, payload fingerprint). For two logs, take the highest
/// index at which both hold an entry of the same term; every index both hold up to there must
/// be identical.
pub fn log_matching(logs: &[(NodeId, BTreeMap<u64, (LogId<NodeId>, u64)>)]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, (a, la)) in logs.iter().enumerate() {
        for (b, lb) in logs.iter().skip(i + 1) {
            let anchor = la
                .iter()
                .rev()
                .find(|(idx, (id, _))| {
                    lb.get(idx).map(|(other, _)| other.leader_id) == Some(id.leader_id)
                })
                .map(|(idx, _)| *idx);
            let Some(anchor) = anchor else { continue };
            for (idx, ea) in la.range(..=anchor) {
                if let Some(eb) = lb.get(idx) {
                    if ea != eb {
                        out.push(format!(
                            "log matching: n{a} and n{b} agree at index {anchor} but differ at {idx} ({} vs {})",
                            ea.0, eb.0
                        ));
                        break;
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn id(term: u64, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    #[test]
    fn log_matching_accepts_a_lagging_log_and_catches_a_forked_one() {
        let full: BTreeMap<u64, (LogId<NodeId>, u64)> = [
            (1, (id(1, 1), 10)),
            (2, (id(1, 2), 20)),
            (3, (id(2, 3), 30)),
        ]
        .into();
        let lagging: BTreeMap<u64, (LogId<NodeId>, u64)> =
            [(1, (id(1, 1), 10)), (2, (id(1, 2), 20))].into();
        assert!(log_matching(&[(1, full.clone()), (2, lagging)]).is_empty());
        // Same term at index 3, different content at index 2.
        let forked: BTreeMap<u64, (LogId<NodeId>, u64)> = [
            (1, (id(1, 1), 10)),
            (2, (id(1, 2), 99)),
            (3, (id(2, 3), 30)),
        ]
        .into();
        assert_eq!(log_matching(&[(1, full), (3, forked)]).len(), 1);
    }
}
