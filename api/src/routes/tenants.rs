//! Tenants and their quotas: `/api/v1/tenants[/{id}]`.
//!
//! Only admins create, change or delete tenants; other users see their own tenant alone, and
//! another tenant's id answers 404 so its existence does not leak.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use raft::model::{Quota, Role, Tenant};
use raft::{keys, Command, Response as RaftResponse};
use serde::{Deserialize, Serialize};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::routes::extract::{ApiJson, ApiQuery};
use crate::routes::objects::{self, Change};
use crate::routes::{decode, idempotency_key, propose, ReadParams};
use crate::AppState;

const MAX_PAGE: usize = 500;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateTenant {
    name: String,
    #[serde(default)]
    #[schema(value_type = Option<crate::openapi::schemas::Quota>)]
    quota: Option<Quota>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateTenant {
    #[schema(value_type = crate::openapi::schemas::Quota)]
    quota: Quota,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ListParams {
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(flatten)]
    read: ReadParams,
}

#[derive(Debug, Serialize)]
pub(crate) struct Page<T> {
    items: Vec<T>,
    next_cursor: Option<String>,
}

pub(crate) fn validate_name(what: &str, name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(ApiError::Validation(format!(
            "{what} name {name:?} must be 1-63 characters of letters, digits, '-', '_' or '.', starting with a letter or digit"
        )))
    }
}

fn with_etag(status: StatusCode, tenant: Tenant) -> Response {
    objects::with_etag(status, tenant.version, tenant)
}

fn tenant_of(resp: RaftResponse) -> ApiResult<Tenant> {
    match resp {
        RaftResponse::Tenant(t) => Ok(t),
        other => Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
    }
}

#[utoipa::path(
    post,
    path = "/tenants",
    tag = "tenants",
    summary = "Create a tenant (admins)",
    params(("Idempotency-Key" = Option<String>, Header, description = "1 to 128 characters; a retry with the same key by the same user returns the first outcome")),
    request_body = CreateTenant,
    responses((status = 201, description = "created", body = crate::openapi::schemas::Tenant, headers(("ETag" = String, description = "the object version, for If-Match")))),
    security(("bearer" = []))
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateTenant>,
) -> ApiResult<Response> {
    caller.require(Role::Admin)?;
    validate_name("tenant", &body.name)?;
    let key = idempotency_key(&headers)?;
    let tenant = Tenant {
        id: crate::federation::new_id(&state)?,
        name: body.name,
        quota: body.quota.unwrap_or_default(),
        usage: Default::default(),
        created_at: 0,
        updated_at: 0,
        version: 0,
    };
    let (_, resp) = propose(&state, &caller, key, Command::CreateTenant { tenant }).await?;
    Ok(with_etag(StatusCode::CREATED, tenant_of(resp)?))
}

fn load(state: &AppState, caller: &Caller, id: &str) -> ApiResult<Tenant> {
    objects::load_visible(state, &keys::tenant(id), "tenant", id, |t: &Tenant| {
        caller.sees_tenant(&t.id)
    })
}

#[utoipa::path(
    get,
    path = "/tenants/{id}",
    tag = "tenants",
    summary = "Get a tenant",
    params(("id" = String, Path, description = "tenant id"), ("consistency" = Option<crate::Consistency>, Query, description = "linearizable (default) or stale: how fresh the read must be")),
    responses((status = 200, description = "the tenant", body = crate::openapi::schemas::Tenant, headers(("ETag" = String, description = "the object version, for If-Match")))),
    security(("bearer" = []))
)]
pub(crate) async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiQuery(read): ApiQuery<ReadParams>,
) -> ApiResult<Response> {
    state.cp.read_barrier(read.consistency).await?;
    Ok(with_etag(StatusCode::OK, load(&state, &caller, &id)?))
}

#[utoipa::path(
    get,
    path = "/tenants",
    tag = "tenants",
    summary = "List the tenants the caller may see",
    params(("limit" = Option<usize>, Query, description = "page size, 1 to 500 (default 100)"), ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"), ("consistency" = Option<crate::Consistency>, Query, description = "linearizable (default) or stale: how fresh the read must be")),
    responses((status = 200, description = "a page of tenants", body = crate::openapi::schemas::TenantPage)),
    security(("bearer" = []))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListParams>,
) -> ApiResult<Json<Page<Tenant>>> {
    let limit = params.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::Validation(format!(
            "limit must be 1..={MAX_PAGE}"
        )));
    }
    state.cp.read_barrier(params.read.consistency).await?;
    if !caller.is_admin() {
        // A tenant user's list is its own tenant.
        let own = load(&state, &caller, &caller.tenant.clone())?;
        return Ok(Json(Page {
            items: vec![own],
            next_cursor: None,
        }));
    }
    let after = params.cursor.as_deref().map(keys::tenant);
    let rows = state
        .cp
        .scan(keys::TENANT_PREFIX, after.as_deref(), limit + 1)?;
    let mut items = rows
        .iter()
        .map(|(_, v)| decode::<Tenant>(v))
        .collect::<ApiResult<Vec<_>>>()?;
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|t| t.id.clone())
    } else {
        None
    };
    Ok(Json(Page { items, next_cursor }))
}

#[utoipa::path(
    patch,
    path = "/tenants/{id}",
    tag = "tenants",
    summary = "Change a tenant's quota (admins)",
    params(("id" = String, Path, description = "tenant id"), ("Idempotency-Key" = Option<String>, Header, description = "1 to 128 characters; a retry with the same key by the same user returns the first outcome"), ("If-Match" = Option<String>, Header, description = "the ETag of the version this change is based on")),
    request_body = UpdateTenant,
    responses((status = 200, description = "the changed tenant", body = crate::openapi::schemas::Tenant, headers(("ETag" = String, description = "the object version, for If-Match")))),
    security(("bearer" = []))
)]
pub(crate) async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<UpdateTenant>,
) -> ApiResult<Response> {
    // Visibility before role: another tenant's id answers 404 like a missing one, never 403.
    load(&state, &caller, &id)?;
    caller.require(Role::Admin)?;
    let change = Change::from_headers(&headers)?;
    let cmd = Command::UpdateTenantQuota {
        id,
        quota: body.quota,
        expected_version: change.expected_version,
    };
    let (_, resp) = propose(&state, &caller, change.key, cmd).await?;
    Ok(with_etag(StatusCode::OK, tenant_of(resp)?))
}

#[utoipa::path(
    delete,
    path = "/tenants/{id}",
    tag = "tenants",
    summary = "Delete an empty tenant (admins)",
    params(("id" = String, Path, description = "tenant id"), ("Idempotency-Key" = Option<String>, Header, description = "1 to 128 characters; a retry with the same key by the same user returns the first outcome"), ("If-Match" = Option<String>, Header, description = "the ETag of the version this change is based on")),
    responses((status = 204, description = "deleted")),
    security(("bearer" = []))
)]
pub(crate) async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    // Visibility before role: another tenant's id answers 404 like a missing one, never 403.
    load(&state, &caller, &id)?;
    caller.require(Role::Admin)?;
    let change = Change::from_headers(&headers)?;
    let cmd = Command::DeleteTenant {
        id,
        expected_version: change.expected_version,
    };
    propose(&state, &caller, change.key, cmd).await?;
    Ok(StatusCode::NO_CONTENT)
}
