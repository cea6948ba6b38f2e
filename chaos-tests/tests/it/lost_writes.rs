//! The lost-write checker on hand-made histories and final reads.

use std::collections::BTreeMap;

use chaos_tests::checker::lost_writes::{check, FinalReads, LossKind};
use chaos_tests::checker::Verdict;
use chaos_tests::history::{Func, Operation};
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

/// Every node returns `read` for key `t`.
fn everywhere(read: Value) -> FinalReads {
    ["n1", "n2", "n3"]
        .iter()
        .map(|n| {
            (
                n.to_string(),
                BTreeMap::from([("t".to_string(), read.clone())]),
            )
        })
        .collect()
}

#[test]
fn accepts_the_latest_acknowledged_write_everywhere() {
    let ops = vec![write(1, 1, 1, (0, 10)), write(2, 2, 2, (20, 30))];
    let report = check(
        &ops,
        &everywhere(json!({"value": 2, "version": 2})),
        &BTreeMap::new(),
    );
    assert_eq!(report.verdict(), Verdict::Pass, "{:?}", report.to_result());
    assert_eq!(report.acknowledged, 2);
    assert_eq!(report.compared, 3);
}

#[test]
fn catches_a_lost_acknowledged_write() {
    let ops = vec![write(1, 1, 1, (0, 10)), write(2, 2, 2, (20, 30))];
    let mut reads = everywhere(json!({"value": 2, "version": 2}));
    reads
        .get_mut("n3")
        .unwrap()
        .insert("t".into(), json!({"value": 1, "version": 1}));
    let report = check(&ops, &reads, &BTreeMap::new());
    assert_eq!(report.verdict(), Verdict::Fail);
    assert_eq!(report.lost.len(), 1);
    let lost = &report.lost[0];
    assert_eq!(
        (lost.node.as_str(), lost.kind),
        ("n3", LossKind::Superseded)
    );
    assert_eq!(lost.expected_one_of[0].op_id, 2);
    // A node that lost the key entirely lost the writes too.
    reads.get_mut("n3").unwrap().remove("t");
    let report = check(&ops, &reads, &BTreeMap::new());
    assert_eq!(report.lost[0].kind, LossKind::Superseded);
}

#[test]
fn catches_phantoms_and_version_regressions() {
    let ops = vec![write(1, 1, 1, (0, 10)), write(2, 2, 2, (20, 30))];
    let report = check(&ops, &everywhere(json!({"value": 9})), &BTreeMap::new());
    assert_eq!(report.lost[0].kind, LossKind::Phantom);
    let report = check(
        &ops,
        &everywhere(json!({"value": 2, "version": 1})),
        &BTreeMap::new(),
    );
    assert_eq!(report.lost[0].kind, LossKind::VersionRegressed);
}

#[test]
fn unknown_and_concurrent_writes_may_be_last() {
    // The unknown write may have landed after the acknowledged one.
    let ops = vec![
        write(1, 1, 1, (0, 10)),
        info(2, Func::Write, "t", json!(2), 5),
    ];
    for v in [1, 2] {
        let report = check(&ops, &everywhere(json!({ "value": v })), &BTreeMap::new());
        assert_eq!(report.verdict(), Verdict::Pass, "final value {v}");
    }
    // Two acknowledged writes that overlap: either may be last.
    let ops = vec![write(1, 1, 1, (0, 30)), write(2, 2, 1, (10, 20))];
    for v in [1, 2] {
        let report = check(&ops, &everywhere(json!({ "value": v })), &BTreeMap::new());
        assert_eq!(report.verdict(), Verdict::Pass, "final value {v}");
    }
    // A failed write cannot be the final value.
    let ops = vec![
        write(1, 1, 1, (0, 10)),
        fail(2, Func::Write, "t", json!(2), (20, 30)),
    ];
    let report = check(&ops, &everywhere(json!({"value": 2})), &BTreeMap::new());
    assert_eq!(report.verdict(), Verdict::Fail);
}

#[test]
fn deletes_must_stay_deleted() {
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
    ];
    assert_eq!(
        check(&ops, &everywhere(Value::Null), &BTreeMap::new()).verdict(),
        Verdict::Pass
    );
    let resurrected = check(&ops, &everywhere(json!({"value": "x"})), &BTreeMap::new());
    assert_eq!(resurrected.verdict(), Verdict::Fail);
    assert_eq!(resurrected.lost.len(), 3);
}
