//! The convergence checker.

use chaos_tests::checker::convergence::{check, NodeDigest, State};
use chaos_tests::checker::Verdict;

fn digest(node: &str, index: u64, digest: &str) -> NodeDigest {
    NodeDigest {
        node: node.into(),
        applied_index: Some(index),
        digest: digest.into(),
    }
}

#[test]
fn equal_digests_converge() {
    let report = check(&[
        digest("n1", 9, "ab"),
        digest("n2", 9, "ab"),
        digest("n3", 9, "ab"),
    ]);
    assert_eq!(
        (report.state, report.verdict()),
        (State::Converged, Verdict::Pass)
    );
}

#[test]
fn distinguishes_lagging_from_diverged() {
    let lagging = check(&[
        digest("n1", 9, "ab"),
        digest("n2", 9, "ab"),
        digest("n3", 7, "cd"),
    ]);
    assert_eq!(
        (lagging.state, lagging.verdict()),
        (State::Lagging, Verdict::Fail)
    );
    let diverged = check(&[
        digest("n1", 9, "ab"),
        digest("n2", 9, "ab"),
        digest("n3", 9, "cd"),
    ]);
    assert_eq!(diverged.state, State::Diverged);
    assert_eq!(diverged.groups["cd"], vec!["n3".to_string()]);
    assert_eq!(check(&[]).verdict(), Verdict::Unknown);
}
