//! Route table and the middleware stack, applied once for every route.

pub(crate) mod api_keys;
mod audit;
mod auth;
mod cluster;
mod day2;
mod events;
mod extract;
mod health;
mod images;
mod migrations;
mod nodes;
mod objects;
mod scheduler;
mod site_moves;
mod sites;
mod tenants;
pub(crate) mod users;
mod vm_metrics;
mod vms;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use raft::{Request as RaftRequest, Response as RaftResponse};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// Every route with its description: the router and the OpenAPI document both come from here.
fn routes() -> OpenApiRouter<AppState> {
    let api = OpenApiRouter::new()
        .routes(routes!(auth::login))
        .routes(routes!(auth::logout))
        .routes(routes!(api_keys::list, api_keys::create))
        .routes(routes!(api_keys::revoke))
        .routes(routes!(audit::list))
        .routes(routes!(audit::verify))
        .routes(routes!(events::stream))
        .routes(routes!(users::totp_enroll))
        .routes(routes!(users::totp_confirm))
        .routes(routes!(users::totp_require))
        .routes(routes!(cluster::status))
        .routes(routes!(cluster::rotate_jwt_key))
        .routes(routes!(cluster::join))
        .routes(routes!(day2::backup))
        .routes(routes!(day2::upgrade_check))
        .routes(routes!(tenants::list, tenants::create))
        .routes(routes!(nodes::list))
        .routes(routes!(nodes::remove))
        .routes(routes!(nodes::drain))
        .routes(routes!(nodes::undrain))
        .routes(routes!(vms::list, vms::create))
        .routes(routes!(vms::get_one, vms::delete))
        .routes(routes!(vms::start))
        .routes(routes!(vms::stop))
        .routes(routes!(vms::reboot))
        .routes(routes!(vms::console))
        .routes(routes!(vm_metrics::get_metrics))
        .routes(routes!(images::list, images::create))
        .routes(routes!(images::get_one, images::delete))
        .routes(routes!(images::upload_status, images::upload_chunk))
        .routes(routes!(images::finish))
        .routes(routes!(vms::get_operation))
        .routes(routes!(migrations::migrate))
        .routes(routes!(site_moves::move_vm))
        .routes(routes!(scheduler::placement))
        .routes(routes!(scheduler::simulate))
        .routes(routes!(sites::list, sites::link))
        .routes(routes!(sites::unlink))
        .routes(routes!(sites::create_token))
        .routes(routes!(users::list, users::create))
        .routes(routes!(users::get_one, users::update, users::delete))
        .routes(routes!(tenants::get_one, tenants::update, tenants::delete));
    OpenApiRouter::new()
        .nest("/api/v1", api)
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(health::metrics))
}

/// The OpenAPI document of [`routes`], completed with errors and security.
pub(crate) fn openapi() -> utoipa::openapi::OpenApi {
    crate::openapi::finish(routes().split_for_parts().1)
}

pub(crate) fn router(state: AppState) -> Router {
    let (router, _) = routes().split_for_parts();
    // Serialized once: the document does not change while the process runs.
    let doc: Arc<str> = Arc::from(crate::openapi::document_json().unwrap_or_default());
    let router = router.route(
        "/openapi.json",
        get(move || {
            let doc = doc.clone();
            async move {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    doc.to_string(),
                )
            }
        }),
    );
    let cors = cors_layer(&state.config.cors_allow_origins);
    router
        .layer(middleware::from_fn_with_state(
            state.clone(),
            sites::forward_remote,
        ))
        .layer(RequestBodyLimitLayer::new(state.config.body_limit))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            state.config.request_timeout,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            record_metrics,
        ))
        .layer(tower::util::option_layer(cors))
        .with_state(state)
}

/// CORS only for configured origins; with none, no CORS headers are sent and browsers keep
/// other sites' pages from calling the API.
fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{header, HeaderValue, Method};
    if origins.is_empty() {
        return None;
    }
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| match HeaderValue::from_str(o) {
            Ok(v) => Some(v),
            Err(_) => {
                tracing::warn!(origin = %o, "ignoring a CORS origin that is not a header value");
                None
            }
        })
        .collect();
    Some(
        tower_http::cors::CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::IF_MATCH,
                header::HeaderName::from_static("idempotency-key"),
                header::HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([header::ETAG, header::RETRY_AFTER]),
    )
}

async fn record_metrics(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    state
        .metrics
        .latency
        .with_label_values(&[&method, &route])
        .observe(start.elapsed().as_secs_f64());
    state
        .metrics
        .requests
        .with_label_values(&[&method, &route, resp.status().as_str()])
        .inc();
    resp
}

/// Proposes a command on behalf of `caller` and turns a refusal of `apply` into an API error.
pub(crate) async fn propose(
    state: &AppState,
    caller: &Caller,
    idempotency_key: Option<String>,
    command: raft::Command,
) -> ApiResult<(u64, RaftResponse)> {
    // `apply` remembers an outcome per actor and key. Scoping the key by the command too means
    // a client reusing one key for two different calls gets each call's own outcome instead of
    // the other's (which the handler could not render).
    let scoped = idempotency_key.map(|k| format!("{}:{k}", command.name()));
    // Taking access away must hold on every node by the time the caller hears it did.
    let revokes_access = matches!(
        command,
        raft::Command::RevokeApiKey { .. }
            | raft::Command::RevokeToken { .. }
            | raft::Command::DeleteUser { .. }
            | raft::Command::UpdateUser { .. }
            | raft::Command::RotateJwtKey { .. }
    );
    let mut req = RaftRequest::new(crate::now_ms(), caller.user_id.clone(), command);
    req.idempotency_key = scoped;
    let (index, resp) = state.cp.write(req).await?;
    if revokes_access {
        state.cp.wait_all_applied(index).await;
    }
    match resp {
        RaftResponse::Rejected { code, message } => Err(ApiError::from_reject(code, message)),
        other => Ok((index, other)),
    }
}

/// The `Idempotency-Key` header, validated.
pub(crate) fn idempotency_key(headers: &axum::http::HeaderMap) -> ApiResult<Option<String>> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => {
            let s = v
                .to_str()
                .map_err(|_| ApiError::Validation("Idempotency-Key must be ASCII".into()))?;
            if s.is_empty() || s.len() > 128 {
                return Err(ApiError::Validation(
                    "Idempotency-Key must have 1 to 128 characters".into(),
                ));
            }
            Ok(Some(s.to_string()))
        }
    }
}

/// `If-Match: "<version>"` as a version number.
pub(crate) fn if_match(headers: &axum::http::HeaderMap) -> ApiResult<Option<u64>> {
    match headers.get(axum::http::header::IF_MATCH) {
        None => Ok(None),
        Some(v) => {
            let s = v
                .to_str()
                .unwrap_or_default()
                .trim()
                .trim_start_matches("W/");
            s.trim_matches('"').parse::<u64>().map(Some).map_err(|_| {
                ApiError::Validation(format!("If-Match {s:?} is not an ETag of this API"))
            })
        }
    }
}

pub(crate) fn decode<T>(bytes: &[u8]) -> ApiResult<T>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    raft::codec::decode(bytes).map_err(|e| ApiError::Internal(e.to_string()))
}

/// `?consistency=stale|linearizable` on reads.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct ReadParams {
    #[serde(default)]
    pub consistency: crate::Consistency,
}
