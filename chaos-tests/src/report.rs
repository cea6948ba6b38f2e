//! The report of a chaos run: operations by outcome, latencies, each checker's verdict and the
//! faults applied, as readable text and as JSON, written under `target/chaos/`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::checker::{CheckResult, Verdict};
use crate::history::{Func, Operation, Outcome};
use crate::nemesis::FaultEvent;

/// Errors writing a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot create the report directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode the report as JSON")]
    Encode(#[from] serde_json::Error),
}

/// Latency percentiles of completed operations, in nanoseconds (nearest rank).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Latency {
    pub count: usize,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
}

impl Latency {
    /// `None` when there is no sample.
    pub fn of(mut samples: Vec<u64>) -> Option<Latency> {
        samples.sort_unstable();
        let max_ns = *samples.last()?;
        let rank = |p: usize| {
            // Nearest rank: the smallest sample with at least p% of samples at or below it.
            let index = (samples.len() * p).div_ceil(100).max(1) - 1;
            samples[index.min(samples.len() - 1)]
        };
        Some(Latency {
            count: samples.len(),
            p50_ns: rank(50),
            p99_ns: rank(99),
            max_ns,
        })
    }
}

/// Counts and latencies of a history.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OperationStats {
    pub total: usize,
    /// Outcome -> count.
    pub by_outcome: BTreeMap<String, usize>,
    /// Function -> outcome -> count.
    pub by_function: BTreeMap<String, BTreeMap<String, usize>>,
    /// Latency of `ok` operations.
    pub ok_latency: Option<Latency>,
}

impl OperationStats {
    pub fn of(ops: &[Operation]) -> Self {
        let mut stats = OperationStats {
            total: ops.len(),
            ..Default::default()
        };
        for op in ops {
            *stats
                .by_outcome
                .entry(op.outcome.as_str().into())
                .or_default() += 1;
            *stats
                .by_function
                .entry(op.f.as_str().into())
                .or_default()
                .entry(op.outcome.as_str().into())
                .or_default() += 1;
        }
        stats.ok_latency = Latency::of(
            ops.iter()
                .filter(|op| op.outcome == Outcome::Ok)
                .filter_map(Operation::latency_ns)
                .collect(),
        );
        stats
    }
}

/// Everything a run reports.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// The scenario, for example `kill-leader-3-nodes`; also the file name.
    pub name: String,
    /// The seed of the fault schedule and workload, to replay the run.
    pub seed: Option<u64>,
    pub duration_ns: u64,
    pub operations: OperationStats,
    pub checks: Vec<CheckResult>,
    pub faults: Vec<FaultEvent>,
}

fn ms(ns: u64) -> String {
    format!("{:.1} ms", ns as f64 / 1e6)
}

fn secs(ns: u64) -> String {
    format!("{:.3}s", ns as f64 / 1e9)
}

impl RunReport {
    /// Fails if any checker failed; unknown if any could not decide.
    pub fn verdict(&self) -> Verdict {
        self.checks
            .iter()
            .fold(Verdict::Pass, |acc, c| acc.and(c.verdict))
    }

    /// The readable report.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; the results are ignored for that reason.
        let _ = writeln!(out, "chaos run {}: {}", self.name, self.verdict().as_str());
        if let Some(seed) = self.seed {
            let _ = writeln!(out, "seed {seed}");
        }
        let _ = writeln!(out, "duration {}", secs(self.duration_ns));
        let _ = writeln!(out, "\noperations: {}", self.operations.total);
        let outcomes = [Outcome::Ok, Outcome::Fail, Outcome::Info];
        let _ = writeln!(out, "  {:<8} {:>8} {:>8} {:>8}", "f", "ok", "fail", "info");
        for f in Func::ALL {
            let Some(counts) = self.operations.by_function.get(f.as_str()) else {
                continue;
            };
            let n = |o: Outcome| counts.get(o.as_str()).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "  {:<8} {:>8} {:>8} {:>8}",
                f.as_str(),
                n(outcomes[0]),
                n(outcomes[1]),
                n(outcomes[2])
            );
        }
        match self.operations.ok_latency {
            Some(l) => {
                let _ = writeln!(
                    out,
                    "  latency of ok operations: p50 {}, p99 {}, max {} ({} samples)",
                    ms(l.p50_ns),
                    ms(l.p99_ns),
                    ms(l.max_ns),
                    l.count
                );
            }
            None => {
                let _ = writeln!(out, "  no operation completed");
            }
        }
        let _ = writeln!(out, "\nfaults: {}", self.faults.len());
        for fault in &self.faults {
            let _ = writeln!(out, "  {}", fault.describe());
        }
        let _ = writeln!(out, "\nchecks:");
        for check in &self.checks {
            let _ = writeln!(
                out,
                "  {:<14} {:<8} {}",
                check.checker,
                check.verdict.as_str(),
                check.summary
            );
            for line in &check.details {
                let _ = writeln!(out, "      {line}");
            }
        }
        out
    }

    pub fn to_json(&self) -> Result<String, ReportError> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// Writes `<name>.txt` and `<name>.json` into `dir` (created if needed); returns both paths.
    pub fn write_to(&self, dir: &Path) -> Result<(PathBuf, PathBuf), ReportError> {
        std::fs::create_dir_all(dir).map_err(|source| ReportError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let stem: String = self
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let text = dir.join(format!("{stem}.txt"));
        let json = dir.join(format!("{stem}.json"));
        let write = |path: &PathBuf, body: String| {
            std::fs::write(path, body).map_err(|source| ReportError::Write {
                path: path.clone(),
                source,
            })
        };
        write(&text, self.to_text())?;
        write(&json, self.to_json()?)?;
        Ok((text, json))
    }
}

/// `target/chaos/` of this workspace, honouring `CARGO_TARGET_DIR`.
pub fn default_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // The crate sits one level below the workspace root.
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .unwrap_or(Path::new("."))
                .join("target")
        });
    target.join("chaos")
}
