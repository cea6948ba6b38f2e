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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_uploads_an_image_resuming_a_started_upload() -> anyhow::Result<()> {
    use sha2::Digest;
    let c = TestCluster::start(1, fast_tuning(60_000, 10_000, 1_000)).await?;
    let home = tempfile::tempdir()?;
    let file = home.path().join("disk.img");
    let data: Vec<u8> = (0..1_300_000u32).map(|i| (i * 7 % 253) as u8).collect();
    std::fs::write(&file, &data)?;
    let sha = hex::encode(sha2::Sha256::digest(&data));

    // An upload of these bytes was started earlier and cut off after its first 100 000 bytes.
    let (s, img) = c
        .request(
            0,
            reqwest::Method::POST,
            "/api/v1/images",
            Some(serde_json::json!({"name": "disk", "size_bytes": data.len(), "sha256": sha})),
        )
        .await?;
    assert_eq!(s, 201, "{img}");
    let id = img["id"].as_str().unwrap();
    let r = c
        .http
        .put(format!("{}/api/v1/images/{id}/upload", c.nodes[0].url()))
        .bearer_auth(c.token.as_deref().unwrap())
        .header("content-range", format!("bytes 0-99999/{}", data.len()))
        .body(data[..100_000].to_vec())
        .send()
        .await?;
    assert_eq!(r.status(), 200);

    let out = Command::new(BIN)
        .args(["image", "upload"])
        .arg(&file)
        .args(["--name", "disk", "--chunk-kib", "256", "-o", "json"])
        .env("HOME", home.path())
        .env("NOVACRON_URL", c.nodes[0].url())
        .env("NOVACRON_TOKEN", c.token.as_deref().unwrap())
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["state"], "ready", "{v}");
    assert_eq!(
        v["id"], id,
        "the started upload was resumed, not restarted: {v}"
    );
    let stored = std::fs::read(c.nodes[0].dir.join("images/images").join(id))?;
    assert!(stored == data);

    let out = Command::new(BIN)
        .args(["image", "list"])
        .env("HOME", home.path())
        .env("NOVACRON_URL", c.nodes[0].url())
        .env("NOVACRON_TOKEN", c.token.as_deref().unwrap())
        .output()?;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("disk") && table.contains("ready"), "{table}");
    Ok(())
}
