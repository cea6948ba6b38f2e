//! The CLI client against a real cluster: login stores a token; commands print tables or JSON;
//! failures exit non-zero with a one-line error.

use std::process::Command;

use crate::harness::{fast_tuning, TestCluster, BIN};

fn cli(c: &TestCluster, home: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("HOME", home)
        .env("NOVACRON_URL", c.nodes[0].url())
        .env_remove("NOVACRON_TOKEN")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_logs_in_and_manages_objects() -> anyhow::Result<()> {
    let c = TestCluster::start(1, fast_tuning(60_000, 10_000, 1_000)).await?;
    let home = tempfile::tempdir()?;
    let password = std::fs::read_to_string(c.nodes[0].dir.join("admin-password"))?;

    // Wrong password: non-zero exit, one line on stderr.
    let out = Command::new(BIN)
        .args(["login", "--user", "admin"])
        .env("HOME", home.path())
        .env("NOVACRON_URL", c.nodes[0].url())
        .env("NOVACRON_PASSWORD", "wrong")
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("bad_credentials"), "{err}");

    let out = Command::new(BIN)
        .args(["login", "--user", "admin"])
        .env("HOME", home.path())
        .env("NOVACRON_URL", c.nodes[0].url())
        .env("NOVACRON_PASSWORD", password.trim())
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (ok, out, err) = cli(&c, home.path(), &["cluster", "status", "-o", "json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v["leader_name"], "n1");

    let (ok, out, err) = cli(&c, home.path(), &["cluster", "status"]);
    assert!(ok, "{err}");
    assert!(out.contains("voter*"), "{out}");

    let (ok, tenant_id, err) = cli(
        &c,
        home.path(),
        &["tenant", "create", "acme", "--max-vms", "1"],
    );
    assert!(ok, "{err}");
    let tenant_id = tenant_id.trim().to_string();
    let (ok, _, err) = cli(
        &c,
        home.path(),
        &[
            "vm", "create", "web", "--tenant", &tenant_id, "--label", "app=web",
        ],
    );
    assert!(ok, "{err}");
    let (ok, _, err) = cli(
        &c,
        home.path(),
        &["vm", "create", "web2", "--tenant", &tenant_id],
    );
    assert!(!ok);
    assert!(err.contains("quota_exceeded"), "{err}");
    let (ok, out, err) = cli(
        &c,
        home.path(),
        &["vm", "list", "--label", "app=web", "-o", "json"],
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v["items"].as_array().map(|a| a.len()), Some(1));
    let (ok, out, _) = cli(&c, home.path(), &["node", "list"]);
    assert!(ok);
    assert!(out.contains("n1"), "{out}");
    Ok(())
}
