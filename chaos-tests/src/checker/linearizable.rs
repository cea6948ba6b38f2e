//! Per-key linearizability of a register history (a Wing-Gong-Lowe search, as porcupine and
//! Knossos do it).
//!
//! Linearizability is compositional, so the history is partitioned by key and each key is
//! searched alone. For one key, the calls and returns are laid out on a doubly linked list sorted
//! by time; the search repeatedly picks a pending call that the sequential model accepts in the
//! current state, removes it (it is "linearized"), and backtracks when it reaches a return whose
//! operation could not be placed. Each (set of linearized operations, model state) pair is tried
//! once, which keeps the search tractable on real histories.
//!
//! Outcomes: `fail` operations did not happen and are dropped; `info` operations (unknown outcome)
//! have no return, so the search may place them anywhere after their invocation or not at all;
//! `info` reads tell nothing and are dropped.
//!
//! # The register model and the value shapes it reads
//!
//! The state of a key is absent or `(version, value)`; creating sets version 1 and every change
//! adds one, as the replicated state machine does for tenants and VMs.
//!
//! | f | invoke `value` | ok `value` |
//! |---|---|---|
//! | read | ignored | `null` (absent) or `{"value": v, "version"?: n}` |
//! | write | the new value | `null` or `{"version": n, ...}` (the resulting version) |
//! | cas | `{"expect": n, "value": v}` | as write |
//! | create | the value | as write |
//! | delete | `null` or `{"expect": n}` | ignored |
//!
//! A `cas` rejected because the version did not match is recorded as `fail`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::Value;

use super::{canonical, CheckResult, Verdict};
use crate::history::{Func, OpId, Operation, Outcome};

/// Limits and starting points of a check.
#[derive(Debug, Clone)]
pub struct Options {
    /// Wall-clock budget for the whole history; keys not decided by then are `Unknown`.
    pub budget: Duration,
    /// Keys that exist before the history starts, with their version and value.
    pub initial: HashMap<String, (u64, Value)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            budget: Duration::from_secs(30),
            initial: HashMap::new(),
        }
    }
}

/// An operation whose values do not have the shape the register model reads.
#[derive(Debug, thiserror::Error)]
#[error("operation {op_id}: {problem}")]
pub struct ShapeError {
    pub op_id: OpId,
    pub problem: &'static str,
}

/// The verdict for one key.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum KeyVerdict {
    Linearizable,
    NotLinearizable(Box<Violation>),
    /// The time budget ran out before the search finished.
    Unknown,
}

/// Why a key's history is not linearizable: the deepest point the search reached.
#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    pub key: String,
    /// The operation whose return the search could not get past: no order of the operations
    /// pending before it explains what it (or they) observed.
    pub blocked: Operation,
    /// The model state after the longest linearized prefix, as text.
    pub state: String,
    /// The end of that prefix (at most the last ten), oldest first.
    pub linearized_tail: Vec<Operation>,
    /// Operations pending at that point that the model refused or that led nowhere.
    pub pending: Vec<Operation>,
}

impl Violation {
    /// A readable multi-line account.
    pub fn describe(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "key {}: cannot linearize {}",
            self.key,
            self.blocked.describe()
        )];
        lines.push(format!("  state after the longest prefix: {}", self.state));
        for op in &self.linearized_tail {
            lines.push(format!("  linearized: {}", op.describe()));
        }
        for op in &self.pending {
            lines.push(format!("  pending: {}", op.describe()));
        }
        lines
    }
}

/// The result of checking a history.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub keys: BTreeMap<String, KeyVerdict>,
    /// Operations that took part in the search (after dropping failures and unknown reads).
    pub operations_checked: usize,
    pub elapsed: Duration,
}

impl Report {
    pub fn verdict(&self) -> Verdict {
        self.keys.values().fold(Verdict::Pass, |acc, v| {
            acc.and(match v {
                KeyVerdict::Linearizable => Verdict::Pass,
                KeyVerdict::NotLinearizable(_) => Verdict::Fail,
                KeyVerdict::Unknown => Verdict::Unknown,
            })
        })
    }

    /// Every violation found, by key.
    pub fn violations(&self) -> impl Iterator<Item = &Violation> {
        self.keys.values().filter_map(|v| match v {
            KeyVerdict::NotLinearizable(v) => Some(v.as_ref()),
            _ => None,
        })
    }

    pub fn to_result(&self) -> CheckResult {
        let bad = self.violations().count();
        let unknown = self
            .keys
            .values()
            .filter(|v| matches!(v, KeyVerdict::Unknown))
            .count();
        let mut details: Vec<String> = self.violations().flat_map(|v| v.describe()).collect();
        details.truncate(super::MAX_DETAILS * 4);
        CheckResult {
            checker: "linearizable".into(),
            verdict: self.verdict(),
            summary: format!(
                "{} operations on {} keys in {:.3}s: {} not linearizable, {} undecided",
                self.operations_checked,
                self.keys.len(),
                self.elapsed.as_secs_f64(),
                bad,
                unknown
            ),
            details,
        }
    }
}

/// Checks a paired history against the register model, key by key.
pub fn check(ops: &[Operation], options: &Options) -> Result<Report, ShapeError> {
    let started = Instant::now();
    let deadline = started + options.budget;
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in ops {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    let mut keys = BTreeMap::new();
    let mut operations_checked = 0;
    for (key, key_ops) in by_key {
        let mut interner = Interner::default();
        let initial = options
            .initial
            .get(key)
            .map(|(version, value)| (*version, interner.intern(value)));
        let mut search_ops = Vec::new();
        for op in key_ops {
            if let Some(reg) = RegOp::parse(op, &mut interner)? {
                search_ops.push(SearchOp { op, reg });
            }
        }
        operations_checked += search_ops.len();
        let verdict = search(key, &search_ops, initial, &interner, deadline);
        keys.insert(key.to_string(), verdict);
    }
    Ok(Report {
        keys,
        operations_checked,
        elapsed: started.elapsed(),
    })
}

/// A value id: JSON values are interned so model states are small, hashable and comparable.
type ValueId = u32;

/// The model state of one key: absent, or at a version with a value.
type State = Option<(u64, ValueId)>;

#[derive(Default)]
struct Interner {
    ids: HashMap<String, ValueId>,
    values: Vec<Value>,
}

impl Interner {
    fn intern(&mut self, value: &Value) -> ValueId {
        let canonical = canonical(value);
        if let Some(id) = self.ids.get(&canonical) {
            return *id;
        }
        let id = ValueId::try_from(self.values.len()).unwrap_or(ValueId::MAX);
        self.ids.insert(canonical, id);
        self.values.push(value.clone());
        id
    }

    fn describe(&self, state: State) -> String {
        match state {
            None => "absent".into(),
            Some((version, id)) => {
                let value = self
                    .values
                    .get(id as usize)
                    .map(Value::to_string)
                    .unwrap_or_default();
                format!("version {version}, value {value}")
            }
        }
    }
}

/// An operation as the register model sees it.
#[derive(Debug, Clone, Copy)]
enum RegOp {
    /// `None`: the client saw the key absent.
    Read {
        seen: Option<(Option<u64>, ValueId)>,
    },
    Write {
        value: ValueId,
        result_version: Option<u64>,
    },
    Cas {
        expect: u64,
        value: ValueId,
        result_version: Option<u64>,
    },
    Create {
        value: ValueId,
        result_version: Option<u64>,
    },
    Delete {
        expect: Option<u64>,
    },
}

fn version_field(value: &Value, field: &str, op_id: OpId) -> Result<Option<u64>, ShapeError> {
    match value.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or(ShapeError {
            op_id,
            problem: "a version is not a non-negative integer",
        }),
    }
}

/// The resulting version an acknowledged mutation reports, if any.
fn result_version(op: &Operation) -> Result<Option<u64>, ShapeError> {
    match op.outcome {
        Outcome::Ok => version_field(&op.output, "version", op.op_id),
        Outcome::Fail | Outcome::Info => Ok(None),
    }
}

impl RegOp {
    /// `None` for operations that constrain nothing: failures and reads of unknown outcome.
    fn parse(op: &Operation, interner: &mut Interner) -> Result<Option<RegOp>, ShapeError> {
        if op.outcome == Outcome::Fail || (op.outcome == Outcome::Info && op.f == Func::Read) {
            return Ok(None);
        }
        let reg = match op.f {
            Func::Read => {
                let seen = match &op.output {
                    Value::Null => None,
                    observed => {
                        let value = observed.get("value").ok_or(ShapeError {
                            op_id: op.op_id,
                            problem: "a read saw neither null nor {\"value\": ...}",
                        })?;
                        Some((
                            version_field(observed, "version", op.op_id)?,
                            interner.intern(value),
                        ))
                    }
                };
                RegOp::Read { seen }
            }
            Func::Write => RegOp::Write {
                value: interner.intern(&op.input),
                result_version: result_version(op)?,
            },
            Func::Create => RegOp::Create {
                value: interner.intern(&op.input),
                result_version: result_version(op)?,
            },
            Func::Cas => {
                let expect = version_field(&op.input, "expect", op.op_id)?.ok_or(ShapeError {
                    op_id: op.op_id,
                    problem: "a cas has no \"expect\" version",
                })?;
                let value = op.input.get("value").ok_or(ShapeError {
                    op_id: op.op_id,
                    problem: "a cas has no \"value\"",
                })?;
                RegOp::Cas {
                    expect,
                    value: interner.intern(value),
                    result_version: result_version(op)?,
                }
            }
            Func::Delete => RegOp::Delete {
                expect: version_field(&op.input, "expect", op.op_id)?,
            },
        };
        Ok(Some(reg))
    }

    /// The sequential model: the next state, or `None` if the operation cannot happen in `state`.
    fn step(self, state: State) -> Option<State> {
        let check = |version: u64, reported: Option<u64>| reported.is_none_or(|r| r == version);
        match self {
            RegOp::Read { seen } => match (state, seen) {
                (None, None) => Some(state),
                (Some((version, value)), Some((seen_version, seen_value)))
                    if value == seen_value && check(version, seen_version) =>
                {
                    Some(state)
                }
                _ => None,
            },
            RegOp::Write {
                value,
                result_version,
            } => {
                let version = state.map_or(1, |(v, _)| v + 1);
                check(version, result_version).then_some(Some((version, value)))
            }
            RegOp::Cas {
                expect,
                value,
                result_version,
            } => match state {
                Some((version, _)) if version == expect && check(version + 1, result_version) => {
                    Some(Some((version + 1, value)))
                }
                _ => None,
            },
            RegOp::Create {
                value,
                result_version,
            } => (state.is_none() && check(1, result_version)).then_some(Some((1, value))),
            RegOp::Delete { expect } => match state {
                Some((version, _)) if expect.is_none_or(|e| e == version) => Some(None),
                _ => None,
            },
        }
    }
}

struct SearchOp<'a> {
    op: &'a Operation,
    reg: RegOp,
}

impl SearchOp<'_> {
    fn definite(&self) -> bool {
        self.op.outcome == Outcome::Ok
    }
}

/// A set of operation indices kept as a 128-bit Zobrist hash: each operation has a random key
/// and the set is the XOR of its members' keys, so adding or removing one is O(1) and the memo
/// stores 16 bytes instead of a bitset of the whole history. Two different sets collide with
/// probability 2^-128 per pair, far below any chance of a checker run ever meeting one; a
/// collision could only prune a branch, and the keys are drawn from a fixed seed so a verdict
/// replays exactly.
struct OpSet {
    keys: Vec<u128>,
    hash: u128,
}

impl OpSet {
    fn new(n: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(0x6e6f_7661_6372_6f6e);
        Self {
            keys: (0..n).map(|_| rng.gen()).collect(),
            hash: 0,
        }
    }
    /// Adds or removes operation `i` (XOR is its own inverse).
    fn toggle(&mut self, i: usize) {
        self.hash ^= self.keys[i];
    }
}

/// The list of calls and returns: node 0 is the head, the last node the tail.
struct Links {
    next: Vec<usize>,
    prev: Vec<usize>,
}

impl Links {
    fn remove(&mut self, i: usize) {
        let (p, n) = (self.prev[i], self.next[i]);
        self.next[p] = n;
        self.prev[n] = p;
    }
    /// Undoes `remove`; removals must be undone in reverse order, which the search's stack keeps.
    fn restore(&mut self, i: usize) {
        let (p, n) = (self.prev[i], self.next[i]);
        self.next[p] = i;
        self.prev[n] = i;
    }
}

/// What a list node stands for.
#[derive(Clone, Copy)]
struct Event {
    op: usize,
    is_call: bool,
}

fn search(
    key: &str,
    ops: &[SearchOp<'_>],
    initial: State,
    interner: &Interner,
    deadline: Instant,
) -> KeyVerdict {
    let mut remaining = ops.iter().filter(|o| o.definite()).count();
    if remaining == 0 {
        return KeyVerdict::Linearizable;
    }
    // Lay out calls and returns by time; an unknown outcome returns "at infinity". At equal
    // times calls come first, so operations that touch are treated as concurrent.
    let mut events: Vec<(u64, bool, Event)> = Vec::with_capacity(ops.len() * 2);
    for (i, o) in ops.iter().enumerate() {
        let ret = if o.definite() {
            o.op.complete_ns.unwrap_or(u64::MAX)
        } else {
            u64::MAX
        };
        events.push((
            o.op.invoke_ns,
            false,
            Event {
                op: i,
                is_call: true,
            },
        ));
        events.push((
            ret,
            true,
            Event {
                op: i,
                is_call: false,
            },
        ));
    }
    events.sort_by_key(|(time, is_return, e)| (*time, *is_return, e.op));
    let head = 0;
    let tail = events.len() + 1;
    let node_events: Vec<Event> = events.iter().map(|(_, _, e)| *e).collect();
    let node = |index: usize| -> Event { node_events[index - 1] };
    let mut return_node = vec![0; ops.len()];
    for (index, e) in node_events.iter().enumerate() {
        if !e.is_call {
            return_node[e.op] = index + 1;
        }
    }
    let mut links = Links {
        next: (1..=tail + 1).collect(),
        prev: std::iter::once(0).chain(0..tail).collect(),
    };

    let mut state = initial;
    let mut linearized = OpSet::new(ops.len());
    let mut seen: HashSet<(u128, State)> = HashSet::new();
    // The calls linearized so far, each with the state before it.
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut deepest: Option<Box<Violation>> = None;
    let mut deepest_depth = 0;
    let mut steps: u64 = 0;
    let mut entry = links.next[head];
    loop {
        steps += 1;
        if steps.is_multiple_of(1024) && Instant::now() >= deadline {
            return KeyVerdict::Unknown;
        }
        let at_return = entry == tail || !node(entry).is_call;
        if !at_return {
            let i = node(entry).op;
            if let Some(next_state) = ops[i].reg.step(state) {
                linearized.toggle(i);
                if seen.insert((linearized.hash, next_state)) {
                    stack.push((entry, state));
                    state = next_state;
                    links.remove(entry);
                    links.remove(return_node[i]);
                    if ops[i].definite() {
                        remaining -= 1;
                        if remaining == 0 {
                            return KeyVerdict::Linearizable;
                        }
                    }
                    entry = links.next[head];
                    continue;
                }
                linearized.toggle(i);
            }
            entry = links.next[entry];
            continue;
        }
        // A return (or the end) with its operation not linearized: this branch is dead.
        if deepest.is_none() || stack.len() > deepest_depth {
            deepest_depth = stack.len();
            deepest = Some(Box::new(violation_at(
                key, ops, &stack, &links, head, entry, tail, &node, state, interner,
            )));
        }
        let Some((call, before)) = stack.pop() else {
            break;
        };
        let i = node(call).op;
        state = before;
        linearized.toggle(i);
        links.restore(return_node[i]);
        links.restore(call);
        if ops[i].definite() {
            remaining += 1;
        }
        entry = links.next[call];
    }
    match deepest {
        Some(v) => KeyVerdict::NotLinearizable(v),
        // Unreachable in practice: a failed search always passes a dead return first.
        None => KeyVerdict::Unknown,
    }
}

#[allow(clippy::too_many_arguments)]
fn violation_at(
    key: &str,
    ops: &[SearchOp<'_>],
    stack: &[(usize, State)],
    links: &Links,
    head: usize,
    blocked_node: usize,
    tail: usize,
    node: &impl Fn(usize) -> Event,
    state: State,
    interner: &Interner,
) -> Violation {
    let linearized_tail = stack
        .iter()
        .rev()
        .take(10)
        .rev()
        .map(|(call, _)| ops[node(*call).op].op.clone())
        .collect();
    let mut pending = Vec::new();
    let mut cursor = links.next[head];
    while cursor != blocked_node && cursor != tail && pending.len() < 10 {
        let e = node(cursor);
        if e.is_call {
            pending.push(ops[e.op].op.clone());
        }
        cursor = links.next[cursor];
    }
    // The end of the list is only reached when nothing is pending; name the first pending call.
    let blocked = if blocked_node == tail {
        pending.first().cloned()
    } else {
        Some(ops[node(blocked_node).op].op.clone())
    };
    Violation {
        key: key.to_string(),
        blocked: blocked.unwrap_or_else(|| ops[0].op.clone()),
        state: interner.describe(state),
        linearized_tail,
        pending,
    }
}
