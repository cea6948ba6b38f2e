//! Federation on the REST side, with two in-memory sites: the catalog pull is done here by
//! hand (as the leader's sync loop does it: the peer's change feed, committed with
//! `ApplyCatalog`), and forwarded calls run through the peer's router. The transport itself
//! and the sync loop are tested with real nodes in `node/tests/it/federation.rs`.

use axum::http::StatusCode;
use raft::federation::{SiteIdentity, SiteLink, SiteSync, FEED_PREFIX};
use raft::model::Role;
use raft::{Command, Request, Response};
use serde_json::{json, Value};

use api::ControlPlane;

use crate::fake::{TestApi, ADMIN_PASSWORD};

async fn site(id: &str, name: &str) -> TestApi {
    let api = TestApi::new().await;
    let site = SiteIdentity {
        id: id.into(),
        name: name.into(),
    };
    commit(&api, 0, Command::InitSite { site }).await;
    api
}

async fn commit(api: &TestApi, at: u64, command: Command) -> Response {
    let (_, r) = api
        .cp
        .write(Request::new(at.max(1), "test", command))
        .await
        .unwrap();
    r
}

/// Links `a` and `b` both ways, and lets each forward to the other.
async fn link(a: &TestApi, b: &TestApi) {
    for (x, y) in [(a, b), (b, a)] {
        let peer = api_site(y);
        commit(
            x,
            1,
            Command::LinkSite {
                link: SiteLink {
                    site: peer.clone(),
                    ca_cert_pem: "pinned".into(),
                    addrs: vec!["192.0.2.1:7003".into()],
                    created_at: 0,
                    updated_at: 0,
                },
                token: None,
            },
        )
        .await;
        x.cp.peers.lock().unwrap().insert(peer.id, y.app.clone());
    }
}

fn api_site(api: &TestApi) -> SiteIdentity {
    raft::codec::decode(&api.cp.get_raw(raft::federation::SITE)).unwrap()
}

/// One pull of `from`'s change feed into `into`'s catalog, committed at time `at`.
async fn pull(into: &TestApi, from: &TestApi, at: u64) {
    let site = api_site(from).id;
    let sync: SiteSync = into
        .cp
        .get(&raft::federation::sync_key(&site))
        .unwrap()
        .map(|b| raft::codec::decode(&b).unwrap())
        .unwrap_or_default();
    let cp = from.cp.clone();
    let page = raft::federation::changes_since(
        |start, n| {
            Ok(cp
                .scan(FEED_PREFIX, None, usize::MAX)
                .unwrap()
                .into_iter()
                .map(|(k, _)| k)
                .filter(|k| k.as_slice() >= start)
                .take(n)
                .collect())
        },
        |key| Ok(cp.get(key).unwrap()),
        sync.index,
        0,
        1000,
    )
    .unwrap();
    let r = commit(
        into,
        at,
        Command::ApplyCatalog {
            site,
            from: sync.index,
            to: page.to,
            head: page.to,
            latency_ms: 2,
            reset: false,
            stale_keys: vec![],
            changes: page.changes,
        },
    )
    .await;
    assert_eq!(r, Response::Ok);
}

async fn create_vm(api: &TestApi, token: &str, name: &str, extra: Value) -> Value {
    let mut body = json!({"name": name, "vcpus": 1, "memory_mib": 128});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let (s, v) = api
        .call("POST", "/api/v1/vms", Some(token), Some(body))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    v["vm"].clone()
}

fn names_and_sites(page: &Value) -> Vec<(String, String, bool)> {
    let mut out: Vec<_> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap().to_string(),
                i["site"]["name"].as_str().unwrap().to_string(),
                i["site"]["stale"].as_bool().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn vms_of_every_site_are_listed_with_their_site_and_a_tenant_sees_only_its_own() {
    let a = site("aaaaa1", "a").await;
    let b = site("bbbbb1", "b").await;
    link(&a, &b).await;
    let admin_a = a.login("admin", ADMIN_PASSWORD).await;
    let admin_b = b.login("admin", ADMIN_PASSWORD).await;
    // A tenant of a with a user and a VM; another tenant of a with a VM; a VM at b.
    let (_, t1) = a
        .call(
            "POST",
            "/api/v1/tenants",
            Some(&admin_a),
            Some(json!({"name": "acme"})),
        )
        .await;
    let (_, t2) = a
        .call(
            "POST",
            "/api/v1/tenants",
            Some(&admin_a),
            Some(json!({"name": "other"})),
        )
        .await;
    let t1 = t1["id"].as_str().unwrap().to_string();
    assert!(t1.starts_with("aaaaa1-"), "ids carry the home site: {t1}");
    let alice = a.user("alice", &t1, Role::Operator).await;
    let vm_a = create_vm(&a, &alice, "acme-vm", json!({})).await;
    assert!(vm_a["id"].as_str().unwrap().starts_with("aaaaa1-"));
    create_vm(&a, &admin_a, "other-vm", json!({"tenant": t2["id"]})).await;
    create_vm(&b, &admin_b, "b-vm", json!({})).await;
    pull(&b, &a, api::now_ms()).await;
    pull(&a, &b, api::now_ms()).await;

    // The admin of b sees every VM of both sites, each with its site.
    let (s, page) = b
        .call("GET", "/api/v1/vms?site=all", Some(&admin_b), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{page}");
    assert_eq!(
        names_and_sites(&page),
        [
            ("acme-vm".to_string(), "a".to_string(), false),
            ("b-vm".to_string(), "b".to_string(), false),
            ("other-vm".to_string(), "a".to_string(), false),
        ]
    );
    // Without `site`, only b's own.
    let (_, own) = b.call("GET", "/api/v1/vms", Some(&admin_b), None).await;
    assert_eq!(names_and_sites(&own).len(), 1);
    // One site by name, paged one at a time through the site cursor.
    let (_, first) = b
        .call("GET", "/api/v1/vms?site=a&limit=1", Some(&admin_b), None)
        .await;
    let cursor = first["next_cursor"].as_str().unwrap().to_string();
    let (_, second) = b
        .call(
            "GET",
            &format!("/api/v1/vms?site=a&limit=1&cursor={cursor}"),
            Some(&admin_b),
            None,
        )
        .await;
    assert_eq!(
        names_and_sites(&first).len() + names_and_sites(&second).len(),
        2
    );
    assert_ne!(first["items"][0]["id"], second["items"][0]["id"]);

    // alice (home a) logs in at b: a checks the password; b issues its own token.
    let (s, login) = b
        .call(
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"username": "alice@a", "password": "pw"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{login}");
    let alice_at_b = login["token"].as_str().unwrap().to_string();
    // A wrong password is refused by the home site.
    let (s, _) = b
        .call(
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"username": "alice", "password": "wrong-password"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // At b, alice sees exactly her tenant's VMs, of every site.
    let (_, mine) = b
        .call("GET", "/api/v1/vms?site=all", Some(&alice_at_b), None)
        .await;
    assert_eq!(
        names_and_sites(&mine),
        [("acme-vm".to_string(), "a".to_string(), false)]
    );
    // Her VM, read and stopped through b, is served by a.
    let id = vm_a["id"].as_str().unwrap();
    let (s, got) = b
        .call("GET", &format!("/api/v1/vms/{id}"), Some(&alice_at_b), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{got}");
    let (s, stop) = b
        .call(
            "POST",
            &format!("/api/v1/vms/{id}/stop"),
            Some(&alice_at_b),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{stop}");
    let (_, at_a) = a
        .call("GET", &format!("/api/v1/vms/{id}"), Some(&admin_a), None)
        .await;
    assert_eq!(at_a["desired_state"], "stopped");
    // Another tenant's VM of a: 404 through b, exactly like an unknown id.
    let (_, all_a) = a.call("GET", "/api/v1/vms", Some(&admin_a), None).await;
    let other = all_a["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "other-vm")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    for path in [format!("/api/v1/vms/{other}"), "/api/v1/vms/made-up".into()] {
        let (s, _) = b.call("GET", &path, Some(&alice_at_b), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
    }
}

#[tokio::test]
async fn a_vm_created_through_another_site_lives_at_the_site_named() {
    let a = site("aaaaa2", "a").await;
    let edge = site("eeeee2", "edge").await;
    link(&a, &edge).await;
    let admin_a = a.login("admin", ADMIN_PASSWORD).await;
    let admin_edge = edge.login("admin", ADMIN_PASSWORD).await;
    pull(&edge, &a, api::now_ms()).await;
    let vm = create_vm(&a, &admin_a, "at-edge", json!({"site": "edge"})).await;
    assert!(
        vm["id"].as_str().unwrap().starts_with("eeeee2-"),
        "made by the edge site: {vm}"
    );
    let (_, at_edge) = edge
        .call("GET", "/api/v1/vms", Some(&admin_edge), None)
        .await;
    assert_eq!(
        names_and_sites(&at_edge),
        [("at-edge".into(), "edge".into(), false)]
    );
    let (_, at_a) = a.call("GET", "/api/v1/vms", Some(&admin_a), None).await;
    assert!(names_and_sites(&at_a).is_empty());
    // An unknown site is a 404; a cut-off site a 503 that names it.
    let (s, _) = a
        .call(
            "POST",
            "/api/v1/vms",
            Some(&admin_a),
            Some(json!({"name": "x", "vcpus": 1, "memory_mib": 128, "site": "nowhere"})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    a.cp.peers.lock().unwrap().clear();
    let (s, v) = a
        .call(
            "POST",
            "/api/v1/vms",
            Some(&admin_a),
            Some(json!({"name": "y", "vcpus": 1, "memory_mib": 128, "site": "edge"})),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("eeeee2"), "{v}");
}

#[tokio::test]
async fn a_site_not_heard_from_is_listed_as_stale_with_its_last_data() {
    let a = site("aaaaa3", "a").await;
    let b = site("bbbbb3", "b").await;
    link(&a, &b).await;
    let admin_a = a.login("admin", ADMIN_PASSWORD).await;
    let admin_b = b.login("admin", ADMIN_PASSWORD).await;
    create_vm(&b, &admin_b, "b-vm", json!({})).await;
    // The last pull from b was a minute ago (the default stale limit is 15 s).
    let minute_ago = api::now_ms() - 60_000;
    pull(&a, &b, minute_ago).await;
    let (_, page) = a
        .call("GET", "/api/v1/vms?site=all", Some(&admin_a), None)
        .await;
    let item = &page["items"][0];
    assert_eq!(item["name"], "b-vm");
    assert_eq!(item["site"]["stale"], true);
    assert!(item["site"]["age_ms"].as_u64().unwrap() >= 60_000, "{item}");
    let (_, sites) = a.call("GET", "/api/v1/sites", Some(&admin_a), None).await;
    let b_view = &sites["sites"][1];
    assert_eq!(b_view["name"], "b");
    assert_eq!(b_view["health"], "stale");
    assert_eq!(sites["sites"][0]["local"], true);
    // A fresh pull makes it current again.
    pull(&a, &b, api::now_ms()).await;
    let (_, sites) = a.call("GET", "/api/v1/sites", Some(&admin_a), None).await;
    assert_eq!(sites["sites"][1]["health"], "ok");
    // Unlinking forgets the site's catalog.
    let (s, _) = a
        .call("DELETE", "/api/v1/sites/b", Some(&admin_a), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, page) = a
        .call("GET", "/api/v1/vms?site=all", Some(&admin_a), None)
        .await;
    assert_eq!(page["items"].as_array().unwrap().len(), 0, "{page}");
    let (s, _) = a
        .call("GET", "/api/v1/vms?site=b", Some(&admin_a), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_federation_token_is_issued_once_to_admins() {
    let a = site("aaaaa4", "a").await;
    let admin = a.login("admin", ADMIN_PASSWORD).await;
    let (s, v) = a
        .call("POST", "/api/v1/federation/tokens", Some(&admin), None)
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let token: raft::federation::LinkToken = v["token"].as_str().unwrap().parse().unwrap();
    assert_eq!(token.site_id, "aaaaa4");
    // The secret is not stored, only its hash.
    let stored: raft::federation::FederationToken =
        raft::codec::decode(&a.cp.get_raw(&raft::federation::token_key(&token.token_id))).unwrap();
    assert_eq!(stored.secret_sha256, token.secret_sha256());
    assert_ne!(stored.secret_sha256, token.secret);
}
