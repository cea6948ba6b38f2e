//! `GET /api/v1/cluster` (membership and Raft progress) and `POST /api/v1/cluster/join`.

use axum::extract::State;
use axum::Json;

use crate::auth::Caller;
use crate::control::{ClusterStatus, JoinRequest, JoinResponse};
use crate::error::{ApiError, ApiResult};
use crate::routes::extract::ApiJson;
use crate::AppState;

#[utoipa::path(
    get,
    path = "/cluster",
    tag = "cluster",
    summary = "Membership and Raft progress",
    responses((status = 200, description = "cluster status", body = crate::ClusterStatus)),
    security(("bearer" = []))
)]
pub(crate) async fn status(
    State(state): State<AppState>,
    _caller: Caller,
) -> ApiResult<Json<ClusterStatus>> {
    Ok(Json(state.cp.status().await?))
}

/// Unauthenticated by bearer token: the join token in the body is the credential.
#[utoipa::path(
    post,
    path = "/cluster/join",
    tag = "cluster",
    summary = "Admit a node (the join token in the body is the credential)",
    request_body = crate::JoinRequest,
    responses((status = 200, description = "admitted", body = crate::JoinResponse)),
    security(())
)]
pub(crate) async fn join(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<JoinRequest>,
) -> ApiResult<Json<JoinResponse>> {
    if req.member.name.is_empty() || req.member.name.len() > 63 {
        return Err(ApiError::Validation(
            "node name must have 1 to 63 characters".into(),
        ));
    }
    if req.csr_pem.len() > 16 * 1024 {
        return Err(ApiError::Validation("CSR is too large".into()));
    }
    Ok(Json(state.cp.join(req).await?))
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct Rotated {
    /// How many signing keys verify now (the new one signs).
    keys_kept: u32,
}

/// Adds a fresh JWT signing key in front (admins only). Tokens signed with the previous keys
/// keep verifying until they fall out of the kept window.
#[utoipa::path(
    post,
    path = "/cluster/rotate-jwt-key",
    tag = "cluster",
    summary = "Rotate the JWT signing key (admins)",
    responses((status = 200, description = "rotated", body = Rotated)),
    security(("bearer" = []))
)]
pub(crate) async fn rotate_jwt_key(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Rotated>> {
    use rand::RngCore;
    caller.require(raft::model::Role::Admin)?;
    let mut key = vec![0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    let keep = state.config.jwt_keys_kept.max(2);
    crate::routes::propose(
        &state,
        &caller,
        None,
        raft::Command::RotateJwtKey { key, keep },
    )
    .await?;
    Ok(Json(Rotated { keys_kept: keep }))
}
