//! Day-2 operations over REST: `GET /api/v1/backup` (a checksummed, consistent copy of the
//! replicated state) and `GET /api/v1/cluster/upgrade-check` (feature gates and blockers).
//! Both are for admins only: a backup holds the cluster's secrets and every password hash.

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::auth::Caller;
use crate::control::UpgradeReport;
use crate::error::ApiResult;
use crate::AppState;

/// The header carrying the hex sha256 of the backup's body (also recorded inside the file).
pub const BACKUP_SHA256_HEADER: &str = "x-novacron-backup-sha256";

#[utoipa::path(
    get,
    path = "/backup",
    tag = "cluster",
    summary = "Download a consistent, checksummed backup of the replicated state (admins)",
    responses((status = 200, description = "the backup file", body = Vec<u8>, content_type = "application/octet-stream")),
    security(("bearer" = []))
)]
pub(crate) async fn backup(State(state): State<AppState>, caller: Caller) -> ApiResult<Response> {
    caller.require(raft::model::Role::Admin)?;
    let blob = state.cp.backup().await?;
    let mut resp = blob.bytes.into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&blob.sha256) {
        headers.insert(BACKUP_SHA256_HEADER, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"novacron-{}.backup\"",
        blob.last_applied_index
    )) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

#[utoipa::path(
    get,
    path = "/cluster/upgrade-check",
    tag = "cluster",
    summary = "Feature sets of the members and what blocks an upgrade (admins)",
    responses((status = 200, description = "the report", body = crate::control::UpgradeReport)),
    security(("bearer" = []))
)]
pub(crate) async fn upgrade_check(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<UpgradeReport>> {
    caller.require(raft::model::Role::Admin)?;
    Ok(Json(state.cp.upgrade_check().await?))
}
