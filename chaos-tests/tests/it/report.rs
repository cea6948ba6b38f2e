//! The run report: text and JSON written under the target directory.

use std::collections::BTreeMap;

use chaos_tests::checker::{convergence, linearizable, lost_writes, Verdict};
use chaos_tests::generate::{register_history, Config};
use chaos_tests::nemesis::{Action, FaultEvent};
use chaos_tests::report::{default_dir, Latency, OperationStats, RunReport};

#[test]
fn latency_percentiles_use_nearest_rank() {
    let l = Latency::of((1..=100).collect()).unwrap();
    assert_eq!((l.p50_ns, l.p99_ns, l.max_ns, l.count), (50, 99, 100, 100));
    let one = Latency::of(vec![7]).unwrap();
    assert_eq!((one.p50_ns, one.p99_ns), (7, 7));
    assert_eq!(Latency::of(Vec::new()), None);
}

/// A full report of a generated run, as the fast tier will produce after a real one.
#[test]
fn writes_a_readable_and_a_json_report() {
    let seed = 11;
    let generated = register_history(seed, &Config::default());
    let lin = linearizable::check(&generated.ops, &linearizable::Options::default()).unwrap();
    let reads = [("n1".to_string(), generated.final_state.clone())].into();
    let lost = lost_writes::check(&generated.ops, &reads, &BTreeMap::new());
    let conv = convergence::check(&[]);
    let report = RunReport {
        name: "checker self-test".into(),
        seed: Some(seed),
        duration_ns: generated
            .ops
            .iter()
            .filter_map(|o| o.complete_ns)
            .max()
            .unwrap_or(0),
        operations: OperationStats::of(&generated.ops),
        checks: vec![lin.to_result(), lost.to_result(), conv.to_result()],
        faults: vec![FaultEvent {
            time_ns: 1_500_000_000,
            action: Action::Kill,
            target: "n2".into(),
            error: None,
        }],
    };
    assert_eq!(
        report.verdict(),
        Verdict::Unknown,
        "no digests: convergence is undecided"
    );
    assert_eq!(report.operations.total, generated.ops.len());
    let text = report.to_text();
    for needle in [
        "chaos run checker self-test",
        "seed 11",
        "linearizable",
        "lost_writes",
        "Kill n2",
        "p99",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    print!("{text}");

    let dir = tempfile::tempdir().unwrap();
    let (txt, json) = report.write_to(dir.path()).unwrap();
    assert_eq!(txt.file_name().unwrap(), "checker_self-test.txt");
    let parsed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(parsed["seed"], 11);
    assert_eq!(parsed["checks"][0]["verdict"], "pass");
    // And where the chaos tiers put theirs.
    let (txt, _) = report.write_to(&default_dir()).unwrap();
    assert!(
        txt.ends_with("chaos/checker_self-test.txt"),
        "{}",
        txt.display()
    );
}
