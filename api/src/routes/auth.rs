//! `POST /api/v1/auth/login` (password, then TOTP when enrolled; recorded in the audit log
//! either way) and `POST /api/v1/auth/logout` (revokes the token on every node through Raft).

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use raft::model::{AuditEntry, User};
use raft::{keys, Command, Request};
use serde::{Deserialize, Serialize};

use crate::auth::{
    issue_enrollment_token, issue_token, load_secrets, load_security, load_user, verify_password,
    Caller, Credential,
};
use crate::error::{ApiError, ApiResult};
use crate::routes::extract::ApiJson;
use crate::routes::{decode, propose};
use crate::AppState;

/// How long an enrolment-only token lives: enough to scan a QR code and type one code.
const ENROLLMENT_TTL_SECS: u64 = 600;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct LoginBody {
    username: String,
    password: String,
    /// The current code of the user's authenticator, once TOTP is enrolled.
    #[serde(default)]
    totp: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct LoginReply {
    token: String,
    /// Seconds since the Unix epoch.
    expires_at: u64,
    /// Set when an administrator requires TOTP and the user has not enrolled yet: the token
    /// only allows `POST /users/{id}/totp` and `.../totp/confirm`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    totp_enrollment_required: bool,
    user_id: String,
}

/// The peer address when the server was started with connect info; unknown peers share one
/// bucket, which fails safe (limits everyone together) rather than open.
pub(crate) struct ClientIp(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip())
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        ))
    }
}

fn find_user(state: &AppState, username: &str) -> ApiResult<Option<User>> {
    let Some(id) = state.cp.get(&keys::user_name(username))? else {
        return Ok(None);
    };
    let id: String = decode(&id)?;
    load_user(state, &id)
}

/// A user whose home is a linked site: `name@site` names the site, a bare name must be
/// unique among linked sites (this site's own users were looked up first).
fn find_federated_user(state: &AppState, username: &str) -> ApiResult<Option<(String, User)>> {
    let (name, site) = match username.rsplit_once('@') {
        Some((name, site)) => match crate::federation::find_link(state, site)? {
            Some(link) => (name, Some(link.site.id)),
            None => return Ok(None),
        },
        None => (username, None),
    };
    let prefix = raft::federation::catalog_username_prefix(name);
    let mut found = Vec::new();
    for (key, id) in state.cp.scan(&prefix, None, 3)? {
        let home = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
        if site.as_ref().is_none_or(|s| *s == home) {
            found.push((home, String::from_utf8_lossy(&id).into_owned()));
        }
    }
    let [(home, id)] = found.as_slice() else {
        return Ok(None);
    };
    Ok(crate::federation::catalog_user(state, id)?.map(|u| (home.clone(), u)))
}

/// A user of another site logs in here: its home site checks the password and second
/// factor (only it holds them), then this site issues its own token for the user, whose
/// role and tenant are those replicated from home.
async fn federated_login(
    state: &AppState,
    site: &str,
    user: User,
    body: &LoginBody,
) -> ApiResult<Json<LoginReply>> {
    let call = crate::control::ForwardedCall {
        method: "POST".into(),
        path_and_query: "/api/v1/auth/login".into(),
        body: serde_json::to_vec(&serde_json::json!({
            "username": user.username,
            "password": body.password,
            "totp": body.totp,
        }))
        .map_err(|e| ApiError::Internal(e.to_string()))?,
        user_id: String::new(),
        idempotency_key: None,
        if_match: None,
    };
    let reply = state.cp.forward_to_site(site, call).await.map_err(|e| {
        ApiError::Cluster(crate::control::ClusterError::Unavailable(format!(
            "the home site of {} cannot check the password now: {e}",
            body.username
        )))
    })?;
    let home: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
    if reply.status != 200 || home.get("user_id").and_then(|v| v.as_str()) != Some(&user.id) {
        audit_login(state, &body.username, &user.tenant, "failed").await;
        return Err(match reply.status {
            401 if home.get("code").and_then(|c| c.as_str()) == Some("totp_required") => {
                ApiError::TotpRequired
            }
            _ => ApiError::BadCredentials,
        });
    }
    if home
        .get("totp_enrollment_required")
        .and_then(|v| v.as_bool())
        == Some(true)
    {
        // Enrolment happens at home; a site elsewhere hands out no full token meanwhile.
        return Err(ApiError::TotpRequired);
    }
    audit_login(state, &body.username, &user.tenant, "ok").await;
    let secrets = load_secrets(state)?;
    let now = crate::now_ms() / 1000;
    let ttl = state.config.token_ttl.as_secs();
    let token = issue_token(&secrets, &user, now, ttl)?;
    Ok(Json(LoginReply {
        token,
        expires_at: now + ttl,
        totp_enrollment_required: false,
        user_id: user.id,
    }))
}

async fn audit_login(state: &AppState, username: &str, tenant: &str, result: &str) {
    let entry = AuditEntry {
        seq: 0,
        at: crate::now_ms(),
        actor: username.to_string(),
        tenant: tenant.to_string(),
        action: "auth.login".into(),
        target: format!("user/{username}"),
        result: result.into(),
        prev_hash: String::new(),
        hash: String::new(),
    };
    let req = Request::new(entry.at, username, Command::Audit { entry });
    // A login must not fail because the audit write did: the outcome is logged instead.
    if let Err(e) = state.cp.write(req).await {
        tracing::warn!(error = %e, "could not record login in the audit log");
    }
}

/// Checks the second factor of a user who enrolled; `Ok(())` when it passes.
async fn second_factor(state: &AppState, user: &User, code: Option<&str>) -> ApiResult<()> {
    let sec = load_security(state, &user.id)?;
    let Some(secret) = sec.totp_secret.filter(|_| sec.totp_confirmed) else {
        return Ok(());
    };
    let code = code.ok_or(ApiError::TotpRequired)?;
    let now = crate::now_ms() / 1000;
    let step =
        crate::totp::check(&secret, &user.username, code, now)?.ok_or(ApiError::BadCredentials)?;
    let req = Request::new(
        crate::now_ms(),
        user.id.clone(),
        Command::UseTotpStep {
            user_id: user.id.clone(),
            step,
        },
    );
    // A refusal here means the code was already used: a replay counts as a wrong code.
    match state.cp.write(req).await? {
        (_, raft::Response::Rejected { .. }) => Err(ApiError::BadCredentials),
        _ => Ok(()),
    }
}

#[utoipa::path(
    post,
    path = "/auth/login",
    tag = "auth",
    summary = "Log in with a password (and TOTP code) for a bearer token",
    request_body = LoginBody,
    responses((status = 200, description = "logged in", body = LoginReply)),
    security(())
)]
pub(crate) async fn login(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    ApiJson(body): ApiJson<LoginBody>,
) -> ApiResult<Json<LoginReply>> {
    state.limiters.check_login(ip)?;
    if body.username.is_empty() || body.username.len() > 128 || body.password.len() > 1024 {
        return Err(ApiError::Validation(
            "username or password has an invalid length".into(),
        ));
    }
    let user = find_user(&state, &body.username)?;
    if user.is_none() {
        if let Some((site, user)) = find_federated_user(&state, &body.username)? {
            return federated_login(&state, &site, user, &body).await;
        }
    }
    let hash = user.as_ref().map(|u| u.password_hash.clone());
    let password = body.password.clone();
    // argon2 is deliberately slow: keep it off the async workers.
    let ok = tokio::task::spawn_blocking(move || match hash {
        Some(h) => verify_password(&password, &h),
        None => false,
    })
    .await
    .map_err(|e| ApiError::Internal(format!("password check failed: {e}")))?;
    let tenant = user.as_ref().map(|u| u.tenant.clone()).unwrap_or_default();
    let user = match (ok, user) {
        (true, Some(user)) => user,
        _ => {
            audit_login(&state, &body.username, &tenant, "failed").await;
            return Err(ApiError::BadCredentials);
        }
    };
    if let Err(e) = second_factor(&state, &user, body.totp.as_deref()).await {
        let result = match e {
            ApiError::TotpRequired => "totp_required",
            _ => "failed",
        };
        audit_login(&state, &body.username, &tenant, result).await;
        return Err(e);
    }
    let secrets = load_secrets(&state)?;
    let now = crate::now_ms() / 1000;
    let sec = load_security(&state, &user.id)?;
    if sec.require_totp && !sec.totp_confirmed {
        audit_login(&state, &body.username, &tenant, "enrollment_required").await;
        let token = issue_enrollment_token(&secrets, &user, now, ENROLLMENT_TTL_SECS)?;
        return Ok(Json(LoginReply {
            token,
            expires_at: now + ENROLLMENT_TTL_SECS,
            totp_enrollment_required: true,
            user_id: user.id,
        }));
    }
    audit_login(&state, &body.username, &tenant, "ok").await;
    let ttl = state.config.token_ttl.as_secs();
    let token = issue_token(&secrets, &user, now, ttl)?;
    Ok(Json(LoginReply {
        token,
        expires_at: now + ttl,
        totp_enrollment_required: false,
        user_id: user.id,
    }))
}

/// Revokes the presented token until its own expiry, on every node.
#[utoipa::path(
    post,
    path = "/auth/logout",
    tag = "auth",
    summary = "Revoke the token of this request on every node",
    responses((status = 204, description = "logged out")),
    security(("bearer" = []))
)]
pub(crate) async fn logout(State(state): State<AppState>, caller: Caller) -> ApiResult<StatusCode> {
    let Credential::Token { jti, exp } = caller.credential.clone() else {
        return Err(ApiError::Validation(
            "logout ends a login token; revoke an API key with DELETE /api/v1/api-keys/{id}".into(),
        ));
    };
    propose(
        &state,
        &caller,
        None,
        Command::RevokeToken {
            jti,
            expires_at: exp,
        },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
