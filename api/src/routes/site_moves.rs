//! Cross-site move: `POST /api/v1/vms/{id}/move {"site": "<name or id>"}` asks the VM's home
//! site to move it to a linked site, keeping its id. It answers `202 {vm, operation}`; the
//! operation (`vm.move`) succeeds once the VM is at the target site with its disk copied and
//! verified, and fails with the reason when the move rolled back (the VM then stays here).

use axum::extract::{Path, State};
use axum::response::Response;
use raft::model::Role;
use raft::Response as RaftResponse;
use serde::Deserialize;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::routes::extract::ApiJson;
use crate::routes::vms::{accepted, load};
use crate::AppState;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MoveBody {
    /// The linked site to move to, by name or id.
    site: String,
}

#[utoipa::path(
    post,
    path = "/vms/{id}/move",
    tag = "vms",
    summary = "Move a VM to another site (stopped, disk copied, started there)",
    params(("id" = String, Path, description = "VM id")),
    request_body(content = MoveBody, description = "the target site"),
    responses(
        (status = 202, description = "accepted", body = crate::routes::vms::Accepted),
        (status = 501, description = "this control plane cannot move VMs between sites", body = crate::openapi::schemas::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn move_vm(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<MoveBody>,
) -> ApiResult<Response> {
    // Visibility first: another tenant's VM answers 404 whatever the caller's role.
    load(&state, &caller, &id)?;
    caller.require(Role::Operator)?;
    if body.site.is_empty() {
        return Err(ApiError::Validation("site must not be empty".into()));
    }
    let (_, resp) = state.cp.move_vm(&id, &body.site, &caller.user_id).await?;
    match resp {
        RaftResponse::Rejected { code, message } => Err(ApiError::from_reject(code, message)),
        other => accepted(other),
    }
}
