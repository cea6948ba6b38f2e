//! The client history: what every client invoked and what it saw, one JSON record per line.
//!
//! A history is the only evidence the checkers trust. Each operation leaves an `invoke` record when
//! the client sends it and one completion record when the client learns its outcome:
//!
//! - `ok`: the operation took effect (and `value` holds what the client observed),
//! - `fail`: the operation definitely did not take effect (a rejected precondition, a 4xx),
//! - `info`: the outcome is unknown (a timeout, a connection reset). Such an operation may have
//!   taken effect at any instant after its invocation, or never.
//!
//! An invocation without any completion (the client itself died) is read as `info`.
//! Times are nanoseconds on one monotonic [`Clock`] shared with the fault log, so operations and
//! faults can be placed on one timeline.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Identifies one client operation in a history; unique within the history.
pub type OpId = u64;

/// The kind of a history record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The client sent the request.
    Invoke,
    /// The request took effect; `value` is what the client observed.
    Ok,
    /// The request definitely did not take effect.
    Fail,
    /// The outcome is unknown: it may or may not have taken effect.
    Info,
}

/// The function an operation applies to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Func {
    /// Read the current value (`null` when the object does not exist).
    Read,
    /// Replace the value unconditionally.
    Write,
    /// Replace the value if the object is at the expected version (`If-Match`).
    Cas,
    /// Create the object; fails if it exists.
    Create,
    /// Delete the object (optionally only at an expected version).
    Delete,
}

impl Func {
    /// Every function, in a fixed order (for reports).
    pub const ALL: [Func; 5] = [
        Func::Read,
        Func::Write,
        Func::Cas,
        Func::Create,
        Func::Delete,
    ];

    /// The lower-case name used in the JSONL format.
    pub fn as_str(self) -> &'static str {
        match self {
            Func::Read => "read",
            Func::Write => "write",
            Func::Cas => "cas",
            Func::Create => "create",
            Func::Delete => "delete",
        }
    }

    /// Whether the operation may change the state of its key.
    pub fn is_mutation(self) -> bool {
        !matches!(self, Func::Read)
    }
}

/// One line of a history file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The logical client (one operation at a time per process).
    pub process: u64,
    /// Shared by the invocation and its completion.
    pub op_id: OpId,
    pub kind: Kind,
    pub f: Func,
    /// The object the operation is about (for example a tenant id).
    pub key: String,
    /// On `invoke`, the argument; on `ok`, the observation. See [`crate::checker::linearizable`]
    /// for the shapes the register model reads.
    #[serde(default)]
    pub value: Value,
    /// Nanoseconds on the run's [`Clock`].
    pub time_ns: u64,
    /// The node the client talked to, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Why a `fail` or `info` happened (status code, timeout), for people reading the history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Fail,
    /// Unknown: possibly applied at any point after invocation.
    Info,
}

impl Outcome {
    /// The lower-case name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Fail => "fail",
            Outcome::Info => "info",
        }
    }
}

/// An invocation paired with its completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    pub process: u64,
    pub op_id: OpId,
    pub f: Func,
    pub key: String,
    /// The argument from the invocation.
    pub input: Value,
    /// The observation from an `ok` completion; `Value::Null` otherwise.
    pub output: Value,
    pub outcome: Outcome,
    pub invoke_ns: u64,
    /// `None` when the outcome is unknown: the operation may take effect at any later time.
    pub complete_ns: Option<u64>,
    pub node: Option<String>,
    pub error: Option<String>,
}

impl Operation {
    /// Latency of a completed operation.
    pub fn latency_ns(&self) -> Option<u64> {
        self.complete_ns.map(|c| c.saturating_sub(self.invoke_ns))
    }

    /// A short human description, used in checker reports.
    pub fn describe(&self) -> String {
        let end = match self.complete_ns {
            Some(c) => c.to_string(),
            None => "?".to_string(),
        };
        format!(
            "op {} (process {}) {} {} {} -> {} {} [{}..{}]{}",
            self.op_id,
            self.process,
            self.f.as_str(),
            self.key,
            self.input,
            self.outcome.as_str(),
            self.output,
            self.invoke_ns,
            end,
            self.node
                .as_deref()
                .map(|n| format!(" via {n}"))
                .unwrap_or_default(),
        )
    }
}

/// Errors reading, writing or pairing a history.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("history i/o")]
    Io(#[from] std::io::Error),
    #[error("history line {line} is not a record")]
    Parse {
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode a history record")]
    Encode(#[source] serde_json::Error),
    #[error("operation {0} is invoked twice")]
    DuplicateInvoke(OpId),
    #[error("operation {0} completes without an invocation")]
    CompletionWithoutInvoke(OpId),
    #[error("operation {0} completes twice")]
    DuplicateCompletion(OpId),
    #[error(
        "operation {op_id} completes with a different function or key than it was invoked with"
    )]
    MismatchedCompletion { op_id: OpId },
    #[error(
        "operation {op_id} completes at {complete_ns} ns, before its invocation at {invoke_ns} ns"
    )]
    CompletesBeforeInvoke {
        op_id: OpId,
        invoke_ns: u64,
        complete_ns: u64,
    },
}

/// A monotonic clock whose zero is the start of a run; shared by the client and the nemesis.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
}

impl Clock {
    /// Starts a clock at zero now.
    pub fn start() -> Self {
        Self {
            origin: Instant::now(),
        }
    }

    /// Nanoseconds since the clock started (saturating at `u64::MAX`, some 584 years).
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Appends records to a JSONL sink.
pub struct HistoryWriter<W: Write> {
    out: W,
}

impl<W: Write> HistoryWriter<W> {
    pub fn new(out: W) -> Self {
        Self { out }
    }

    /// Writes one record as one line.
    pub fn append(&mut self, record: &Record) -> Result<(), HistoryError> {
        serde_json::to_writer(&mut self.out, record).map_err(HistoryError::Encode)?;
        self.out.write_all(b"\n")?;
        Ok(())
    }

    /// Flushes the sink, so a crash of the client keeps what was recorded.
    pub fn flush(&mut self) -> Result<(), HistoryError> {
        self.out.flush()?;
        Ok(())
    }

    /// Returns the sink.
    pub fn into_inner(self) -> W {
        self.out
    }
}

/// Reads every record of a JSONL history; blank lines are skipped.
pub fn read_records<R: BufRead>(input: R) -> Result<Vec<Record>, HistoryError> {
    let mut records = Vec::new();
    for (index, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(&line).map_err(|source| HistoryError::Parse {
            line: index + 1,
            source,
        })?;
        records.push(record);
    }
    Ok(records)
}

/// Pairs invocations with completions, in invocation order.
///
/// An invocation never completed becomes an `info` operation: the client may have died after the
/// request reached the cluster.
pub fn pair(records: &[Record]) -> Result<Vec<Operation>, HistoryError> {
    let mut ops: Vec<Operation> = Vec::new();
    let mut index_of: HashMap<OpId, usize> = HashMap::new();
    let mut completed: Vec<bool> = Vec::new();
    for record in records {
        match record.kind {
            Kind::Invoke => {
                if index_of.contains_key(&record.op_id) {
                    return Err(HistoryError::DuplicateInvoke(record.op_id));
                }
                index_of.insert(record.op_id, ops.len());
                completed.push(false);
                ops.push(Operation {
                    process: record.process,
                    op_id: record.op_id,
                    f: record.f,
                    key: record.key.clone(),
                    input: record.value.clone(),
                    output: Value::Null,
                    outcome: Outcome::Info,
                    invoke_ns: record.time_ns,
                    complete_ns: None,
                    node: record.node.clone(),
                    error: None,
                });
            }
            Kind::Ok | Kind::Fail | Kind::Info => {
                let Some(&i) = index_of.get(&record.op_id) else {
                    return Err(HistoryError::CompletionWithoutInvoke(record.op_id));
                };
                if completed[i] {
                    return Err(HistoryError::DuplicateCompletion(record.op_id));
                }
                completed[i] = true;
                let op = &mut ops[i];
                if op.f != record.f || op.key != record.key {
                    return Err(HistoryError::MismatchedCompletion {
                        op_id: record.op_id,
                    });
                }
                if record.time_ns < op.invoke_ns {
                    return Err(HistoryError::CompletesBeforeInvoke {
                        op_id: record.op_id,
                        invoke_ns: op.invoke_ns,
                        complete_ns: record.time_ns,
                    });
                }
                op.error = record.error.clone();
                match record.kind {
                    Kind::Ok => {
                        op.outcome = Outcome::Ok;
                        op.output = record.value.clone();
                        op.complete_ns = Some(record.time_ns);
                    }
                    Kind::Fail => {
                        op.outcome = Outcome::Fail;
                        op.complete_ns = Some(record.time_ns);
                    }
                    // The time the client gave up tells nothing about when the operation may
                    // take effect: a request stuck in a leader's queue can commit much later.
                    Kind::Info | Kind::Invoke => op.outcome = Outcome::Info,
                }
            }
        }
    }
    Ok(ops)
}

/// Reads and pairs a JSONL history.
pub fn read_operations<R: BufRead>(input: R) -> Result<Vec<Operation>, HistoryError> {
    pair(&read_records(input)?)
}

/// Builds the two records of a completed operation, for hand-made histories and generators.
pub fn records_of(op: &Operation) -> Vec<Record> {
    let invoke = Record {
        process: op.process,
        op_id: op.op_id,
        kind: Kind::Invoke,
        f: op.f,
        key: op.key.clone(),
        value: op.input.clone(),
        time_ns: op.invoke_ns,
        node: op.node.clone(),
        error: None,
    };
    let completion = match (op.outcome, op.complete_ns) {
        (Outcome::Ok, Some(t)) => Some((Kind::Ok, op.output.clone(), t)),
        (Outcome::Fail, Some(t)) => Some((Kind::Fail, Value::Null, t)),
        (Outcome::Info, Some(t)) => Some((Kind::Info, Value::Null, t)),
        // A completion without a time cannot be written; the reader will see an open invocation,
        // which it reads as `info`, the only sound reading.
        (_, None) => None,
    };
    let mut out = vec![invoke];
    if let Some((kind, value, time_ns)) = completion {
        out.push(Record {
            kind,
            value,
            time_ns,
            error: op.error.clone(),
            ..out[0].clone()
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(op_id: OpId, kind: Kind, f: Func, value: Value, time_ns: u64) -> Record {
        Record {
            process: 1,
            op_id,
            kind,
            f,
            key: "t1".into(),
            value,
            time_ns,
            node: Some("n1".into()),
            error: None,
        }
    }

    #[test]
    fn round_trips_through_jsonl_and_pairs() {
        let records = vec![
            rec(1, Kind::Invoke, Func::Write, json!(5), 10),
            rec(2, Kind::Invoke, Func::Read, Value::Null, 11),
            rec(1, Kind::Ok, Func::Write, Value::Null, 20),
            rec(
                3,
                Kind::Invoke,
                Func::Cas,
                json!({"expect": 1, "value": 6}),
                21,
            ),
            rec(
                2,
                Kind::Ok,
                Func::Read,
                json!({"version": 1, "value": 5}),
                22,
            ),
            rec(3, Kind::Info, Func::Cas, Value::Null, 30),
            rec(4, Kind::Invoke, Func::Delete, Value::Null, 31),
        ];
        let mut writer = HistoryWriter::new(Vec::new());
        for r in &records {
            writer.append(r).unwrap();
        }
        let bytes = writer.into_inner();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert_eq!(text.lines().count(), records.len());
        assert!(text.contains(r#""kind":"invoke""#));
        let back = read_records(bytes.as_slice()).unwrap();
        assert_eq!(back, records);

        let ops = pair(&back).unwrap();
        assert_eq!(ops.len(), 4);
        assert_eq!(ops[0].outcome, Outcome::Ok);
        assert_eq!(ops[0].complete_ns, Some(20));
        assert_eq!(ops[1].output, json!({"version": 1, "value": 5}));
        // Unknown outcomes stay open-ended, whether reported or never completed.
        assert_eq!(ops[2].outcome, Outcome::Info);
        assert_eq!(ops[2].complete_ns, None);
        assert_eq!(ops[3].outcome, Outcome::Info);
        assert_eq!(ops[3].complete_ns, None);
    }

    #[test]
    fn rejects_malformed_histories() {
        let dup = vec![
            rec(1, Kind::Invoke, Func::Read, Value::Null, 1),
            rec(1, Kind::Invoke, Func::Read, Value::Null, 2),
        ];
        assert!(matches!(pair(&dup), Err(HistoryError::DuplicateInvoke(1))));
        let orphan = vec![rec(7, Kind::Ok, Func::Read, Value::Null, 1)];
        assert!(matches!(
            pair(&orphan),
            Err(HistoryError::CompletionWithoutInvoke(7))
        ));
        let backwards = vec![
            rec(1, Kind::Invoke, Func::Read, Value::Null, 5),
            rec(1, Kind::Ok, Func::Read, Value::Null, 4),
        ];
        assert!(matches!(
            pair(&backwards),
            Err(HistoryError::CompletesBeforeInvoke { .. })
        ));
        let err = read_records("{not json}\n".as_bytes()).unwrap_err();
        assert!(matches!(err, HistoryError::Parse { line: 1, .. }));
    }

    #[test]
    fn records_of_inverts_pair() {
        let records = vec![
            rec(1, Kind::Invoke, Func::Write, json!(5), 10),
            rec(1, Kind::Fail, Func::Write, Value::Null, 20),
        ];
        let ops = pair(&records).unwrap();
        assert_eq!(records_of(&ops[0]), records);
    }
}
