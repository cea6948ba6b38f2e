//! Prometheus metrics of the migrations this node transferred as their source: how many ended
//! how, how long they took, the guest's downtime and the bytes moved, by mode (`live`,
//! `handoff`).

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

#[derive(Clone)]
pub struct MigrationMetrics {
    pub outcomes: IntCounterVec,
    pub total_seconds: HistogramVec,
    pub downtime_seconds: HistogramVec,
    pub bytes: IntCounterVec,
}

impl Default for MigrationMetrics {
    fn default() -> Self {
        let secs = |name: &str, help: &str, start: f64| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(
                    prometheus::exponential_buckets(start, 2.0, 14).expect("static buckets"),
                ),
                &["mode"],
            )
            .expect("static metric definition")
        };
        MigrationMetrics {
            outcomes: IntCounterVec::new(
                Opts::new(
                    "novacron_migrations_total",
                    "Migrations this node transferred as source, by outcome and mode",
                ),
                &["outcome", "mode"],
            )
            .expect("static metric definition"),
            total_seconds: secs(
                "novacron_migration_seconds",
                "Total time of a migration's transfer",
                0.05,
            ),
            downtime_seconds: secs(
                "novacron_migration_downtime_seconds",
                "Time the guest was paused at the switch-over",
                0.005,
            ),
            bytes: IntCounterVec::new(
                Opts::new(
                    "novacron_migration_bytes_total",
                    "Bytes moved by migrations from this node",
                ),
                &["mode"],
            )
            .expect("static metric definition"),
        }
    }
}

impl MigrationMetrics {
    /// Every collector, for registration in the node's registry.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.outcomes.clone()),
            Box::new(self.total_seconds.clone()),
            Box::new(self.downtime_seconds.clone()),
            Box::new(self.bytes.clone()),
        ]
    }
}
