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
