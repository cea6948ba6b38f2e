//! A node whose Raft stops on its own (openraft stops for good on a storage failure such as a
//! full disk) must not go on serving a replica that never catches up: `serve_node` returns an
//! error so the process exits and its supervisor restarts it from disk.
//!
//! Found by the chaos long tier's full-disk scenario: the node whose disk filled up kept
//! answering (stale) requests after the disk had room again, and never rejoined.

use std::time::Duration;

use node::server::{serve_node, Node, ServeOptions};

#[tokio::test]
async fn serving_ends_with_an_error_when_raft_stops_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let opts = ServeOptions {
        data_dir: dir.path().join("n1"),
        name: Some("n1".into()),
        api_addr: Some("127.0.0.1:0".parse().unwrap()),
        peer_addr: Some("127.0.0.1:0".parse().unwrap()),
        init: true,
        libvirt_uri: Some("test:///default".into()),
        ..Default::default()
    };
    let node = Node::start(opts).await.unwrap();
    let raft = node.control.raft.clone();
    let mut metrics = raft.metrics();
    tokio::time::timeout(
        Duration::from_secs(30),
        metrics.wait_for(|m| m.current_leader.is_some()),
    )
    .await
    .unwrap()
    .unwrap();
    let served = tokio::spawn(serve_node(node, std::future::pending()));
    // Stands in for the storage failure: the Raft core quits while nobody asked the node to stop.
    raft.shutdown().await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(30), served)
        .await
        .expect("serve_node kept serving after its Raft stopped")
        .unwrap();
    let err = result.expect_err("serve_node must report that its Raft stopped");
    assert!(err.to_string().contains("Raft stopped"), "{err:#}");
}

/// A node whose disk cannot make data durable must acknowledge nothing: its store `fdatasync`s
/// sled's file after every flush and fails the append (or vote) when that fails, so the node
/// never becomes ready; it does not serve writes that a power cut could take back.
///
/// Found by the chaos long tier's fsync-failure scenario: sled 0.34 waits for its writes with
/// `sync_file_range` and only logs failed fsyncs, so with failing `fdatasync` nodes went on
/// acknowledging appends. Runs the node under `fiu-run` (Debian `fiu-utils`, installed by
/// `cargo xtask ci`), with `fdatasync` failing from the start.
#[tokio::test]
async fn a_node_whose_disk_cannot_sync_acknowledges_nothing() {
    let Some(fiu_run) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("fiu-run"))
            .find(|p| p.is_file())
    }) else {
        eprintln!("skipped: fiu-run (Debian fiu-utils) is not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n1");
    let mut child = std::process::Command::new(fiu_run)
        .args(["-x", "-c", "enable name=posix/io/sync/fdatasync"])
        .arg(env!("CARGO_BIN_EXE_novacron"))
        .args([
            "serve",
            "--init",
            "--name",
            "n1",
            "--api-addr",
            "127.0.0.1:0",
        ])
        .args([
            "--peer-addr",
            "127.0.0.1:0",
            "--libvirt-uri",
            "test:///default",
        ])
        .arg("--data-dir")
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The node must give up (exit with an error) and never answer ready.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        let api = std::fs::read_to_string(data.join("node.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["api_addr"].as_str().map(str::to_string));
        if let Some(api) = api {
            if let Ok(r) = http.get(format!("http://{api}/readyz")).send().await {
                if r.status().is_success() {
                    let _ = child.kill();
                    panic!(
                        "a node that cannot fdatasync became ready and would acknowledge writes"
                    );
                }
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the node neither exited nor became ready"
        );
        // Polls for either outcome; neither has an event to wait on.
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success(), "{status}");
}
