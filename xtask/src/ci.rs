//! `cargo xtask ci`: everything CI checks, in order, each step timed, stopping at the first failure.
//!
//! Steps: Debian prerequisites (only as root), `cargo fmt --check`, clippy with `-D warnings`,
//! a system libvirtd for the tests that need one, then the tests (nextest when installed) in the
//! dev profile only, so CI compiles the workspace once.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;

use crate::process::{is_root, output_of, run_inherit, succeeds_within};

/// Debian packages the build and the tests need: libvirt headers for the `virt` crate, a libvirtd
/// with its QEMU driver, the tools the chaos and migration tests drive, and etcd for the bench.
/// `qemu-utils` is deliberately absent: a newer one is installed and naming it breaks apt.
const DEBIAN_PACKAGES: &[&str] = &[
    "libvirt-dev",
    "pkg-config",
    "libvirt-daemon",
    "libvirt-daemon-driver-qemu",
    "libvirt-clients",
    "qemu-system-x86",
    "socat",
    "busybox-static",
    "nftables",
    "etcd-server",
    // Headless browser tests of the dashboard.
    "chromium",
    "chromium-driver",
];

/// The libvirt URI handed to the tests through `NOVACRON_LIBVIRT_URI`.
const LIBVIRT_URI: &str = "qemu:///system";

#[derive(Args)]
pub(crate) struct CiArgs {
    /// Skip installing Debian packages even when running as root.
    #[arg(long)]
    no_install: bool,
    /// Run every step even after one fails (the default stops at the first failure).
    #[arg(long)]
    keep_going: bool,
}

/// A named step of the CI run.
type Step = (&'static str, Box<dyn Fn() -> Result<()>>);

struct StepResult {
    name: &'static str,
    took: Duration,
    outcome: Result<()>,
}

pub(crate) fn run(args: &CiArgs) -> Result<()> {
    let started = Instant::now();
    let mut results: Vec<StepResult> = Vec::new();
    let nextest = has_nextest();

    let mut steps: Vec<Step> = Vec::new();
    if !args.no_install {
        steps.push(("prerequisites", Box::new(install_prerequisites)));
    }
    steps.push((
        "fmt",
        Box::new(|| run_inherit(crate::cargo().args(["fmt", "--all", "--check"]))),
    ));
    steps.push((
        "clippy",
        Box::new(|| {
            run_inherit(crate::cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        }),
    ));
    steps.push(("libvirtd", Box::new(crate::libvirtd::ensure)));
    steps.push(("guest", Box::new(|| crate::guest::ensure().map(|_| ()))));
    if nextest {
        steps.push((
            "tests (nextest)",
            Box::new(|| {
                run_inherit(
                    crate::cargo()
                        .args(["nextest", "run", "--workspace", "--no-tests=pass"])
                        .envs(test_env()),
                )
            }),
        ));
        // nextest does not run doctests; cargo test does them in the same dev profile.
        steps.push((
            "doctests",
            Box::new(|| {
                run_inherit(
                    crate::cargo()
                        .args(["test", "--workspace", "--doc"])
                        .envs(test_env()),
                )
            }),
        ));
    } else {
        steps.push((
            "tests",
            Box::new(|| {
                run_inherit(
                    crate::cargo()
                        .args(["test", "--workspace"])
                        .envs(test_env()),
                )
            }),
        ));
    }

    for (name, step) in &steps {
        println!("==> ci step: {name}");
        let t0 = Instant::now();
        let outcome = step();
        let took = t0.elapsed();
        match &outcome {
            Ok(()) => println!("==> ci step: {name}: ok in {:.1} s", took.as_secs_f64()),
            Err(e) => println!(
                "==> ci step: {name}: FAILED in {:.1} s: {e:#}",
                took.as_secs_f64()
            ),
        }
        let failed = outcome.is_err();
        results.push(StepResult {
            name,
            took,
            outcome,
        });
        if failed && !args.keep_going {
            break;
        }
    }

    println!("==> ci summary");
    for r in &results {
        let status = if r.outcome.is_ok() { "ok" } else { "FAILED" };
        println!(
            "    {:<16} {:>8.1} s  {status}",
            r.name,
            r.took.as_secs_f64()
        );
    }
    let total = started.elapsed().as_secs_f64();
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| r.outcome.is_err())
        .map(|r| r.name)
        .collect();
    if !failed.is_empty() {
        println!(
            "ci: FAILED ({}) after {total:.1} s ({} of {} steps run)",
            failed.join(", "),
            results.len(),
            steps.len()
        );
        bail!("ci failed: {}", failed.join(", "));
    }
    println!("ci: all {} steps passed in {total:.1} s", results.len());
    Ok(())
}

/// What the tests that need real libvirt and the test guest read from the environment.
fn test_env() -> Vec<(String, String)> {
    let dir = crate::guest::dir();
    vec![
        ("NOVACRON_LIBVIRT_URI".into(), LIBVIRT_URI.into()),
        (
            "NOVACRON_GUEST_KERNEL".into(),
            dir.join("vmlinuz").display().to_string(),
        ),
        (
            "NOVACRON_GUEST_INITRD".into(),
            dir.join("initrd.gz").display().to_string(),
        ),
        ("NOVACRON_GUEST_MARKER".into(), crate::guest::MARKER.into()),
        (
            "NOVACRON_LIBVIRTD_RESTART_CMD".into(),
            crate::libvirtd::RESTART_CMD.into(),
        ),
    ]
}

fn has_nextest() -> bool {
    succeeds_within(
        crate::cargo().args(["nextest", "--version"]),
        Duration::from_secs(30),
    )
}

/// Whether dpkg reports `package` as installed.
fn dpkg_installed(package: &str) -> bool {
    output_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_ok_and(|status| status.ends_with("install ok installed"))
}

/// Installs the missing Debian packages in one apt transaction; only as root on Debian, because a
/// developer's own machine is theirs to manage.
/// What building `novacron` needs: libvirt's headers for the `virt` crate.
pub(crate) const BUILD_PACKAGES: &[&str] = &["libvirt-dev", "pkg-config"];

fn install_prerequisites() -> Result<()> {
    install_packages(DEBIAN_PACKAGES)
}

/// Installs the missing ones of `packages` with apt (as root on Debian; otherwise says so).
pub(crate) fn install_packages(packages: &[&str]) -> Result<()> {
    if !Path::new("/etc/debian_version").exists() {
        println!("not Debian: skipping package installation");
        return Ok(());
    }
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    let mut missing = missing;
    // qemu-img usually comes with the machine (newer than Debian's); install it only if absent
    // and the VM tooling is wanted.
    if packages.contains(&"qemu-system-x86")
        && !succeeds_within(
            Command::new("qemu-img").arg("--version"),
            Duration::from_secs(10),
        )
    {
        missing.push("qemu-utils");
    }
    if missing.is_empty() {
        println!("all {} packages already installed", packages.len());
        return Ok(());
    }
    if !is_root() {
        println!("not root: not installing missing packages {missing:?}");
        return Ok(());
    }
    println!("installing {missing:?}");
    run_inherit(
        Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    run_inherit(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
