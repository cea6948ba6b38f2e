//! Federation on the REST side: `/api/v1/sites` (this site and its links, with their health),
//! `/api/v1/federation/tokens` (one-time link tokens), and the forwarding of calls about
//! objects that live at another site to their home site.
//!
//! A VM, and a `POST /vms` naming a `site`, that belong to a linked site are forwarded over
//! the site link on behalf of the caller; the home site applies the caller's role and tenant
//! as it knows them (its own user, or one replicated from the user's home site). A forwarded
//! call is never forwarded again.

use axum::body::{to_bytes, Body};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use raft::federation::{
    self as fed, CatalogKind, CatalogObject, FederationToken, LinkToken, SiteLink, SiteSync,
};
use raft::model::{Role, Vm};
use raft::Command;
use serde::{Deserialize, Serialize};

use crate::auth::{Caller, ForwardedPrincipal};
use crate::control::{ClusterError, ForwardedCall, ForwardedReply};
use crate::error::{ApiError, ApiResult};
use crate::routes::extract::ApiJson;
use crate::routes::propose;
use crate::AppState;

/// How long a federation token stays valid.
const TOKEN_TTL_MS: u64 = 3600 * 1000;

/// At most this many addresses in a link request.
const MAX_LINK_ADDRS: usize = 16;

/// One site as seen from here.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct SiteView {
    pub id: String,
    pub name: String,
    /// This site (the one answering).
    pub local: bool,
    /// `ok`: synced recently; `failing`: the last pulls failed but the catalog is still
    /// recent; `stale`: no successful pull for longer than the stale limit; `never`: linked but
    /// never synced. Always `ok` for the local site.
    pub health: String,
    /// Federation endpoints of the site's nodes.
    pub addrs: Vec<String>,
    /// Round-trip time of the last successful pull, ms.
    pub latency_ms: Option<u64>,
    /// When the last successful pull was committed (ms since the epoch).
    pub last_sync_at: Option<u64>,
    /// How old our copy of the site's catalog is, ms.
    pub age_ms: Option<u64>,
    /// Log entries of the site not yet in our catalog, as of the last pull.
    pub lag_entries: Option<u64>,
    /// The last pull error since the last success.
    pub error: Option<String>,
    pub linked_at: Option<u64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct SiteList {
    /// This site first, then every linked site.
    pub sites: Vec<SiteView>,
}

/// The site a VM list entry lives at, and whether that is known only from an old catalog.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct SiteTag {
    pub id: String,
    pub name: String,
    /// The entry comes from a catalog older than the stale limit (its site is unreachable).
    pub stale: bool,
    /// Age of the catalog the entry comes from, ms (0 for the local site).
    pub age_ms: u64,
}

/// Whether a site's catalog counts as stale at `now`.
pub(crate) fn is_stale(state: &AppState, sync: &SiteSync, now: u64) -> bool {
    sync.synced_at == 0
        || now.saturating_sub(sync.synced_at) > state.config.site_stale_after.as_millis() as u64
}

pub(crate) fn local_tag(state: &AppState) -> ApiResult<SiteTag> {
    let site = crate::federation::site(state)?;
    Ok(SiteTag {
        id: site.id,
        name: site.name,
        stale: false,
        age_ms: 0,
    })
}

pub(crate) fn remote_tag(state: &AppState, link: &SiteLink, sync: &SiteSync, now: u64) -> SiteTag {
    SiteTag {
        id: link.site.id.clone(),
        name: link.site.name.clone(),
        stale: is_stale(state, sync, now),
        age_ms: if sync.synced_at == 0 {
            now.saturating_sub(link.created_at)
        } else {
            now.saturating_sub(sync.synced_at)
        },
    }
}

#[utoipa::path(
    get,
    path = "/sites",
    tag = "federation",
    summary = "This site and every linked site, with the health of each link",
    responses((status = 200, description = "the sites", body = SiteList)),
    security(("bearer" = []))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    _caller: Caller,
) -> ApiResult<Json<SiteList>> {
    let own = crate::federation::site(&state)?;
    let now = crate::now_ms();
    let mut sites = vec![SiteView {
        id: own.id,
        name: own.name,
        local: true,
        health: "ok".into(),
        addrs: state.cp.federation_addrs(),
        latency_ms: None,
        last_sync_at: None,
        age_ms: Some(0),
        lag_entries: Some(0),
        error: None,
        linked_at: None,
    }];
    for (link, sync) in crate::federation::links(&state)? {
        let health = if sync.synced_at == 0 {
            "never"
        } else if is_stale(&state, &sync, now) {
            "stale"
        } else if sync.error.is_some() {
            // Pulls fail, the catalog is not yet older than the stale limit.
            "failing"
        } else {
            "ok"
        };
        sites.push(SiteView {
            id: link.site.id.clone(),
            name: link.site.name.clone(),
            local: false,
            health: health.into(),
            addrs: link.addrs.clone(),
            latency_ms: (sync.synced_at != 0).then_some(sync.latency_ms),
            last_sync_at: (sync.synced_at != 0).then_some(sync.synced_at),
            age_ms: (sync.synced_at != 0).then(|| now.saturating_sub(sync.synced_at)),
            lag_entries: (sync.synced_at != 0).then(|| sync.head.saturating_sub(sync.index)),
            error: sync.error.clone(),
            linked_at: Some(link.created_at),
        });
    }
    Ok(Json(SiteList { sites }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct TokenReply {
    /// Give this to the admin of the site that links to this one; valid once, for an hour.
    pub token: String,
    /// Federation endpoints of this site's nodes, to pass along with the token.
    pub addrs: Vec<String>,
    pub expires_at: u64,
}

#[utoipa::path(
    post,
    path = "/federation/tokens",
    tag = "federation",
    summary = "Issue a one-time token that lets another site link to this one (admin)",
    responses((status = 201, description = "the token, shown once", body = TokenReply)),
    security(("bearer" = []))
)]
pub(crate) async fn create_token(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Response> {
    caller.require(Role::Admin)?;
    let site = crate::federation::site(&state)?;
    let secrets = crate::auth::load_secrets(&state)?;
    let ca_fingerprint = raft::tls::ca_fingerprint(&secrets.ca_cert_pem)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let token = LinkToken {
        site_id: site.id,
        ca_fingerprint,
        token_id: uuid::Uuid::new_v4().simple().to_string(),
        secret: {
            use rand::RngCore;
            let mut secret = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut secret);
            hex::encode(secret)
        },
    };
    let now = crate::now_ms();
    let stored = FederationToken {
        id: token.token_id.clone(),
        secret_sha256: token.secret_sha256(),
        created_at: now,
        expires_at: now + TOKEN_TTL_MS,
    };
    propose(
        &state,
        &caller,
        None,
        Command::CreateFederationToken { token: stored },
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(TokenReply {
            token: token.to_string(),
            addrs: state.cp.federation_addrs(),
            expires_at: now + TOKEN_TTL_MS,
        }),
    )
        .into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LinkBody {
    /// The token issued by the other site (`nft1.…`).
    pub token: String,
    /// Federation endpoints (`HOST:PORT`) of the other site's nodes; any one suffices.
    pub addrs: Vec<String>,
}

#[utoipa::path(
    post,
    path = "/sites",
    tag = "federation",
    summary = "Link this site to the site that issued a token (admin)",
    request_body = LinkBody,
    responses(
        (status = 201, description = "linked", body = SiteView),
        (status = 501, description = "this control plane has no federation", body = crate::openapi::schemas::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn link(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<LinkBody>,
) -> ApiResult<Response> {
    caller.require(Role::Admin)?;
    let token: LinkToken = body
        .token
        .parse()
        .map_err(|e: String| ApiError::Validation(e))?;
    if body.addrs.is_empty() || body.addrs.len() > MAX_LINK_ADDRS {
        return Err(ApiError::Validation(format!(
            "give 1 to {MAX_LINK_ADDRS} addresses of the other site"
        )));
    }
    for addr in &body.addrs {
        if addr.len() > 255
            || addr
                .rsplit_once(':')
                .is_none_or(|(_, p)| p.parse::<u16>().is_err())
        {
            return Err(ApiError::Validation(format!("{addr:?} is not HOST:PORT")));
        }
    }
    if token.site_id == crate::federation::site(&state)?.id {
        return Err(ApiError::Validation("a site cannot link to itself".into()));
    }
    let link = state.cp.link_site(&body.token, body.addrs).await?;
    let view = SiteView {
        id: link.site.id.clone(),
        name: link.site.name.clone(),
        local: false,
        health: "never".into(),
        addrs: link.addrs.clone(),
        latency_ms: None,
        last_sync_at: None,
        age_ms: None,
        lag_entries: None,
        error: None,
        linked_at: Some(link.created_at),
    };
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

#[utoipa::path(
    delete,
    path = "/sites/{site}",
    tag = "federation",
    summary = "Unlink a site and forget its catalog (admin)",
    params(("site" = String, Path, description = "site name or id")),
    responses((status = 204, description = "unlinked")),
    security(("bearer" = []))
)]
pub(crate) async fn unlink(
    State(state): State<AppState>,
    caller: Caller,
    Path(site): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require(Role::Admin)?;
    state
        .cp
        .read_barrier(crate::Consistency::Linearizable)
        .await?;
    let link = crate::federation::find_link(&state, &site)?
        .ok_or_else(|| ApiError::NotFound(format!("site {site}")))?;
    let prefix = fed::catalog_prefix(&link.site.id);
    let catalog_keys = state
        .cp
        .scan(&prefix, None, usize::MAX)?
        .into_iter()
        .filter_map(|(k, _)| {
            k.strip_prefix(prefix.as_slice())
                .map(|rest| String::from_utf8_lossy(rest).into_owned())
        })
        .collect();
    propose(
        &state,
        &caller,
        None,
        Command::UnlinkSite {
            site: link.site.id,
            catalog_keys,
        },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Where a request must go: `None` to serve it here.
async fn remote_target(
    state: &AppState,
    req: &mut Request,
    caller: &Caller,
) -> ApiResult<Option<String>> {
    let path = req.uri().path();
    let Some(rest) = path.strip_prefix("/api/v1/vms") else {
        return Ok(None);
    };
    if rest.is_empty() || rest == "/" {
        if req.method() != Method::POST {
            return Ok(None);
        }
        // `POST /vms` with a `site`: read the body (already size-limited) to find it.
        let body = std::mem::take(req.body_mut());
        let bytes = to_bytes(body, state.config.body_limit)
            .await
            .map_err(|_| ApiError::Validation("request body too large".into()))?;
        let site = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("site").and_then(|s| s.as_str()).map(str::to_string));
        *req.body_mut() = Body::from(bytes);
        let Some(site) = site else {
            return Ok(None);
        };
        let own = crate::federation::site(state)?;
        if site == own.name || site == own.id {
            return Ok(None);
        }
        let link = crate::federation::find_link(state, &site)?
            .ok_or_else(|| ApiError::NotFound(format!("site {site}")))?;
        return Ok(Some(link.site.id));
    }
    let Some(id) = rest
        .strip_prefix('/')
        .map(|r| r.split('/').next().unwrap_or_default())
    else {
        return Ok(None);
    };
    if id.is_empty() || state.cp.get(&raft::keys::vm(id))?.is_some() {
        return Ok(None);
    }
    // Not here: a VM of a linked site is forwarded there, if the caller may see it at all
    // (otherwise the local handler answers 404 as for any unknown id).
    match crate::federation::catalog_object(state, CatalogKind::Vm, id)? {
        Some((site, CatalogObject::Vm(vm))) if caller.sees_tenant(&vm.tenant) => Ok(Some(site)),
        _ => Ok(None),
    }
}

/// Middleware: serves calls about objects of linked sites by forwarding them home.
pub(crate) async fn forward_remote(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    // A call that reached us over a link is served here, whatever it names.
    if req.extensions().get::<ForwardedPrincipal>().is_some()
        || !req.uri().path().starts_with("/api/v1/vms")
    {
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let caller = {
        use axum::extract::FromRequestParts;
        Caller::from_request_parts(&mut parts, &state).await
    };
    let mut req = Request::from_parts(parts, body);
    let Ok(caller) = caller else {
        // Unauthenticated: the handler answers 401 in the usual way.
        return next.run(req).await;
    };
    let site = match remote_target(&state, &mut req, &caller).await {
        Ok(Some(site)) => site,
        Ok(None) => return next.run(req).await,
        Err(e) => return e.into_response(),
    };
    match forward(&state, &caller, &site, req).await {
        Ok(reply) => reply_response(reply),
        Err(e) => e.into_response(),
    }
}

async fn forward(
    state: &AppState,
    caller: &Caller,
    site: &str,
    req: Request,
) -> ApiResult<ForwardedReply> {
    let (parts, body) = req.into_parts();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let body = to_bytes(body, state.config.body_limit)
        .await
        .map_err(|_| ApiError::Validation("request body too large".into()))?;
    let call = ForwardedCall {
        method: parts.method.to_string(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default(),
        body: body.to_vec(),
        user_id: caller.user_id.clone(),
        idempotency_key: header("idempotency-key"),
        if_match: header("if-match"),
    };
    state
        .cp
        .forward_to_site(site, call)
        .await
        .map_err(|e| match e {
            ClusterError::Unavailable(_) | ClusterError::Internal(_) => ApiError::Cluster(
                ClusterError::Unavailable(format!("site {site} cannot be reached: {e}")),
            ),
            other => ApiError::Cluster(other),
        })
}

fn reply_response(reply: ForwardedReply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut resp = (status, reply.body).into_response();
    if let Some(ct) = reply
        .content_type
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        resp.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    if let Some(etag) = reply.etag.and_then(|v| HeaderValue::from_str(&v).ok()) {
        resp.headers_mut().insert(header::ETAG, etag);
    }
    resp
}

/// The VMs of linked sites the caller may see, each with its site tag, for `?site=all` or
/// `?site=<name>`: `sites` are the site ids wanted.
pub(crate) fn remote_vms(
    state: &AppState,
    caller: &Caller,
    sites: &[String],
) -> ApiResult<Vec<(SiteTag, Vm)>> {
    let now = crate::now_ms();
    let mut out = Vec::new();
    for (link, sync) in crate::federation::links(state)? {
        if !sites.contains(&link.site.id) {
            continue;
        }
        let tag = remote_tag(state, &link, &sync, now);
        for object in crate::federation::catalog(state, &link.site.id, CatalogKind::Vm)? {
            if let CatalogObject::Vm(vm) = object {
                if caller.sees_tenant(&vm.tenant) {
                    out.push((tag.clone(), vm));
                }
            }
        }
    }
    Ok(out)
}
