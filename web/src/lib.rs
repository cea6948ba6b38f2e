//! The NovaCron dashboard, embedded in the binary and served by every node at `/`.
//!
//! This crate owns only static content: one HTML shell, one script, one style sheet and an icon,
//! all compiled into the binary with `include_str!`/`include_bytes!`. The pages run in the browser
//! and talk to the REST API of the same origin (`/api/v1/...`), so the router holds no state and
//! knows nothing of the cluster. It never sets a fallback route, so the node can merge it next to
//! the API without the two routers fighting over unmatched paths.
//!
//! Caching: the shell at `/` is always revalidated (`no-cache` plus an `ETag`), and it names every
//! asset with `?v=<content hash>`. An asset requested with the current hash is immutable for a
//! year; any other request for it is revalidated. So a node upgraded to a new binary is picked up
//! by browsers at the next page load, and nothing stale is ever served from cache.

use std::sync::OnceLock;

use axum::extract::{Path, Query};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The HTML shell; `{{name}}` placeholders are replaced by versioned asset URLs at first use.
const INDEX_TEMPLATE: &str = include_str!("../assets/index.html");

/// Cache policy of the shell and of assets fetched without their current version.
const REVALIDATE: &str = "no-cache";
/// Cache policy of an asset fetched with its current content hash: that URL never changes meaning.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// The pages load nothing from elsewhere: no CDN, no inline script, no framing by other sites.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// One embedded file served under `/assets/`.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// File name, as it appears after `/assets/`.
    pub name: &'static str,
    /// `Content-Type` sent with it.
    pub content_type: &'static str,
    /// The bytes compiled into the binary.
    pub body: &'static [u8],
}

/// Every asset the dashboard loads. The shell references each through its placeholder.
pub const ASSETS: &[Asset] = &[
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../assets/app.js"),
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../assets/app.css"),
    },
    Asset {
        name: "favicon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../assets/favicon.svg"),
    },
];

/// The dashboard's routes: `/` (and `/index.html`), `/assets/{name}` and `/favicon.ico`.
///
/// Stateless, so the node merges it next to the API: `api::router(..).merge(web::router())`.
pub fn router() -> Router {
    Router::new()
        .route("/", get(index))
        .route("/index.html", get(index))
        .route("/assets/{name}", get(asset))
        // Browsers ask for this path whatever the page says; answer with the same icon.
        .route("/favicon.ico", get(favicon))
}

/// Total bytes of script and style a page loads (reported in the benchmarks document).
pub fn page_weight() -> usize {
    INDEX_TEMPLATE.len()
        + ASSETS
            .iter()
            .filter(|a| a.name.ends_with(".js") || a.name.ends_with(".css"))
            .map(|a| a.body.len())
            .sum::<usize>()
}

/// Hex of the first 8 bytes of the SHA-256 of `bytes`: short, and enough to tell versions apart.
fn short_hash(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..8])
}

/// The version tag of an asset, computed once per process.
fn asset_version(asset: &Asset) -> &'static str {
    static VERSIONS: OnceLock<Vec<String>> = OnceLock::new();
    let versions = VERSIONS.get_or_init(|| ASSETS.iter().map(|a| short_hash(a.body)).collect());
    ASSETS
        .iter()
        .position(|a| a.name == asset.name)
        .and_then(|i| versions.get(i))
        .map(String::as_str)
        .unwrap_or("")
}

/// The rendered shell and its ETag, computed once per process.
fn rendered_index() -> &'static (String, String) {
    static INDEX: OnceLock<(String, String)> = OnceLock::new();
    INDEX.get_or_init(|| {
        let mut html = INDEX_TEMPLATE.to_string();
        for a in ASSETS {
            let url = format!("/assets/{}?v={}", a.name, asset_version(a));
            html = html.replace(&format!("{{{{{}}}}}", a.name), &url);
        }
        let etag = format!("\"{}\"", short_hash(html.as_bytes()));
        (html, etag)
    })
}

/// True when the request's `If-None-Match` names `etag` (or `*`).
fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .map(str::trim)
                .any(|t| t == "*" || t == etag || t.strip_prefix("W/") == Some(etag))
        })
}

/// A response with the headers every dashboard file carries.
fn respond(
    headers: &HeaderMap,
    etag: &str,
    content_type: &'static str,
    cache: &'static str,
    body: Vec<u8>,
) -> Response {
    let status = if not_modified(headers, etag) {
        StatusCode::NOT_MODIFIED
    } else {
        StatusCode::OK
    };
    let body = if status == StatusCode::NOT_MODIFIED {
        Vec::new()
    } else {
        body
    };
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

async fn index(headers: HeaderMap) -> Response {
    let (html, etag) = rendered_index();
    respond(
        &headers,
        etag,
        "text/html; charset=utf-8",
        REVALIDATE,
        html.as_bytes().to_vec(),
    )
}

#[derive(Debug, Deserialize)]
struct AssetQuery {
    v: Option<String>,
}

fn serve_asset(asset: &Asset, requested: Option<&str>, headers: &HeaderMap) -> Response {
    let version = asset_version(asset);
    let cache = if requested == Some(version) {
        IMMUTABLE
    } else {
        REVALIDATE
    };
    let etag = format!("\"{version}\"");
    respond(
        headers,
        &etag,
        asset.content_type,
        cache,
        asset.body.to_vec(),
    )
}

async fn asset(
    Path(name): Path<String>,
    Query(q): Query<AssetQuery>,
    headers: HeaderMap,
) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(a) => serve_asset(a, q.v.as_deref(), &headers),
        None => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}

async fn favicon(headers: HeaderMap) -> Response {
    match ASSETS.iter().find(|a| a.name == "favicon.svg") {
        Some(a) => serve_asset(a, None, &headers),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::{to_bytes, Body};
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(uri: &str, if_none_match: Option<&str>) -> Response {
        let mut req = Request::get(uri);
        if let Some(tag) = if_none_match {
            req = req.header(header::IF_NONE_MATCH, tag);
        }
        router()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    fn header_of(resp: &Response, name: header::HeaderName) -> &str {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    async fn body_text(resp: Response) -> String {
        String::from_utf8(to_bytes(resp.into_body(), 1 << 22).await.unwrap().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn serves_the_shell_at_root_with_versioned_assets() {
        let resp = get("/", None).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            header_of(&resp, header::CONTENT_TYPE),
            "text/html; charset=utf-8"
        );
        assert_eq!(header_of(&resp, header::CACHE_CONTROL), "no-cache");
        assert!(header_of(&resp, header::CONTENT_SECURITY_POLICY).contains("default-src 'self'"));
        assert_eq!(header_of(&resp, header::X_CONTENT_TYPE_OPTIONS), "nosniff");
        let html = body_text(resp).await;
        assert!(html.starts_with("<!doctype html>"));
        assert!(
            !html.contains("{{"),
            "an asset placeholder was left in the page"
        );
        for a in ASSETS {
            let url = format!("/assets/{}?v={}", a.name, asset_version(a));
            assert!(html.contains(&url), "page does not reference {url}");
        }
        // The page must not load anything from another origin.
        assert!(!html.contains("http://") && !html.contains("https://"));
    }

    #[tokio::test]
    async fn index_html_is_the_same_page() {
        let a = body_text(get("/", None).await).await;
        let b = body_text(get("/index.html", None).await).await;
        assert_eq!(a, b);
    }

    #[tokio::test]
    async fn assets_have_their_content_type_and_body() {
        for a in ASSETS {
            let resp = get(&format!("/assets/{}", a.name), None).await;
            assert_eq!(resp.status(), StatusCode::OK, "{}", a.name);
            assert_eq!(header_of(&resp, header::CONTENT_TYPE), a.content_type);
            let body = to_bytes(resp.into_body(), 1 << 22).await.unwrap();
            assert_eq!(&body[..], a.body, "{}", a.name);
        }
        let js = get("/assets/app.js", None).await;
        assert_eq!(
            header_of(&js, header::CONTENT_TYPE),
            "text/javascript; charset=utf-8"
        );
        let css = get("/assets/app.css", None).await;
        assert_eq!(
            header_of(&css, header::CONTENT_TYPE),
            "text/css; charset=utf-8"
        );
    }

    #[tokio::test]
    async fn versioned_assets_are_immutable_and_others_revalidate() {
        let js = ASSETS.iter().find(|a| a.name == "app.js").unwrap();
        let v = asset_version(js);
        assert_eq!(v.len(), 16);
        let current = get(&format!("/assets/app.js?v={v}"), None).await;
        assert_eq!(header_of(&current, header::CACHE_CONTROL), IMMUTABLE);
        assert_eq!(header_of(&current, header::ETAG), format!("\"{v}\""));
        let stale = get("/assets/app.js?v=0000000000000000", None).await;
        assert_eq!(header_of(&stale, header::CACHE_CONTROL), "no-cache");
        let bare = get("/assets/app.js", None).await;
        assert_eq!(header_of(&bare, header::CACHE_CONTROL), "no-cache");
    }

    #[tokio::test]
    async fn matching_etag_answers_not_modified() {
        let first = get("/", None).await;
        let etag = header_of(&first, header::ETAG).to_string();
        assert!(etag.starts_with('"'));
        let again = get("/", Some(&etag)).await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        assert!(body_text(again).await.is_empty());
        let other = get("/", Some("\"nope\"")).await;
        assert_eq!(other.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn unknown_asset_is_404_and_favicon_is_served() {
        assert_eq!(
            get("/assets/nope.js", None).await.status(),
            StatusCode::NOT_FOUND
        );
        // Path traversal cannot reach anything: names are matched against the embedded table.
        assert_eq!(
            get("/assets/..%2FCargo.toml", None).await.status(),
            StatusCode::NOT_FOUND
        );
        let icon = get("/favicon.ico", None).await;
        assert_eq!(icon.status(), StatusCode::OK);
        assert_eq!(header_of(&icon, header::CONTENT_TYPE), "image/svg+xml");
    }

    #[tokio::test]
    async fn merges_next_to_another_router_without_conflict() {
        // The node merges this router with the API; neither may claim the other's paths.
        let api = Router::new().route("/api/v1/cluster", axum::routing::get(|| async { "api" }));
        let app = api.merge(router());
        let resp = app
            .clone()
            .oneshot(Request::get("/api/v1/cluster").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(body_text(resp).await, "api");
        let resp = app
            .oneshot(Request::get("/").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }

    #[test]
    fn page_weight_counts_script_and_style() {
        assert!(page_weight() > INDEX_TEMPLATE.len());
    }
}
