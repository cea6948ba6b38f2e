//! Users: `/api/v1/users[/{id}]`.
//!
//! Admins manage every user; a tenant-admin manages the users of its own tenant and may not
//! create admins; others may read only themselves. Password hashes never leave the server.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use raft::model::{Role, User};
use raft::{keys, Command, Response as RaftResponse};
use serde::{Deserialize, Serialize};

use crate::auth::{hash_password, Caller};
use crate::error::{ApiError, ApiResult};
use crate::routes::extract::{ApiJson, ApiQuery};
use crate::routes::objects::{self, Change};
use crate::routes::tenants::validate_name;
use crate::routes::{decode, idempotency_key, propose, ReadParams};
use crate::AppState;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct UserView {
    id: String,
    username: String,
    tenant: String,
    #[schema(value_type = crate::openapi::schemas::Role)]
    role: Role,
    created_at: u64,
    updated_at: u64,
    version: u64,
}

impl From<User> for UserView {
    fn from(u: User) -> Self {
        UserView {
            id: u.id,
            username: u.username,
            tenant: u.tenant,
            role: u.role,
            created_at: u.created_at,
            updated_at: u.updated_at,
            version: u.version,
        }
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateUser {
    username: String,
    password: String,
    tenant: String,
    #[schema(value_type = crate::openapi::schemas::Role)]
    role: Role,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateUser {
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<crate::openapi::schemas::Role>)]
    role: Option<Role>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ListParams {
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(flatten)]
    read: ReadParams,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = UserPage)]
pub(crate) struct Page {
    items: Vec<UserView>,
    next_cursor: Option<String>,
}

fn validate_password(p: &str) -> ApiResult<()> {
    if p.len() < 8 || p.len() > 1024 {
        return Err(ApiError::Validation(
            "password must have 8 to 1024 characters".into(),
        ));
    }
    Ok(())
}

/// May `caller` manage users of `tenant` with `role`?
fn may_manage(caller: &Caller, tenant: &str, role: Option<Role>) -> ApiResult<()> {
    if caller.is_admin() {
        return Ok(());
    }
    // Another tenant answers 404 whatever the caller's role, as a missing tenant does.
    if caller.tenant != tenant {
        return Err(ApiError::NotFound(format!("tenant {tenant}")));
    }
    caller.require(Role::TenantAdmin)?;
    if role == Some(Role::Admin) {
        return Err(ApiError::Forbidden);
    }
    Ok(())
}

fn with_etag(status: StatusCode, user: User) -> Response {
    objects::with_etag(status, user.version, UserView::from(user))
}

fn user_of(resp: RaftResponse) -> ApiResult<User> {
    match resp {
        RaftResponse::User(u) => Ok(u),
        other => Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
    }
}

async fn hash(password: String) -> ApiResult<String> {
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| ApiError::Internal(format!("password hashing failed: {e}")))?
}

#[utoipa::path(
    post,
    path = "/users",
    tag = "users",
    summary = "Create a user",
    params(("Idempotency-Key" = Option<String>, Header, description = "1 to 128 characters; a retry with the same key by the same user returns the first outcome")),
    request_body = CreateUser,
    responses((status = 201, description = "created", body = UserView, headers(("ETag" = String, description = "the object version, for If-Match")))),
    security(("bearer" = []))
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateUser>,
) -> ApiResult<Response> {
    may_manage(&caller, &body.tenant, Some(body.role))?;
    validate_name("user", &body.username)?;
    validate_password(&body.password)?;
    if body.role == Role::Admin && body.tenant != raft::model::SYSTEM_TENANT {
        return Err(ApiError::Validation(
            "admins belong to the system tenant".into(),
        ));
    }
    let key = idempotency_key(&headers)?;
    let user = User {
        id: crate::federation::new_id(&state)?,
        username: body.username,
        password_hash: hash(body.password).await?,
        tenant: body.tenant,
        role: body.role,
        created_at: crate::now_ms(),
        updated_at: crate::now_ms(),
        version: 0,
    };
    let (_, resp) = propose(&state, &caller, key, Command::CreateUser { user }).await?;
    Ok(with_etag(StatusCode::CREATED, user_of(resp)?))
}

fn visible(state: &AppState, caller: &Caller, id: &str) -> ApiResult<User> {
    objects::load_visible(state, &keys::user(id), "user", id, |user: &User| {
        caller.is_admin()
            || caller.user_id == user.id
            || (caller.tenant == user.tenant && caller.role <= Role::TenantAdmin)
    })
}

#[utoipa::path(
    get,
    path = "/users/{id}",
    tag = "users",
    summary = "Get a user",
    params(("id" = String, Path, description = "user id"), ("consistency" = Option<crate::Consistency>, Query, description = "linearizable (default) or stale: how fresh the read must be")),
    responses((status = 200, description = "the user", body = UserView, headers(("ETag" = String, description = "the object version, for If-Match")))),
    security(("bearer" = []))
)]
pub(crate) async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiQuery(read): ApiQuery<ReadParams>,
) -> ApiResult<Response> {
    state.cp.read_barrier(read.consistency).await?;
    Ok(with_etag(StatusCode::OK, visible(&state, &caller, &id)?))
}

#[utoipa::path(
    get,
    path = "/users",
    tag = "users",
    summary = "List the users the caller may see",
    params(("limit" = Option<usize>, Query, description = "page size, 1 to 500 (default 100)"), ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"), ("tenant" = Option<String>, Query, description = "admins only: one tenant"), ("consistency" = Option<crate::Consistency>, Query, description = "linearizable (default) or stale: how fresh the read must be")),
    responses((status = 200, description = "a page of users", body = Page)),
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
    caller.require(Role::TenantAdmin)?;
    state.cp.read_barrier(params.read.consistency).await?;
    let tenant_filter = if caller.is_admin() {
        params.tenant
    } else {
        Some(caller.tenant.clone())
    };
    let mut items = Vec::new();
    let mut after = params.cursor.as_deref().map(keys::user);
    // Filtering happens after the scan, so scan in batches until the page is full.
    let mut next_cursor = None;
    'outer: loop {
        let rows = state
            .cp
            .scan(keys::USER_PREFIX, after.as_deref(), limit + 1)?;
        let exhausted = rows.len() <= limit;
        for (k, v) in rows {
            let user: User = decode(&v)?;
            after = Some(k);
            if tenant_filter.as_ref().is_some_and(|t| *t != user.tenant) {
                continue;
            }
            if items.len() == limit {
                next_cursor = items.last().map(|u: &UserView| u.id.clone());
                break 'outer;
            }
            items.push(UserView::from(user));
        }
        if exhausted {
            break;
        }
    }
    Ok(Json(Page { items, next_cursor }))
}

#[utoipa::path(
    patch,
    path = "/users/{id}",
    tag = "users",
    summary = "Change a user's password or role",
    params(("id" = String, Path, description = "user id"), ("Idempotency-Key" = Option<String>, Header, description = "1 to 128 characters; a retry with the same key by the same user returns the first outcome"), ("If-Match" = Option<String>, Header, description = "the ETag of the version this change is based on")),
    request_body = UpdateUser,
    responses((status = 200, description = "the changed user", body = UserView, headers(("ETag" = String, description = "the object version, for If-Match")))),
    security(("bearer" = []))
)]
pub(crate) async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<UpdateUser>,
) -> ApiResult<Response> {
    let target = visible(&state, &caller, &id)?;
    let self_password_only = caller.user_id == target.id && body.role.is_none();
    if self_password_only {
        self_service(&caller)?;
    } else {
        may_manage(&caller, &target.tenant, body.role)?;
    }
    let password_hash = match body.password {
        Some(p) => {
            validate_password(&p)?;
            Some(hash(p).await?)
        }
        None => None,
    };
    let change = Change::from_headers(&headers)?;
    let cmd = Command::UpdateUser {
        id,
        password_hash,
        role: body.role,
        expected_version: change.expected_version,
    };
    let (_, resp) = propose(&state, &caller, change.key, cmd).await?;
    Ok(with_etag(StatusCode::OK, user_of(resp)?))
}

#[utoipa::path(
    delete,
    path = "/users/{id}",
    tag = "users",
    summary = "Delete a user",
    params(("id" = String, Path, description = "user id"), ("Idempotency-Key" = Option<String>, Header, description = "1 to 128 characters; a retry with the same key by the same user returns the first outcome"), ("If-Match" = Option<String>, Header, description = "the ETag of the version this change is based on")),
    responses((status = 204, description = "deleted")),
    security(("bearer" = []))
)]
pub(crate) async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    let target = visible(&state, &caller, &id)?;
    may_manage(&caller, &target.tenant, Some(target.role))?;
    if target.id == caller.user_id {
        return Err(ApiError::Validation("you cannot delete yourself".into()));
    }
    let key = idempotency_key(&headers)?;
    propose(&state, &caller, key, Command::DeleteUser { id }).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct TotpEnrollment {
    /// The shared secret in base32, for manual entry.
    secret: String,
    /// `otpauth://totp/...`, for a QR code.
    otpauth_url: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TotpCode {
    code: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RequireTotp {
    required: bool,
}

/// Changes a user makes to its own account (password, second factor) need a login: an API
/// key, whatever its scope, would otherwise take over the account and with it the owner's
/// full role.
fn self_service(caller: &Caller) -> ApiResult<()> {
    match caller.credential {
        crate::auth::Credential::Token { .. } => Ok(()),
        // Accounts are changed at their home site, by the user in person.
        crate::auth::Credential::ApiKey { .. } | crate::auth::Credential::Forwarded { .. } => {
            Err(ApiError::Forbidden)
        }
    }
}

/// Only the user itself enrols: the secret belongs on its own device.
fn only_self(caller: &Caller, id: &str) -> ApiResult<()> {
    if caller.user_id == id {
        self_service(caller)
    } else if caller.is_admin() || caller.role <= Role::TenantAdmin {
        Err(ApiError::Forbidden)
    } else {
        Err(ApiError::NotFound(format!("user {id}")))
    }
}

#[utoipa::path(
    post,
    path = "/users/{id}/totp",
    tag = "users",
    summary = "Start TOTP enrolment (the user itself)",
    params(("id" = String, Path, description = "user id")),
    responses((status = 201, description = "the new secret", body = TotpEnrollment)),
    security(("bearer" = []))
)]
pub(crate) async fn totp_enroll(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let user = visible(&state, &caller, &id)?;
    only_self(&caller, &id)?;
    let secret = crate::totp::new_secret();
    let (base32, url) = crate::totp::provisioning(&secret, &user.username)?;
    propose(
        &state,
        &caller,
        None,
        Command::EnrollTotp {
            user_id: id,
            secret,
        },
    )
    .await?;
    let body = TotpEnrollment {
        secret: base32,
        otpauth_url: url,
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[utoipa::path(
    post,
    path = "/users/{id}/totp/confirm",
    tag = "users",
    summary = "Confirm TOTP enrolment with a current code",
    params(("id" = String, Path, description = "user id")),
    request_body = TotpCode,
    responses((status = 204, description = "enrolled")),
    security(("bearer" = []))
)]
pub(crate) async fn totp_confirm(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<TotpCode>,
) -> ApiResult<StatusCode> {
    let user = visible(&state, &caller, &id)?;
    only_self(&caller, &id)?;
    let sec = crate::auth::load_security(&state, &id)?;
    let secret = sec
        .totp_secret
        .ok_or_else(|| ApiError::Conflict("enrol first: POST /users/{id}/totp".into()))?;
    let step = crate::totp::check(&secret, &user.username, &body.code, crate::now_ms() / 1000)?
        .ok_or_else(|| ApiError::Validation("the code does not match".into()))?;
    propose(
        &state,
        &caller,
        None,
        Command::ConfirmTotp { user_id: id, step },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    put,
    path = "/users/{id}/totp/required",
    tag = "users",
    summary = "Require (or stop requiring) TOTP for a user",
    params(("id" = String, Path, description = "user id"), ("Idempotency-Key" = Option<String>, Header, description = "1 to 128 characters; a retry with the same key by the same user returns the first outcome")),
    request_body = RequireTotp,
    responses((status = 204, description = "set")),
    security(("bearer" = []))
)]
pub(crate) async fn totp_require(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<RequireTotp>,
) -> ApiResult<StatusCode> {
    let target = visible(&state, &caller, &id)?;
    may_manage(&caller, &target.tenant, Some(target.role))?;
    let key = idempotency_key(&headers)?;
    let cmd = Command::SetRequireTotp {
        user_id: id,
        require: body.required,
    };
    propose(&state, &caller, key, cmd).await?;
    Ok(StatusCode::NO_CONTENT)
}
