//! Admission: a wrong join token is refused, and the node does not start.

use std::process::Command;

use crate::harness::{fast_tuning, TestCluster, BIN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_with_a_wrong_token_is_refused() -> anyhow::Result<()> {
    let c = TestCluster::start(1, fast_tuning(60_000, 10_000, 1_000)).await?;
    let good = c.join_token()?;
    // Same CA fingerprint, wrong secret.
    let (prefix, _) = good.rsplit_once('.').unwrap();
    let forged = format!("{prefix}.{}", "0".repeat(64));
    let dir = c.root.path().join("intruder");
    let out = Command::new(BIN)
        .args([
            "serve",
            "--data-dir",
            &dir.display().to_string(),
            "--name",
            "intruder",
            "--api-addr",
            "127.0.0.1:0",
            "--peer-addr",
            "127.0.0.1:0",
            "--join",
            &c.nodes[0].url(),
            "--token",
            &forged,
        ])
        .output()?;
    assert!(!out.status.success(), "the intruder must not start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("join"), "unexpected error: {stderr}");
    // Nothing about the intruder reached the replicated state.
    let v = c.status(0).await?;
    assert_eq!(v["members"].as_array().map(|m| m.len()), Some(1), "{v}");
    Ok(())
}
