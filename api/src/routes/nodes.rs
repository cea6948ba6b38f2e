//! Nodes: `/api/v1/nodes`, drain and undrain, and removal from the cluster.
//!
//! Removal is committed through Raft (`Command::RemoveNode`); the leader's membership
//! controller then takes the node out of the Raft membership.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use raft::model::{NodeRecord, Role, Vm};
use raft::{keys, Command};
use serde::Serialize;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::routes::extract::ApiQuery;
use crate::routes::{decode, propose, ReadParams};
use crate::AppState;

#[derive(Debug, Serialize)]
pub(crate) struct NodeView {
    #[serde(flatten)]
    node: NodeRecord,
    /// VMs placed on the node and what they reserve, counting only those the caller may see.
    vms: u64,
    vcpus_used: u64,
    memory_mib_used: u64,
}

fn all_nodes(state: &AppState) -> ApiResult<Vec<NodeRecord>> {
    state
        .cp
        .scan(keys::NODE_PREFIX, None, usize::MAX)?
        .iter()
        .map(|(_, v)| decode::<NodeRecord>(v))
        .collect()
}

fn find(state: &AppState, id_or_name: &str) -> ApiResult<NodeRecord> {
    all_nodes(state)?
        .into_iter()
        .find(|n| !n.removed && (n.id.to_string() == id_or_name || n.member.name == id_or_name))
        .ok_or_else(|| ApiError::NotFound(format!("node {id_or_name}")))
}

#[utoipa::path(
    get,
    path = "/nodes",
    tag = "nodes",
    summary = "List nodes with what is placed on them",
    params(("consistency" = Option<crate::Consistency>, Query, description = "linearizable (default) or stale: how fresh the read must be")),
    responses((status = 200, description = "the nodes", body = Vec<crate::openapi::schemas::NodeView>)),
    security(("bearer" = []))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(read): ApiQuery<ReadParams>,
) -> ApiResult<Json<Vec<NodeView>>> {
    caller.require(Role::Viewer)?;
    state.cp.read_barrier(read.consistency).await?;
    // Usage counts only the VMs the caller may see: other tenants' VMs must not show, even
    // as numbers.
    let vms: Vec<Vm> = state
        .cp
        .scan(keys::VM_PREFIX, None, usize::MAX)?
        .iter()
        .map(|(_, v)| decode::<Vm>(v))
        .filter(|vm| {
            vm.as_ref()
                .map_or(true, |vm| caller.sees_tenant(&vm.tenant))
        })
        .collect::<ApiResult<_>>()?;
    let views = all_nodes(&state)?
        .into_iter()
        .filter(|n| !n.removed)
        .map(|node| {
            let on: Vec<&Vm> = vms.iter().filter(|v| v.node == Some(node.id)).collect();
            NodeView {
                vms: on.len() as u64,
                vcpus_used: on.iter().map(|v| u64::from(v.vcpus)).sum(),
                memory_mib_used: on.iter().map(|v| v.memory_mib).sum(),
                node,
            }
        })
        .collect();
    Ok(Json(views))
}

async fn set_schedulable(
    state: AppState,
    caller: Caller,
    id: String,
    on: bool,
) -> ApiResult<Json<NodeRecord>> {
    caller.require(Role::Admin)?;
    let node = find(&state, &id)?;
    let (_, resp) = propose(
        &state,
        &caller,
        None,
        Command::SetNodeSchedulable {
            id: node.id,
            schedulable: on,
        },
    )
    .await?;
    match resp {
        raft::Response::Node(n) => Ok(Json(n)),
        other => Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
    }
}

#[utoipa::path(
    post,
    path = "/nodes/{id}/drain",
    tag = "nodes",
    summary = "Stop placing VMs on a node (admins)",
    params(("id" = String, Path, description = "node id or name")),
    responses((status = 200, description = "the node", body = crate::openapi::schemas::NodeRecord)),
    security(("bearer" = []))
)]
pub(crate) async fn drain(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<NodeRecord>> {
    set_schedulable(state, caller, id, false).await
}

#[utoipa::path(
    post,
    path = "/nodes/{id}/undrain",
    tag = "nodes",
    summary = "Place VMs on a node again (admins)",
    params(("id" = String, Path, description = "node id or name")),
    responses((status = 200, description = "the node", body = crate::openapi::schemas::NodeRecord)),
    security(("bearer" = []))
)]
pub(crate) async fn undrain(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<NodeRecord>> {
    set_schedulable(state, caller, id, true).await
}

/// Removes a node from the cluster for good. Refused while VMs are placed on it: drain first.
#[utoipa::path(
    delete,
    path = "/nodes/{id}",
    tag = "nodes",
    summary = "Remove a drained node from the cluster (admins)",
    params(("id" = String, Path, description = "node id or name")),
    responses((status = 204, description = "removed")),
    security(("bearer" = []))
)]
pub(crate) async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require(Role::Admin)?;
    let node = find(&state, &id)?;
    let placed = state
        .cp
        .scan(keys::VM_PREFIX, None, usize::MAX)?
        .iter()
        .map(|(_, v)| decode::<Vm>(v))
        .collect::<ApiResult<Vec<_>>>()?
        .into_iter()
        .filter(|v| v.node == Some(node.id))
        .count();
    if placed > 0 {
        return Err(ApiError::Conflict(format!(
            "node {} still has {placed} VMs; drain it first",
            node.member.name
        )));
    }
    propose(&state, &caller, None, Command::RemoveNode { id: node.id }).await?;
    Ok(StatusCode::NO_CONTENT)
}
