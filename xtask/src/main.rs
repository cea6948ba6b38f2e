//! `cargo xtask`: the one automation entry point of the workspace.
//!
//! - `ci`: prerequisites, format, lints, a libvirtd for the tests, tests; what `.ci/run` calls.
//! - `dev`: install prerequisites, build, and run `novacron dev up`.
//! - `guest`: build the tiny test guest from Debian packages.
//! - `libvirtd`: start a system libvirtd by hand when none answers (containers have no systemd).
//! - `bench raft`: NovaCron's replicated write path against an etcd cluster on the same machine.
//! - `bench vm`: time from `POST /api/v1/vms` to running, on the test driver and real QEMU.
//! - `bench scheduler`: placements per second, alone and committed through Raft.
//! - `schemathesis`: schemathesis against one live node from the committed OpenAPI document.
//! - `chaos`: the chaos tiers: fast (kill, pause, partition, loss on a real 3-node cluster), `sim`
//!   (seeds of the deterministic simulation) and `long` (one scenario per fault class, 5 nodes).
//! - `axe`: fetch the pinned axe-core the dashboard's accessibility tests inject.
//! - `bench web`: every dashboard page's server time on a 3-node cluster with 1,000 VMs.
//! - `package`: the Debian package (`dpkg-deb` from a staged tree); `deploy-check` installs it
//!   and validates the deployment manifests offline (a CI step).
//!
//! xtask depends on no crate of ours on purpose: it must build in seconds and keep working while
//! the product does not compile.

mod axe;
mod bench;
mod chaos;
mod ci;
mod dev;
mod guest;
mod libvirtd;
mod package;
mod process;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "NovaCron workspace automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install prerequisites (as root on Debian), then fmt, clippy and the tests; what CI runs.
    Ci(ci::CiArgs),
    /// Start a system libvirtd (qemu:///system) by hand unless one already answers.
    Libvirtd,
    /// Install what the build needs (as root on Debian), build the binary and start a local
    /// cluster: the one command to try NovaCron on a fresh machine.
    Dev(dev::DevArgs),
    /// Build the tiny test guest (Debian cloud kernel + busybox initramfs) in target/guest.
    Guest,
    /// The chaos tiers (fast by default, `sim`, `long`); prints reports, writes them under target/chaos/.
    Chaos(chaos::ChaosArgs),
    /// Fetch the pinned axe-core (npm) that the dashboard's accessibility tests inject.
    Axe,
    /// Schemathesis (from PyPI) against one live node from api/openapi.json; also a CI step.
    Schemathesis,
    /// Build the Debian package of the node (binary, systemd unit, example config).
    Package(package::PackageArgs),
    /// Validate the deployment manifests offline; as root, install the package and start a
    /// single-node cluster from it. Also a CI step.
    DeployCheck,
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Durable writes and leader failover of a 3-node NovaCron cluster, with etcd as the anchor.
    Raft(bench::RaftArgs),
    /// Server time of every dashboard page on a 3-node cluster with 1,000 VMs, from a follower.
    Web(bench::web::WebArgs),
    /// Time from POST /api/v1/vms to running, for concurrent creates, on the test driver and QEMU.
    Vm(bench::VmArgs),
    /// Placements per second: the scheduler alone, and committed through a 3-node cluster.
    Scheduler(bench::SchedulerArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Ci(args) => ci::run(&args),
        Command::Libvirtd => libvirtd::ensure(),
        Command::Dev(args) => dev::run(&args),
        Command::Guest => guest::ensure().map(|_| ()),
        Command::Chaos(args) => chaos::run(&args),
        Command::Axe => axe::ensure().map(|_| ()),
        Command::Schemathesis => ci::schemathesis(),
        Command::Package(args) => package::run(&args),
        Command::DeployCheck => package::deploy_check(),
        Command::Bench {
            which: BenchCommand::Raft(args),
        } => bench::run_raft(&args),
        Command::Bench {
            which: BenchCommand::Web(args),
        } => bench::web::run(&args),
        Command::Bench {
            which: BenchCommand::Vm(args),
        } => bench::run_vm(&args),
        Command::Bench {
            which: BenchCommand::Scheduler(args),
        } => bench::run_scheduler(&args),
    };
    // One line with the cause chain; returning the error from main would print a backtrace too
    // whenever RUST_BACKTRACE is set, burying the message.
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root: xtask lives one folder below it.
pub(crate) fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .unwrap_or(manifest_dir)
}

/// Where cargo puts build outputs: `CARGO_TARGET_DIR` when set, else `<root>/target`.
pub(crate) fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// The cargo that runs us (`CARGO` is set by `cargo run`), so nested builds use the same toolchain.
pub(crate) fn cargo() -> std::process::Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(workspace_root());
    cmd
}
