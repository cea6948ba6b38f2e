//! Seeded random histories that are valid by construction must always pass.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chaos_tests::checker::linearizable::{self, Options};
use chaos_tests::checker::{lost_writes, Verdict};
use chaos_tests::generate::{register_history, Config};

/// Fixed seeds for reproducibility, plus one fresh seed per run (or `CHAOS_SEED`) for breadth.
fn seeds() -> Vec<u64> {
    let fresh = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
    let mut seeds: Vec<u64> = (0..60).collect();
    seeds.push(fresh);
    seeds
}

fn assert_valid(seed: u64, config: &Config) {
    println!("seed {seed} (replay with CHAOS_SEED={seed})");
    let generated = register_history(seed, config);
    let report = linearizable::check(
        &generated.ops,
        &Options {
            budget: Duration::from_secs(20),
            ..Options::default()
        },
    )
    .expect("generated values have the register shapes");
    assert_eq!(
        report.verdict(),
        Verdict::Pass,
        "seed {seed}: {:#?}",
        report.to_result()
    );
    let reads: lost_writes::FinalReads = ["n1", "n2", "n3"]
        .iter()
        .map(|n| (n.to_string(), generated.final_state.clone()))
        .collect();
    let lost = lost_writes::check(&generated.ops, &reads, &BTreeMap::new());
    assert_eq!(
        lost.verdict(),
        Verdict::Pass,
        "seed {seed}: {:#?}",
        lost.to_result()
    );
}

#[test]
fn generated_histories_always_pass() {
    for seed in seeds() {
        assert_valid(seed, &Config::default());
    }
}

#[test]
fn highly_concurrent_histories_on_one_key_pass_within_budget() {
    let config = Config {
        processes: 12,
        keys: 1,
        operations: 600,
        values: 3,
        lost_reply: 0.1,
        lost_request: 0.1,
    };
    for seed in seeds().into_iter().take(8) {
        assert_valid(seed, &config);
    }
}

#[test]
fn the_same_seed_gives_the_same_history() {
    let a = register_history(42, &Config::default());
    let b = register_history(42, &Config::default());
    assert_eq!(a.ops, b.ops);
    assert_ne!(a.ops, register_history(43, &Config::default()).ops);
}

#[test]
fn a_corrupted_read_in_a_generated_history_is_caught() {
    use chaos_tests::history::{Func, Outcome};
    for seed in seeds().into_iter().take(20) {
        println!("seed {seed} (replay with CHAOS_SEED={seed})");
        let mut generated = register_history(seed, &Config::default());
        let Some(read) = generated
            .ops
            .iter_mut()
            .find(|o| o.f == Func::Read && o.outcome == Outcome::Ok && !o.output.is_null())
        else {
            continue;
        };
        // Values are drawn from 0..4, so nobody ever wrote this one.
        read.output["value"] = serde_json::json!(999);
        let report = linearizable::check(&generated.ops, &Options::default()).unwrap();
        assert_eq!(report.verdict(), Verdict::Fail, "seed {seed}");
    }
}
