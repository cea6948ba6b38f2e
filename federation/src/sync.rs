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
use raft::store::StateReader;
use raft::{Command, RejectCode, Request, Response};
use tokio::sync::watch;

use crate::client::{CallError, Peers};

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
    pub reader: StateReader,
    pub cp: Arc<dyn ControlPlane>,
    pub peers: Arc<Peers>,
    pub config: SyncConfig,
    pub metrics: Arc<SyncMetrics>,
    /// When this node last committed a pull of each site (cleared when leadership is lost).
    last_commit: Mutex<HashMap<String, Instant>>,
    actor: String,
}

impl Syncer {
    pub fn new(
        reader: StateReader,
        cp: Arc<dyn ControlPlane>,
        peers: Arc<Peers>,
        config: SyncConfig,
        metrics: Arc<SyncMetrics>,
        actor: String,
    ) -> Self {
        Syncer {
            reader,
            cp,
            peers,
            config,
            metrics,
            last_commit: Mutex::new(HashMap::new()),
            actor,
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
        let stored = self
            .reader
            .get::<SiteSync>(&fed::sync_key(&link.site.id))
            .ok()
            .flatten()
            .unwrap_or_default();
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

    /// Our catalog keys of `site` (object keys at the site), as this replica holds them.
    fn catalog_keys(&self, site: &str) -> Result<Vec<String>, PullError> {
        let prefix = fed::catalog_prefix(site);
        let rows = self
            .reader
            .scan_raw(&prefix, None, usize::MAX)
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
        let mut from = self
            .reader
            .get::<SiteSync>(&fed::sync_key(site))
            .map_err(|e| PullError::Store(e.to_string()))?
            .unwrap_or_default()
            .index;
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
        let links = crate::server::links_of(&syncer.reader);
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
