//! The linearizability checker on hand-made register histories.

use std::time::Duration;

use chaos_tests::checker::linearizable::{check, KeyVerdict, Options};
use chaos_tests::checker::Verdict;
use chaos_tests::generate::{register_history, Config};
use chaos_tests::history::{self, Func, HistoryWriter, Operation};
use serde_json::{json, Value};

use crate::{fail, info, ok};

fn write(id: u64, v: i64, version: u64, at: (u64, u64)) -> Operation {
    ok(
        id,
        Func::Write,
        "t",
        json!(v),
        json!({ "version": version }),
        at,
    )
}

fn read(id: u64, v: i64, version: u64, at: (u64, u64)) -> Operation {
    ok(
        id,
        Func::Read,
        "t",
        Value::Null,
        json!({"value": v, "version": version}),
        at,
    )
}

fn verdict(ops: &[Operation]) -> Verdict {
    check(ops, &Options::default())
        .expect("hand-made values have the register shapes")
        .verdict()
}

#[test]
fn accepts_a_sequential_history() {
    let ops = vec![
        ok(
            0,
            Func::Create,
            "t",
            json!(0),
            json!({"version": 1}),
            (0, 5),
        ),
        write(1, 1, 2, (10, 20)),
        read(2, 1, 2, (30, 40)),
        ok(
            3,
            Func::Cas,
            "t",
            json!({"expect": 2, "value": 7}),
            json!({"version": 3}),
            (50, 60),
        ),
        read(4, 7, 3, (70, 80)),
        ok(5, Func::Delete, "t", Value::Null, Value::Null, (90, 95)),
        ok(6, Func::Read, "t", Value::Null, Value::Null, (100, 110)),
    ];
    let report = check(&ops, &Options::default()).unwrap();
    assert_eq!(report.verdict(), Verdict::Pass, "{:?}", report.to_result());
    assert_eq!(report.operations_checked, 7);
}

#[test]
fn rejects_a_stale_read() {
    // The read starts after the second write completed, yet sees the first value.
    let ops = vec![
        write(1, 1, 1, (0, 10)),
        write(2, 2, 2, (20, 30)),
        read(3, 1, 1, (40, 50)),
    ];
    let report = check(&ops, &Options::default()).unwrap();
    assert_eq!(report.verdict(), Verdict::Fail);
    let violation = report.violations().next().unwrap();
    assert_eq!(violation.key, "t");
    assert_eq!(violation.blocked.op_id, 3, "{:#?}", violation.describe());
    assert!(violation.state.contains("version 2"), "{}", violation.state);
    let result = report.to_result();
    assert!(
        result.details[0].contains("cannot linearize op 3"),
        "{:?}",
        result.details
    );
}

#[test]
fn a_stale_read_without_versions_is_still_caught() {
    let ops = vec![
        ok(1, Func::Write, "t", json!("a"), Value::Null, (0, 10)),
        ok(2, Func::Write, "t", json!("b"), Value::Null, (20, 30)),
        ok(
            3,
            Func::Read,
            "t",
            Value::Null,
            json!({"value": "a"}),
            (40, 50),
        ),
    ];
    assert_eq!(verdict(&ops), Verdict::Fail);
}

#[test]
fn overlapping_intervals_allow_either_order() {
    // Both reads overlap the write, so each may see the old or the new value...
    let ops = vec![
        write(1, 1, 1, (0, 10)),
        write(2, 2, 2, (20, 100)),
        read(3, 2, 2, (30, 40)),
        read(4, 1, 1, (25, 60)),
    ];
    assert_eq!(verdict(&ops), Verdict::Pass);
    // ...but once one read saw the new value, a read that starts after it cannot see the old.
    let ops = vec![
        write(1, 1, 1, (0, 10)),
        write(2, 2, 2, (20, 100)),
        read(3, 2, 2, (30, 40)),
        read(4, 1, 1, (45, 60)),
    ];
    assert_eq!(verdict(&ops), Verdict::Fail);
}

#[test]
fn concurrent_compare_and_sets_serialise() {
    // Two clients cas from version 1 at once; only one may win, and the winner is visible.
    let cas = |id, v, result: Option<u64>, at| match result {
        Some(version) => ok(
            id,
            Func::Cas,
            "t",
            json!({"expect": 1, "value": v}),
            json!({ "version": version }),
            at,
        ),
        None => fail(id, Func::Cas, "t", json!({"expect": 1, "value": v}), at),
    };
    let ops = vec![
        write(1, 0, 1, (0, 10)),
        cas(2, 5, Some(2), (20, 40)),
        cas(3, 6, None, (21, 41)),
        read(4, 5, 2, (50, 60)),
    ];
    assert_eq!(verdict(&ops), Verdict::Pass);
    // Both acknowledged: one of them must have seen version 2, so this is impossible.
    let ops = vec![
        write(1, 0, 1, (0, 10)),
        cas(2, 5, Some(2), (20, 40)),
        cas(3, 6, Some(2), (21, 41)),
    ];
    assert_eq!(verdict(&ops), Verdict::Fail);
}

#[test]
fn unknown_outcomes_may_apply_late_or_never() {
    // A write of unknown outcome may take effect long after the client gave up...
    let late = vec![
        write(1, 1, 1, (0, 10)),
        info(2, Func::Write, "t", json!(2), 20),
        read(3, 1, 1, (30, 40)),
        read(4, 2, 2, (100, 110)),
    ];
    assert_eq!(verdict(&late), Verdict::Pass);
    // ...or never.
    let never = vec![
        write(1, 1, 1, (0, 10)),
        info(2, Func::Write, "t", json!(2), 20),
        read(3, 1, 1, (100, 110)),
    ];
    assert_eq!(verdict(&never), Verdict::Pass);
    // But not before it was invoked, and only once: the old value cannot come back.
    let early = vec![
        read(0, 2, 2, (0, 5)),
        write(1, 1, 1, (0, 10)),
        info(2, Func::Write, "t", json!(2), 20),
    ];
    assert_eq!(verdict(&early), Verdict::Fail);
    let flip_flop = vec![
        write(1, 1, 1, (0, 10)),
        info(2, Func::Write, "t", json!(2), 20),
        read(3, 2, 2, (30, 40)),
        read(4, 1, 1, (50, 60)),
    ];
    assert_eq!(verdict(&flip_flop), Verdict::Fail);
}

#[test]
fn failed_operations_did_not_happen() {
    let ops = vec![
        write(1, 1, 1, (0, 10)),
        fail(2, Func::Write, "t", json!(2), (20, 30)),
        read(3, 2, 2, (40, 50)),
    ];
    assert_eq!(verdict(&ops), Verdict::Fail);
}

#[test]
fn reads_of_deleted_objects_see_nothing() {
    let ops = vec![
        ok(
            1,
            Func::Create,
            "t",
            json!("x"),
            json!({"version": 1}),
            (0, 10),
        ),
        ok(2, Func::Delete, "t", Value::Null, Value::Null, (20, 30)),
        ok(
            3,
            Func::Read,
            "t",
            Value::Null,
            json!({"value": "x", "version": 1}),
            (40, 50),
        ),
    ];
    assert_eq!(verdict(&ops), Verdict::Fail);
    let create_twice = vec![
        ok(
            1,
            Func::Create,
            "t",
            json!("x"),
            json!({"version": 1}),
            (0, 10),
        ),
        ok(
            2,
            Func::Create,
            "t",
            json!("y"),
            json!({"version": 1}),
            (20, 30),
        ),
    ];
    assert_eq!(verdict(&create_twice), Verdict::Fail);
}

#[test]
fn keys_are_checked_independently() {
    let mut ops = vec![write(1, 1, 1, (0, 10)), read(2, 1, 1, (20, 30))];
    ops.push(ok(3, Func::Write, "u", json!(1), Value::Null, (0, 10)));
    ops.push(ok(4, Func::Write, "u", json!(2), Value::Null, (20, 30)));
    ops.push(ok(
        5,
        Func::Read,
        "u",
        Value::Null,
        json!({"value": 1}),
        (40, 50),
    ));
    let report = check(&ops, &Options::default()).unwrap();
    assert!(matches!(report.keys["t"], KeyVerdict::Linearizable));
    assert!(matches!(report.keys["u"], KeyVerdict::NotLinearizable(_)));
}

#[test]
fn initial_state_is_honoured() {
    let ops = vec![read(1, 9, 4, (0, 10)), write(2, 1, 5, (20, 30))];
    assert_eq!(verdict(&ops), Verdict::Fail);
    let options = Options {
        initial: [("t".to_string(), (4, json!(9)))].into(),
        ..Options::default()
    };
    assert_eq!(check(&ops, &options).unwrap().verdict(), Verdict::Pass);
}

#[test]
fn malformed_values_are_errors_not_verdicts() {
    let ops = vec![ok(
        1,
        Func::Cas,
        "t",
        json!({"value": 1}),
        Value::Null,
        (0, 1),
    )];
    let err = check(&ops, &Options::default()).unwrap_err();
    assert_eq!(err.op_id, 1);
}

#[test]
fn an_exhausted_budget_is_unknown() {
    let generated = register_history(
        7,
        &Config {
            operations: 3000,
            keys: 1,
            ..Config::default()
        },
    );
    let options = Options {
        budget: Duration::ZERO,
        ..Options::default()
    };
    let report = check(&generated.ops, &options).unwrap();
    assert_eq!(report.verdict(), Verdict::Unknown);
}

#[test]
fn checks_a_history_read_back_from_jsonl() {
    let ops = vec![
        write(1, 1, 1, (0, 10)),
        write(2, 2, 2, (20, 30)),
        read(3, 1, 1, (40, 50)),
        info(4, Func::Write, "t", json!(3), 60),
    ];
    let file = tempfile::NamedTempFile::new().unwrap();
    let mut writer = HistoryWriter::new(std::io::BufWriter::new(file.reopen().unwrap()));
    for op in &ops {
        for record in history::records_of(op) {
            writer.append(&record).unwrap();
        }
    }
    writer.flush().unwrap();
    let back = history::read_operations(std::io::BufReader::new(
        std::fs::File::open(file.path()).unwrap(),
    ))
    .unwrap();
    assert_eq!(back.len(), 4);
    assert_eq!(verdict(&back), Verdict::Fail);
}
