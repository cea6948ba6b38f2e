//! `cargo xtask chaos`: the chaos tiers.
//!
//! - `cargo xtask chaos [--seed S] [--duration-secs N]`: the fast tier against real `novacron`
//!   processes;
//! - `cargo xtask chaos sim [--seeds N] [--seed S]`: seeds of the deterministic simulation
//!   (`--seed` replays one; `--trace FILE` writes its whole event trace);
//! - `cargo xtask chaos long [--only NAME]`: the long tier, one real-process scenario per fault
//!   class on 5 nodes.
//!
//! The real-process tiers build the product binary and the chaos runner and make sure `nft`
//! exists (installing Debian's `nftables` as root when it is missing: partitions and packet loss
//! are nftables rules), and for the long tier `fiu-run` (Debian's `fiu-utils`, for failing
//! fsync); the simulation needs only the runner. `novacron-chaos` prints the
//! report and writes it under `target/chaos/`. The runner lives in the `chaos-tests` crate so
//! xtask keeps depending on no crate of ours.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};

use crate::process::{is_root, run_inherit, succeeds_within};

#[derive(Args)]
pub(crate) struct ChaosArgs {
    #[command(subcommand)]
    tier: Option<Tier>,
    /// Seed of the fault schedule and workload (random when absent; the report prints it).
    #[arg(long)]
    seed: Option<u64>,
    /// How long faults are injected.
    #[arg(long, default_value_t = 60)]
    duration_secs: u64,
    /// Cluster size.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
}

#[derive(Subcommand)]
enum Tier {
    /// Seeds of the deterministic simulation tier.
    Sim {
        /// Replay this one seed.
        #[arg(long)]
        seed: Option<u64>,
        /// How many seeds to run (from --first).
        #[arg(long, default_value_t = 50)]
        seeds: u64,
        #[arg(long, default_value_t = 0)]
        first: u64,
        /// Write the whole event trace of the replayed seed here.
        #[arg(long)]
        trace: Option<std::path::PathBuf>,
    },
    /// The long tier: one real-process scenario per fault class on 5 nodes.
    Long {
        #[arg(long)]
        seed: Option<u64>,
        /// Seconds of faults per scenario.
        #[arg(long, default_value_t = 20)]
        duration_secs: u64,
        /// Only the scenarios whose name contains this.
        #[arg(long)]
        only: Option<String>,
    },
}

fn nft_works() -> bool {
    succeeds_within(
        Command::new("nft").args(["list", "tables"]),
        Duration::from_secs(10),
    )
}

fn ensure_nft() -> Result<()> {
    if nft_works() {
        return Ok(());
    }
    if !is_root() {
        bail!("the chaos tier needs root and nftables (partitions and loss are nft rules)");
    }
    if !Path::new("/etc/debian_version").exists() {
        bail!("nft is missing; install nftables");
    }
    println!("installing nftables");
    run_inherit(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends", "nftables"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    if !nft_works() {
        bail!("nft still does not work after installing nftables");
    }
    Ok(())
}

/// The long tier's fsync-failure scenario runs nodes under `fiu-run` (Debian `fiu-utils`).
fn ensure_fiu() -> Result<()> {
    let present = succeeds_within(
        Command::new("sh").args(["-c", "command -v fiu-run && command -v fiu-ctrl"]),
        Duration::from_secs(10),
    );
    if present {
        return Ok(());
    }
    if !is_root() || !Path::new("/etc/debian_version").exists() {
        bail!("the long tier needs fiu-run and fiu-ctrl; install fiu-utils");
    }
    println!("installing fiu-utils");
    run_inherit(
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "fiu-utils",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn build_runner() -> Result<std::path::PathBuf> {
    run_inherit(crate::cargo().args(["build", "-p", "chaos-tests", "--bin", "novacron-chaos"]))?;
    Ok(crate::target_dir().join("debug").join("novacron-chaos"))
}

pub(crate) fn run(args: &ChaosArgs) -> Result<()> {
    match &args.tier {
        Some(Tier::Sim {
            seed,
            seeds,
            first,
            trace,
        }) => {
            let mut cmd = Command::new(build_runner()?);
            cmd.arg("sim")
                .arg("--seeds")
                .arg(seeds.to_string())
                .arg("--first")
                .arg(first.to_string());
            if let Some(seed) = seed {
                cmd.arg("--seed").arg(seed.to_string());
            }
            if let Some(trace) = trace {
                cmd.arg("--trace").arg(trace);
            }
            return run_inherit(&mut cmd);
        }
        Some(Tier::Long {
            seed,
            duration_secs,
            only,
        }) => {
            ensure_nft()?;
            ensure_fiu()?;
            run_inherit(crate::cargo().args(["build", "-p", "node", "--bin", "novacron"]))?;
            let runner = build_runner()?;
            let mut cmd = Command::new(runner);
            cmd.arg("long")
                .arg("--bin")
                .arg(crate::target_dir().join("debug").join("novacron"))
                .arg("--out-dir")
                .arg(crate::target_dir().join("chaos"))
                .arg("--duration-secs")
                .arg(duration_secs.to_string());
            if let Some(seed) = seed {
                cmd.arg("--seed").arg(seed.to_string());
            }
            if let Some(only) = only {
                cmd.arg("--only").arg(only);
            }
            return run_inherit(&mut cmd);
        }
        None => {}
    }
    ensure_nft()?;
    // Two builds, not one: building both packages in one invocation unifies their dependency
    // features differently from `cargo build -p node`, which recompiles much of the tree.
    run_inherit(crate::cargo().args(["build", "-p", "node", "--bin", "novacron"]))?;
    run_inherit(crate::cargo().args(["build", "-p", "chaos-tests", "--bin", "novacron-chaos"]))?;
    let bin_dir = crate::target_dir().join("debug");
    let mut cmd = Command::new(bin_dir.join("novacron-chaos"));
    cmd.arg("--bin")
        .arg(bin_dir.join("novacron"))
        .arg("--duration-secs")
        .arg(args.duration_secs.to_string())
        .arg("--nodes")
        .arg(args.nodes.to_string())
        .arg("--out-dir")
        .arg(crate::target_dir().join("chaos"));
    if let Some(seed) = args.seed {
        cmd.arg("--seed").arg(seed.to_string());
    }
    run_inherit(&mut cmd)
}
