//! Image upload and use across a 3-node cluster on libvirt's test driver: chunks sent through
//! any node land on the upload node, an interrupted upload resumes at the stored offset, a
//! wrong checksum is refused, and a VM placed on another node gets the image over QUIC.

use std::time::Duration;

use serde_json::{json, Value};
use sha2::Digest;
use tokio::io::AsyncWriteExt;

use crate::harness::{eventually, fast_tuning, TestCluster};
use crate::vms::{wait_op, wait_state};

const CHUNK: usize = 64 * 1024;

/// A real qcow2 file, so the agent can build an overlay on it.
fn qcow2(dir: &std::path::Path) -> Vec<u8> {
    let path = dir.join("base.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("64M")
        .output()
        .expect("qemu-img runs");
    assert!(out.status.success(), "{out:?}");
    let mut bytes = std::fs::read(&path).unwrap();
    // Pad so the upload takes several chunks; qcow2 ignores data past its tables.
    bytes.resize(bytes.len().max(5 * CHUNK + 123), 0);
    bytes
}

fn sha(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

async fn put(
    c: &TestCluster,
    via: usize,
    id: &str,
    data: &[u8],
    start: usize,
    total: usize,
) -> (u16, Value) {
    let end = start + data.len() - 1;
    let r = c
        .http
        .put(format!("{}/api/v1/images/{id}/upload", c.nodes[via].url()))
        .bearer_auth(c.token.as_deref().unwrap())
        .header("content-range", format!("bytes {start}-{end}/{total}"))
        .header("content-type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

/// Sends a chunk's headers and half its body, then drops the connection: the server must
/// store nothing of it.
async fn interrupted_put(
    c: &TestCluster,
    via: usize,
    id: &str,
    data: &[u8],
    start: usize,
    total: usize,
) {
    let mut s = tokio::net::TcpStream::connect(&c.nodes[via].api)
        .await
        .unwrap();
    let head = format!(
        "PUT /api/v1/images/{id}/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/octet-stream\r\nContent-Range: bytes {start}-{}/{total}\r\n\
         Content-Length: {}\r\n\r\n",
        c.token.as_deref().unwrap(),
        start + data.len() - 1,
        data.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&data[..data.len() / 2]).await.unwrap();
    s.flush().await.unwrap();
    drop(s);
}

async fn offset(c: &TestCluster, via: usize, id: &str) -> anyhow::Result<u64> {
    let (s, v) = c
        .request(
            via,
            reqwest::Method::GET,
            &format!("/api/v1/images/{id}/upload"),
            None,
        )
        .await?;
    anyhow::ensure!(s == 200, "upload status: {s} {v}");
    v["offset"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no offset in {v}"))
}

async fn node_id(c: &TestCluster, i: usize) -> anyhow::Result<u64> {
    let status = c.status(i).await?;
    status["node_id"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no node_id in {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_resumes_after_an_interruption_and_another_node_runs_a_vm_from_it(
) -> anyhow::Result<()> {
    let c = TestCluster::start(3, fast_tuning(60_000, 10_000, 1_000)).await?;
    let data = qcow2(c.root.path());
    let total = data.len();

    // Created through node 0: its store receives the bytes.
    let (s, img) = c
        .request(
            0,
            reqwest::Method::POST,
            "/api/v1/images",
            Some(json!({"name": "base", "size_bytes": total, "sha256": sha(&data)})),
        )
        .await?;
    assert_eq!(s, 201, "{img}");
    let id = img["id"].as_str().unwrap().to_string();
    let upload_node = node_id(&c, 0).await?;
    assert_eq!(img["upload_node"], upload_node);

    // Two chunks through node 1, forwarded to node 0.
    for k in 0..2 {
        let (s, v) = put(
            &c,
            1,
            &id,
            &data[k * CHUNK..(k + 1) * CHUNK],
            k * CHUNK,
            total,
        )
        .await;
        assert_eq!(s, 200, "{v}");
    }
    // The third is cut off mid-body through node 2.
    interrupted_put(&c, 2, &id, &data[2 * CHUNK..3 * CHUNK], 2 * CHUNK, total).await;
    // The client does not know what arrived: it asks, and resumes there.
    let at = eventually(
        "the offset to be readable",
        Duration::from_secs(10),
        || async { offset(&c, 2, &id).await.ok() },
    )
    .await? as usize;
    assert_eq!(at, 2 * CHUNK, "only whole chunks are stored");
    let (s, v) = put(&c, 2, &id, &data[CHUNK..2 * CHUNK], CHUNK, total).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (409, Some("offset_mismatch")),
        "{v}"
    );
    let mut at = at;
    while at < total {
        let end = (at + CHUNK).min(total);
        let (s, v) = put(&c, 2, &id, &data[at..end], at, total).await;
        assert_eq!(s, 200, "{v}");
        at = v["offset"].as_u64().unwrap() as usize;
    }
    let (s, ready) = c
        .request(
            1,
            reqwest::Method::POST,
            &format!("/api/v1/images/{id}/finish"),
            Some(json!({"sha256": sha(&data)})),
        )
        .await?;
    assert_eq!(s, 200, "{ready}");
    assert_eq!(ready["state"], "ready");
    assert_eq!(ready["locations"], json!([upload_node]));
    let stored = std::fs::read(c.nodes[0].dir.join("images/images").join(&id))?;
    assert!(
        stored == data,
        "the upload node holds exactly the uploaded bytes"
    );

    // A VM from the image on node 2, which does not have it: it is fetched over QUIC,
    // verified, announced, and backs the VM's overlay.
    let target = 2;
    let target_id = node_id(&c, target).await?;
    let (s, created) = c
        .request(
            1,
            reqwest::Method::POST,
            "/api/v1/vms",
            Some(
                json!({"name": "from-image", "vcpus": 1, "memory_mib": 128, "image": "base",
                        "placement": {"node": c.nodes[target].name}}),
            ),
        )
        .await?;
    assert_eq!(s, 202, "{created}");
    let vm_id = created["vm"]["id"].as_str().unwrap().to_string();
    let op = wait_op(&c, 1, created["operation"]["id"].as_str().unwrap()).await?;
    if op["state"] != "succeeded" {
        c.dump_logs();
    }
    assert_eq!(op["state"], "succeeded", "{op}");
    let vm = wait_state(&c, 0, &vm_id, "running").await?;
    assert_eq!(vm["node"], target_id);
    assert_eq!(vm["image"], id.as_str());
    let copy = std::fs::read(c.nodes[target].dir.join("images/images").join(&id))?;
    assert!(copy == data, "the fetched copy is byte-identical");
    let overlay = c.nodes[target]
        .dir
        .join("images/vms")
        .join(&vm_id)
        .join("root.qcow2");
    assert!(overlay.exists(), "overlay {overlay:?}");
    let (_, img) = c
        .request(
            0,
            reqwest::Method::GET,
            &format!("/api/v1/images/{id}"),
            None,
        )
        .await?;
    assert_eq!(img["locations"], json!([upload_node, target_id]), "{img}");

    // Deleting the VM removes its overlay, not the image.
    let (s, del) = c
        .request(
            0,
            reqwest::Method::DELETE,
            &format!("/api/v1/vms/{vm_id}"),
            None,
        )
        .await?;
    assert_eq!(s, 202, "{del}");
    wait_op(&c, 0, del["operation"]["id"].as_str().unwrap()).await?;
    eventually("the overlay to go", Duration::from_secs(30), || async {
        (!overlay.exists()).then_some(())
    })
    .await?;
    let copy_path = c.nodes[target].dir.join("images/images").join(&id);
    assert!(copy_path.exists());

    // Deleting the image removes its bytes from every node that held them.
    let (s, v) = c
        .request(
            2,
            reqwest::Method::DELETE,
            &format!("/api/v1/images/{id}"),
            None,
        )
        .await?;
    assert_eq!(s, 204, "{v}");
    let original = c.nodes[0].dir.join("images/images").join(&id);
    eventually("the image bytes to go", Duration::from_secs(30), || async {
        (!copy_path.exists() && !original.exists()).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_checksum_is_refused_and_the_upload_discarded() -> anyhow::Result<()> {
    let c = TestCluster::start(3, fast_tuning(60_000, 10_000, 1_000)).await?;
    let data = vec![42u8; 3 * CHUNK];
    let (s, img) = c
        .request(
            1,
            reqwest::Method::POST,
            "/api/v1/images",
            Some(json!({"name": "bad", "size_bytes": data.len(), "sha256": sha(&data)})),
        )
        .await?;
    assert_eq!(s, 201, "{img}");
    let id = img["id"].as_str().unwrap().to_string();
    let mut wrong = data.clone();
    wrong[CHUNK + 7] = 0;
    let (s, v) = put(&c, 0, &id, &wrong, 0, wrong.len()).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = c
        .request(
            2,
            reqwest::Method::POST,
            &format!("/api/v1/images/{id}/finish"),
            Some(json!({"sha256": sha(&data)})),
        )
        .await?;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["code"], "checksum_mismatch");
    assert_eq!(
        offset(&c, 0, &id).await?,
        0,
        "the wrong bytes were discarded"
    );
    let (_, img) = c
        .request(
            0,
            reqwest::Method::GET,
            &format!("/api/v1/images/{id}"),
            None,
        )
        .await?;
    assert_eq!(img["state"], "uploading");
    // Two clients racing with chunks for the same offset, through different nodes: exactly one
    // is stored, the other is told where the upload stands.
    let (a, b) = tokio::join!(
        put(&c, 1, &id, &data[..CHUNK], 0, data.len()),
        put(&c, 2, &id, &data[..CHUNK], 0, data.len()),
    );
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(statuses, [200, 409], "{a:?} {b:?}");
    assert_eq!(offset(&c, 0, &id).await?, CHUNK as u64);
    // Uploading the right bytes afterwards works.
    let (s, v) = put(&c, 2, &id, &data[CHUNK..], CHUNK, data.len()).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = c
        .request(
            0,
            reqwest::Method::POST,
            &format!("/api/v1/images/{id}/finish"),
            Some(json!({"sha256": sha(&data)})),
        )
        .await?;
    assert_eq!((s, v["state"].as_str()), (200, Some("ready")), "{v}");
    Ok(())
}
