//! Raft metrics in Prometheus form: term, leader changes, log, commit and apply progress, apply
//! lag and the latency of durable writes. Updated from openraft's metrics channel.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, Registry, TextEncoder};

#[derive(Clone)]
pub struct RaftMetrics {
    registry: Registry,
    pub term: IntGauge,
    pub leader_changes: IntCounter,
    pub is_leader: IntGauge,
    pub last_log_index: IntGauge,
    pub commit_index: IntGauge,
    pub last_applied: IntGauge,
    pub apply_lag: IntGauge,
    pub snapshot_index: IntGauge,
    pub purged_index: IntGauge,
    pub voters: IntGauge,
    pub learners: IntGauge,
    /// Time from proposing a command to its commit and apply (append + quorum fsync + apply).
    pub write_seconds: Histogram,
    pub forwarded_writes: IntCounter,
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("static metric definition");
    let _ = registry.register(Box::new(g.clone()));
    g
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("static metric definition");
    let _ = registry.register(Box::new(c.clone()));
    c
}

impl RaftMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let write_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "novacron_raft_write_seconds",
                "Latency of durable writes: propose to committed and applied",
            )
            .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16).expect("static buckets")),
        )
        .expect("static metric definition");
        let _ = registry.register(Box::new(write_seconds.clone()));
        Self {
            term: gauge(&registry, "novacron_raft_term", "Current Raft term"),
            leader_changes: counter(
                &registry,
                "novacron_raft_leader_changes_total",
                "Times this node saw the leader change",
            ),
            is_leader: gauge(
                &registry,
                "novacron_raft_is_leader",
                "1 when this node leads",
            ),
            last_log_index: gauge(&registry, "novacron_raft_last_log_index", "Last log index"),
            commit_index: gauge(
                &registry,
                "novacron_raft_commit_index",
                "Highest index known committed (the applied index on followers)",
            ),
            last_applied: gauge(
                &registry,
                "novacron_raft_last_applied",
                "Last applied index",
            ),
            apply_lag: gauge(
                &registry,
                "novacron_raft_apply_lag",
                "Log entries appended but not yet applied",
            ),
            snapshot_index: gauge(
                &registry,
                "novacron_raft_snapshot_index",
                "Last snapshot index",
            ),
            purged_index: gauge(
                &registry,
                "novacron_raft_purged_index",
                "Last log index removed by compaction",
            ),
            voters: gauge(
                &registry,
                "novacron_raft_voters",
                "Voters in the membership",
            ),
            learners: gauge(
                &registry,
                "novacron_raft_learners",
                "Learners in the membership",
            ),
            forwarded_writes: counter(
                &registry,
                "novacron_raft_forwarded_writes_total",
                "Writes this node forwarded to the leader",
            ),
            write_seconds,
            registry,
        }
    }

    /// Adds a metric owned elsewhere (the store's append histogram) to this registry.
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) {
        if let Err(e) = self.registry.register(c) {
            tracing::warn!(error = %e, "metric registration failed");
        }
    }

    pub fn observe(
        &self,
        m: &openraft::RaftMetrics<u64, raft::Member>,
        previous_leader: &mut Option<u64>,
    ) {
        self.term.set(m.current_term as i64);
        if m.current_leader != *previous_leader {
            if m.current_leader.is_some() {
                self.leader_changes.inc();
            }
            *previous_leader = m.current_leader;
        }
        self.is_leader
            .set(i64::from(m.current_leader == Some(m.id)));
        let last_log = m.last_log_index.unwrap_or(0);
        let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
        self.last_log_index.set(last_log as i64);
        self.last_applied.set(applied as i64);
        self.commit_index.set(applied as i64);
        self.apply_lag.set(last_log.saturating_sub(applied) as i64);
        self.snapshot_index
            .set(m.snapshot.map(|l| l.index).unwrap_or(0) as i64);
        self.purged_index
            .set(m.purged.map(|l| l.index).unwrap_or(0) as i64);
        let membership = m.membership_config.membership();
        let voters = membership.voter_ids().count();
        let learners = membership.learner_ids().count();
        self.voters.set(voters as i64);
        self.learners.set(learners as i64);
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for RaftMetrics {
    fn default() -> Self {
        Self::new()
    }
}
