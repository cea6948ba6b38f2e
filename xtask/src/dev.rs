//! `cargo xtask dev`: from a fresh machine to a running local cluster in one command.
//!
//! Installs the Debian packages the build needs (as root; see `ci::install_packages`),
//! builds `novacron` in the dev profile (the one CI uses, so nothing is built twice), then runs
//! `novacron dev up` in the foreground; Ctrl-C stops the cluster.
//!
//! With `--vms` it also installs libvirt, QEMU and iproute2 and builds the tiny test guest, which
//! the nodes then offer as image `tiny`: run as root, `dev up` gives each node its own libvirt
//! host and the VMs are real.

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
    /// Also install libvirt, QEMU and iproute2 and build the tiny guest (image `tiny`), so that,
    /// as root, each node gets its own libvirt host and runs real VMs.
    #[arg(long)]
    vms: bool,
}

/// What per-node libvirt hosts need on top of the build packages.
const VM_PACKAGES: &[&str] = &[
    "libvirt-daemon",
    "libvirt-daemon-driver-qemu",
    "libvirt-clients",
    "qemu-system-x86",
    "iproute2",
];

pub(crate) fn run(args: &DevArgs) -> Result<()> {
    if !args.no_install {
        let mut packages = crate::ci::BUILD_PACKAGES.to_vec();
        if args.vms {
            packages.extend_from_slice(VM_PACKAGES);
        }
        crate::ci::install_packages(&packages)?;
    }
    run_inherit(crate::cargo().args(["build", "-p", "node"])).context("building novacron")?;
    let bin = crate::target_dir().join("debug/novacron");
    let mut cmd = std::process::Command::new(bin);
    if args.vms {
        let guest = crate::guest::ensure().context("building the tiny guest")?;
        // A guest the user chose already wins.
        for (key, path) in [
            ("NOVACRON_GUEST_KERNEL", &guest.kernel),
            ("NOVACRON_GUEST_INITRD", &guest.initrd),
        ] {
            if std::env::var_os(key).is_none() {
                cmd.env(key, path);
            }
        }
    }
    run_inherit(cmd.args([
        "dev",
        "up",
        "--nodes",
        &args.nodes.to_string(),
        "--base-port",
        &args.base_port.to_string(),
    ]))
}
