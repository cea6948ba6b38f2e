//! `novacron-chaos`: runs the fast tier against real `novacron` processes and prints the report;
//! exits non-zero unless every checker passes. `cargo xtask chaos` builds and calls it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use chaos_tests::checker::Verdict;
use chaos_tests::run::{self, RunConfig};
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "novacron-chaos",
    about = "NovaCron fast chaos tier on real processes"
)]
struct Args {
    /// Seed of the fault schedule and the workload (random when absent; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// How long faults are injected.
    #[arg(long, default_value_t = 60)]
    duration_secs: u64,
    /// Cluster size.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// The novacron binary.
    #[arg(long, env = "NOVACRON_BIN")]
    bin: PathBuf,
    /// Where the report, the history and the node data go (default: target/chaos/).
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut config = RunConfig::fast(args.bin, seed, Duration::from_secs(args.duration_secs));
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
