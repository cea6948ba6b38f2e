//! `GET /api/v1/audit` (filtered, paginated, tenant-scoped for tenant-admins) and
//! `GET /api/v1/audit/verify` (admins): recomputes the hash chain and names the first entry
//! that does not fit, so a modified, removed or inserted entry is detected.

use axum::extract::State;
use axum::Json;
use raft::apply::audit_hash;
use raft::keys;
use raft::model::{AuditEntry, Role};
use serde::{Deserialize, Serialize};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::routes::extract::ApiQuery;
use crate::routes::{decode, ReadParams};
use crate::AppState;

#[derive(Debug, Deserialize)]
pub(crate) struct AuditParams {
    #[serde(default)]
    limit: Option<usize>,
    /// The `seq` of the last entry of the previous page.
    #[serde(default)]
    cursor: Option<u64>,
    #[serde(default)]
    actor: Option<String>,
    /// Exact action, or a prefix ending in `.` (`vm.` matches every VM action).
    #[serde(default)]
    action: Option<String>,
    /// Milliseconds since the Unix epoch; entries at or after it.
    #[serde(default)]
    since: Option<u64>,
    /// Admins only: one tenant's entries.
    #[serde(default)]
    tenant: Option<String>,
    #[serde(flatten)]
    read: ReadParams,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct AuditPage {
    #[schema(value_type = Vec<crate::openapi::schemas::AuditEntry>)]
    items: Vec<AuditEntry>,
    next_cursor: Option<u64>,
}

fn matches(p: &AuditParams, tenant: Option<&str>, e: &AuditEntry) -> bool {
    tenant.is_none_or(|t| e.tenant == t)
        && p.actor.as_deref().is_none_or(|a| e.actor == a)
        && p.since.is_none_or(|s| e.at >= s)
        && p.action.as_deref().is_none_or(|a| {
            if a.ends_with('.') {
                e.action.starts_with(a)
            } else {
                e.action == a
            }
        })
}

#[utoipa::path(
    get,
    path = "/audit",
    tag = "audit",
    summary = "List audit entries (tenant-admins see their tenant)",
    params(("limit" = Option<usize>, Query, description = "page size, 1 to 500 (default 100)"), ("cursor" = Option<u64>, Query, description = "next_cursor of the previous page"), ("actor" = Option<String>, Query, description = "user id"), ("action" = Option<String>, Query, description = "exact action, or a prefix ending in a dot"), ("since" = Option<u64>, Query, description = "milliseconds since the Unix epoch"), ("tenant" = Option<String>, Query, description = "admins only: one tenant"), ("consistency" = Option<crate::Consistency>, Query, description = "linearizable (default) or stale: how fresh the read must be")),
    responses((status = 200, description = "a page of entries", body = AuditPage)),
    security(("bearer" = []))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(params): ApiQuery<AuditParams>,
) -> ApiResult<Json<AuditPage>> {
    let limit = params.limit.unwrap_or(100);
    if limit == 0 || limit > 500 {
        return Err(ApiError::Validation("limit must be 1..=500".into()));
    }
    caller.require(Role::TenantAdmin)?;
    state.cp.read_barrier(params.read.consistency).await?;
    let tenant = if caller.is_admin() {
        params.tenant.clone()
    } else {
        Some(caller.tenant.clone())
    };
    let mut items = Vec::new();
    let mut after = params.cursor.map(keys::audit);
    let mut next_cursor = None;
    'outer: loop {
        let rows = state
            .cp
            .scan(keys::AUDIT_PREFIX, after.as_deref(), limit + 1)?;
        let exhausted = rows.len() <= limit;
        for (k, v) in rows {
            let e: AuditEntry = decode(&v)?;
            after = Some(k);
            if !matches(&params, tenant.as_deref(), &e) {
                continue;
            }
            if items.len() == limit {
                next_cursor = items.last().map(|e: &AuditEntry| e.seq);
                break 'outer;
            }
            items.push(e);
        }
        if exhausted {
            break;
        }
    }
    Ok(Json(AuditPage { items, next_cursor }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Verification {
    ok: bool,
    /// Entries checked.
    checked: u64,
    /// The first entry that does not fit the chain.
    first_broken_seq: Option<u64>,
    reason: Option<String>,
}

/// Walks the chain from the first entry: each must carry the next seq, its predecessor's hash
/// and a hash of its own fields; the head record must point at the last one.
pub(crate) fn verify_chain(state: &AppState) -> ApiResult<Verification> {
    const BATCH: usize = 1000;
    let mut prev_hash = String::new();
    let mut expected = 1u64;
    let mut after: Option<Vec<u8>> = None;
    let broken = |seq: u64, checked: u64, reason: String| Verification {
        ok: false,
        checked,
        first_broken_seq: Some(seq),
        reason: Some(reason),
    };
    loop {
        let rows = state.cp.scan(keys::AUDIT_PREFIX, after.as_deref(), BATCH)?;
        let n = rows.len();
        for (k, v) in rows {
            let checked = expected - 1;
            let e: AuditEntry = match decode(&v) {
                Ok(e) => e,
                Err(_) => return Ok(broken(expected, checked, "entry is unreadable".into())),
            };
            if k != keys::audit(e.seq) || e.seq != expected {
                return Ok(broken(
                    expected,
                    checked,
                    format!("expected entry {expected}, found {}", e.seq),
                ));
            }
            if e.prev_hash != prev_hash {
                return Ok(broken(
                    e.seq,
                    checked,
                    "does not link to the previous entry".into(),
                ));
            }
            if audit_hash(&e) != e.hash {
                return Ok(broken(
                    e.seq,
                    checked,
                    "content does not match its hash".into(),
                ));
            }
            prev_hash = e.hash;
            expected += 1;
            after = Some(k);
        }
        if n < BATCH {
            break;
        }
    }
    let checked = expected - 1;
    let head: Option<(u64, String)> = match state.cp.get(keys::AUDIT_HEAD)? {
        Some(b) => Some(decode(&b)?),
        None => None,
    };
    match head {
        Some((seq, hash)) if seq != checked || hash != prev_hash => Ok(broken(
            checked + 1,
            checked,
            format!("the chain ends at {checked} but its head says {seq}"),
        )),
        None if checked > 0 => Ok(broken(1, checked, "the chain has no head".into())),
        _ => Ok(Verification {
            ok: true,
            checked,
            first_broken_seq: None,
            reason: None,
        }),
    }
}

#[utoipa::path(
    get,
    path = "/audit/verify",
    tag = "audit",
    summary = "Verify the hash chain of the audit log (admins)",
    responses((status = 200, description = "the verification result", body = Verification)),
    security(("bearer" = []))
)]
pub(crate) async fn verify(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Verification>> {
    caller.require(Role::Admin)?;
    state
        .cp
        .read_barrier(crate::Consistency::Linearizable)
        .await?;
    Ok(Json(verify_chain(&state)?))
}
