//! The quota checker on hand-made samples and claims.

use std::collections::BTreeMap;

use chaos_tests::checker::quota::{
    check, Claim, Direction, Evidence, LimitChange, Overshoot, Resource, UsageSample,
};
use chaos_tests::checker::Verdict;
use chaos_tests::history::Outcome;

fn sample(time_ns: u64, usage: u64, limit: u64) -> UsageSample {
    UsageSample {
        time_ns,
        node: "n2".into(),
        tenant: "acme".into(),
        resource: Resource::Vms,
        usage,
        limit: Some(limit),
    }
}

fn create(op_id: u64, at: (u64, u64), outcome: Outcome) -> Claim {
    Claim {
        tenant: "acme".into(),
        resource: Resource::Vms,
        direction: Direction::Acquire,
        amount: 1,
        invoke_ns: at.0,
        complete_ns: Some(at.1),
        outcome,
        op_id: Some(op_id),
    }
}

/// Tenant `acme` may run two VMs.
fn limited_to_two(claims: Vec<Claim>) -> Evidence {
    Evidence {
        initial_limits: BTreeMap::from([(
            "acme".to_string(),
            BTreeMap::from([(Resource::Vms, 2)]),
        )]),
        claims,
        ..Evidence::default()
    }
}

#[test]
fn samples_at_or_below_the_limit_pass_and_above_fail() {
    let ok = Evidence {
        samples: vec![sample(1, 2, 3), sample(2, 3, 3)],
        ..Evidence::default()
    };
    assert_eq!(check(&ok).verdict(), Verdict::Pass);
    let over = Evidence {
        samples: vec![sample(1, 3, 3), sample(2, 4, 3)],
        ..Evidence::default()
    };
    let report = check(&over);
    assert_eq!(report.verdict(), Verdict::Fail);
    assert!(matches!(&report.overshoots[..], [Overshoot::Sample(s)] if s.usage == 4));
}

#[test]
fn catches_more_acknowledged_creates_than_the_quota() {
    // Three creates sent to different nodes at once, all acknowledged, with room for two.
    let report = check(&limited_to_two(vec![
        create(1, (0, 50), Outcome::Ok),
        create(2, (1, 40), Outcome::Ok),
        create(3, (2, 45), Outcome::Ok),
    ]));
    assert_eq!(report.verdict(), Verdict::Fail);
    assert_eq!(report.acknowledged_claims, 3);
    assert!(
        matches!(
            &report.overshoots[..],
            [Overshoot::Admitted {
                usage_at_least: 3,
                limit_at_most: 2,
                op_id: Some(1),
                ..
            }]
        ),
        "{:?}",
        report.overshoots
    );
}

#[test]
fn rejected_and_released_claims_do_not_count() {
    let rejected = check(&limited_to_two(vec![
        create(1, (0, 50), Outcome::Ok),
        create(2, (1, 40), Outcome::Ok),
        create(3, (2, 45), Outcome::Fail),
        create(4, (3, 46), Outcome::Info),
    ]));
    assert_eq!(
        rejected.verdict(),
        Verdict::Pass,
        "{:?}",
        rejected.overshoots
    );
    let mut claims = vec![
        create(1, (0, 10), Outcome::Ok),
        create(2, (20, 30), Outcome::Ok),
        create(3, (60, 70), Outcome::Ok),
    ];
    // A delete (even of unknown outcome) may free room from its invocation on.
    claims.push(Claim {
        direction: Direction::Release,
        outcome: Outcome::Info,
        complete_ns: None,
        ..create(4, (40, 40), Outcome::Info)
    });
    assert_eq!(check(&limited_to_two(claims)).verdict(), Verdict::Pass);
}

#[test]
fn a_raised_limit_may_admit_more() {
    let raise = |outcome, at: (u64, Option<u64>)| LimitChange {
        tenant: "acme".into(),
        resource: Resource::Vms,
        limit: Some(3),
        invoke_ns: at.0,
        complete_ns: at.1,
        outcome,
    };
    let creates = vec![
        create(1, (0, 50), Outcome::Ok),
        create(2, (1, 40), Outcome::Ok),
        create(3, (2, 45), Outcome::Ok),
    ];
    for change in [
        raise(Outcome::Ok, (10, Some(20))),
        raise(Outcome::Info, (10, None)),
    ] {
        let mut evidence = limited_to_two(creates.clone());
        evidence.limit_changes.push(change);
        assert_eq!(check(&evidence).verdict(), Verdict::Pass);
    }
    // A raise that was rejected, or that started after the third create was acknowledged,
    // does not excuse it.
    for change in [
        raise(Outcome::Fail, (10, Some(20))),
        raise(Outcome::Ok, (60, Some(70))),
    ] {
        let mut evidence = limited_to_two(creates.clone());
        evidence.limit_changes.push(change);
        assert_eq!(check(&evidence).verdict(), Verdict::Fail);
    }
}
