//! The simulation's witness: the event trace (hashed, for replay) and the Raft invariants,
//! checked at every event that could break them.
//!
//! - **Election safety**: openraft 0.9 runs in its default "advanced" leader-id mode, where a
//!   leader is identified by `(term, node)` and two candidates may both win the same term (their
//!   entries carry distinct, totally ordered leader ids). So the classic "one leader per term"
//!   does not hold by design (seed 33 shows it) and is replaced by what the mode promises:
//!   every node's saved vote only moves forward, every leader was granted its leader id by a
//!   quorum of voters before it led (checked at each `save_vote`), and a node that reports
//!   itself leader does so under a leader id that names it (checked at each step).
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
    /// Term -> nodes that led in it (several in one term are allowed in this mode).
    leaders: BTreeMap<u64, std::collections::BTreeSet<NodeId>>,
    /// The last vote each node saved.
    votes: BTreeMap<NodeId, Vote<NodeId>>,
    /// Leader id (term, node) -> nodes that saved a vote for it.
    grants: BTreeMap<(u64, NodeId), std::collections::BTreeSet<NodeId>>,
    voters: usize,
    committed: BTreeMap<u64, CommittedEntry>,
    applies: u64,
    /// The whole trace, kept only when asked for (replaying one seed to study it).
    full: Option<Vec<String>>,
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
                votes: BTreeMap::new(),
                grants: BTreeMap::new(),
                voters: 0,
                committed: BTreeMap::new(),
                applies: 0,
                full: None,
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
        if let Some(full) = st.full.as_mut() {
            full.push(line.clone());
        }
        st.tail.push_back(line);
    }

    /// Keeps every trace line from now on (see [`Observer::full_trace`]).
    pub fn keep_full_trace(&self) {
        self.lock().full.get_or_insert_with(Vec::new);
    }

    /// The whole trace, when [`Observer::keep_full_trace`] was called.
    pub fn full_trace(&self) -> Option<Vec<String>> {
        self.lock().full.clone()
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

    /// How many voters the cluster has (its quorum is a majority of them).
    pub fn set_voters(&self, voters: usize) {
        self.lock().voters = voters;
    }

    /// A node saved a vote: votes only move forward, and a node that commits a vote for itself
    /// (it won the election) must have been granted that leader id by a quorum.
    pub fn vote_saved(&self, node: NodeId, vote: &Vote<NodeId>) {
        self.event(format_args!("n{node} vote {vote}"));
        let leader = (vote.leader_id.term, vote.leader_id.node_id);
        let mut problems = Vec::new();
        {
            let mut st = self.lock();
            if let Some(previous) = st.votes.get(&node) {
                let forward = matches!(
                    vote.partial_cmp(previous),
                    Some(std::cmp::Ordering::Greater | std::cmp::Ordering::Equal)
                );
                if !forward {
                    problems.push(format!(
                        "n{node} vote went backwards from {previous} to {vote}"
                    ));
                }
            }
            st.votes.insert(node, *vote);
            st.grants.entry(leader).or_default().insert(node);
            if vote.is_committed() && leader.1 == node {
                st.leaders.entry(leader.0).or_default().insert(node);
                let granted = st.grants.get(&leader).map(|g| g.len()).unwrap_or(0);
                let quorum = st.voters / 2 + 1;
                if granted < quorum {
                    problems.push(format!(
                        "n{node} leads term {} with {granted} grants, fewer than a quorum of {quorum}",
                        leader.0
                    ));
                }
            }
        }
        for p in problems {
            self.violation(p);
        }
    }

    /// `witness` reports itself leader under `vote`: that leader id must name it.
    pub fn leader_seen(&self, witness: NodeId, vote: &Vote<NodeId>) {
        if vote.leader_id.node_id != witness {
            self.violation(format!(
                "n{witness} acts as leader under the leader id of n{} ({vote})",
                vote.leader_id.node_id
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

    /// Entries applied (all nodes), elected leaders, and terms that had more than one leader.
    pub fn counts(&self) -> (u64, usize, usize) {
        let st = self.lock();
        let elected = st.leaders.values().map(|l| l.len()).sum();
        let shared = st.leaders.values().filter(|l| l.len() > 1).count();
        (st.applies, elected, shared)
    }
}

impl Default for Observer {
    fn default() -> Self {
        Self::new()
    }
}

/// A node's log as index -> (log id, payload fingerprint).
pub type LogDigest = BTreeMap<u64, (LogId<NodeId>, u64)>;

/// Log matching over the nodes' current logs: returns a description of each violation.
///
/// For two logs, take the highest index at which both hold an entry of the same leader id;
/// every index both hold up to there must be identical.
pub fn log_matching(logs: &[(NodeId, LogDigest)]) -> Vec<String> {
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
    fn votes_must_move_forward_and_leaders_need_a_quorum() {
        let obs = Observer::new();
        obs.set_voters(3);
        let v = |term, node| Vote::new(term, node);
        let won = |term, node| Vote::new_committed(term, node);
        obs.vote_saved(1, &v(2, 1));
        obs.vote_saved(2, &v(2, 1));
        obs.vote_saved(1, &won(2, 1));
        assert!(obs.violations().is_empty(), "{:?}", obs.violations());
        // n3 wins with only its own grant.
        obs.vote_saved(3, &v(3, 3));
        obs.vote_saved(3, &won(3, 3));
        assert_eq!(obs.violations().len(), 1);
        // n2 goes back to an older term.
        obs.vote_saved(2, &v(1, 2));
        assert_eq!(obs.violations().len(), 2);
        // A leader reporting under another node's leader id.
        obs.leader_seen(1, &won(2, 3));
        assert_eq!(obs.violations().len(), 3);
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
