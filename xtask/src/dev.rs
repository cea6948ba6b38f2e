//! `cargo xtask dev`: from a fresh machine to a running local cluster in one command.
//!
//! Installs the Debian packages the build needs (as root; see `ci::install_packages`),
//! builds `novacron` in the dev profile (the one CI uses, so nothing is built twice), then runs
//! `novacron dev up` in the foreground; Ctrl-C stops the cluster.

use anyhow::{Context, Result};
use clap::Args;

use crate::process::run_inherit;

#[derive(Args)]
pub(crate) struct DevArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// API of node i on base-port + i, QUIC on base-port + 100 + i.
    #[arg(long, default_value_t = 8080)]
    base_port: u16,
    /// Skip installing Debian packages.
    #[arg(long)]
    no_install: bool,
}

pub(crate) fn run(args: &DevArgs) -> Result<()> {
    if !args.no_install {
        crate::ci::install_packages(crate::ci::BUILD_PACKAGES)?;
    }
    run_inherit(crate::cargo().args(["build", "-p", "node"])).context("building novacron")?;
    let bin = crate::target_dir().join("debug/novacron");
    run_inherit(std::process::Command::new(bin).args([
        "dev",
        "up",
        "--nodes",
        &args.nodes.to_string(),
        "--base-port",
        &args.base_port.to_string(),
    ]))
}
