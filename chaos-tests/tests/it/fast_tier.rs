//! The fast tier, shortened: a real 3-node cluster under kill, pause, partition and loss faults
//! must end with a linearizable history, no lost acknowledged write, no quota overshoot, converged
//! nodes and availability after healing.
//!
//! Needs the `novacron` binary (`NOVACRON_BIN`, else `<target>/debug/novacron`: build it with
//! `cargo build -p node` first) and root with nftables. The seed comes from
//! `NOVACRON_CHAOS_SEED` or is drawn at random and printed, so a failure replays.

use std::path::PathBuf;
use std::time::Duration;

use chaos_tests::checker::{linearizable, Verdict};
use chaos_tests::history::{self, Func, Outcome};
use chaos_tests::run::{self, RunConfig};
use serde_json::json;

fn novacron_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("NOVACRON_BIN") {
        return PathBuf::from(bin);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug/novacron")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fast_tier_under_kill_pause_partition_and_loss() {
    let bin = novacron_bin();
    assert!(
        bin.is_file(),
        "the novacron binary is missing at {}: run `cargo build -p node` first or set NOVACRON_BIN",
        bin.display()
    );
    let seed = std::env::var("NOVACRON_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("fast tier seed {seed} (replay with NOVACRON_CHAOS_SEED={seed})");
    let mut config = RunConfig::fast(bin, seed, Duration::from_secs(30));
    config.out_dir = chaos_tests::report::default_dir().join("test");
    let outcome = run::run(&config).await.unwrap();
    let report = &outcome.report;
    println!("{}", report.to_text());

    assert_eq!(
        report.verdict(),
        Verdict::Pass,
        "seed {seed}: see {}",
        outcome.text_path.display()
    );
    // The run must have exercised what it claims to: faults of every class it drew, and real
    // acknowledged traffic of every register function.
    assert!(!report.faults.is_empty(), "no fault was injected");
    assert!(
        report.faults.iter().all(|f| f.error.is_none()),
        "a fault failed: {:?}",
        report.faults
    );
    for f in ["read", "write", "cas", "create"] {
        let ok = report
            .operations
            .by_function
            .get(f)
            .and_then(|outcomes| outcomes.get("ok"))
            .copied()
            .unwrap_or(0);
        assert!(ok > 0, "no acknowledged {f}");
    }

    // The checker is not vacuous on this history: a read that reports a value nobody wrote is
    // caught.
    let file = std::fs::File::open(&outcome.history_path).unwrap();
    let mut ops = history::read_operations(std::io::BufReader::new(file)).unwrap();
    let read = ops
        .iter_mut()
        .find(|op| op.f == Func::Read && op.outcome == Outcome::Ok && !op.output.is_null())
        .expect("an acknowledged read of an existing tenant");
    read.output["value"] = json!(1);
    let corrupted = linearizable::check(&ops, &linearizable::Options::default()).unwrap();
    assert_eq!(corrupted.verdict(), Verdict::Fail);
}
