//! Local reads of the replicated state, for the API and the controllers.
//!
//! A [`StateReader`] reads this node's replica directly: what it returns is committed, but may
//! lag the leader. Callers that need a linearizable read first obtain a read index from Raft
//! and then [`StateReader::wait_applied`] for it. The reader also carries the two signals of
//! progress: a watch of the last applied index and a broadcast of every applied request.

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, watch};

use super::state_machine::read_last_applied;
use super::{state_keys, Inner, StoreError};
use crate::codec;
use crate::command::{Request, Response};
use crate::keys;
use crate::model::{AuditEntry, ClusterSecrets, NodeRecord, Operation, Tenant, User, Vm};

/// One applied client request, as published on [`StateReader::subscribe`].
///
/// Only entries that carry a request are published (not blank or membership entries), and a
/// snapshot installation publishes nothing: a subscriber sees the index jump and must re-read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub index: u64,
    pub request: Request,
    pub response: Response,
}

/// Reads the local replica. Cheap to clone; clones share the database.
#[derive(Debug, Clone)]
pub struct StateReader {
    pub(super) inner: Arc<Inner>,
}

/// The digest of a replicated key space: sha256 over every (key, value) pair in key order,
/// each part prefixed with its length so that no two different maps hash alike.
///
/// Public so that a state kept elsewhere (`apply::MemState` in tests) can be compared with a
/// store's [`StateReader::digest`].
pub fn digest_of<'a>(pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> String {
    let mut h = Sha256::new();
    for (k, v) in pairs {
        h.update((k.len() as u64).to_be_bytes());
        h.update(k);
        h.update((v.len() as u64).to_be_bytes());
        h.update(v);
    }
    hex::encode(h.finalize())
}

/// How many times [`StateReader::digest`] rescans when entries are applied during its scan.
const DIGEST_ATTEMPTS: usize = 16;

/// Keys and stored bytes, in key order.
pub type RawRows = Vec<(Vec<u8>, Vec<u8>)>;

impl StateReader {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        StateReader { inner }
    }

    /// The value stored at `key`, decoded.
    pub fn get<T>(&self, key: &[u8]) -> Result<Option<T>, StoreError>
    where
        T: rkyv::Archive,
        T::Archived: for<'a> rkyv::bytecheck::CheckBytes<
                rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>,
            > + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
    {
        match self.inner.state.get(key)? {
            Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Up to `limit` entries whose key starts with `prefix`, in key order, starting after the
    /// key `after` (exclusive) when given: pass the last key of a page to get the next one.
    pub fn scan<T>(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, T)>, StoreError>
    where
        T: rkyv::Archive,
        T::Archived: for<'a> rkyv::bytecheck::CheckBytes<
                rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>,
            > + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
    {
        self.scan_raw(prefix, after, limit)?
            .into_iter()
            .map(|(k, v)| Ok((k, codec::decode(&v)?)))
            .collect()
    }

    /// The stored bytes at `key` (format byte included), for callers that decode themselves.
    pub fn get_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.inner.state.get(key)?.map(|v| v.to_vec()))
    }

    /// Like [`StateReader::scan`], returning the stored bytes.
    pub fn scan_raw(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<RawRows, StoreError> {
        // The smallest key strictly greater than `after` is `after` followed by a zero byte.
        let start = match after {
            Some(after) if after >= prefix => {
                let mut k = after.to_vec();
                k.push(0);
                k
            }
            _ => prefix.to_vec(),
        };
        let mut out = Vec::new();
        for item in self.inner.state.range(start..) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn all<T>(&self, prefix: &[u8]) -> Result<Vec<T>, StoreError>
    where
        T: rkyv::Archive,
        T::Archived: for<'a> rkyv::bytecheck::CheckBytes<
                rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>,
            > + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
    {
        Ok(self
            .scan(prefix, None, usize::MAX)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    pub fn tenant(&self, id: &str) -> Result<Option<Tenant>, StoreError> {
        self.get(&keys::tenant(id))
    }

    pub fn tenant_by_name(&self, name: &str) -> Result<Option<Tenant>, StoreError> {
        match self.get::<String>(&keys::tenant_name(name))? {
            Some(id) => self.tenant(&id),
            None => Ok(None),
        }
    }

    /// Every tenant, ordered by id.
    pub fn tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        self.all(keys::TENANT_PREFIX)
    }

    pub fn user(&self, id: &str) -> Result<Option<User>, StoreError> {
        self.get(&keys::user(id))
    }

    pub fn user_by_name(&self, username: &str) -> Result<Option<User>, StoreError> {
        match self.get::<String>(&keys::user_name(username))? {
            Some(id) => self.user(&id),
            None => Ok(None),
        }
    }

    /// Every user, ordered by id.
    pub fn users(&self) -> Result<Vec<User>, StoreError> {
        self.all(keys::USER_PREFIX)
    }

    pub fn node(&self, id: u64) -> Result<Option<NodeRecord>, StoreError> {
        self.get(&keys::node(id))
    }

    /// Every node ever registered (removed ones included, flagged), ordered by id.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.all(keys::NODE_PREFIX)
    }

    pub fn vm(&self, id: &str) -> Result<Option<Vm>, StoreError> {
        self.get(&keys::vm(id))
    }

    /// The VM called `name` in `tenant` (names are unique per tenant).
    pub fn vm_by_name(&self, tenant: &str, name: &str) -> Result<Option<Vm>, StoreError> {
        match self.get::<String>(&keys::vm_name(tenant, name))? {
            Some(id) => self.vm(&id),
            None => Ok(None),
        }
    }

    /// Every VM of every tenant, ordered by id. The API filters by tenant.
    pub fn vms(&self) -> Result<Vec<Vm>, StoreError> {
        self.all(keys::VM_PREFIX)
    }

    pub fn operation(&self, id: &str) -> Result<Option<Operation>, StoreError> {
        self.get(&keys::operation(id))
    }

    /// The cluster's secrets, once the cluster is initialised.
    pub fn secrets(&self) -> Result<Option<ClusterSecrets>, StoreError> {
        self.get(keys::SECRETS)
    }

    /// Up to `limit` audit entries with a sequence number greater than `after_seq`, in order.
    pub fn audit(&self, after_seq: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        Ok(self
            .scan(keys::AUDIT_PREFIX, Some(&keys::audit(after_seq)), limit)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    /// The index of the last entry applied to this replica (0 before any).
    pub fn last_applied_index(&self) -> u64 {
        *self.inner.applied.borrow()
    }

    /// A watch of the last applied index.
    pub fn applied_watch(&self) -> watch::Receiver<u64> {
        self.inner.applied.subscribe()
    }

    /// Waits until this replica has applied `index`, or fails after `timeout`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<(), StoreError> {
        let mut rx = self.inner.applied.subscribe();
        let outcome = tokio::time::timeout(timeout, async {
            rx.wait_for(|applied| *applied >= index).await.map(|_| ())
        })
        .await;
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(StoreError::Closed),
            Err(_) => Err(StoreError::WaitTimeout {
                index,
                reached: self.last_applied_index(),
            }),
        }
    }

    /// Applied requests from now on. A subscriber that falls more than
    /// [`super::EVENT_CAPACITY`] entries behind gets `RecvError::Lagged` and should re-read.
    pub fn subscribe(&self) -> broadcast::Receiver<Applied> {
        self.inner.events.subscribe()
    }

    /// A digest of the replicated state (internal keys excluded): replicas that applied the
    /// same log have the same digest.
    ///
    /// The scan is not isolated from concurrent applies, so it is repeated until the last
    /// applied log id is the same before and after it; a replica that keeps applying during
    /// every attempt yields [`StoreError::DigestUnstable`] rather than a digest of a mixed state.
    pub fn digest(&self) -> Result<String, StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let before = read_last_applied(&self.inner.state)?;
            let mut pairs = Vec::new();
            for item in self.inner.state.iter() {
                let (k, v) = item?;
                if !state_keys::is_internal(&k) {
                    pairs.push((k, v));
                }
            }
            let after = read_last_applied(&self.inner.state)?;
            if before == after {
                return Ok(digest_of(pairs.iter().map(|(k, v)| (&k[..], &v[..]))));
            }
            if attempt >= DIGEST_ATTEMPTS {
                return Err(StoreError::DigestUnstable { attempts: attempt });
            }
        }
    }
}

impl StateReader {
    /// This site's published objects changed after log index `since` (see
    /// [`crate::federation::changes_since`]), read from this replica.
    pub fn federation_changes(
        &self,
        since: u64,
        limit: usize,
    ) -> Result<crate::federation::ChangePage, StoreError> {
        let storage = |e: sled::Error| crate::apply::ApplyError::Storage(e.to_string());
        // The applied index is read before the feed, so a page that reaches the end of the
        // feed is complete at least up to it.
        let applied = self.last_applied_index();
        let page = crate::federation::changes_since(
            |start, n| {
                let mut out = Vec::with_capacity(n);
                for item in self.inner.state.range(start.to_vec()..).take(n) {
                    let (k, _) = item.map_err(storage)?;
                    if !k.starts_with(crate::federation::FEED_PREFIX) {
                        break;
                    }
                    out.push(k.to_vec());
                }
                Ok(out)
            },
            |key| {
                Ok(self
                    .inner
                    .state
                    .get(key)
                    .map_err(storage)?
                    .map(|v| v.to_vec()))
            },
            since,
            applied,
            limit,
        )?;
        Ok(page)
    }

    /// This site's identity; a cluster that never named its site is `default`.
    pub fn site(&self) -> Result<crate::federation::SiteIdentity, StoreError> {
        if let Some(site) = self.get(crate::federation::SITE)? {
            return Ok(site);
        }
        let cluster_id = self
            .get::<ClusterSecrets>(keys::SECRETS)?
            .map(|s| s.cluster_id)
            .unwrap_or_default();
        Ok(crate::federation::SiteIdentity::implicit(&cluster_id))
    }
}
