//! Seeded random register histories that are linearizable by construction.
//!
//! Concurrent clients are simulated against one sequential register per key: every operation is
//! invoked, then applied to the model at a later instant (its linearization point), then completed
//! later still, so the application order is a witness linearization. Some operations end with an
//! unknown outcome, either after being applied (the reply was lost) or without ever being applied
//! (the request timed out before reaching the leader), and preconditions that do not hold are
//! recorded as `fail`. The checkers must accept every such history; the same seed gives the same
//! history, so a failure replays.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::history::{Func, Operation, Outcome};

/// The shape of a generated history.
#[derive(Debug, Clone)]
pub struct Config {
    pub processes: usize,
    pub keys: usize,
    pub operations: usize,
    /// Distinct values written: a small range makes equal values common, which is harder.
    pub values: u64,
    /// Probability that an applied operation's reply is lost (recorded as `info`).
    pub lost_reply: f64,
    /// Probability that an operation times out without being applied (recorded as `info`).
    pub lost_request: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            processes: 5,
            keys: 3,
            operations: 200,
            values: 4,
            lost_reply: 0.05,
            lost_request: 0.05,
        }
    }
}

enum Phase {
    Idle,
    /// Invoked, not yet applied.
    Invoked(usize),
    /// Applied; the outcome is known and waits to be completed.
    Applied(usize),
}

/// A generated history and the state it leaves.
#[derive(Debug, Clone)]
pub struct Generated {
    pub seed: u64,
    pub ops: Vec<Operation>,
    /// Key -> its final state in the read shape (`null` or `{"version", "value"}`), as a fully
    /// healed cluster would return it.
    pub final_state: BTreeMap<String, Value>,
}

/// Generates a linearizable history from `seed`.
pub fn register_history(seed: u64, config: &Config) -> Generated {
    let mut rng = StdRng::seed_from_u64(seed);
    let keys: Vec<String> = (0..config.keys.max(1)).map(|k| format!("k{k}")).collect();
    // The sequential model: per key, absent or (version, value).
    let mut model: Vec<Option<(u64, u64)>> = vec![None; keys.len()];
    let mut phases: Vec<Phase> = (0..config.processes.max(1)).map(|_| Phase::Idle).collect();
    let mut ops: Vec<Operation> = Vec::new();
    let mut key_of: Vec<usize> = Vec::new();
    let mut time: u64 = 0;
    let mut invoked = 0;
    while invoked < config.operations || phases.iter().any(|p| !matches!(p, Phase::Idle)) {
        time += rng.gen_range(1..=3);
        let p = rng.gen_range(0..phases.len());
        match phases[p] {
            Phase::Idle => {
                if invoked >= config.operations {
                    continue;
                }
                invoked += 1;
                let k = rng.gen_range(0..keys.len());
                let value = rng.gen_range(0..config.values.max(1));
                let (f, input) = match rng.gen_range(0..10) {
                    0..=3 => (Func::Read, Value::Null),
                    4..=5 => (Func::Write, json!(value)),
                    6..=7 => {
                        // Usually the current version, sometimes a stale or future one.
                        let current = model[k].map_or(0, |(v, _)| v);
                        let expect = match rng.gen_range(0..4) {
                            0 => current.saturating_sub(1),
                            1 => current + 1,
                            _ => current,
                        };
                        (Func::Cas, json!({"expect": expect, "value": value}))
                    }
                    8 => (Func::Create, json!(value)),
                    _ => (Func::Delete, Value::Null),
                };
                ops.push(Operation {
                    process: p as u64,
                    op_id: ops.len() as u64,
                    f,
                    key: keys[k].clone(),
                    input,
                    output: Value::Null,
                    outcome: Outcome::Info,
                    invoke_ns: time,
                    complete_ns: None,
                    node: Some(format!("n{}", rng.gen_range(1..=3))),
                    error: None,
                });
                key_of.push(k);
                phases[p] = Phase::Invoked(ops.len() - 1);
            }
            Phase::Invoked(i) => {
                if rng.gen_bool(config.lost_request) {
                    // Timed out before taking effect: an open-ended unknown outcome.
                    phases[p] = Phase::Idle;
                    continue;
                }
                let k = key_of[i];
                let op = &mut ops[i];
                let applied = apply(&mut model[k], op);
                op.outcome = if applied { Outcome::Ok } else { Outcome::Fail };
                if !applied {
                    op.output = Value::Null;
                }
                if applied && rng.gen_bool(config.lost_reply) {
                    // Applied, but the client never learns it.
                    op.outcome = Outcome::Info;
                    op.output = Value::Null;
                    phases[p] = Phase::Idle;
                } else {
                    phases[p] = Phase::Applied(i);
                }
            }
            Phase::Applied(i) => {
                ops[i].complete_ns = Some(time);
                phases[p] = Phase::Idle;
            }
        }
        // Stop starting new work once the budget is spent; in-flight operations that were never
        // applied end as unknown, which is what a client sees when the run stops.
        if invoked >= config.operations {
            for phase in phases.iter_mut() {
                if let Phase::Invoked(_) = phase {
                    *phase = Phase::Idle;
                }
            }
        }
    }
    let final_state = keys
        .iter()
        .zip(&model)
        .map(|(key, state)| {
            let read = match state {
                None => Value::Null,
                Some((version, value)) => json!({"version": *version, "value": *value}),
            };
            (key.clone(), read)
        })
        .collect();
    Generated {
        seed,
        ops,
        final_state,
    }
}

/// Applies `op` to one key's model, fills its observation, and says whether it took effect.
fn apply(state: &mut Option<(u64, u64)>, op: &mut Operation) -> bool {
    let value_of = |v: &Value| v.as_u64().unwrap_or(0);
    match op.f {
        Func::Read => {
            op.output = match state {
                None => Value::Null,
                Some((version, value)) => json!({"version": *version, "value": *value}),
            };
            true
        }
        Func::Write => {
            let version = state.map_or(1, |(v, _)| v + 1);
            *state = Some((version, value_of(&op.input)));
            op.output = json!({ "version": version });
            true
        }
        Func::Cas => {
            let expect = op.input.get("expect").and_then(Value::as_u64);
            match *state {
                Some((version, _)) if Some(version) == expect => {
                    let value = op.input.get("value").map(value_of).unwrap_or(0);
                    *state = Some((version + 1, value));
                    op.output = json!({ "version": version + 1 });
                    true
                }
                _ => false,
            }
        }
        Func::Create => {
            if state.is_some() {
                return false;
            }
            *state = Some((1, value_of(&op.input)));
            op.output = json!({ "version": 1 });
            true
        }
        Func::Delete => {
            if state.is_none() {
                return false;
            }
            *state = None;
            true
        }
    }
}
