//! The integration tests of the chaos crate: the checkers on hand-made and generated histories,
//! the report, and the nemesis on real processes. One binary, one module per subject.

mod convergence;
mod fast_tier;
mod generated;
mod linearizable;
mod lost_writes;
mod nemesis;
mod quota;
mod report;
mod sim;
mod single_runner;

use chaos_tests::history::{Func, Operation, Outcome};
use serde_json::Value;

/// An acknowledged operation on `key` over `[invoke, complete]`.
pub fn ok(id: u64, f: Func, key: &str, input: Value, output: Value, at: (u64, u64)) -> Operation {
    Operation {
        process: id,
        op_id: id,
        f,
        key: key.into(),
        input,
        output,
        outcome: Outcome::Ok,
        invoke_ns: at.0,
        complete_ns: Some(at.1),
        node: None,
        error: None,
    }
}

/// An operation that definitely did not take effect.
pub fn fail(id: u64, f: Func, key: &str, input: Value, at: (u64, u64)) -> Operation {
    Operation {
        outcome: Outcome::Fail,
        output: Value::Null,
        ..ok(id, f, key, input, Value::Null, at)
    }
}

/// An operation of unknown outcome invoked at `invoke`.
pub fn info(id: u64, f: Func, key: &str, input: Value, invoke: u64) -> Operation {
    Operation {
        outcome: Outcome::Info,
        complete_ns: None,
        ..ok(id, f, key, input, Value::Null, (invoke, invoke))
    }
}
