//! The single-runner checker on hand-made hypervisor samples.

use chaos_tests::checker::single_runner::{check, Migration, Options, RunSample};
use chaos_tests::checker::Verdict;

fn samples(node: &str, vm: &str, spans: &[(u64, bool)]) -> Vec<RunSample> {
    spans
        .iter()
        .map(|&(time_ns, running)| RunSample {
            time_ns,
            node: node.into(),
            vm_id: vm.into(),
            running,
        })
        .collect()
}

fn migration(source: &str, target: &str, window: (u64, u64)) -> Migration {
    Migration {
        id: "op-1".into(),
        vm_id: "vm1".into(),
        source: source.into(),
        target: target.into(),
        start_ns: window.0,
        end_ns: Some(window.1),
    }
}

/// vm1 runs on n1 until 30 and shows up on n2 at 15: two copies between 15 and 30.
fn double_run() -> Vec<RunSample> {
    let mut all = samples(
        "n1",
        "vm1",
        &[(0, true), (10, true), (20, true), (30, true), (40, false)],
    );
    all.extend(samples(
        "n2",
        "vm1",
        &[(5, false), (15, true), (25, true), (35, true)],
    ));
    all
}

#[test]
fn accepts_a_restart_elsewhere_after_the_first_copy_stopped() {
    let mut all = samples(
        "n1",
        "vm1",
        &[(0, true), (10, true), (20, false), (30, false)],
    );
    all.extend(samples(
        "n2",
        "vm1",
        &[(5, false), (15, false), (25, true), (35, true)],
    ));
    // Another VM running on n1 at the same time is no conflict.
    all.extend(samples("n1", "vm2", &[(0, true), (40, true)]));
    let report = check(&all, &[], Options::default());
    assert_eq!(report.verdict(), Verdict::Pass, "{:?}", report.double_runs);
    assert_eq!(report.vms, 2);
}

#[test]
fn catches_a_double_running_vm() {
    let report = check(&double_run(), &[], Options::default());
    assert_eq!(report.verdict(), Verdict::Fail);
    let run = &report.double_runs[0];
    assert_eq!(run.vm_id, "vm1");
    assert_eq!(run.nodes, ("n1".to_string(), "n2".to_string()));
    assert_eq!((run.from_ns, run.to_ns), (15, 30));
}

#[test]
fn a_migration_window_excuses_only_its_own_hand_over() {
    let inside = check(
        &double_run(),
        &[migration("n1", "n2", (12, 31))],
        Options::default(),
    );
    assert_eq!(inside.verdict(), Verdict::Pass);
    assert_eq!(inside.handovers, 1);
    // The overlap outlasts the window by 5 ns: excused only with a tolerance of 5.
    let short = [migration("n1", "n2", (12, 25))];
    assert_eq!(
        check(&double_run(), &short, Options::default()).verdict(),
        Verdict::Fail
    );
    let tolerant = Options {
        handover_tolerance_ns: 5,
    };
    assert_eq!(
        check(&double_run(), &short, tolerant).verdict(),
        Verdict::Pass
    );
    // A migration between other nodes excuses nothing.
    let elsewhere = [migration("n1", "n3", (0, 100))];
    assert_eq!(
        check(&double_run(), &elsewhere, Options::default()).verdict(),
        Verdict::Fail
    );
}
