//! Reading the federation state from the local replica: this site, its links, and the
//! catalog of objects published by linked sites (see `raft::federation`).

use raft::federation::{self as fed, CatalogKind, CatalogObject, SiteIdentity, SiteLink, SiteSync};
use raft::model::User;

use crate::auth::load;
use crate::error::ApiResult;
use crate::AppState;

/// This site's identity (`default` with an id derived from the cluster id when never set).
pub fn site(state: &AppState) -> ApiResult<SiteIdentity> {
    if let Some(site) = load::<SiteIdentity>(state, fed::SITE)? {
        return Ok(site);
    }
    let secrets = crate::auth::load_secrets(state)?;
    Ok(SiteIdentity::implicit(&secrets.cluster_id))
}

/// A new object id of this site: `<site id>-<uuid>`, unique across linked sites.
pub fn new_id(state: &AppState) -> ApiResult<String> {
    Ok(format!("{}-{}", site(state)?.id, uuid::Uuid::new_v4()))
}

/// Every linked site, with its pull state.
pub fn links(state: &AppState) -> ApiResult<Vec<(SiteLink, SiteSync)>> {
    let mut out = Vec::new();
    for (_, bytes) in state.cp.scan(fed::LINK_PREFIX, None, usize::MAX)? {
        let link: SiteLink = raft::codec::decode(&bytes)
            .map_err(|e| crate::error::ApiError::Internal(e.to_string()))?;
        let sync = load::<SiteSync>(state, &fed::sync_key(&link.site.id))?.unwrap_or_default();
        out.push((link, sync));
    }
    Ok(out)
}

/// The linked site named or identified by `name_or_id`.
pub fn find_link(state: &AppState, name_or_id: &str) -> ApiResult<Option<SiteLink>> {
    Ok(links(state)?
        .into_iter()
        .map(|(l, _)| l)
        .find(|l| l.site.name == name_or_id || l.site.id == name_or_id))
}

/// Every catalog object of one kind published by `site`.
pub fn catalog(state: &AppState, site: &str, kind: CatalogKind) -> ApiResult<Vec<CatalogObject>> {
    let mut out = Vec::new();
    for (_, bytes) in state
        .cp
        .scan(&fed::catalog_kind_prefix(site, kind), None, usize::MAX)?
    {
        out.push(
            raft::codec::decode(&bytes)
                .map_err(|e| crate::error::ApiError::Internal(e.to_string()))?,
        );
    }
    Ok(out)
}

/// The linked site that currently holds the object `id` of `kind`, if any.
pub fn site_of(state: &AppState, kind: CatalogKind, id: &str) -> ApiResult<Option<String>> {
    Ok(state
        .cp
        .get(&fed::catalog_index_key(kind, id))?
        .map(|b| String::from_utf8_lossy(&b).into_owned()))
}

/// One catalog object by kind and id, with the site that publishes it.
pub fn catalog_object(
    state: &AppState,
    kind: CatalogKind,
    id: &str,
) -> ApiResult<Option<(String, CatalogObject)>> {
    let Some(site) = site_of(state, kind, id)? else {
        return Ok(None);
    };
    let key = String::from_utf8_lossy(kind.prefix()).into_owned() + id;
    Ok(load::<CatalogObject>(state, &fed::catalog_key(&site, &key))?.map(|o| (site, o)))
}

/// A user replicated from its home site (read-only here).
pub fn catalog_user(state: &AppState, id: &str) -> ApiResult<Option<User>> {
    Ok(match catalog_object(state, CatalogKind::User, id)? {
        Some((_, CatalogObject::User(u))) => Some(u),
        _ => None,
    })
}
