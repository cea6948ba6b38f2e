//! The event stream: tenant filtering, Raft indexes as ids, resume with Last-Event-ID.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use raft::model::Role;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::fake::{TestApi, ADMIN_PASSWORD};

/// An open event stream, read event by event.
struct Events {
    body: Body,
    buf: String,
}

#[derive(Debug)]
struct Sse {
    kind: String,
    id: Option<u64>,
    data: Value,
}

impl Events {
    async fn open(t: &TestApi, token: &str, last_id: Option<&str>) -> Result<Events, StatusCode> {
        let mut req =
            Request::get("/api/v1/events").header("authorization", format!("Bearer {token}"));
        if let Some(id) = last_id {
            req = req.header("last-event-id", id);
        }
        let resp = t
            .app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        if resp.status() != StatusCode::OK {
            return Err(resp.status());
        }
        Ok(Events {
            body: resp.into_body(),
            buf: String::new(),
        })
    }

    /// The next event (keep-alive comments skipped); fails the test if none comes in 10 s.
    async fn next(&mut self) -> Sse {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut ev = Sse {
                    kind: "message".into(),
                    id: None,
                    data: Value::Null,
                };
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        ev.kind = v.trim().into();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        ev.id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        ev.data = serde_json::from_str(v.trim()).unwrap();
                    }
                }
                if ev.data.is_null() && ev.id.is_none() {
                    continue;
                }
                return ev;
            }
            let frame = tokio::time::timeout(Duration::from_secs(10), self.body.frame())
                .await
                .expect("an event within 10 s")
                .expect("stream open")
                .unwrap();
            if let Ok(data) = frame.into_data() {
                self.buf.push_str(&String::from_utf8_lossy(&data));
            }
        }
    }
}

async fn tenant(t: &TestApi, admin: &str, name: &str) -> String {
    let (_, v) = t
        .call(
            "POST",
            "/api/v1/tenants",
            Some(admin),
            Some(json!({"name": name})),
        )
        .await;
    v["id"].as_str().unwrap().to_string()
}

async fn set_quota(t: &TestApi, admin: &str, id: &str, vms: u64) {
    let (s, v) = t
        .call(
            "PATCH",
            &format!("/api/v1/tenants/{id}"),
            Some(admin),
            Some(json!({"quota": {"max_vms": vms}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn callers_see_only_their_tenant_with_raft_indexes_as_ids() {
    let t = TestApi::new().await;
    let admin = t.login("admin", ADMIN_PASSWORD).await;
    let a = tenant(&t, &admin, "a").await;
    let b = tenant(&t, &admin, "b").await;
    let viewer = t.user("va", &a, Role::Viewer).await;
    assert_eq!(
        Events::open(&t, "nope", None).await.err(),
        Some(StatusCode::UNAUTHORIZED)
    );

    let mut mine = Events::open(&t, &viewer, None).await.unwrap();
    let mut all = Events::open(&t, &admin, None).await.unwrap();
    set_quota(&t, &admin, &b, 5).await;
    // Identity objects of the tenant are for tenant-admins: a viewer does not see them.
    t.user("vb", &a, Role::Viewer).await;
    set_quota(&t, &admin, &a, 7).await;

    let e = mine.next().await;
    assert_eq!(
        (e.kind.as_str(), e.data["tenant"].as_str()),
        ("change", Some(a.as_str())),
        "{e:?}"
    );
    assert_eq!(e.data["action"], "tenant.update");
    assert_eq!(e.data["object"]["quota"]["max_vms"], 7);
    assert_eq!(e.id, e.data["index"].as_u64());

    let first = all.next().await;
    assert_eq!(first.data["tenant"].as_str(), Some(b.as_str()));
    let second = all.next().await;
    assert_eq!(second.data["action"], "user.create");
    assert!(
        second.data["object"].get("password_hash").is_none(),
        "{second:?}"
    );
    assert!(second.id > first.id);
}

#[tokio::test]
async fn resume_replays_what_was_missed_or_asks_to_relist() {
    let t = TestApi::new().await;
    let admin = t.login("admin", ADMIN_PASSWORD).await;
    let a = tenant(&t, &admin, "a").await;
    // The first stream starts the history; changes made while nobody listens are kept.
    let mut live = Events::open(&t, &admin, None).await.unwrap();
    set_quota(&t, &admin, &a, 1).await;
    let seen = live.next().await.id.unwrap();
    drop(live);
    set_quota(&t, &admin, &a, 2).await;
    set_quota(&t, &admin, &a, 3).await;

    let mut resumed = Events::open(&t, &admin, Some(&seen.to_string()))
        .await
        .unwrap();
    let e = resumed.next().await;
    assert_eq!(e.data["object"]["quota"]["max_vms"], 2, "{e:?}");
    let e = resumed.next().await;
    assert_eq!(e.data["object"]["quota"]["max_vms"], 3, "{e:?}");
    // Live changes follow the replay without duplicates.
    set_quota(&t, &admin, &a, 4).await;
    assert_eq!(resumed.next().await.data["object"]["quota"]["max_vms"], 4);

    // An index from before the kept history: re-list.
    let mut old = Events::open(&t, &admin, Some("1")).await.unwrap();
    assert_eq!(old.next().await.kind, "reset");
    assert_eq!(
        Events::open(&t, &admin, Some("x")).await.err(),
        Some(StatusCode::BAD_REQUEST)
    );
}
