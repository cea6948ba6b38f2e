//! `POST /api/v1/auth/login`: password login, recorded in the audit log either way.

use axum::extract::State;
use axum::Json;
use raft::model::{AuditEntry, User};
use raft::{keys, Command, Request};
use serde::{Deserialize, Serialize};

use crate::auth::{issue_token, load_secrets, load_user, verify_password};
use crate::error::{ApiError, ApiResult};
use crate::routes::decode;
use crate::AppState;

#[derive(Debug, Deserialize)]
pub(crate) struct LoginBody {
    username: String,
    password: String,
    #[serde(default)]
    #[allow(dead_code)] // read once TOTP enrolment lands
    totp: Option<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct LoginReply {
    token: String,
    /// Seconds since the Unix epoch.
    expires_at: u64,
}

fn find_user(state: &AppState, username: &str) -> ApiResult<Option<User>> {
    let Some(id) = state.cp.get(&keys::user_name(username))? else {
        return Ok(None);
    };
    let id: String = decode(&id)?;
    load_user(state, &id)
}

async fn audit_login(state: &AppState, username: &str, tenant: &str, ok: bool) {
    let entry = AuditEntry {
        seq: 0,
        at: crate::now_ms(),
        actor: username.to_string(),
        tenant: tenant.to_string(),
        action: "auth.login".into(),
        target: format!("user/{username}"),
        result: if ok { "ok".into() } else { "failed".into() },
        prev_hash: String::new(),
        hash: String::new(),
    };
    let req = Request::new(entry.at, username, Command::Audit { entry });
    // A login must not fail because the audit write did: the outcome is logged instead.
    if let Err(e) = state.cp.write(req).await {
        tracing::warn!(error = %e, "could not record login in the audit log");
    }
}

pub(crate) async fn login(
    State(state): State<AppState>,
    Json(body): Json<LoginBody>,
) -> ApiResult<Json<LoginReply>> {
    if body.username.is_empty() || body.username.len() > 128 || body.password.len() > 1024 {
        return Err(ApiError::Validation(
            "username or password has an invalid length".into(),
        ));
    }
    let user = find_user(&state, &body.username)?;
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
    audit_login(&state, &body.username, &tenant, ok).await;
    let user = match (ok, user) {
        (true, Some(user)) => user,
        _ => return Err(ApiError::BadCredentials),
    };
    let secrets = load_secrets(&state)?;
    let now = crate::now_ms() / 1000;
    let ttl = state.config.token_ttl.as_secs();
    let token = issue_token(&secrets, &user, now, ttl)?;
    Ok(Json(LoginReply {
        token,
        expires_at: now + ttl,
    }))
}
