//! `cargo xtask bench raft` (and `bench vm`, in `vm.rs`): NovaCron's durable write path and leader failover, measured in the
//! same run as a 3-member etcd cluster on the same machine, so the numbers have an anchor.
//!
//! For each system: start 3 members on loopback (free ports found by binding port 0), run the
//! closed-loop write load at each concurrency, then kill the leader with SIGKILL a number of
//! times and time the first successful write through a survivor. Results go to
//! `docs/benchmarks.md`. Every server is a child process killed at the end (also on errors), and
//! all data lives in a temporary directory.

mod etcd;
mod load;
mod member;
mod novacron;
mod report;
mod scheduler;
mod vm;
pub(crate) mod web;

pub(crate) use scheduler::{run as run_scheduler, SchedulerArgs};
pub(crate) use vm::{run_vm, VmArgs};

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use load::WriteTarget;
use member::Member;
use report::SystemReport;

/// The concurrencies measured: one client (pure latency), a moderate and a heavy load.
const CONCURRENCIES: [usize; 3] = [1, 50, 500];
/// How long a restarted member may take to be back before the trial fails.
const RESTART_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Systems {
    Both,
    Novacron,
    Etcd,
}

#[derive(Args)]
pub(crate) struct RaftArgs {
    /// Short runs (3 s per concurrency, 5 failover trials) to check that everything works.
    #[arg(long)]
    quick: bool,
    /// Seconds of load per concurrency (default 10, or 3 with --quick).
    #[arg(long)]
    duration_secs: Option<u64>,
    /// Leader-kill trials per system (default 20, or 5 with --quick).
    #[arg(long)]
    trials: Option<usize>,
    /// Which systems to measure; the other column of the report reads "not run".
    #[arg(long, value_enum, default_value = "both")]
    only: Systems,
    /// Use this novacron binary instead of building one with `cargo build --release -p node`.
    #[arg(long)]
    novacron_bin: Option<PathBuf>,
    /// Where to write the report (default: docs/benchmarks.md in the workspace).
    #[arg(long)]
    out: Option<PathBuf>,
}

impl RaftArgs {
    /// The options that change what is measured, as they would be typed.
    fn command_line(&self) -> String {
        let mut line = "cargo xtask bench raft".to_owned();
        if self.quick {
            line.push_str(" --quick");
        }
        if let Some(secs) = self.duration_secs {
            line.push_str(&format!(" --duration-secs {secs}"));
        }
        if let Some(trials) = self.trials {
            line.push_str(&format!(" --trials {trials}"));
        }
        match self.only {
            Systems::Both => {}
            Systems::Novacron => line.push_str(" --only novacron"),
            Systems::Etcd => line.push_str(" --only etcd"),
        }
        line
    }
}

/// A 3-member cluster the benchmark can load, kill and restart.
pub(crate) trait BenchCluster {
    fn name(&self) -> &'static str;
    fn members(&mut self) -> &mut [Member];
    /// How to send one durable write to any member.
    fn target(&self) -> WriteTarget;
    /// The index of the member that is the leader now.
    async fn leader(&mut self) -> Result<usize>;
    /// Waits until every member is up and all agree on one leader.
    async fn wait_healthy(&mut self, timeout: Duration) -> Result<()>;
}

pub(crate) fn run_raft(args: &RaftArgs) -> Result<()> {
    // reqwest is built without a default TLS provider; install ring once (see ENVIRONMENT.md),
    // even though the benchmark itself only speaks plain HTTP on loopback.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let duration =
        Duration::from_secs(
            args.duration_secs
                .unwrap_or(if args.quick { 3 } else { 10 }),
        );
    let trials = args.trials.unwrap_or(if args.quick { 5 } else { 20 });
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| crate::workspace_root().join("docs").join("benchmarks.md"));

    // Build first, before any server runs, so the compiler does not compete with the measurement.
    let novacron_binary = match args.only {
        Systems::Etcd => None,
        Systems::Both | Systems::Novacron => Some(match &args.novacron_bin {
            Some(path) if path.exists() => Ok(path.clone()),
            Some(path) => Err(anyhow::anyhow!("{} does not exist", path.display())),
            None => novacron::build(),
        }),
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let tmp = tempfile::Builder::new()
        .prefix("novacron-bench-")
        .tempdir()
        .context("creating the data directory")?;

    let mut novacron_report = SystemReport::new("NovaCron");
    let mut etcd_report = SystemReport::new("etcd");
    let run_id = run_id();

    if args.only != Systems::Etcd {
        let outcome = match novacron_binary {
            Some(Ok(binary)) => {
                novacron_report.version = novacron::version(&binary);
                runtime.block_on(async {
                    let dir = tmp.path().join("novacron");
                    std::fs::create_dir_all(&dir)?;
                    let mut cluster = novacron::Novacron::start(&binary, &dir).await?;
                    measure(
                        &mut cluster,
                        &mut novacron_report,
                        duration,
                        trials,
                        &run_id,
                    )
                    .await
                })
            }
            Some(Err(e)) => Err(e),
            None => Ok(()),
        };
        if let Err(e) = outcome {
            eprintln!("NovaCron: {e:#}");
            novacron_report.error = Some(format!("{e:#}"));
        }
    } else {
        novacron_report.error = Some("not run (--only etcd)".to_owned());
    }

    if args.only != Systems::Novacron {
        etcd_report.version = etcd::version();
        let outcome = runtime.block_on(async {
            let dir = tmp.path().join("etcd");
            std::fs::create_dir_all(&dir)?;
            let mut cluster = etcd::Etcd::start(&dir).await?;
            measure(&mut cluster, &mut etcd_report, duration, trials, &run_id).await
        });
        if let Err(e) = outcome {
            eprintln!("etcd: {e:#}");
            etcd_report.error = Some(format!("{e:#}"));
        }
    } else {
        etcd_report.error = Some("not run (--only novacron)".to_owned());
    }

    let settings = report::Settings {
        duration,
        trials,
        command: args.command_line(),
    };
    let mut markdown = report::render(&novacron_report, &etcd_report, &settings);
    // The dashboard's section is written by `bench web`: keep it across this rewrite.
    let previous = std::fs::read_to_string(&out).unwrap_or_default();
    if let Some(dashboard) = web::section_of(&previous, web::SECTION) {
        markdown = web::replace_section(&markdown, web::SECTION, &dashboard);
    }
    // And the VM lifecycle section of `bench vm`.
    if let Some(section) = vm::section_of(&previous) {
        markdown = format!("{}\n\n{section}\n", markdown.trim_end());
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // The scheduler's section belongs to `bench scheduler`; keep it across this rewrite.
    let markdown = match std::fs::read_to_string(&out) {
        Ok(old) => match old.find(scheduler::SECTION) {
            Some(start) => scheduler::replace_section(&markdown, &old[start..]),
            None => markdown,
        },
        Err(_) => markdown,
    };
    std::fs::write(&out, &markdown).with_context(|| format!("writing {}", out.display()))?;
    println!("{markdown}");
    println!("written to {}", out.display());

    let failed: Vec<&str> = [&novacron_report, &etcd_report]
        .into_iter()
        .filter(|r| r.failed())
        .map(|r| r.name)
        .collect();
    if !failed.is_empty() {
        // Keep the servers' data and logs for a post-mortem instead of deleting them.
        let kept = tmp.keep();
        eprintln!("data and logs kept in {}", kept.display());
        anyhow::bail!("the benchmark failed for {}", failed.join(" and "));
    }
    Ok(())
}

/// Load at each concurrency, then the failover trials; results accumulate in `report` so a
/// failure part-way still reports what was measured before it.
async fn measure<C: BenchCluster>(
    cluster: &mut C,
    report: &mut SystemReport,
    duration: Duration,
    trials: usize,
    run_id: &str,
) -> Result<()> {
    let target = cluster.target();
    for concurrency in CONCURRENCIES {
        println!(
            "{}: {concurrency} clients for {} s",
            cluster.name(),
            duration.as_secs()
        );
        let summary = load::run(
            &target,
            concurrency,
            duration,
            &format!("b{run_id}-c{concurrency}"),
        )
        .await?;
        println!(
            "{}: {concurrency} clients: {:.0} writes/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
            cluster.name(),
            summary.throughput(),
            summary.hist.value_at_quantile(0.5) as f64 / 1000.0,
            summary.hist.value_at_quantile(0.99) as f64 / 1000.0,
            summary.errors
        );
        report.loads.push(summary);
    }

    for trial in 0..trials {
        cluster.wait_healthy(RESTART_TIMEOUT).await?;
        let leader = cluster.leader().await?;
        let survivors: Vec<usize> = (0..cluster.members().len())
            .filter(|&i| i != leader)
            .collect();
        let killed_at = Instant::now();
        cluster.members()[leader].kill()?;
        let took = load::time_to_first_write(
            &target,
            &survivors,
            killed_at,
            &format!("f{run_id}-t{trial}"),
        )
        .await?;
        match took {
            Some(t) => println!(
                "{}: trial {}/{trials}: killed {}, first write after {:.0} ms",
                cluster.name(),
                trial + 1,
                cluster.members()[leader].name,
                t.as_secs_f64() * 1000.0
            ),
            None => println!(
                "{}: trial {}/{trials}: killed {}, no write succeeded within {:?}",
                cluster.name(),
                trial + 1,
                cluster.members()[leader].name,
                load::FAILOVER_DEADLINE
            ),
        }
        report.failover.push(took);
        cluster.members()[leader].start()?;
    }
    cluster.wait_healthy(RESTART_TIMEOUT).await?;
    Ok(())
}

/// A short id that makes this run's keys and tenant names unique (base 36 of the clock).
pub(crate) fn run_id() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let mut n = millis % 36u128.pow(6);
    let mut out = Vec::new();
    for _ in 0..6 {
        let digit = u32::try_from(n % 36).unwrap_or(0);
        out.push(char::from_digit(digit, 36).unwrap_or('0'));
        n /= 36;
    }
    out.iter().rev().collect()
}
