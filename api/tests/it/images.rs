//! Image uploads through the router: chunks in order with Content-Range, resume after an
//! interruption, checksum verification, tenancy, and VMs naming an image.

use axum::http::StatusCode;
use raft::model::Role;
use serde_json::{json, Value};
use sha2::Digest;

use crate::fake::{TestApi, ADMIN_PASSWORD};

fn sha(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

async fn put_chunk(
    t: &TestApi,
    token: &str,
    id: &str,
    data: &[u8],
    start: u64,
    total: u64,
) -> (StatusCode, Value) {
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let end = start + data.len() as u64 - 1;
    let req = axum::http::Request::builder()
        .method("PUT")
        .uri(format!("/api/v1/images/{id}/upload"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/octet-stream")
        .header("content-range", format!("bytes {start}-{end}/{total}"))
        .body(Body::from(data.to_vec()))
        .unwrap();
    let resp = t.app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn setup() -> (TestApi, String, String, String) {
    let t = TestApi::new().await;
    let admin = t.login("admin", ADMIN_PASSWORD).await;
    let mut tokens = Vec::new();
    for name in ["a", "b"] {
        let (s, v) = t
            .call(
                "POST",
                "/api/v1/tenants",
                Some(&admin),
                Some(json!({ "name": name })),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        tokens.push(
            t.user(
                &format!("op{name}"),
                v["id"].as_str().unwrap(),
                Role::Operator,
            )
            .await,
        );
    }
    let b = tokens.pop().unwrap();
    let a = tokens.pop().unwrap();
    (t, admin, a, b)
}

async fn create(t: &TestApi, token: &str, name: &str, data: &[u8]) -> String {
    let (s, v) = t
        .call(
            "POST",
            "/api/v1/images",
            Some(token),
            Some(json!({"name": name, "size_bytes": data.len(), "sha256": sha(data)})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["state"], "uploading");
    v["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn an_interrupted_upload_resumes_at_the_stored_offset_and_finishes() {
    let (t, _, a, b) = setup().await;
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let id = create(&t, &a, "disk", &data).await;
    let total = data.len() as u64;

    let (s, v) = put_chunk(&t, &a, &id, &data[..4_000], 0, total).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["offset"], 4_000);
    // The client "lost" its connection and does not know what arrived: it retries a chunk
    // from a wrong offset and is told where the upload stands instead of corrupting it.
    let (s, v) = put_chunk(&t, &a, &id, &data[2_000..6_000], 2_000, total).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["code"], "offset_mismatch");
    let (s, v) = t
        .call(
            "GET",
            &format!("/api/v1/images/{id}/upload"),
            Some(&a),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let at = v["offset"].as_u64().unwrap();
    assert_eq!(at, 4_000);
    // Not finished yet: finishing early is refused.
    let (s, v) = t
        .call(
            "POST",
            &format!("/api/v1/images/{id}/finish"),
            Some(&a),
            Some(json!({"sha256": sha(&data)})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");

    let (s, v) = put_chunk(&t, &a, &id, &data[at as usize..], at, total).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["offset"], total);
    // A chunk past the announced size is refused.
    let (s, _) = put_chunk(&t, &a, &id, b"x", total, total).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // Another tenant cannot see, resume or finish it.
    let (s, _) = t
        .call("GET", &format!("/api/v1/images/{id}"), Some(&b), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = put_chunk(&t, &b, &id, b"x", total, total).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let (s, v) = t
        .call(
            "POST",
            &format!("/api/v1/images/{id}/finish"),
            Some(&a),
            Some(json!({"sha256": sha(&data)})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "ready");
    assert_eq!(v["locations"], json!([1]));
    assert_eq!(t.cp.uploads.lock().unwrap()[&id], data);

    let (s, v) = t.call("GET", "/api/v1/images", Some(&a), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    let (_, v) = t.call("GET", "/api/v1/images", Some(&b), None).await;
    assert!(v["items"].as_array().unwrap().is_empty());

    // VMs name the image by name (or id) and store its id; a missing image is refused.
    let (s, v) = t
        .call(
            "POST",
            "/api/v1/vms",
            Some(&a),
            Some(json!({"name": "w", "vcpus": 1, "memory_mib": 128, "image": "disk"})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["vm"]["image"], id.as_str());
    let (s, _) = t
        .call(
            "POST",
            "/api/v1/vms",
            Some(&b),
            Some(json!({"name": "w", "vcpus": 1, "memory_mib": 128, "image": "disk"})),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "tenant b has no image called disk"
    );

    // In use by a VM: not deletable; another tenant cannot even see it.
    let (s, v) = t
        .call("DELETE", &format!("/api/v1/images/{id}"), Some(&a), None)
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (s, _) = t
        .call("DELETE", &format!("/api/v1/images/{id}"), Some(&b), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn an_unused_image_is_deleted_and_its_name_freed() {
    let (t, _, a, _) = setup().await;
    let id = create(&t, &a, "tmp", b"abc").await;
    let (s, _) = t
        .call("DELETE", &format!("/api/v1/images/{id}"), Some(&a), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = t
        .call("GET", &format!("/api/v1/images/{id}"), Some(&a), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    create(&t, &a, "tmp", b"abc").await;
}

#[tokio::test]
async fn a_checksum_mismatch_is_refused_and_the_upload_discarded() {
    let (t, _, a, _) = setup().await;
    let data = vec![7u8; 3_000];
    let id = create(&t, &a, "bad", &data).await;
    let mut wrong = data.clone();
    wrong[1_500] ^= 1;
    let (s, _) = put_chunk(&t, &a, &id, &wrong, 0, 3_000).await;
    assert_eq!(s, StatusCode::OK);
    // Claiming another checksum than the announced one is refused before any work.
    let (s, v) = t
        .call(
            "POST",
            &format!("/api/v1/images/{id}/finish"),
            Some(&a),
            Some(json!({"sha256": sha(&wrong)})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (s, v) = t
        .call(
            "POST",
            &format!("/api/v1/images/{id}/finish"),
            Some(&a),
            Some(json!({"sha256": sha(&data)})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["code"], "checksum_mismatch");
    let (_, v) = t
        .call("GET", &format!("/api/v1/images/{id}"), Some(&a), None)
        .await;
    assert_eq!(v["state"], "uploading");
    let (_, v) = t
        .call(
            "GET",
            &format!("/api/v1/images/{id}/upload"),
            Some(&a),
            None,
        )
        .await;
    assert_eq!(v["offset"], 0, "the wrong bytes are gone: {v}");
    // An image still uploading cannot back a VM.
    let (s, v) = t
        .call(
            "POST",
            "/api/v1/vms",
            Some(&a),
            Some(json!({"name": "w", "vcpus": 1, "memory_mib": 128, "image": id})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
}

#[tokio::test]
async fn uploads_are_validated() {
    let (t, _, a, _) = setup().await;
    for bad in [
        json!({"name": "x", "size_bytes": 0, "sha256": sha(b"")}),
        json!({"name": "x", "size_bytes": 1u64 << 40, "sha256": sha(b"")}),
        json!({"name": "x", "size_bytes": 1, "sha256": "abc"}),
        json!({"name": "bad name", "size_bytes": 1, "sha256": sha(b"")}),
    ] {
        let (s, v) = t
            .call("POST", "/api/v1/images", Some(&a), Some(bad.clone()))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
    }
    let id = create(&t, &a, "dup", b"abc").await;
    let (s, _) = t
        .call(
            "POST",
            "/api/v1/images",
            Some(&a),
            Some(json!({"name": "dup", "size_bytes": 3, "sha256": sha(b"abc")})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    // A Content-Range that does not match the body or the size is refused.
    let (s, _) = put_chunk(&t, &a, &id, b"ab", 0, 5).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}
