//! The scheduler's routes: `GET /api/v1/vms/{id}/placement` (the stored explanation of the VM's
//! last placement decision, tenant-scoped like the VM) and `POST /api/v1/scheduler/simulate`
//! (admin: what would go where, run on the leader's view, changing nothing).

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::Json;
use raft::keys;
use raft::model::{NodeId, Role};
use raft::placement::PlacementExplanation;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::routes::extract::{ApiJson, ApiQuery};
use crate::routes::vms::{load, nodes};
use crate::routes::{decode, ReadParams};
use crate::scheduler::{explanation_view, ExplanationView, SimulateRequest, SimulateResult};
use crate::AppState;

/// Most VMs one simulation may create.
const MAX_SIMULATED_VMS: usize = 10_000;

fn names(state: &AppState) -> ApiResult<BTreeMap<NodeId, String>> {
    Ok(nodes(state)?
        .into_iter()
        .map(|n| (n.id, n.member.name))
        .collect())
}

#[utoipa::path(
    get,
    path = "/vms/{id}/placement",
    tag = "vms",
    summary = "Why the VM is on its node (or on none): every node's verdict",
    params(("id" = String, Path, description = "VM id"), ("consistency" = Option<crate::Consistency>, Query, description = "linearizable (default) or stale: how fresh the read must be")),
    responses((status = 200, description = "the last placement decision", body = ExplanationView)),
    security(("bearer" = []))
)]
pub(crate) async fn placement(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiQuery(read): ApiQuery<ReadParams>,
) -> ApiResult<Json<ExplanationView>> {
    state.cp.read_barrier(read.consistency).await?;
    // Tenant scope first: another tenant's VM is not found, whatever is stored for it.
    let vm = load(&state, &caller, &id)?;
    let bytes = state.cp.get(&keys::placement(&vm.id))?.ok_or_else(|| {
        ApiError::NotFound(format!(
            "placement decision for vm {id} (not scheduled yet)"
        ))
    })?;
    let e: PlacementExplanation = decode(&bytes)?;
    Ok(Json(explanation_view(&e, &names(&state)?)))
}

#[utoipa::path(
    post,
    path = "/scheduler/simulate",
    tag = "scheduler",
    summary = "What would go where if these VMs were created, or if a node were drained (no effect)",
    request_body = SimulateRequest,
    responses(
        (status = 200, description = "the simulated placements", body = SimulateResult),
        (status = 501, description = "this control plane has no scheduler", body = crate::openapi::schemas::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn simulate(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<SimulateRequest>,
) -> ApiResult<Json<SimulateResult>> {
    caller.require(Role::Admin)?;
    if let SimulateRequest::Drain { node } = &body {
        if node.trim().is_empty() {
            return Err(ApiError::Validation("name the node to drain".into()));
        }
    }
    if let SimulateRequest::Create { vms } = &body {
        if vms.len() > MAX_SIMULATED_VMS {
            return Err(ApiError::Validation(format!(
                "at most {MAX_SIMULATED_VMS} VMs per simulation"
            )));
        }
        if vms.iter().any(|v| v.vcpus == 0 || v.memory_mib == 0) {
            return Err(ApiError::Validation(
                "every VM needs vcpus and memory_mib".into(),
            ));
        }
    }
    Ok(Json(state.cp.simulate(body).await?))
}
