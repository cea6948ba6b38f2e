//! API keys: `/api/v1/api-keys[/{id}]`.
//!
//! Any user may create keys for itself, scoped to its own tenant and to at most its own role;
//! the secret is returned once and only its sha256 is stored. Users list and revoke their own
//! keys; a tenant-admin those of its tenant; an admin every key. Another tenant's key is 404.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use raft::model::{ApiKey, Role};
use raft::{keys, Command, Response as RaftResponse};
use serde::{Deserialize, Serialize};

use crate::auth::{generate_api_key, Caller, Credential};
use crate::error::{ApiError, ApiResult};
use crate::routes::extract::{ApiJson, ApiQuery};
use crate::routes::objects;
use crate::routes::tenants::validate_name;
use crate::routes::{decode, idempotency_key, propose, ReadParams};
use crate::AppState;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ApiKeyView {
    id: String,
    name: String,
    owner: String,
    tenant: String,
    #[schema(value_type = crate::openapi::schemas::Role)]
    role: Role,
    created_at: u64,
    expires_at: Option<u64>,
    revoked: bool,
}

impl From<ApiKey> for ApiKeyView {
    fn from(k: ApiKey) -> Self {
        ApiKeyView {
            id: k.id,
            name: k.name,
            owner: k.owner,
            tenant: k.tenant,
            role: k.role,
            created_at: k.created_at,
            expires_at: k.expires_at,
            revoked: k.revoked,
        }
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateApiKey {
    name: String,
    /// Defaults to the creator's role; may not be more powerful.
    #[serde(default)]
    #[schema(value_type = Option<crate::openapi::schemas::Role>)]
    role: Option<Role>,
    /// Milliseconds since the Unix epoch; must be in the future.
    #[serde(default)]
    expires_at: Option<u64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct CreatedApiKey {
    #[serde(flatten)]
    view: ApiKeyView,
    /// The bearer secret, `nck_<id>_<secret>`. Shown only in this response.
    key: String,
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

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = ApiKeyPage)]
pub(crate) struct Page {
    items: Vec<ApiKeyView>,
    next_cursor: Option<String>,
}

/// May `caller` see (and revoke) `key`?
fn may_see(caller: &Caller, key: &ApiKey) -> bool {
    caller.is_admin()
        || key.owner == caller.user_id
        || (key.tenant == caller.tenant && caller.role <= Role::TenantAdmin)
}

#[utoipa::path(
    post,
    path = "/api-keys",
    tag = "api-keys",
    summary = "Create an API key (the secret is shown once)",
    params(("Idempotency-Key" = Option<String>, Header, description = "1 to 128 characters; a retry with the same key by the same user returns the first outcome")),
    request_body = CreateApiKey,
    responses((status = 201, description = "created", body = CreatedApiKey)),
    security(("bearer" = []))
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateApiKey>,
) -> ApiResult<Response> {
    // A key minting keys would let a leaked key outlive its own revocation.
    if matches!(caller.credential, Credential::ApiKey { .. }) {
        return Err(ApiError::Forbidden);
    }
    validate_name("API key", &body.name)?;
    let role = body.role.unwrap_or(caller.role);
    if role < caller.role {
        return Err(ApiError::Forbidden);
    }
    if let Some(exp) = body.expires_at {
        if exp <= crate::now_ms() {
            return Err(ApiError::Validation(
                "expires_at must be in the future".into(),
            ));
        }
    }
    let key_header = idempotency_key(&headers)?;
    let (id, bearer, hash) = generate_api_key();
    let key = ApiKey {
        id,
        name: body.name,
        owner: caller.user_id.clone(),
        tenant: caller.tenant.clone(),
        role,
        secret_sha256: hash,
        created_at: crate::now_ms(),
        expires_at: body.expires_at,
        revoked: false,
    };
    let (_, resp) = propose(&state, &caller, key_header, Command::CreateApiKey { key }).await?;
    let RaftResponse::ApiKey(stored) = resp else {
        return Err(ApiError::Internal(format!("unexpected outcome {resp:?}")));
    };
    // A retry with the same Idempotency-Key returns the first key, whose secret this request
    // does not know: refuse rather than hand out a secret that does not match.
    if !bearer.starts_with(&format!("{}{}_", crate::auth::API_KEY_PREFIX, stored.id)) {
        return Err(ApiError::Conflict(
            "this Idempotency-Key already created a key; its secret was shown once".into(),
        ));
    }
    let body = CreatedApiKey {
        view: ApiKeyView::from(stored),
        key: bearer,
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[utoipa::path(
    get,
    path = "/api-keys",
    tag = "api-keys",
    summary = "List the API keys the caller may see",
    params(("limit" = Option<usize>, Query, description = "page size, 1 to 500 (default 100)"), ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"), ("consistency" = Option<crate::Consistency>, Query, description = "linearizable (default) or stale: how fresh the read must be")),
    responses((status = 200, description = "a page of keys", body = Page)),
    security(("bearer" = []))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListParams>,
) -> ApiResult<Json<Page>> {
    let limit = params.limit.unwrap_or(100);
    if limit == 0 || limit > 500 {
        return Err(ApiError::Validation("limit must be 1..=500".into()));
    }
    state.cp.read_barrier(params.read.consistency).await?;
    let mut items = Vec::new();
    let mut after = params.cursor.as_deref().map(keys::api_key);
    let mut next_cursor = None;
    // Filtering happens after the scan, so scan in batches until the page is full.
    'outer: loop {
        let rows = state
            .cp
            .scan(keys::API_KEY_PREFIX, after.as_deref(), limit + 1)?;
        let exhausted = rows.len() <= limit;
        for (k, v) in rows {
            let key: ApiKey = decode(&v)?;
            after = Some(k);
            if !may_see(&caller, &key) {
                continue;
            }
            if items.len() == limit {
                next_cursor = items.last().map(|k: &ApiKeyView| k.id.clone());
                break 'outer;
            }
            items.push(ApiKeyView::from(key));
        }
        if exhausted {
            break;
        }
    }
    Ok(Json(Page { items, next_cursor }))
}

#[utoipa::path(
    delete,
    path = "/api-keys/{id}",
    tag = "api-keys",
    summary = "Revoke an API key on every node",
    params(("id" = String, Path, description = "API key id"), ("Idempotency-Key" = Option<String>, Header, description = "1 to 128 characters; a retry with the same key by the same user returns the first outcome")),
    responses((status = 204, description = "revoked")),
    security(("bearer" = []))
)]
pub(crate) async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    objects::load_visible(
        &state,
        &keys::api_key(&id),
        "API key",
        &id,
        |key: &ApiKey| may_see(&caller, key),
    )?;
    let key_header = idempotency_key(&headers)?;
    propose(&state, &caller, key_header, Command::RevokeApiKey { id }).await?;
    Ok(StatusCode::NO_CONTENT)
}
