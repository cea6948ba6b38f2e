//! `GET /api/v1/events`: server-sent events of every applied change, with the Raft log index
//! as the event id, filtered to what the caller may see, resumable with `Last-Event-ID`.
//!
//! Each change is a `change` event whose data is `{index, action, tenant, object}`; objects are
//! shown as the API shows them (no password or key hashes). When a resume cannot be served
//! exactly (the index is older than the kept history, or this client fell behind), a `reset`
//! event tells the client to re-list and continue from the live stream.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use raft::model::{Role, SYSTEM_TENANT};
use raft::store::Applied;
use raft::Response as RaftResponse;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::events::Resume;
use crate::routes::api_keys::ApiKeyView;
use crate::routes::users::UserView;
use crate::AppState;

/// The tenant a change belongs to and its client view, or `None` when it changed nothing
/// visible (refusals, audit-only records, second-factor bookkeeping).
fn view(a: &Applied) -> Option<(String, bool, Value)> {
    // The boolean marks identity objects, which only tenant-admins of the tenant may see.
    let v = match &a.response {
        RaftResponse::Tenant(t) => (t.id.clone(), false, json!(t)),
        RaftResponse::User(u) => (u.tenant.clone(), true, json!(UserView::from(u.clone()))),
        RaftResponse::Vm { vm, operation } => (
            vm.tenant.clone(),
            false,
            json!({"vm": vm, "operation": operation}),
        ),
        RaftResponse::Operation(op) => (op.tenant.clone(), false, json!(op)),
        RaftResponse::ApiKey(k) => (k.tenant.clone(), true, json!(ApiKeyView::from(k.clone()))),
        RaftResponse::Node(n) => (SYSTEM_TENANT.to_string(), false, json!(n)),
        RaftResponse::Image(i) => (i.tenant.clone(), false, json!(i)),
        // A batch spans tenants, so only administrators see it whole; each tenant sees its
        // VMs change when their agents report them.
        RaftResponse::Placements(p) => (SYSTEM_TENANT.to_string(), false, json!(p)),
        RaftResponse::Ok | RaftResponse::Rejected { .. } => return None,
    };
    Some(v)
}

fn event_for(caller: &Caller, a: &Applied) -> Option<Event> {
    let (tenant, identity, object) = view(a)?;
    let allowed = caller.is_admin()
        || (tenant == caller.tenant && (!identity || caller.role <= Role::TenantAdmin));
    if !allowed {
        return None;
    }
    let data = json!({
        "index": a.index,
        "action": a.request.command.name(),
        "tenant": tenant,
        "object": object,
    });
    Some(
        Event::default()
            .event("change")
            .id(a.index.to_string())
            .data(data.to_string()),
    )
}

fn reset(reason: &str) -> Event {
    Event::default()
        .event("reset")
        .data(json!({"reason": reason}).to_string())
}

#[utoipa::path(
    get,
    path = "/events",
    tag = "events",
    summary = "Server-sent events of every visible change",
    params(("Last-Event-ID" = Option<u64>, Header, description = "resume after this Raft index")),
    responses((status = 200, description = "an endless text/event-stream of change and reset events", body = String, content_type = "text/event-stream")),
    security(("bearer" = []))
)]
pub(crate) async fn stream(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let last_id = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::Validation("Last-Event-ID must be an index".into()))?,
        ),
    };
    state.events.start().await?;
    // Subscribe before reading the history, so nothing falls between the two.
    let rx = state.cp.subscribe();
    let mut pending = VecDeque::new();
    let mut sent = 0u64;
    if let Some(n) = last_id {
        sent = n;
        match state.events.since(n) {
            Resume::Replay(events) => {
                for a in events {
                    sent = sent.max(a.index);
                    pending.extend(event_for(&caller, &a));
                }
            }
            Resume::Reset => pending.push_back(reset("history no longer kept; re-list")),
        }
    }
    let stream = futures::stream::unfold(
        (rx, pending, sent, caller),
        |(mut rx, mut pending, mut sent, caller)| async move {
            loop {
                if let Some(e) = pending.pop_front() {
                    return Some((Ok(e), (rx, pending, sent, caller)));
                }
                match rx.recv().await {
                    Ok(a) if a.index <= sent => continue,
                    Ok(a) => {
                        sent = a.index;
                        pending.extend(event_for(&caller, &a));
                    }
                    Err(RecvError::Lagged(_)) => {
                        pending.push_back(reset("this client fell behind; re-list"));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
