//! Live migration: `POST /api/v1/vms/{id}/migrate` asks the cluster to move a running VM to
//! another node (the named one, or one the leader chooses). It answers `202 {vm, operation}`;
//! the operation succeeds once the VM runs on the target and the cluster placed it there, and
//! its `result` shows the migration's phase, mode (`live` or `handoff`), times and bytes.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use raft::migration::{Migration, MigrationPhase};
use raft::model::{NodeRecord, Operation, Role};
use raft::{keys, Command};
use serde::Deserialize;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::routes::extract::ApiJson;
use crate::routes::vms::{accepted, load, operation};
use crate::routes::{decode, idempotency_key, propose};
use crate::AppState;

/// The largest bandwidth cap accepted, MiB/s (a typo guard, not a limit of the product).
const MAX_BANDWIDTH: u64 = 1 << 20;

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MigrateBody {
    /// Node name or id; omitted: the leader chooses.
    #[serde(default)]
    target_node: Option<String>,
    /// Caps the live transfer, MiB/s.
    #[serde(default)]
    bandwidth_mib_s: Option<u64>,
}

#[utoipa::path(
    post,
    path = "/vms/{id}/migrate",
    tag = "vms",
    summary = "Move a running VM to another node, live",
    params(("id" = String, Path, description = "VM id"), ("Idempotency-Key" = Option<String>, Header, description = "1 to 128 characters; a retry with the same key by the same user returns the first outcome")),
    request_body(content = Option<MigrateBody>, description = "optional target node and bandwidth cap"),
    responses((status = 202, description = "accepted", body = crate::routes::vms::Accepted)),
    security(("bearer" = []))
)]
pub(crate) async fn migrate(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Option<ApiJson<MigrateBody>>,
) -> ApiResult<Response> {
    let body = body.map(|ApiJson(b)| b).unwrap_or_default();
    // Visibility first: another tenant's VM answers 404 whatever the caller's role.
    let vm = load(&state, &caller, &id)?;
    caller.require(Role::Operator)?;
    let requested_target = match &body.target_node {
        None => None,
        Some(name) => Some(node_id(&state, name)?),
    };
    if body
        .bandwidth_mib_s
        .is_some_and(|b| b == 0 || b > MAX_BANDWIDTH)
    {
        return Err(ApiError::Validation(format!(
            "bandwidth_mib_s must be between 1 and {MAX_BANDWIDTH}"
        )));
    }
    let op = operation("vm.migrate", &vm.tenant, &id);
    let migration = Migration {
        id: op.id.clone(),
        vm_id: id.clone(),
        tenant: vm.tenant.clone(),
        source: 0,
        requested_target,
        target: None,
        phase: MigrationPhase::Requested,
        mode: None,
        reason: "user".into(),
        source_epoch: 0,
        bandwidth_mib_s: body.bandwidth_mib_s,
        total_ms: None,
        downtime_ms: None,
        bytes: None,
        error: None,
        created_at: 0,
        updated_at: 0,
    };
    let key = idempotency_key(&headers)?;
    let cmd = Command::RequestMigration {
        migration,
        operation: op,
    };
    let (_, resp) = propose(&state, &caller, key, cmd).await?;
    accepted(resp)
}

fn node_id(state: &AppState, name: &str) -> ApiResult<u64> {
    for (_, v) in state.cp.scan(keys::NODE_PREFIX, None, 10_000)? {
        let n: NodeRecord = decode(&v)?;
        if !n.removed && (n.member.name == name || n.id.to_string() == name) {
            return Ok(n.id);
        }
    }
    Err(ApiError::Validation(format!(
        "node {name:?} does not exist"
    )))
}

/// The `result` of an operation: for a migration, its record.
pub(crate) fn result_of(state: &AppState, op: &Operation) -> ApiResult<Option<serde_json::Value>> {
    if op.kind == raft::site_move::OPERATION_KIND {
        return site_move_result(state, op);
    }
    if op.kind != "vm.migrate" {
        return Ok(None);
    }
    let Some(bytes) = state.cp.get(&keys::migration(&op.id))? else {
        return Ok(None);
    };
    let m: Migration = decode(&bytes)?;
    Ok(Some(serde_json::json!({
        "phase": m.phase,
        "source": m.source,
        "target": m.target,
        "mode": m.mode,
        "reason": m.reason,
        "total_ms": m.total_ms,
        "downtime_ms": m.downtime_ms,
        "bytes": m.bytes,
    })))
}

/// The `result` of a cross-site move: its phase, sites, the disk's size and sha256 as the
/// source measured them, and why it rolled back.
fn site_move_result(state: &AppState, op: &Operation) -> ApiResult<Option<serde_json::Value>> {
    let Some(bytes) = state.cp.get(&raft::site_move::move_key(&op.id))? else {
        return Ok(None);
    };
    let m: raft::site_move::SiteMove = decode(&bytes)?;
    Ok(Some(serde_json::json!({
        "phase": m.phase,
        "source_site": m.source_site,
        "target_site": m.target_site,
        "target_node": m.target_node,
        "disk": m.disk.map(|d| serde_json::json!({"size": d.size, "sha256": d.sha256})),
        "reason": m.reason,
    })))
}
