//! `novacron-chaos`: the chaos tiers from the command line; `cargo xtask chaos` builds and calls
//! it. Without a subcommand it runs the fast tier against real `novacron` processes; `sim` runs
//! seeds of the deterministic simulation; `long` runs the long tier's scenarios. Each prints
//! its report and exits non-zero unless every check passes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use chaos_tests::checker::Verdict;
use chaos_tests::long;
use chaos_tests::run::{self, RunConfig};
use chaos_tests::sim::{self, SimConfig};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "novacron-chaos", about = "NovaCron chaos tiers")]
struct Args {
    #[command(subcommand)]
    tier: Option<Tier>,
    /// Seed of the fault schedule and the workload (random when absent; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// How long faults are injected.
    #[arg(long, default_value_t = 60)]
    duration_secs: u64,
    /// Cluster size.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// The novacron binary (the real-process tiers need it).
    #[arg(long, env = "NOVACRON_BIN", global = true)]
    bin: Option<PathBuf>,
    /// Where the report, the history and the node data go (default: target/chaos/).
    #[arg(long, global = true)]
    out_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Tier {
    /// Seeds of the deterministic simulation (no processes, no network, simulated time).
    Sim {
        /// Replay this one seed (prints its summary; with --trace, its whole event trace).
        #[arg(long)]
        seed: Option<u64>,
        /// How many consecutive seeds to run, starting at --first.
        #[arg(long, default_value_t = 50)]
        seeds: u64,
        #[arg(long, default_value_t = 0)]
        first: u64,
        /// Cluster size (3 or 5 drawn from each seed when absent).
        #[arg(long)]
        nodes: Option<usize>,
        /// Simulated seconds of faults per seed.
        #[arg(long, default_value_t = 12)]
        fault_secs: u64,
        /// Write the whole event trace of a replayed seed to this file.
        #[arg(long)]
        trace: Option<PathBuf>,
    },
    /// The long tier: one real-process scenario per fault class on 5 nodes.
    Long {
        #[arg(long)]
        seed: Option<u64>,
        /// Seconds of faults per scenario.
        #[arg(long, default_value_t = 20)]
        duration_secs: u64,
        #[arg(long, default_value_t = 5)]
        nodes: usize,
        /// Run only the scenarios whose name contains this.
        #[arg(long)]
        only: Option<String>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.tier {
        Some(Tier::Sim {
            seed,
            seeds,
            first,
            nodes,
            fault_secs,
            trace,
        }) => run_sim(seed, seeds, first, nodes, fault_secs, trace),
        Some(Tier::Long {
            seed,
            duration_secs,
            nodes,
            only,
        }) => run_long(&args.bin, &args.out_dir, seed, duration_secs, nodes, only),
        None => run_fast(args),
    }
}

fn run_sim(
    seed: Option<u64>,
    seeds: u64,
    first: u64,
    nodes: Option<usize>,
    fault_secs: u64,
    trace: Option<PathBuf>,
) -> ExitCode {
    let config = SimConfig {
        nodes,
        fault_phase: Duration::from_secs(fault_secs),
        keep_trace: trace.is_some(),
        ..SimConfig::default()
    };
    let list: Vec<u64> = match seed {
        Some(s) => vec![s],
        None => (first..first.saturating_add(seeds)).collect(),
    };
    let mut failed = Vec::new();
    for s in &list {
        match sim::run_seed(*s, &config) {
            Ok(outcome) => {
                print!("{}", outcome.summary());
                if let (Some(path), Some(lines)) = (&trace, &outcome.trace) {
                    let text = lines.join("\n") + "\n";
                    if let Err(e) = std::fs::write(path, text) {
                        eprintln!("error: cannot write the trace to {}: {e}", path.display());
                    }
                }
                if outcome.verdict() != Verdict::Pass {
                    failed.push(*s);
                }
            }
            Err(e) => {
                eprintln!("sim seed {s}: error: {:#}", anyhow::Error::from(e));
                failed.push(*s);
            }
        }
    }
    println!(
        "simulation: {} seeds, {} failed{}",
        list.len(),
        failed.len(),
        if failed.is_empty() {
            String::new()
        } else {
            format!(" {failed:?}; replay with `cargo xtask chaos sim --seed S`")
        }
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run_long(
    bin: &Option<PathBuf>,
    out_dir: &Option<PathBuf>,
    seed: Option<u64>,
    duration_secs: u64,
    nodes: usize,
    only: Option<String>,
) -> ExitCode {
    let Some(bin) = bin else {
        eprintln!("error: --bin (or NOVACRON_BIN) is required for the long tier");
        return ExitCode::FAILURE;
    };
    let out_dir = out_dir
        .clone()
        .unwrap_or_else(chaos_tests::report::default_dir);
    let seed = seed.unwrap_or_else(rand::random);
    let duration = Duration::from_secs(duration_secs);
    println!(
        "chaos long tier: seed {seed}, {nodes} nodes, {duration_secs}s of faults per scenario"
    );
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let results = runtime.block_on(long::run_all(
        bin,
        &out_dir,
        seed,
        nodes,
        duration,
        only.as_deref(),
    ));
    let text = long::summary(&results, seed, nodes, duration);
    println!("{text}");
    match long::write_summary(&out_dir, &text) {
        Ok(path) => println!("summary: {}", path.display()),
        Err(e) => eprintln!("error: cannot write the summary: {e}"),
    }
    if results.iter().all(|r| r.verdict() == Verdict::Pass) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run_fast(args: Args) -> ExitCode {
    let Some(bin) = args.bin else {
        eprintln!("error: --bin (or NOVACRON_BIN) is required for the real-process tier");
        return ExitCode::FAILURE;
    };
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut config = RunConfig::fast(bin, seed, Duration::from_secs(args.duration_secs));
    config.nodes = args.nodes;
    if let Some(dir) = args.out_dir {
        config.out_dir = dir;
    }
    println!(
        "chaos fast tier: seed {seed}, {} nodes, {}s of faults",
        config.nodes, args.duration_secs
    );
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run::run(&config)) {
        Ok(outcome) => {
            println!("{}", outcome.report.to_text());
            println!("report: {}", outcome.text_path.display());
            println!("history: {}", outcome.history_path.display());
            if outcome.report.verdict() == Verdict::Pass {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}
