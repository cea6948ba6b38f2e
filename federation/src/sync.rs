//! The catalog pull: while this node leads, it pulls every linked site's change feed and
//! commits each page as `Command::ApplyCatalog`, a compare-and-set on the index pulled so far,
//! so a deposed leader's late pull cannot move a catalog backwards or apply a page twice.
//!
//! An empty pull is committed at least every `heartbeat`, so a site's `synced_at` and latency
//! stay fresh while nothing changes there. A failure is committed (`SiteSyncFailed`) only when
//! its text differs from the stored one, so an unreachable site costs no log entry per attempt.
//! A peer whose head is behind our index lost state (restored, rebuilt): we pull again from
//! zero with `reset`, naming every catalog key we hold for it so stale objects disappear.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::ControlPlane;
use raft::federation::{self as fed, CatalogChange, SiteLink, SiteSync};
use raft::{Command, RejectCode, Request, Response};
use tokio::sync::watch;

use crate::client::{CallError, Peers};
use crate::proto::ChangesReply;

/// A source of peer sites' change pages ([`Peers`] over the network; a fake in tests).
#[tonic::async_trait]
pub trait ChangeSource: Send + Sync + 'static {
    /// One page of `link`'s changes after `since`, with the round trip it took.
    async fn changes(
        &self,
        link: &SiteLink,
        since: u64,
        limit: u32,
    ) -> Result<(ChangesReply, Duration), CallError>;
}

#[tonic::async_trait]
impl ChangeSource for Peers {
    async fn changes(
        &self,
        link: &SiteLink,
        since: u64,
        limit: u32,
    ) -> Result<(ChangesReply, Duration), CallError> {
        Peers::changes(self, link, since, limit).await
    }
}

/// Settings of the pull loop.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// How often each linked site is pulled.
    pub interval: Duration,
    /// An empty pull is committed at least this often.
    pub heartbeat: Duration,
    /// Changes asked for per page.
    pub page_limit: u32,
    /// Pages pulled per site per round before yielding to the next round.
    pub max_pages: usize,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            interval: Duration::from_secs(1),
            heartbeat: Duration::from_secs(5),
            page_limit: 500,
            max_pages: 20,
        }
    }
}

/// Counters of the pull loop, rendered in Prometheus text.
#[derive(Debug, Default)]
pub struct SyncMetrics {
    pulls: AtomicU64,
    failures: AtomicU64,
    /// Failures committed as `SiteSyncFailed` (only when the error text changed).
    failures_recorded: AtomicU64,
    /// Per site: entries of the peer's log not yet in our catalog, at the last pull.
    lag: Mutex<BTreeMap<String, u64>>,
}

impl SyncMetrics {
    pub fn pulls(&self) -> u64 {
        self.pulls.load(Ordering::Relaxed)
    }
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn render(&self) -> String {
        let mut out = format!(
            "# HELP novacron_federation_pulls_total Catalog pages committed from linked sites.\n\
             # TYPE novacron_federation_pulls_total counter\n\
             novacron_federation_pulls_total {}\n\
             # HELP novacron_federation_pull_failures_total Catalog pulls that failed.\n\
             # TYPE novacron_federation_pull_failures_total counter\n\
             novacron_federation_pull_failures_total {}\n\
             # HELP novacron_federation_failures_recorded_total Pull failures committed to the log (changes of error only).\n\
             # TYPE novacron_federation_failures_recorded_total counter\n\
             novacron_federation_failures_recorded_total {}\n\
             # HELP novacron_federation_lag_entries Log entries of a linked site not yet pulled.\n\
             # TYPE novacron_federation_lag_entries gauge\n",
            self.pulls(),
            self.failures(),
            self.failures_recorded.load(Ordering::Relaxed)
        );
        let lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
        for (site, n) in lag.iter() {
            out.push_str(&format!(
                "novacron_federation_lag_entries{{site=\"{site}\"}} {n}\n"
            ));
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Call(#[from] CallError),
    #[error("the peer sent an unreadable change: {0}")]
    Decode(String),
    #[error("cannot commit the pull: {0}")]
    Commit(String),
    #[error("cannot read the replica: {0}")]
    Store(String),
}

impl PullError {
    /// The text recorded in `SiteSync.error`: stable across attempts that fail the same way.
    fn recorded(&self, link: &SiteLink) -> String {
        match self {
            PullError::Call(CallError::Unreachable { .. }) => format!(
                "site {} is unreachable at {}",
                link.site.name,
                link.addrs.join(", ")
            ),
            other => other.to_string(),
        }
    }
}

/// Pulls catalogs on behalf of this node while it leads.
pub struct Syncer {
    /// Reads (this node's replica) and writes (through the leader) of the cluster.
    pub cp: Arc<dyn ControlPlane>,
    /// Where changes come from: the peer sites ([`Peers`]).
    pub peers: Arc<dyn ChangeSource>,
    pub config: SyncConfig,
    pub metrics: Arc<SyncMetrics>,
    /// When this node last committed a pull of each site (cleared when leadership is lost).
    last_commit: Mutex<HashMap<String, Instant>>,
    actor: String,
}

impl Syncer {
    pub fn new(
        cp: Arc<dyn ControlPlane>,
        peers: Arc<dyn ChangeSource>,
        config: SyncConfig,
        metrics: Arc<SyncMetrics>,
        actor: String,
    ) -> Self {
        Syncer {
            cp,
            peers,
            config,
            metrics,
            last_commit: Mutex::new(HashMap::new()),
            actor,
        }
    }

    /// The linked sites, as the replica holds them.
    fn links(&self) -> Vec<SiteLink> {
        match self.cp.scan(fed::LINK_PREFIX, None, usize::MAX) {
            Ok(rows) => rows
                .into_iter()
                .filter_map(|(_, v)| raft::codec::decode(&v).ok())
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the site links");
                Vec::new()
            }
        }
    }

    fn last_commits(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.last_commit.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pulls `link` once and records the outcome: the time of a commit, or the failure.
    pub async fn pull_and_record(&self, link: &SiteLink) {
        let due = self
            .last_commits()
            .get(&link.site.id)
            .is_none_or(|t| t.elapsed() >= self.config.heartbeat);
        match self.pull(link, due).await {
            Ok(true) => {
                self.last_commits()
                    .insert(link.site.id.clone(), Instant::now());
            }
            Ok(false) => {}
            Err(e) => {
                self.metrics.failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(site = %link.site.id, error = %e, "catalog pull failed");
                self.record_failure(link, &e).await;
            }
        }
    }

    async fn record_failure(&self, link: &SiteLink, e: &PullError) {
        let text = e.recorded(link);
        let stored = self.sync_state(&link.site.id).unwrap_or_default();
        if stored.error.as_deref() == Some(text.as_str()) {
            return;
        }
        tracing::warn!(site = %link.site.id, error = %text, "catalog pull failing");
        let req = Request::new(
            crate::now_ms(),
            self.actor.clone(),
            Command::SiteSyncFailed {
                site: link.site.id.clone(),
                error: text,
            },
        );
        match self.cp.write(req).await {
            Ok(_) => {
                self.metrics
                    .failures_recorded
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(error = %e, "cannot record the pull failure"),
        }
    }

    /// Re-links `link` with the addresses its site reports now, when they differ (a node was
    /// added or removed there), so later calls reach every node it has.
    async fn follow_addrs(&self, link: &SiteLink, addrs: &[String]) {
        let mut now: Vec<String> = addrs.to_vec();
        now.sort();
        now.dedup();
        let mut had = link.addrs.clone();
        had.sort();
        if now.is_empty() || now == had {
            return;
        }
        let mut updated = link.clone();
        updated.addrs = now;
        let req = Request::new(
            crate::now_ms(),
            self.actor.clone(),
            Command::LinkSite {
                link: updated,
                token: None,
            },
        );
        match self.cp.write(req).await {
            Ok((_, Response::Ok)) => {
                tracing::info!(site = %link.site.id, "the site's federation addresses changed")
            }
            Ok((_, other)) => tracing::debug!(?other, "cannot update the site's addresses"),
            Err(e) => tracing::debug!(error = %e, "cannot update the site's addresses"),
        }
    }

    /// The stored pull state of `site` (default before the first pull).
    fn sync_state(&self, site: &str) -> Result<SiteSync, PullError> {
        let store = |e: String| PullError::Store(e);
        match self
            .cp
            .get(&fed::sync_key(site))
            .map_err(|e| store(e.to_string()))?
        {
            Some(bytes) => raft::codec::decode(&bytes).map_err(|e| store(e.to_string())),
            None => Ok(SiteSync::default()),
        }
    }

    /// Our catalog keys of `site` (object keys at the site), as this replica holds them.
    fn catalog_keys(&self, site: &str) -> Result<Vec<String>, PullError> {
        let prefix = fed::catalog_prefix(site);
        let rows = self
            .cp
            .scan(&prefix, None, usize::MAX)
            .map_err(|e| PullError::Store(e.to_string()))?;
        Ok(rows
            .into_iter()
            .filter_map(|(k, _)| {
                k.strip_prefix(prefix.as_slice())
                    .map(|o| String::from_utf8_lossy(o).into_owned())
            })
            .collect())
    }

    /// Pulls `link`'s pages; returns whether something was committed. `heartbeat_due`: commit
    /// even an empty page.
    pub async fn pull(&self, link: &SiteLink, heartbeat_due: bool) -> Result<bool, PullError> {
        let site = &link.site.id;
        let mut from = self.sync_state(site)?.index;
        let mut committed = false;
        for _ in 0..self.config.max_pages.max(1) {
            let (mut reply, mut rtt) = self
                .peers
                .changes(link, from, self.config.page_limit)
                .await?;
            let reset = from > reply.head;
            let mut stale_keys = Vec::new();
            if reset {
                tracing::warn!(%site, ours = from, head = reply.head, "the peer's log is behind our catalog; pulling it again from the start");
                stale_keys = self.catalog_keys(site)?;
                (reply, rtt) = self.peers.changes(link, 0, self.config.page_limit).await?;
            }
            let changes = reply
                .changes
                .iter()
                .map(|c| serde_json::from_slice::<CatalogChange>(c))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| PullError::Decode(e.to_string()))?;
            if !reset && changes.is_empty() && (committed || !heartbeat_due) {
                break;
            }
            let command = Command::ApplyCatalog {
                site: site.clone(),
                from,
                to: reply.to,
                head: reply.head,
                latency_ms: rtt.as_millis() as u64,
                reset,
                stale_keys,
                changes,
            };
            let (_, response) = self
                .cp
                .write(Request::new(crate::now_ms(), self.actor.clone(), command))
                .await
                .map_err(|e| PullError::Commit(e.to_string()))?;
            match response {
                Response::Ok => {}
                // Another pull moved the index (a previous leader's, committed late): the next
                // round starts from the stored index.
                Response::Rejected {
                    code: RejectCode::VersionMismatch | RejectCode::NotFound,
                    ..
                } => return Ok(committed),
                Response::Rejected { message, .. } => return Err(PullError::Commit(message)),
                other => return Err(PullError::Commit(format!("unexpected {other:?}"))),
            }
            if !committed {
                // Once per pull: `link` is this pull's copy and stays the old one.
                self.follow_addrs(link, &reply.addrs).await;
            }
            committed = true;
            self.metrics.pulls.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .lag
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(site.clone(), reply.head.saturating_sub(reply.to));
            from = reply.to;
            if !reply.more {
                break;
            }
        }
        Ok(committed)
    }
}

/// Starts a pull of every linked site each `config.interval` while `is_leader()` holds, until
/// `stop` turns true. Each site is pulled by its own task and a site still being pulled is
/// skipped, so an unreachable site (whose calls wait for timeouts) never delays the others.
pub async fn run(
    syncer: Arc<Syncer>,
    is_leader: impl Fn() -> bool + Send,
    mut stop: watch::Receiver<bool>,
) {
    let mut interval = tokio::time::interval(syncer.config.interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut in_flight: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
        in_flight.retain(|_, task| !task.is_finished());
        if !is_leader() {
            // A pull started while leading may still commit: harmless, as every pull is a
            // compare-and-set on the index; a later leadership starts with heartbeats due.
            for (_, task) in in_flight.drain() {
                task.abort();
            }
            syncer.last_commits().clear();
            continue;
        }
        let links = syncer.links();
        syncer
            .last_commits()
            .retain(|site, _| links.iter().any(|l| &l.site.id == site));
        for link in links {
            if in_flight.contains_key(&link.site.id) {
                continue;
            }
            let s = syncer.clone();
            let site = link.site.id.clone();
            in_flight.insert(
                site,
                tokio::spawn(async move { s.pull_and_record(&link).await }),
            );
        }
    }
    for (_, task) in in_flight.drain() {
        task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::{ClusterError, ClusterStatus, Consistency, JoinRequest, JoinResponse};
    use raft::apply::MemState;
    use raft::federation::{CatalogObject, SiteIdentity};
    use raft::model::{Quota, Tenant};

    /// A single-replica cluster: `apply` over an in-memory state.
    #[derive(Default)]
    struct MemCluster {
        state: Mutex<(MemState, u64)>,
    }

    #[tonic::async_trait]
    impl ControlPlane for MemCluster {
        async fn write(&self, req: Request) -> Result<(u64, Response), ClusterError> {
            let mut guard = self.state.lock().unwrap();
            guard.1 += 1;
            let index = guard.1;
            let response = raft::apply::apply(&guard.0, &req, index)
                .map_err(|e| ClusterError::Internal(e.to_string()))?;
            Ok((index, response))
        }
        async fn read_barrier(&self, _: Consistency) -> Result<(), ClusterError> {
            Ok(())
        }
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ClusterError> {
            Ok(self.state.lock().unwrap().0.map.borrow().get(key).cloned())
        }
        fn scan(
            &self,
            prefix: &[u8],
            _after: Option<&[u8]>,
            limit: usize,
        ) -> Result<raft::store::RawRows, ClusterError> {
            let guard = self.state.lock().unwrap();
            let map = guard.0.map.borrow();
            Ok(map
                .range(prefix.to_vec()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .take(limit)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect())
        }
        async fn status(&self) -> Result<ClusterStatus, ClusterError> {
            Err(ClusterError::Unsupported("status".into()))
        }
        async fn join(&self, _: JoinRequest) -> Result<JoinResponse, ClusterError> {
            Err(ClusterError::Unsupported("join".into()))
        }
        async fn console(&self, _: &str) -> Result<api::control::ConsoleStream, ClusterError> {
            Err(ClusterError::Unsupported("console".into()))
        }
        fn ready(&self) -> bool {
            true
        }
        fn metrics_text(&self) -> String {
            String::new()
        }
        fn subscribe(&self) -> tokio::sync::broadcast::Receiver<raft::store::Applied> {
            tokio::sync::broadcast::channel(1).1
        }
    }

    /// A peer site whose feed is a list of (index, change) and whose head can move back (as
    /// after a restore), or which is unreachable.
    /// (head, feed of (index, change), cut off).
    type PeerState = (u64, Vec<(u64, CatalogChange)>, bool);

    #[derive(Default)]
    struct FakePeer {
        feed: Mutex<PeerState>,
        /// The addresses the peer reports (none: the link is left alone).
        addrs: Mutex<Vec<String>>,
    }

    impl FakePeer {
        fn set(&self, head: u64, feed: Vec<(u64, CatalogChange)>) {
            *self.feed.lock().unwrap() = (head, feed, false);
        }
        fn cut(&self) {
            self.feed.lock().unwrap().2 = true;
        }
    }

    #[tonic::async_trait]
    impl ChangeSource for FakePeer {
        async fn changes(
            &self,
            link: &SiteLink,
            since: u64,
            _limit: u32,
        ) -> Result<(ChangesReply, Duration), CallError> {
            let (head, feed, cut) = self.feed.lock().unwrap().clone();
            if cut {
                return Err(CallError::Unreachable {
                    site: link.site.id.clone(),
                    last: "refused".into(),
                });
            }
            let changes = if since > head {
                vec![]
            } else {
                feed.iter()
                    .filter(|(i, _)| *i > since)
                    .map(|(_, c)| serde_json::to_vec(c).unwrap())
                    .collect()
            };
            let reply = ChangesReply {
                to: since.max(head),
                more: false,
                head,
                changes,
                addrs: self.addrs.lock().unwrap().clone(),
            };
            Ok((reply, Duration::from_millis(3)))
        }
    }

    fn tenant(id: &str) -> (u64, CatalogChange) {
        let t = Tenant {
            id: id.into(),
            name: id.into(),
            quota: Quota::default(),
            usage: Default::default(),
            created_at: 0,
            updated_at: 0,
            version: 0,
        };
        (
            0,
            CatalogChange {
                key: format!("t/{id}"),
                object: Some(CatalogObject::Tenant(t)),
            },
        )
    }

    fn at(index: u64, (_, c): (u64, CatalogChange)) -> (u64, CatalogChange) {
        (index, c)
    }

    fn keys(cp: &MemCluster) -> Vec<String> {
        let prefix = fed::catalog_prefix("bbbbbb");
        cp.scan(&prefix, None, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
            .collect()
    }

    #[tokio::test]
    async fn pulls_commit_changes_heartbeats_resets_and_failures_once() {
        let cp = Arc::new(MemCluster::default());
        let peer = Arc::new(FakePeer::default());
        let link = SiteLink {
            site: SiteIdentity {
                id: "bbbbbb".into(),
                name: "b".into(),
            },
            ca_cert_pem: String::new(),
            addrs: vec!["127.0.0.1:1".into()],
            created_at: 0,
            updated_at: 0,
        };
        let (_, r) = cp
            .write(Request::new(
                1,
                "test",
                Command::LinkSite {
                    link: link.clone(),
                    token: None,
                },
            ))
            .await
            .unwrap();
        assert_eq!(r, Response::Ok);
        let metrics = Arc::new(SyncMetrics::default());
        let syncer = Syncer::new(
            cp.clone(),
            peer.clone(),
            SyncConfig::default(),
            metrics.clone(),
            "node:1".into(),
        );

        // A first pull brings the peer's objects and its index.
        peer.set(
            10,
            vec![at(4, tenant("bbbbbb-t1")), at(7, tenant("bbbbbb-t2"))],
        );
        assert!(syncer.pull(&link, false).await.unwrap());
        assert_eq!(keys(&cp), ["t/bbbbbb-t1", "t/bbbbbb-t2"]);
        assert_eq!(syncer.sync_state("bbbbbb").unwrap().index, 10);
        // Nothing new: nothing committed unless a heartbeat is due.
        peer.set(
            12,
            vec![at(4, tenant("bbbbbb-t1")), at(7, tenant("bbbbbb-t2"))],
        );
        assert!(!syncer.pull(&link, false).await.unwrap());
        assert_eq!(syncer.sync_state("bbbbbb").unwrap().index, 10);
        assert!(syncer.pull(&link, true).await.unwrap());
        let sync = syncer.sync_state("bbbbbb").unwrap();
        assert_eq!((sync.index, sync.head, sync.latency_ms), (12, 12, 3));

        // The peer was restored to an older state: everything is pulled again from zero and
        // what it no longer has leaves our catalog.
        peer.set(5, vec![at(2, tenant("bbbbbb-t3"))]);
        assert!(syncer.pull(&link, false).await.unwrap());
        assert_eq!(keys(&cp), ["t/bbbbbb-t3"]);
        assert_eq!(syncer.sync_state("bbbbbb").unwrap().index, 5);

        // Unreachable: recorded once however many attempts fail, cleared by the next success.
        peer.cut();
        for _ in 0..3 {
            syncer.pull_and_record(&link).await;
        }
        assert_eq!(metrics.failures(), 3);
        assert_eq!(metrics.failures_recorded.load(Ordering::Relaxed), 1);
        let sync = syncer.sync_state("bbbbbb").unwrap();
        assert_eq!(
            sync.error.as_deref(),
            Some("site b is unreachable at 127.0.0.1:1")
        );
        peer.set(6, vec![at(6, tenant("bbbbbb-t4"))]);
        syncer.pull_and_record(&link).await;
        let sync = syncer.sync_state("bbbbbb").unwrap();
        assert_eq!((sync.index, sync.error), (6, None));
        assert!(metrics
            .render()
            .contains("novacron_federation_lag_entries{site=\"bbbbbb\"} 0"));

        // The peer grew a node: the link follows its addresses.
        *peer.addrs.lock().unwrap() = vec!["127.0.0.1:2".into(), "127.0.0.1:1".into()];
        assert!(syncer.pull(&link, true).await.unwrap());
        let stored: SiteLink =
            raft::codec::decode(&cp.get(&fed::link_key("bbbbbb")).unwrap().unwrap()).unwrap();
        assert_eq!(stored.addrs, ["127.0.0.1:1", "127.0.0.1:2"]);
    }
}
