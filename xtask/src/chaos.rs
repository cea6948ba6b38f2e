//! `cargo xtask chaos`: the fast chaos tier against real `novacron` processes.
//!
//! Builds the product binary and the chaos runner, makes sure `nft` exists (installing Debian's
//! `nftables` as root when it is missing: partitions and packet loss are nftables rules), then
//! runs `novacron-chaos`, which prints the report and writes it under `target/chaos/`. The
//! runner lives in the `chaos-tests` crate so xtask keeps depending on no crate of ours.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;

use crate::process::{is_root, run_inherit, succeeds_within};

#[derive(Args)]
pub(crate) struct ChaosArgs {
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

pub(crate) fn run(args: &ChaosArgs) -> Result<()> {
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
