//! Unauthenticated probes: liveness, readiness and Prometheus metrics.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;

use crate::AppState;

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    summary = "Liveness",
    responses((status = 200, description = "alive", body = String, content_type = "text/plain")),
    security(())
)]
pub(crate) async fn healthz() -> &'static str {
    "ok"
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    summary = "Readiness: member of a cluster with a known leader",
    responses((status = 200, description = "ready", body = String, content_type = "text/plain"), (status = 503, description = "not ready", body = String, content_type = "text/plain")),
    security(())
)]
pub(crate) async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.cp.ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    summary = "Prometheus metrics",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")),
    security(())
)]
pub(crate) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut text = state.metrics.render();
    text.push_str(&state.cp.metrics_text());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}
