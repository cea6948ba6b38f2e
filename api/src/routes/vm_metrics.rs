//! `GET /api/v1/vms/{id}/metrics`: the recent statistics of one VM (CPU, memory, disk and
//! network), served by any node. The series lives only on the node hosting the VM; the control
//! plane fetches it from there. Visibility follows the VM: another tenant's VM answers 404.

use axum::extract::{Path, State};
use axum::Json;
use raft::model::Role;
use serde::Deserialize;

use crate::auth::Caller;
use crate::control::VmMetrics;
use crate::error::{ApiError, ApiResult};
use crate::routes::extract::ApiQuery;
use crate::routes::vms::load;
use crate::routes::ReadParams;
use crate::AppState;

#[derive(Debug, Deserialize)]
pub(crate) struct MetricsParams {
    /// Only samples taken after this instant (milliseconds since the Unix epoch).
    #[serde(default)]
    since: Option<u64>,
    #[serde(flatten)]
    read: ReadParams,
}

#[utoipa::path(
    get,
    path = "/vms/{id}/metrics",
    tag = "vms",
    summary = "Recent statistics of a VM (CPU, memory, disk and network), oldest first",
    params(("id" = String, Path, description = "VM id"), ("since" = Option<u64>, Query, description = "only samples taken after this instant, in milliseconds since the Unix epoch"), ("consistency" = Option<crate::Consistency>, Query, description = "linearizable (default) or stale: how fresh the read of the VM must be")),
    responses((status = 200, description = "the VM's series", body = VmMetrics)),
    security(("bearer" = []))
)]
pub(crate) async fn get_metrics(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiQuery(p): ApiQuery<MetricsParams>,
) -> ApiResult<Json<VmMetrics>> {
    caller.require(Role::Viewer)?;
    state.cp.read_barrier(p.read.consistency).await?;
    let vm = load(&state, &caller, &id)?;
    if vm.node.is_none() {
        return Err(ApiError::Conflict(format!(
            "vm {id} is not placed on a node yet"
        )));
    }
    Ok(Json(state.cp.vm_metrics(&id, p.since).await?))
}
