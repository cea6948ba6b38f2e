//! The replicated side of federation: this site's identity, its links to other sites, the
//! catalog of what linked sites publish, and the change feed that lets peers pull this site's
//! own objects incrementally.
//!
//! Every object has one home site that owns its writes. A site's own tenants, users, nodes and
//! VMs live in their usual trees; every change to them is also recorded in the change feed
//! (`f/x/`), keyed by the log index that made it, so a peer asks "what changed since index N"
//! and gets each changed object once, at its current value (or its absence). What a site learns
//! from a peer is kept under `f/c/<site>/`, written only by [`Command::ApplyCatalog`] with a
//! compare-and-set on the last index pulled, so two leaders pulling at once cannot regress it.
//!
//! Key layout (all under `f/`):
//! - `f/site`: this site's [`SiteIdentity`] (absent before `InitSite`: the site is `default`);
//! - `f/l/<site id>`: a [`SiteLink`];
//! - `f/t/<token id>`: a pending [`FederationToken`];
//! - `f/s/<site id>`: the [`SiteSync`] state of the pull from that site;
//! - `f/c/<site id>/<object key>`: a [`CatalogObject`] published by that site;
//! - `f/ci/<kind>/<object id>`: the site holding a catalog object (to route by id);
//! - `f/cn/<username>/<site id>`: the user id of a federated user with that name;
//! - `f/u/<tenant id>`: the usage at this site of a tenant whose home is another site;
//! - `f/x/<index>/<object key>` and `f/xk/<object key>`: the change feed and its reverse index.

use std::cell::RefCell;
use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::apply::{get, put, reject, ApplyError, StateTx};
use crate::command::{Command, RejectCode, Response};
use crate::model::{Millis, NodeRecord, Tenant, Usage, User, Vm};

/// The prefixes of the objects a site publishes to its peers.
pub const PUBLISHED_PREFIXES: [&[u8]; 4] = [b"t/", b"u/", b"n/", b"v/"];

pub const SITE: &[u8] = b"f/site";
pub const LINK_PREFIX: &[u8] = b"f/l/";
pub const TOKEN_PREFIX: &[u8] = b"f/t/";
pub const SYNC_PREFIX: &[u8] = b"f/s/";
pub const CATALOG_PREFIX: &[u8] = b"f/c/";
pub const FEED_PREFIX: &[u8] = b"f/x/";

/// The name of a site whose identity was never set (a cluster from before federation).
pub const DEFAULT_SITE: &str = "default";

/// A site id: short, lowercase, in every object id the site makes (`<site id>-<uuid>`).
pub const SITE_ID_LEN: usize = 6;

pub fn link_key(site: &str) -> Vec<u8> {
    [LINK_PREFIX, site.as_bytes()].concat()
}
pub fn token_key(id: &str) -> Vec<u8> {
    [TOKEN_PREFIX, id.as_bytes()].concat()
}
pub fn sync_key(site: &str) -> Vec<u8> {
    [SYNC_PREFIX, site.as_bytes()].concat()
}
/// The prefix of every catalog object of `site`.
pub fn catalog_prefix(site: &str) -> Vec<u8> {
    [CATALOG_PREFIX, site.as_bytes(), b"/"].concat()
}
/// The catalog entry of `site` for the object stored at `object_key` there (`v/<id>`, ...).
pub fn catalog_key(site: &str, object_key: &str) -> Vec<u8> {
    [&catalog_prefix(site), object_key.as_bytes()].concat()
}
/// The catalog objects of one kind of `site`.
pub fn catalog_kind_prefix(site: &str, kind: CatalogKind) -> Vec<u8> {
    [&catalog_prefix(site), kind.prefix()].concat()
}
fn link_name_key(name: &str) -> Vec<u8> {
    [b"f/ln/", name.as_bytes()].concat()
}
pub fn catalog_index_key(kind: CatalogKind, id: &str) -> Vec<u8> {
    [b"f/ci/", kind.prefix(), id.as_bytes()].concat()
}
pub fn catalog_username_prefix(username: &str) -> Vec<u8> {
    [b"f/cn/", username.as_bytes(), b"/"].concat()
}
fn catalog_username_key(username: &str, site: &str) -> Vec<u8> {
    [&catalog_username_prefix(username), site.as_bytes()].concat()
}
pub fn foreign_usage_key(tenant: &str) -> Vec<u8> {
    [b"f/u/", tenant.as_bytes()].concat()
}
fn feed_key(index: u64, object_key: &[u8]) -> Vec<u8> {
    [FEED_PREFIX, format!("{index:020}/").as_bytes(), object_key].concat()
}
fn feed_reverse_key(object_key: &[u8]) -> Vec<u8> {
    [b"f/xk/", object_key].concat()
}

/// Splits a change-feed key into its index and the object key it names.
pub fn parse_feed_key(key: &[u8]) -> Option<(u64, &[u8])> {
    let rest = key.strip_prefix(FEED_PREFIX)?;
    let (index, object) = (rest.get(..20)?, rest.get(21..)?);
    let index = std::str::from_utf8(index).ok()?.parse().ok()?;
    Some((index, object))
}

/// The feed key from which to scan for changes after `index`.
pub fn feed_start_after(index: u64) -> Vec<u8> {
    [
        FEED_PREFIX,
        format!("{:020}/", index.saturating_add(1)).as_bytes(),
    ]
    .concat()
}

/// Who this site is. Set once, at `--init`.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct SiteIdentity {
    /// [`SITE_ID_LEN`] characters of `[a-z0-9]`; prefixes every object id made here.
    pub id: String,
    /// Operator-chosen, unique among linked sites.
    pub name: String,
}

impl SiteIdentity {
    /// Whether `id` is a valid site id.
    pub fn valid_id(id: &str) -> bool {
        id.len() == SITE_ID_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    }

    /// Whether `name` is a valid site name: 1-32 of `[a-z0-9-]`, not starting with `-`.
    pub fn valid_name(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= 32
            && !name.starts_with('-')
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    }

    /// The site of a cluster that never set one: named `default`, its id derived from the
    /// cluster id so it is stable.
    pub fn implicit(cluster_id: &str) -> SiteIdentity {
        let id: String = cluster_id
            .bytes()
            .filter(|b| b.is_ascii_hexdigit())
            .map(|b| b.to_ascii_lowercase() as char)
            .chain(std::iter::repeat('0'))
            .take(SITE_ID_LEN)
            .collect();
        SiteIdentity {
            id,
            name: DEFAULT_SITE.to_string(),
        }
    }
}

/// The home site of an object, as encoded in its id (`<site id>-...`); `None` for ids made
/// before federation (plain UUIDs, whose first group is 8 characters long).
pub fn home_site_of_id(id: &str) -> Option<&str> {
    let (site, _) = id.split_once('-')?;
    SiteIdentity::valid_id(site).then_some(site)
}

/// An id without its home-site prefix: the UUID part of `<site id>-<uuid>` (libvirt domain
/// UUIDs, image file names), or the whole id when it has none.
pub fn uuid_part(id: &str) -> &str {
    match home_site_of_id(id) {
        Some(site) => id.get(site.len() + 1..).unwrap_or(id),
        None => id,
    }
}

/// A peer site this site exchanges catalogs with; both sides hold one for the other.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct SiteLink {
    pub site: SiteIdentity,
    /// The peer's cluster CA, pinned: only certificates it signed are accepted for this site.
    pub ca_cert_pem: String,
    /// `HOST:PORT` of the peer's federation endpoints (any node of the site answers).
    pub addrs: Vec<String>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// A one-time secret that lets another site link to this one. Only its hash is stored.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct FederationToken {
    pub id: String,
    /// sha256 (hex) of the secret.
    pub secret_sha256: String,
    pub created_at: Millis,
    pub expires_at: Millis,
}

/// How far this site has pulled a peer's change feed, and how that went.
#[derive(
    Debug,
    Clone,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct SiteSync {
    /// The peer's log index up to which its changes are in our catalog.
    pub index: u64,
    /// The peer's applied index at the last successful pull (lag = `head - index`).
    pub head: u64,
    /// When the last successful pull was committed (proposer's clock).
    pub synced_at: Millis,
    /// Round-trip time of the last successful pull.
    pub latency_ms: u64,
    /// The last failure since the last success, if any.
    pub error: Option<String>,
    pub failed_at: Option<Millis>,
}

/// The kinds of objects in a catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CatalogKind {
    Tenant,
    User,
    Node,
    Vm,
}

impl CatalogKind {
    pub fn prefix(self) -> &'static [u8] {
        match self {
            CatalogKind::Tenant => b"t/",
            CatalogKind::User => b"u/",
            CatalogKind::Node => b"n/",
            CatalogKind::Vm => b"v/",
        }
    }

    /// The kind of the object stored at `object_key` and its id.
    pub fn of_key(object_key: &str) -> Option<(CatalogKind, &str)> {
        let (prefix, id) = object_key.split_at_checked(2)?;
        let kind = match prefix {
            "t/" => CatalogKind::Tenant,
            "u/" => CatalogKind::User,
            "n/" => CatalogKind::Node,
            "v/" => CatalogKind::Vm,
            _ => return None,
        };
        (!id.is_empty()).then_some((kind, id))
    }
}

/// One object a site publishes, at its current version.
#[allow(clippy::large_enum_variant)]
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(tag = "kind", content = "object", rename_all = "lowercase")]
pub enum CatalogObject {
    Tenant(Tenant),
    /// Without its password hash: logins of a user of another site are checked by its home.
    User(User),
    Node(NodeRecord),
    Vm(Vm),
}

impl CatalogObject {
    pub fn kind(&self) -> CatalogKind {
        match self {
            CatalogObject::Tenant(_) => CatalogKind::Tenant,
            CatalogObject::User(_) => CatalogKind::User,
            CatalogObject::Node(_) => CatalogKind::Node,
            CatalogObject::Vm(_) => CatalogKind::Vm,
        }
    }

    /// The key the object has in its home site's state (`v/<id>`, ...).
    pub fn object_key(&self) -> String {
        match self {
            CatalogObject::Tenant(t) => format!("t/{}", t.id),
            CatalogObject::User(u) => format!("u/{}", u.id),
            CatalogObject::Node(n) => String::from_utf8_lossy(&crate::keys::node(n.id)).into(),
            CatalogObject::Vm(v) => format!("v/{}", v.id),
        }
    }
}

/// One change pulled from a peer: the object at `key` now is `object`, or is gone.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct CatalogChange {
    /// The object's key at its home site (`v/<id>`, `t/<id>`, `u/<id>`, `n/<id>`).
    pub key: String,
    pub object: Option<CatalogObject>,
}

/// Names of the federation commands (see [`crate::command::ADDED_COMMANDS`]).
pub const COMMANDS: [&str; 6] = [
    "site.init",
    "site.token_create",
    "site.link",
    "site.unlink",
    "site.catalog",
    "site.sync_failed",
];

/// The site identity stored in the state, if any.
pub fn site_identity(tx: &dyn StateTx) -> Result<Option<SiteIdentity>, ApplyError> {
    get(tx, SITE)
}

/// Applies the federation commands; `None` for every other command.
pub(crate) fn apply(
    tx: &dyn StateTx,
    command: &Command,
    at: Millis,
) -> Result<Option<Response>, ApplyError> {
    let response = match command {
        Command::InitSite { site } => {
            if !SiteIdentity::valid_id(&site.id) || !SiteIdentity::valid_name(&site.name) {
                reject(RejectCode::Invalid, "invalid site id or name")
            } else if tx.get(SITE)?.is_some() {
                reject(RejectCode::AlreadyInitialized, "the site is already named")
            } else {
                put(tx, SITE, site)?;
                Response::Ok
            }
        }
        Command::CreateFederationToken { token } => {
            if tx.get(&token_key(&token.id))?.is_some() {
                reject(RejectCode::AlreadyExists, "token id is taken")
            } else {
                put(tx, &token_key(&token.id), token)?;
                Response::Ok
            }
        }
        Command::LinkSite { link, token } => link_site(tx, link, token.as_ref(), at)?,
        Command::UnlinkSite { site, catalog_keys } => match get::<SiteLink>(tx, &link_key(site))? {
            None => reject(RejectCode::NotFound, format!("site {site} is not linked")),
            Some(link) => {
                tx.remove(&link_name_key(&link.site.name))?;
                tx.remove(&link_key(site))?;
                tx.remove(&sync_key(site))?;
                remove_catalog_keys(tx, site, catalog_keys)?;
                Response::Ok
            }
        },
        Command::ApplyCatalog {
            site,
            from,
            to,
            head,
            latency_ms,
            reset,
            stale_keys,
            changes,
        } => apply_catalog(
            tx,
            site,
            (*from, *to, *head),
            *latency_ms,
            reset.then_some(stale_keys.as_slice()),
            changes,
            at,
        )?,
        Command::SiteSyncFailed { site, error } => match get::<SiteSync>(tx, &sync_key(site))? {
            None if tx.get(&link_key(site))?.is_none() => {
                reject(RejectCode::NotFound, format!("site {site} is not linked"))
            }
            sync => {
                let mut sync = sync.unwrap_or_default();
                sync.error = Some(error.clone());
                sync.failed_at = Some(at);
                put(tx, &sync_key(site), &sync)?;
                Response::Ok
            }
        },
        _ => return Ok(None),
    };
    Ok(Some(response))
}

fn link_site(
    tx: &dyn StateTx,
    link: &SiteLink,
    token: Option<&(String, String)>,
    at: Millis,
) -> Result<Response, ApplyError> {
    if !SiteIdentity::valid_id(&link.site.id) || !SiteIdentity::valid_name(&link.site.name) {
        return Ok(reject(RejectCode::Invalid, "invalid site id or name"));
    }
    if let Some(own) = site_identity(tx)? {
        if own.id == link.site.id || own.name == link.site.name {
            return Ok(reject(
                RejectCode::Invalid,
                "a site cannot link to itself or to a site of the same name",
            ));
        }
    }
    // Site names are unique among linked sites: they are how users name sites.
    let name_key = link_name_key(&link.site.name);
    if let Some(other) = tx.get(&name_key)? {
        if other != link.site.id.as_bytes() {
            return Ok(reject(
                RejectCode::AlreadyExists,
                format!("another site is already linked as {}", link.site.name),
            ));
        }
    }
    if let Some((id, secret_sha256)) = token {
        let Some(stored) = get::<FederationToken>(tx, &token_key(id))? else {
            return Ok(reject(
                RejectCode::NotFound,
                "unknown or used federation token",
            ));
        };
        if stored.expires_at <= at || &stored.secret_sha256 != secret_sha256 {
            return Ok(reject(
                RejectCode::Invalid,
                "expired or wrong federation token",
            ));
        }
        tx.remove(&token_key(id))?;
    }
    let mut link = link.clone();
    if let Some(old) = get::<SiteLink>(tx, &link_key(&link.site.id))? {
        link.created_at = old.created_at;
    } else {
        link.created_at = at;
    }
    link.updated_at = at;
    if let Some(old) = get::<SiteLink>(tx, &link_key(&link.site.id))? {
        tx.remove(&link_name_key(&old.site.name))?;
    }
    tx.put(&name_key, link.site.id.as_bytes().to_vec())?;
    put(tx, &link_key(&link.site.id), &link)?;
    Ok(Response::Ok)
}

/// Removes catalog entries of `site` by key (object keys at the home site). `apply` cannot scan
/// a prefix inside its transaction, so the proposer lists the keys from its replica; the
/// compare-and-set on the pulled index makes that list exact.
fn remove_catalog_keys(tx: &dyn StateTx, site: &str, keys: &[String]) -> Result<(), ApplyError> {
    for object_key in keys {
        let key = catalog_key(site, object_key);
        if let Some(old) = get::<CatalogObject>(tx, &key)? {
            unindex(tx, site, &old)?;
            tx.remove(&key)?;
        }
    }
    Ok(())
}

fn index(tx: &dyn StateTx, site: &str, object: &CatalogObject) -> Result<(), ApplyError> {
    let id = object_id(object);
    tx.put(
        &catalog_index_key(object.kind(), &id),
        site.as_bytes().to_vec(),
    )?;
    if let CatalogObject::User(u) = object {
        tx.put(
            &catalog_username_key(&u.username, site),
            u.id.as_bytes().to_vec(),
        )?;
    }
    Ok(())
}

fn unindex(tx: &dyn StateTx, site: &str, object: &CatalogObject) -> Result<(), ApplyError> {
    let key = catalog_index_key(object.kind(), &object_id(object));
    // A VM that moved to another site is indexed there now; only remove our own pointer.
    if tx.get(&key)?.as_deref() == Some(site.as_bytes()) {
        tx.remove(&key)?;
    }
    if let CatalogObject::User(u) = object {
        tx.remove(&catalog_username_key(&u.username, site))?;
    }
    Ok(())
}

fn object_id(object: &CatalogObject) -> String {
    match object {
        CatalogObject::Tenant(t) => t.id.clone(),
        CatalogObject::User(u) => u.id.clone(),
        CatalogObject::Node(n) => n.id.to_string(),
        CatalogObject::Vm(v) => v.id.clone(),
    }
}

/// `reset`: the pull restarts from zero (the peer lost its feed or we were unlinked); the
/// given keys are everything our catalog of `site` held, as the proposer read it at `from`.
fn apply_catalog(
    tx: &dyn StateTx,
    site: &str,
    (from, to, head): (u64, u64, u64),
    latency_ms: u64,
    reset: Option<&[String]>,
    changes: &[CatalogChange],
    at: Millis,
) -> Result<Response, ApplyError> {
    if tx.get(&link_key(site))?.is_none() {
        return Ok(reject(
            RejectCode::NotFound,
            format!("site {site} is not linked"),
        ));
    }
    let mut sync = get::<SiteSync>(tx, &sync_key(site))?.unwrap_or_default();
    // Compare-and-set on the pulled index: a pull made from an older index (a deposed leader's,
    // or a retry) must not move the catalog backwards or apply a change twice.
    if sync.index != from {
        return Ok(reject(
            RejectCode::VersionMismatch,
            format!("catalog of {site} is at {}, not {from}", sync.index),
        ));
    }
    if to < from && reset.is_none() {
        return Ok(reject(
            RejectCode::Invalid,
            "a pull cannot end before it starts",
        ));
    }
    if let Some(stale_keys) = reset {
        remove_catalog_keys(tx, site, stale_keys)?;
    }
    for change in changes {
        let Some((kind, _)) = CatalogKind::of_key(&change.key) else {
            continue;
        };
        let key = catalog_key(site, &change.key);
        if let Some(old) = get::<CatalogObject>(tx, &key)? {
            unindex(tx, site, &old)?;
        }
        match &change.object {
            // A site publishes only what lives there: the system tenant exists everywhere and
            // objects of the wrong kind for their key are dropped.
            Some(CatalogObject::Tenant(t)) if t.id == crate::model::SYSTEM_TENANT => {
                tx.remove(&key)?;
            }
            Some(object) if object.kind() == kind && object.object_key() == change.key => {
                put(tx, &key, object)?;
                index(tx, site, object)?;
            }
            _ => tx.remove(&key)?,
        }
    }
    sync.index = to;
    sync.head = head.max(to);
    sync.synced_at = at;
    sync.latency_ms = latency_ms;
    sync.error = None;
    sync.failed_at = None;
    put(tx, &sync_key(site), &sync)?;
    Ok(Response::Ok)
}

/// The tenant a VM of this site belongs to, and where its usage at this site is kept: its own
/// record for a tenant of this site, `f/u/` for a tenant whose home is a linked site (quotas
/// are enforced per site: each site counts what runs there).
pub(crate) fn tenant_for_usage(
    tx: &dyn StateTx,
    id: &str,
) -> Result<Option<(Tenant, bool)>, ApplyError> {
    if let Some(t) = get::<Tenant>(tx, &crate::keys::tenant(id))? {
        return Ok(Some((t, false)));
    }
    let Some(site) = tx.get(&catalog_index_key(CatalogKind::Tenant, id))? else {
        return Ok(None);
    };
    let site = String::from_utf8_lossy(&site).into_owned();
    let Some(CatalogObject::Tenant(mut t)) =
        get::<CatalogObject>(tx, &catalog_key(&site, &format!("t/{id}")))?
    else {
        return Ok(None);
    };
    t.usage = get::<Usage>(tx, &foreign_usage_key(id))?.unwrap_or_default();
    Ok(Some((t, true)))
}

/// Stores the usage of a tenant loaded with [`tenant_for_usage`].
pub(crate) fn store_tenant_usage(
    tx: &dyn StateTx,
    tenant: &Tenant,
    foreign: bool,
) -> Result<(), ApplyError> {
    if foreign {
        put(tx, &foreign_usage_key(&tenant.id), &tenant.usage)
    } else {
        put(tx, &crate::keys::tenant(&tenant.id), tenant)
    }
}

/// A [`StateTx`] that remembers which published objects a command changed, so that `apply`
/// can record them in the change feed under the entry's log index.
pub(crate) struct Recording<'a> {
    inner: &'a dyn StateTx,
    touched: RefCell<BTreeSet<Vec<u8>>>,
}

impl<'a> Recording<'a> {
    pub(crate) fn new(inner: &'a dyn StateTx) -> Self {
        Recording {
            inner,
            touched: RefCell::new(BTreeSet::new()),
        }
    }

    fn note(&self, key: &[u8]) {
        if PUBLISHED_PREFIXES.iter().any(|p| key.starts_with(p)) {
            self.touched.borrow_mut().insert(key.to_vec());
        }
    }

    /// Writes the change-feed entries of everything touched, at `index`.
    pub(crate) fn record(self, index: u64) -> Result<(), ApplyError> {
        for key in self.touched.into_inner() {
            let reverse = feed_reverse_key(&key);
            if let Some(old) = self.inner.get(&reverse)? {
                if let Ok(old) = <[u8; 8]>::try_from(old.as_slice()) {
                    self.inner
                        .remove(&feed_key(u64::from_be_bytes(old), &key))?;
                }
            }
            self.inner.put(&feed_key(index, &key), Vec::new())?;
            self.inner.put(&reverse, index.to_be_bytes().to_vec())?;
        }
        Ok(())
    }
}

impl StateTx for Recording<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ApplyError> {
        self.inner.get(key)
    }
    fn put(&self, key: &[u8], value: Vec<u8>) -> Result<(), ApplyError> {
        self.note(key);
        self.inner.put(key, value)
    }
    fn remove(&self, key: &[u8]) -> Result<(), ApplyError> {
        self.note(key);
        self.inner.remove(key)
    }
}

/// What a peer gets when it asks for this site's changes after an index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangePage {
    /// The index up to which this page is complete: pass it as `since` next time.
    pub to: u64,
    pub changes: Vec<CatalogChange>,
    /// More changes follow beyond `to`.
    pub more: bool,
}

/// Reads the change feed after `since`: the objects changed by entries after that index, at
/// their current value (or `None` when gone), at least `limit` of them unless the feed ends
/// first; a page never splits one entry's changes. `applied` must be read before the feed:
/// a page that reaches the end of the feed is complete up to it.
pub fn changes_since(
    scan_feed: impl Fn(&[u8], usize) -> Result<Vec<Vec<u8>>, ApplyError>,
    get_value: impl Fn(&[u8]) -> Result<Option<Vec<u8>>, ApplyError>,
    since: u64,
    applied: u64,
    limit: usize,
) -> Result<ChangePage, ApplyError> {
    const BATCH: usize = 256;
    let mut changes = Vec::new();
    let mut to = since;
    let mut start = feed_start_after(since);
    loop {
        let keys = scan_feed(&start, BATCH)?;
        for key in &keys {
            let Some((index, object_key)) = parse_feed_key(key) else {
                continue;
            };
            if changes.len() >= limit.max(1) && index != to {
                return Ok(ChangePage {
                    to,
                    changes,
                    more: true,
                });
            }
            let object = match get_value(object_key)? {
                Some(bytes) => decode_published(object_key, &bytes)?,
                None => None,
            };
            changes.push(CatalogChange {
                key: String::from_utf8_lossy(object_key).into_owned(),
                object,
            });
            to = index;
        }
        match keys.last() {
            Some(last) if keys.len() == BATCH => {
                start = last.clone();
                start.push(0);
            }
            _ => break,
        }
    }
    Ok(ChangePage {
        to: applied.max(to),
        changes,
        more: false,
    })
}

fn decode_published(object_key: &[u8], bytes: &[u8]) -> Result<Option<CatalogObject>, ApplyError> {
    let object = match object_key.get(..2) {
        Some(b"t/") => CatalogObject::Tenant(crate::codec::decode(bytes)?),
        // Password hashes stay home: a user of another site is verified by its home site.
        Some(b"u/") => CatalogObject::User(User {
            password_hash: String::new(),
            ..crate::codec::decode(bytes)?
        }),
        Some(b"n/") => CatalogObject::Node(crate::codec::decode(bytes)?),
        Some(b"v/") => CatalogObject::Vm(crate::codec::decode(bytes)?),
        _ => return Ok(None),
    };
    Ok(Some(object))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::{apply, MemState};
    use crate::command::Request;
    use crate::model::{DesiredState, Operation, OperationState, Quota, Role, VmState};

    fn at(st: &MemState, index: u64, cmd: Command) -> Response {
        apply(st, &Request::new(1_000 + index, "tester", cmd), index).unwrap()
    }

    fn tenant(id: &str, max_vms: Option<u64>) -> Tenant {
        Tenant {
            id: id.into(),
            name: format!("name-{id}"),
            quota: Quota {
                max_vms,
                ..Quota::default()
            },
            usage: Default::default(),
            created_at: 0,
            updated_at: 0,
            version: 0,
        }
    }

    fn vm(id: &str, tenant: &str) -> Vm {
        Vm {
            id: id.into(),
            name: id.into(),
            tenant: tenant.into(),
            vcpus: 1,
            memory_mib: 64,
            disk_gib: 1,
            image: None,
            labels: Default::default(),
            node: None,
            desired_state: DesiredState::Running,
            state: VmState::Pending,
            ha: false,
            anti_affinity_group: None,
            epoch: 0,
            created_at: 0,
            updated_at: 0,
            version: 0,
            placement: Default::default(),
        }
    }

    fn op(id: &str) -> Operation {
        Operation {
            id: id.into(),
            kind: "vm.create".into(),
            tenant: String::new(),
            target: String::new(),
            state: OperationState::Pending,
            error: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    fn page(st: &MemState, since: u64, applied: u64, limit: usize) -> ChangePage {
        let map = &st.map;
        changes_since(
            |start, n| {
                Ok(map
                    .borrow()
                    .range(start.to_vec()..)
                    .take_while(|(k, _)| k.starts_with(FEED_PREFIX))
                    .take(n)
                    .map(|(k, _)| k.clone())
                    .collect())
            },
            |key| Ok(map.borrow().get(key).cloned()),
            since,
            applied,
            limit,
        )
        .unwrap()
    }

    fn link(id: &str, name: &str) -> SiteLink {
        SiteLink {
            site: SiteIdentity {
                id: id.into(),
                name: name.into(),
            },
            ca_cert_pem: "ca".into(),
            addrs: vec!["127.0.0.1:1".into()],
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn the_change_feed_returns_each_changed_object_once_at_its_latest_value() {
        let st = MemState::default();
        at(
            &st,
            1,
            Command::CreateTenant {
                tenant: tenant("t1", None),
            },
        );
        at(
            &st,
            2,
            Command::CreateVm {
                vm: vm("v1", "t1"),
                operation: op("o1"),
            },
        );
        at(
            &st,
            3,
            Command::CreateVm {
                vm: vm("v2", "t1"),
                operation: op("o2"),
            },
        );
        // Everything since 0: the tenant (changed at 1, 2, 3) once, both VMs.
        let all = page(&st, 0, 3, 100);
        let keys: Vec<_> = all.changes.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["v/v1", "t/t1", "v/v2"]);
        assert_eq!(all.to, 3);
        assert!(!all.more);
        let Some(CatalogObject::Tenant(t)) = &all.changes[1].object else {
            panic!("tenant expected: {all:?}");
        };
        assert_eq!(t.usage.vms, 2, "the latest value is served");
        // Since 2: only what entry 3 changed.
        let tail = page(&st, 2, 3, 100);
        let keys: Vec<_> = tail.changes.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["t/t1", "v/v2"]);
        // Nothing new: an empty page that still advances to the applied index.
        let none = page(&st, 3, 7, 100);
        assert!(none.changes.is_empty());
        assert_eq!(none.to, 7);
    }

    #[test]
    fn a_deleted_object_is_published_as_gone_and_pages_never_split_an_entry() {
        let st = MemState::default();
        at(
            &st,
            1,
            Command::CreateTenant {
                tenant: tenant("t1", None),
            },
        );
        at(
            &st,
            2,
            Command::CreateTenant {
                tenant: tenant("t2", None),
            },
        );
        at(
            &st,
            3,
            Command::CreateVm {
                vm: vm("v1", "t1"),
                operation: op("o1"),
            },
        );
        // t1 was changed again by entry 3, so the feed holds t2 at 2, then v1 and t1 at 3.
        let first = page(&st, 0, 3, 1);
        assert_eq!(first.to, 2);
        assert!(first.more);
        // Entry 3 changed two objects: a page of limit 1 still carries both.
        let second = page(&st, first.to, 3, 1);
        assert_eq!(second.changes.len(), 2);
        assert_eq!(second.to, 3);
        assert!(!second.more);
        at(
            &st,
            4,
            Command::DeleteTenant {
                id: "t2".into(),
                expected_version: None,
            },
        );
        let gone = page(&st, 3, 4, 10);
        assert_eq!(gone.changes.len(), 1);
        assert_eq!(gone.changes[0].key, "t/t2");
        assert_eq!(gone.changes[0].object, None);
    }

    #[test]
    fn catalog_pulls_are_compare_and_set_on_the_pulled_index() {
        let st = MemState::default();
        let pull = |from, to, changes: Vec<CatalogChange>| Command::ApplyCatalog {
            site: "bbbbbb".into(),
            from,
            to,
            head: to,
            latency_ms: 3,
            reset: false,
            stale_keys: vec![],
            changes,
        };
        let v = CatalogChange {
            key: "v/v9".into(),
            object: Some(CatalogObject::Vm(vm("v9", "t9"))),
        };
        assert!(matches!(
            at(&st, 1, pull(0, 5, vec![v.clone()])),
            Response::Rejected {
                code: RejectCode::NotFound,
                ..
            }
        ));
        at(
            &st,
            2,
            Command::LinkSite {
                link: link("bbbbbb", "b"),
                token: None,
            },
        );
        assert_eq!(at(&st, 3, pull(0, 5, vec![v.clone()])), Response::Ok);
        // A second pull made from the same starting point (a deposed leader's) is refused.
        assert!(matches!(
            at(&st, 4, pull(0, 6, vec![])),
            Response::Rejected {
                code: RejectCode::VersionMismatch,
                ..
            }
        ));
        assert_eq!(
            st.get(&catalog_index_key(CatalogKind::Vm, "v9")).unwrap(),
            Some(b"bbbbbb".to_vec())
        );
        // An object under the wrong key is dropped rather than trusted.
        let forged = CatalogChange {
            key: "v/other".into(),
            object: Some(CatalogObject::Vm(vm("v9", "t9"))),
        };
        assert_eq!(at(&st, 5, pull(5, 6, vec![forged])), Response::Ok);
        assert_eq!(st.get(&catalog_key("bbbbbb", "v/other")).unwrap(), None);
        // Deletion removes the entry and its index.
        let gone = CatalogChange {
            key: "v/v9".into(),
            object: None,
        };
        assert_eq!(at(&st, 6, pull(6, 7, vec![gone])), Response::Ok);
        assert_eq!(st.get(&catalog_key("bbbbbb", "v/v9")).unwrap(), None);
        assert_eq!(
            st.get(&catalog_index_key(CatalogKind::Vm, "v9")).unwrap(),
            None
        );
        // Catalog pulls are not published again: only a site's own objects are.
        let feed = page(&st, 0, 6, 100);
        assert!(feed.changes.is_empty(), "{feed:?}");
    }

    #[test]
    fn a_federation_token_links_once_and_names_stay_unique() {
        let st = MemState::default();
        at(
            &st,
            1,
            Command::InitSite {
                site: SiteIdentity {
                    id: "aaaaaa".into(),
                    name: "a".into(),
                },
            },
        );
        at(
            &st,
            2,
            Command::CreateFederationToken {
                token: FederationToken {
                    id: "tok".into(),
                    secret_sha256: "h".into(),
                    created_at: 0,
                    expires_at: 10_000,
                },
            },
        );
        let with = |l: SiteLink, hash: &str| Command::LinkSite {
            link: l,
            token: Some(("tok".into(), hash.into())),
        };
        assert!(matches!(
            at(&st, 3, with(link("bbbbbb", "b"), "wrong")),
            Response::Rejected {
                code: RejectCode::Invalid,
                ..
            }
        ));
        assert_eq!(at(&st, 4, with(link("bbbbbb", "b"), "h")), Response::Ok);
        assert!(matches!(
            at(&st, 5, with(link("cccccc", "c"), "h")),
            Response::Rejected {
                code: RejectCode::NotFound,
                ..
            }
        ));
        assert!(matches!(
            at(
                &st,
                6,
                Command::LinkSite {
                    link: link("cccccc", "b"),
                    token: None
                }
            ),
            Response::Rejected {
                code: RejectCode::AlreadyExists,
                ..
            }
        ));
        assert!(matches!(
            at(
                &st,
                7,
                Command::LinkSite {
                    link: link("aaaaaa", "x"),
                    token: None
                }
            ),
            Response::Rejected {
                code: RejectCode::Invalid,
                ..
            }
        ));
        assert!(matches!(
            at(
                &st,
                8,
                Command::InitSite {
                    site: SiteIdentity {
                        id: "dddddd".into(),
                        name: "d".into()
                    }
                }
            ),
            Response::Rejected {
                code: RejectCode::AlreadyInitialized,
                ..
            }
        ));
    }

    #[test]
    fn a_tenant_of_another_site_uses_this_sites_quota_count() {
        let st = MemState::default();
        at(
            &st,
            1,
            Command::LinkSite {
                link: link("bbbbbb", "b"),
                token: None,
            },
        );
        let t = CatalogChange {
            key: "t/bbbbbb-t".into(),
            object: Some(CatalogObject::Tenant(tenant("bbbbbb-t", Some(1)))),
        };
        at(
            &st,
            2,
            Command::ApplyCatalog {
                site: "bbbbbb".into(),
                from: 0,
                to: 9,
                head: 9,
                latency_ms: 1,
                reset: false,
                stale_keys: vec![],
                changes: vec![t],
            },
        );
        assert!(matches!(
            at(
                &st,
                3,
                Command::CreateVm {
                    vm: vm("v1", "bbbbbb-t"),
                    operation: op("o1")
                }
            ),
            Response::Vm { .. }
        ));
        assert!(matches!(
            at(
                &st,
                4,
                Command::CreateVm {
                    vm: vm("v2", "bbbbbb-t"),
                    operation: op("o2")
                }
            ),
            Response::Rejected {
                code: RejectCode::QuotaExceeded,
                ..
            }
        ));
        // The home site's record is not touched here: it is written only by its home.
        let Some(CatalogObject::Tenant(home)) =
            get::<CatalogObject>(&st, &catalog_key("bbbbbb", "t/bbbbbb-t")).unwrap()
        else {
            panic!("catalog tenant expected");
        };
        assert_eq!(home.usage.vms, 0);
        assert_eq!(
            get::<Usage>(&st, &foreign_usage_key("bbbbbb-t"))
                .unwrap()
                .map(|u| u.vms),
            Some(1)
        );
        let _ = Role::Admin;
    }

    #[test]
    fn ids_name_their_home_site() {
        assert_eq!(home_site_of_id("ab12cd-3f2a"), Some("ab12cd"));
        assert_eq!(
            home_site_of_id("0b3e5f1c-1111-2222-3333-444444444444"),
            None,
            "a plain UUID names no site"
        );
        assert_eq!(SiteIdentity::implicit("0B3E-5f1c").id, "0b3e5f");
        assert!(SiteIdentity::valid_name("edge-1"));
        assert!(!SiteIdentity::valid_name("Edge"));
    }
}

/// The one-time federation token an admin of the issuing site hands to the linking site:
/// `nft1.<site id>.<CA sha256 fingerprint>.<token id>.<secret>`. The fingerprint lets the
/// linking site pin the issuer's CA before trusting anything it says; only the sha256 of the
/// secret is stored by the issuer.
#[derive(Clone, PartialEq, Eq)]
pub struct LinkToken {
    pub site_id: String,
    pub ca_fingerprint: String,
    pub token_id: String,
    pub secret: String,
}

impl std::fmt::Debug for LinkToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkToken")
            .field("site_id", &self.site_id)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .field("token_id", &self.token_id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl std::fmt::Display for LinkToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "nft1.{}.{}.{}.{}",
            self.site_id, self.ca_fingerprint, self.token_id, self.secret
        )
    }
}

impl std::str::FromStr for LinkToken {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        let [version, site_id, fp, token_id, secret] = parts.as_slice() else {
            return Err("a federation token has five dot-separated parts".into());
        };
        if *version != "nft1" {
            return Err("not a federation token (it starts with nft1.)".into());
        }
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !SiteIdentity::valid_id(site_id)
            || !hex(fp, 64)
            || !hex(token_id, 32)
            || !hex(secret, 64)
        {
            return Err("the federation token is malformed".into());
        }
        Ok(LinkToken {
            site_id: site_id.to_string(),
            ca_fingerprint: fp.to_ascii_lowercase(),
            token_id: token_id.to_string(),
            secret: secret.to_string(),
        })
    }
}

impl LinkToken {
    /// sha256 (hex) of the secret, as stored in [`FederationToken::secret_sha256`].
    pub fn secret_sha256(&self) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(self.secret.as_bytes()))
    }
}
