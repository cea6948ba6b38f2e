//! VMs and their operations: `/api/v1/vms[/{id}[/start|stop|reboot]]`, `/api/v1/operations/{id}`.
//!
//! Every change returns `202 {vm, operation}`: the operation finishes when the node's agent has
//! done the work. Another tenant's VM answers 404. Quotas are enforced inside `apply`.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use raft::model::{DesiredState, NodeId, NodeRecord, Operation, OperationState, Role, Vm, VmState};
use raft::placement::PlacementConstraints;
use raft::{keys, Command, Response as RaftResponse};
use serde::{Deserialize, Serialize};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::routes::extract::{ApiJson, ApiQuery};
use crate::routes::objects::{self, Change};
use crate::routes::tenants::validate_name;
use crate::routes::{decode, idempotency_key, propose, ReadParams};
use crate::AppState;

const MAX_LABELS: usize = 64;

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Placement {
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    anti_affinity_group: Option<String>,
    #[serde(default)]
    node_selector: Option<BTreeMap<String, String>>,
    /// VMs of the same tenant and affinity group run on the same node.
    #[serde(default)]
    affinity_group: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateVm {
    name: String,
    vcpus: u32,
    memory_mib: u64,
    #[serde(default)]
    disk_gib: Option<u64>,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    placement: Option<Placement>,
    #[serde(default)]
    ha: Option<bool>,
    #[serde(default)]
    start: Option<bool>,
    /// Admins may create in any tenant; others always create in their own.
    #[serde(default)]
    tenant: Option<String>,
    /// The site (name or id) to create the VM in; another site's is reached over the site
    /// link. Default: this site.
    #[serde(default)]
    site: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Accepted {
    #[schema(value_type = crate::openapi::schemas::Vm)]
    vm: Vm,
    #[schema(value_type = crate::openapi::schemas::Operation)]
    operation: Operation,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ListParams {
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    node: Option<String>,
    /// `key=value`
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
    /// Part of the name, any case: the dashboard's search, so it pages like the other filters.
    #[serde(default)]
    q: Option<String>,
    /// `all` for every linked site too, or one site's name or id; default: this site.
    #[serde(default)]
    site: Option<String>,
    #[serde(flatten)]
    read: ReadParams,
}

/// A VM in a list, with the site it lives at.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct VmItem {
    #[serde(flatten)]
    #[schema(inline, value_type = crate::openapi::schemas::Vm)]
    vm: Vm,
    #[schema(value_type = crate::routes::sites::SiteTag)]
    site: crate::routes::sites::SiteTag,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = VmPage)]
pub(crate) struct Page {
    items: Vec<VmItem>,
    next_cursor: Option<String>,
}

fn validate(body: &CreateVm) -> ApiResult<()> {
    validate_name("VM", &body.name)?;
    if !(1..=64).contains(&body.vcpus) {
        return Err(ApiError::Validation("vcpus must be 1 to 64".into()));
    }
    if !(64..=1024 * 1024).contains(&body.memory_mib) {
        return Err(ApiError::Validation(
            "memory_mib must be 64 to 1048576".into(),
        ));
    }
    if body.disk_gib.is_some_and(|d| d > 64 * 1024) {
        return Err(ApiError::Validation(
            "disk_gib must be at most 65536".into(),
        ));
    }
    if let Some(labels) = &body.labels {
        if labels.len() > MAX_LABELS {
            return Err(ApiError::Validation(format!("at most {MAX_LABELS} labels")));
        }
        for (k, v) in labels {
            if k.is_empty() || k.len() > 63 || v.len() > 255 {
                return Err(ApiError::Validation(format!(
                    "label {k:?} has an invalid length"
                )));
            }
        }
    }
    if let Some(img) = &body.image {
        validate_name("image", img)?;
    }
    if let Some(p) = &body.placement {
        for (what, group) in [
            ("anti-affinity group", &p.anti_affinity_group),
            ("affinity group", &p.affinity_group),
        ] {
            if let Some(g) = group {
                validate_name(what, g)?;
            }
        }
        let selector = p.node_selector.as_ref();
        if selector.is_some_and(|s| s.len() > MAX_LABELS) {
            return Err(ApiError::Validation(format!(
                "at most {MAX_LABELS} node selector labels"
            )));
        }
    }
    Ok(())
}

pub(crate) fn operation(kind: &str, tenant: &str, vm_id: &str) -> Operation {
    Operation {
        id: uuid::Uuid::new_v4().to_string(),
        kind: kind.into(),
        tenant: tenant.into(),
        target: format!("vm/{vm_id}"),
        state: OperationState::Pending,
        error: None,
        created_at: 0,
        updated_at: 0,
    }
}

pub(crate) fn nodes(state: &AppState) -> ApiResult<Vec<NodeRecord>> {
    state
        .cp
        .scan(keys::NODE_PREFIX, None, 10_000)?
        .iter()
        .map(|(_, v)| decode::<NodeRecord>(v))
        .collect()
}

/// The VM's placement constraints for the scheduler. A named node must exist; whether the VM
/// fits there is the scheduler's call (and explained like any other decision).
fn constraints(state: &AppState, placement: &Placement) -> ApiResult<PlacementConstraints> {
    let node = match &placement.node {
        None => None,
        Some(name) => {
            let found = nodes(state)?
                .into_iter()
                .filter(|n| !n.removed)
                .find(|n| n.member.name == *name || n.id.to_string() == *name)
                .ok_or_else(|| ApiError::Validation(format!("node {name:?} does not exist")))?;
            Some(found.id)
        }
    };
    Ok(PlacementConstraints {
        node,
        node_selector: placement.node_selector.clone().unwrap_or_default(),
        affinity_group: placement.affinity_group.clone(),
    })
}

pub(crate) fn accepted(resp: RaftResponse) -> ApiResult<Response> {
    match resp {
        RaftResponse::Vm {
            vm,
            operation: Some(operation),
        } => Ok((StatusCode::ACCEPTED, Json(Accepted { vm, operation })).into_response()),
        other => Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
    }
}

#[utoipa::path(
    post,
    path = "/vms",
    tag = "vms",
    summary = "Create a VM (202 with its operation)",
    params(("Idempotency-Key" = Option<String>, Header, description = "1 to 128 characters; a retry with the same key by the same user returns the first outcome")),
    request_body = CreateVm,
    responses((status = 202, description = "accepted", body = Accepted)),
    security(("bearer" = []))
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateVm>,
) -> ApiResult<Response> {
    // Naming another tenant answers 404 whatever the caller's role, as a missing tenant does.
    let tenant = match &body.tenant {
        Some(t) if caller.is_admin() => t.clone(),
        Some(t) if *t != caller.tenant => return Err(ApiError::NotFound(format!("tenant {t}"))),
        _ => caller.tenant.clone(),
    };
    caller.require(Role::Operator)?;
    validate(&body)?;
    if let Some(site) = &body.site {
        // Another site's name reaches here only in a call forwarded from a third site.
        let own = crate::federation::site(&state)?;
        if *site != own.name && *site != own.id {
            return Err(ApiError::Validation(format!(
                "this is site {}, not {site}",
                own.name
            )));
        }
    }
    // An uploaded image is named by id or by name and stored by id; `tiny` is the test guest
    // every node can boot directly.
    let image = match body.image {
        Some(r) if r != "tiny" => Some(crate::routes::images::resolve(&state, &tenant, &r)?.id),
        other => other,
    };
    let key = idempotency_key(&headers)?;
    let placement = body.placement.unwrap_or_default();
    let constraints = constraints(&state, &placement)?;
    let id = crate::federation::new_id(&state)?;
    let vm = Vm {
        id: id.clone(),
        name: body.name,
        tenant: tenant.clone(),
        vcpus: body.vcpus,
        memory_mib: body.memory_mib,
        disk_gib: body.disk_gib.unwrap_or(0),
        image,
        labels: body.labels.unwrap_or_default(),
        // The leader's placement controller picks the node; the handler only records the
        // constraints, so every placement goes through the scheduler and is explained.
        node: None,
        desired_state: if body.start.unwrap_or(true) {
            DesiredState::Running
        } else {
            DesiredState::Stopped
        },
        state: VmState::Pending,
        ha: body.ha.unwrap_or(false),
        anti_affinity_group: placement.anti_affinity_group,
        epoch: 0,
        created_at: 0,
        updated_at: 0,
        version: 0,
        placement: constraints,
    };
    let operation = operation("vm.create", &tenant, &id);
    let (_, resp) = propose(&state, &caller, key, Command::CreateVm { vm, operation }).await?;
    accepted(resp)
}

pub(crate) fn load(state: &AppState, caller: &Caller, id: &str) -> ApiResult<Vm> {
    objects::load_visible(state, &keys::vm(id), "vm", id, |vm: &Vm| {
        caller.sees_tenant(&vm.tenant)
    })
}

#[utoipa::path(
    get,
    path = "/vms/{id}",
    tag = "vms",
    summary = "Get a VM",
    params(("id" = String, Path, description = "VM id"), ("consistency" = Option<crate::Consistency>, Query, description = "linearizable (default) or stale: how fresh the read must be")),
    responses((status = 200, description = "the VM", body = crate::openapi::schemas::Vm, headers(("ETag" = String, description = "the object version, for If-Match")))),
    security(("bearer" = []))
)]
pub(crate) async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiQuery(read): ApiQuery<ReadParams>,
) -> ApiResult<Response> {
    state.cp.read_barrier(read.consistency).await?;
    let vm = load(&state, &caller, &id)?;
    Ok(objects::with_etag(StatusCode::OK, vm.version, vm))
}

fn state_name(s: VmState) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

#[utoipa::path(
    get,
    path = "/vms",
    tag = "vms",
    summary = "List the VMs the caller may see",
    params(("limit" = Option<usize>, Query, description = "page size, 1 to 500 (default 100)"), ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"), ("state" = Option<String>, Query, description = "VM state"), ("node" = Option<String>, Query, description = "node id or name"), ("label" = Option<String>, Query, description = "key=value"), ("tenant" = Option<String>, Query, description = "admins only: one tenant"), ("q" = Option<String>, Query, description = "part of the name, any case"), ("consistency" = Option<crate::Consistency>, Query, description = "linearizable (default) or stale: how fresh the read must be")),
    responses((status = 200, description = "a page of VMs", body = Page)),
    security(("bearer" = []))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(p): ApiQuery<ListParams>,
) -> ApiResult<Json<Page>> {
    let limit = p.limit.unwrap_or(100);
    if limit == 0 || limit > 500 {
        return Err(ApiError::Validation("limit must be 1..=500".into()));
    }
    let label = match &p.label {
        Some(l) => Some(
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| ApiError::Validation("label filter must be key=value".into()))?,
        ),
        None => None,
    };
    state.cp.read_barrier(p.read.consistency).await?;
    // Which sites: this one, and the linked ones asked for (their VMs come from the catalog).
    let own = crate::federation::site(&state)?;
    let (local, remote_sites): (bool, Vec<String>) = match p.site.as_deref() {
        None => (true, Vec::new()),
        Some(s) if s == own.name || s == own.id => (true, Vec::new()),
        Some("all") => (
            true,
            crate::federation::links(&state)?
                .into_iter()
                .map(|(l, _)| l.site.id)
                .collect(),
        ),
        Some(s) => match crate::federation::find_link(&state, s)? {
            Some(l) => (false, vec![l.site.id]),
            None => return Err(ApiError::NotFound(format!("site {s}"))),
        },
    };
    let node_filter: Option<NodeId> = match &p.node {
        Some(n) => Some(
            nodes(&state)?
                .iter()
                .find(|r| r.member.name == *n || r.id.to_string() == *n)
                .map(|r| r.id)
                .unwrap_or(NodeId::MAX),
        ),
        None => None,
    };
    let tenant = if caller.is_admin() {
        p.tenant.clone()
    } else {
        Some(caller.tenant.clone())
    };
    let name_part =
        p.q.as_deref()
            .map(str::to_lowercase)
            .filter(|q| !q.is_empty());
    let keep = |vm: &Vm, local: bool| {
        tenant.as_ref().is_none_or(|t| *t == vm.tenant)
            && p.state.as_ref().is_none_or(|s| *s == state_name(vm.state))
            // Node ids are per site: the node filter names nodes of this site.
            && node_filter.is_none_or(|n| local && vm.node == Some(n))
            && label
                .as_ref()
                .is_none_or(|(k, v)| vm.labels.get(k) == Some(v))
            && name_part
                .as_ref()
                .is_none_or(|q| vm.name.to_lowercase().contains(q.as_str()))
    };
    let mut items = Vec::new();
    let mut next_cursor = None;
    // A cursor with a `/` is `<site id>/<vm id>`: the page continues among linked sites' VMs.
    let remote_cursor = p
        .cursor
        .as_deref()
        .and_then(|c| c.split_once('/'))
        .map(|(s, v)| (s.to_string(), v.to_string()));
    if local && remote_cursor.is_none() {
        let tag = crate::routes::sites::local_tag(&state)?;
        let mut after = p.cursor.as_deref().map(keys::vm);
        // Unfiltered, a page needs exactly limit + 1 rows (the extra one says whether more
        // follow): reading and copying a fixed 256 would cost a small page ten times what it
        // shows.
        let filtered = tenant.is_some()
            || p.state.is_some()
            || node_filter.is_some()
            || label.is_some()
            || name_part.is_some();
        let batch = if filtered { 256 } else { limit + 1 };
        'scan: loop {
            let rows = state.cp.scan(keys::VM_PREFIX, after.as_deref(), batch)?;
            let exhausted = rows.len() < batch;
            for (k, v) in rows {
                after = Some(k);
                let vm: Vm = decode(&v)?;
                if !keep(&vm, true) {
                    continue;
                }
                if items.len() == limit {
                    next_cursor = items.last().map(|v: &VmItem| v.vm.id.clone());
                    break 'scan;
                }
                items.push(VmItem {
                    vm,
                    site: tag.clone(),
                });
            }
            if exhausted {
                break;
            }
        }
    }
    if next_cursor.is_none() && !remote_sites.is_empty() {
        let mut remote = crate::routes::sites::remote_vms(&state, &caller, &remote_sites)?;
        remote.sort_by(|(a, x), (b, y)| (&a.id, &x.id).cmp(&(&b.id, &y.id)));
        for (tag, vm) in remote {
            if let Some((s, v)) = &remote_cursor {
                if (&tag.id, &vm.id) <= (s, v) {
                    continue;
                }
            }
            if !keep(&vm, false) {
                continue;
            }
            if items.len() == limit {
                next_cursor = items.last().map(|i| format!("{}/{}", i.site.id, i.vm.id));
                break;
            }
            items.push(VmItem { vm, site: tag });
        }
    }
    Ok(Json(Page { items, next_cursor }))
}

async fn set_desired(
    state: AppState,
    caller: Caller,
    id: String,
    headers: HeaderMap,
    desired: DesiredState,
    kind: &str,
) -> ApiResult<Response> {
    // Visibility before role: another tenant's VM answers 404 like a missing one, never 403.
    let vm = load(&state, &caller, &id)?;
    caller.require(Role::Operator)?;
    let change = Change::from_headers(&headers)?;
    let cmd = Command::SetVmDesired {
        id: id.clone(),
        desired,
        operation: operation(kind, &vm.tenant, &id),
        expected_version: change.expected_version,
    };
    let (_, resp) = propose(&state, &caller, change.key, cmd).await?;
    accepted(resp)
}

#[utoipa::path(
    post,
    path = "/vms/{id}/start",
    tag = "vms",
    summary = "Start a VM",
    params(("id" = String, Path, description = "VM id"), ("Idempotency-Key" = Option<String>, Header, description = "1 to 128 characters; a retry with the same key by the same user returns the first outcome")),
    responses((status = 202, description = "accepted", body = Accepted)),
    security(("bearer" = []))
)]
pub(crate) async fn start(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    set_desired(
        state,
        caller,
        id,
        headers,
        DesiredState::Running,
        "vm.start",
    )
    .await
}

#[utoipa::path(
    post,
    path = "/vms/{id}/stop",
    tag = "vms",
    summary = "Stop a VM",
    params(("id" = String, Path, description = "VM id"), ("Idempotency-Key" = Option<String>, Header, description = "1 to 128 characters; a retry with the same key by the same user returns the first outcome")),
    responses((status = 202, description = "accepted", body = Accepted)),
    security(("bearer" = []))
)]
pub(crate) async fn stop(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    set_desired(state, caller, id, headers, DesiredState::Stopped, "vm.stop").await
}

#[utoipa::path(
    post,
    path = "/vms/{id}/reboot",
    tag = "vms",
    summary = "Reboot a VM",
    params(("id" = String, Path, description = "VM id"), ("Idempotency-Key" = Option<String>, Header, description = "1 to 128 characters; a retry with the same key by the same user returns the first outcome")),
    responses((status = 202, description = "accepted", body = Accepted)),
    security(("bearer" = []))
)]
pub(crate) async fn reboot(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    set_desired(
        state,
        caller,
        id,
        headers,
        DesiredState::Running,
        "vm.reboot",
    )
    .await
}

#[utoipa::path(
    delete,
    path = "/vms/{id}",
    tag = "vms",
    summary = "Delete a VM",
    params(("id" = String, Path, description = "VM id"), ("Idempotency-Key" = Option<String>, Header, description = "1 to 128 characters; a retry with the same key by the same user returns the first outcome"), ("If-Match" = Option<String>, Header, description = "the ETag of the version this change is based on")),
    responses((status = 202, description = "accepted", body = Accepted)),
    security(("bearer" = []))
)]
pub(crate) async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    // Visibility before role: another tenant's VM answers 404 like a missing one, never 403.
    let vm = load(&state, &caller, &id)?;
    caller.require(Role::Operator)?;
    let change = Change::from_headers(&headers)?;
    let cmd = Command::DeleteVm {
        id: id.clone(),
        operation: operation("vm.delete", &vm.tenant, &id),
        expected_version: change.expected_version,
    };
    let (_, resp) = propose(&state, &caller, change.key, cmd).await?;
    accepted(resp)
}

#[utoipa::path(
    get,
    path = "/operations/{id}",
    tag = "vms",
    summary = "Get an operation",
    params(("id" = String, Path, description = "operation id"), ("consistency" = Option<crate::Consistency>, Query, description = "linearizable (default) or stale: how fresh the read must be")),
    responses((status = 200, description = "the operation", body = crate::openapi::schemas::OperationView)),
    security(("bearer" = []))
)]
pub(crate) async fn get_operation(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiQuery(read): ApiQuery<ReadParams>,
) -> ApiResult<Json<OperationView>> {
    state.cp.read_barrier(read.consistency).await?;
    let op = objects::load_visible(
        &state,
        &keys::operation(&id),
        "operation",
        &id,
        |op: &Operation| caller.sees_tenant(&op.tenant),
    )?;
    let result = crate::routes::migrations::result_of(&state, &op)?;
    Ok(Json(OperationView { op, result }))
}

/// An operation with what it produced (a migration's phase, mode, times and bytes).
#[derive(Debug, Serialize)]
pub(crate) struct OperationView {
    #[serde(flatten)]
    op: Operation,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<serde_json::Value>,
}

/// `GET /api/v1/vms/{id}/console`: the serial console as a streamed body (bytes as they come).
#[utoipa::path(
    get,
    path = "/vms/{id}/console",
    tag = "vms",
    summary = "Stream the serial console of a running VM",
    params(("id" = String, Path, description = "VM id")),
    responses((status = 200, description = "console bytes as they arrive", body = Vec<u8>, content_type = "application/octet-stream")),
    security(("bearer" = []))
)]
pub(crate) async fn console(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    // Visibility before role: another tenant's VM answers 404 like a missing one, never 403.
    let vm = load(&state, &caller, &id)?;
    caller.require(Role::Operator)?;
    if vm.state != VmState::Running {
        return Err(ApiError::Conflict(format!("vm {id} is not running")));
    }
    let stream = state.cp.console(&id).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}
