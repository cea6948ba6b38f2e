//! `cargo xtask ci`: everything CI checks, in order, each step timed, stopping at the first failure.
//!
//! Steps: Debian prerequisites (only as root), `cargo fmt --check`, clippy with `-D warnings`,
//! a system libvirtd for the tests that need one, then the tests (nextest when installed) in the
//! dev profile only, so CI compiles the workspace once, then schemathesis against one live node
//! from the committed OpenAPI document, then the deployment check (manifests validated offline,
//! the Debian package installed and started). As root, the live-migration tests
//! (`node/tests/it/real_migration.rs`) start their own libvirt hosts in namespaces next to the
//! system libvirtd; they read the same guest variables as the real-VM tests.

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
    // The deployment check polls the packaged node over HTTP.
    "curl",
    "nftables",
    // fdatasync failures injected by the durability test and the chaos long tier.
    "fiu-utils",
    // Network namespaces and the bridge of the separate libvirt hosts (migration tests, dev up).
    "iproute2",
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
    // The accessibility engine the dashboard's browser tests inject (npm, pinned).
    steps.push(("axe-core", Box::new(|| crate::axe::ensure().map(|_| ()))));
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

    // After the tests, so a broken build or a failing unit shows first.
    steps.push(("schemathesis", Box::new(schemathesis)));
    steps.push(("deploy", Box::new(crate::package::deploy_check)));

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
        // The browser tests: axe-core to inject, and the binary the workspace test run builds,
        // which the dashboard's end-to-end test starts as a real 3-node cluster.
        (
            "NOVACRON_AXE_JS".into(),
            crate::axe::script().display().to_string(),
        ),
        (
            "NOVACRON_E2E_BIN".into(),
            crate::target_dir()
                .join("debug")
                .join("novacron")
                .display()
                .to_string(),
        ),
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

/// The schemathesis release CI installs; pinned so a new release cannot change what passes.
const SCHEMATHESIS_VERSION: &str = "4.32.5";

/// Operations schemathesis does not call: the event stream and the console never end, logout
/// would revoke the credential the run uses, and removing the only node ends the cluster.
const SCHEMATHESIS_EXCLUDED: &[&str] = &[
    "/api/v1/events",
    "/api/v1/vms/{id}/console",
    "/api/v1/auth/logout",
    "/api/v1/nodes/{id}",
];

/// Kills the node when the step ends, however it ends.
struct NodeGuard(std::process::Child);

impl Drop for NodeGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Schemathesis against one live node from the committed `api/openapi.json`: no server error,
/// and every response matches the documented schema. The node runs on libvirt's test driver.
pub(crate) fn schemathesis() -> Result<()> {
    use anyhow::Context;

    run_inherit(Command::new("python3").args([
        "-m",
        "pip",
        "install",
        "--quiet",
        &format!("schemathesis=={SCHEMATHESIS_VERSION}"),
    ]))?;
    run_inherit(crate::cargo().args(["build", "-p", "node", "--bin", "novacron"]))?;
    let bin = crate::target_dir().join("debug").join("novacron");
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("n1");
    let password = format!("schemathesis-{}", std::process::id());
    let log = std::fs::File::create(dir.path().join("node.log"))?;
    let child = Command::new(&bin)
        .args(["serve", "--init", "--name", "n1", "--data-dir"])
        .arg(&data)
        .args(["--api-addr", "127.0.0.1:0", "--peer-addr", "127.0.0.1:0"])
        .env("NOVACRON_ADMIN_PASSWORD", &password)
        .env("NOVACRON_LIBVIRT_URI", "test:///default")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let _node = NodeGuard(child);

    let mut addr = String::new();
    crate::process::wait_for("node.json", Duration::from_secs(60), || {
        let text = std::fs::read_to_string(data.join("node.json")).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        match v["api_addr"].as_str() {
            Some(a) => {
                addr = a.to_string();
                true
            }
            None => false,
        }
    })?;
    let url = format!("http://{addr}");
    let key = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(api_key(&url, &password))?;

    let spec = crate::workspace_root().join("api").join("openapi.json");
    let mut cmd = Command::new("schemathesis");
    // Schemathesis keeps a `.schemathesis/` cache in its working directory: not in the tree.
    cmd.current_dir(dir.path())
        .arg("run")
        .arg(&spec)
        .args(["--url", &url])
        .args(["-H", &format!("Authorization: Bearer {key}")])
        .args([
            "--checks",
            "not_a_server_error,response_schema_conformance",
            "--max-examples",
            "25",
            "--request-timeout",
            "10",
            // Fixed seed: a failure CI reports reproduces locally.
            "--generation-deterministic",
        ]);
    for path in SCHEMATHESIS_EXCLUDED {
        cmd.args(["--exclude-path", path]);
    }
    let outcome = run_inherit(&mut cmd);
    if outcome.is_err() {
        let log = std::fs::read_to_string(dir.path().join("node.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        for line in tail.iter().rev() {
            eprintln!("node: {line}");
        }
    }
    outcome
}

/// Waits until the node is ready, logs in as admin and creates an admin API key for the run:
/// unlike a login token, a key outlives the JWT key rotations schemathesis itself triggers.
async fn api_key(url: &str, password: &str) -> Result<String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    loop {
        ticker.tick().await;
        let ready = http.get(format!("{url}/readyz")).send().await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the node at {url} did not become ready within 60 s");
        }
    }
    let login: serde_json::Value = http
        .post(format!("{url}/api/v1/auth/login"))
        .json(&serde_json::json!({"username": "admin", "password": password}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let token = login["token"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no token in {login}"))?;
    let created: serde_json::Value = http
        .post(format!("{url}/api/v1/api-keys"))
        .bearer_auth(token)
        .json(&serde_json::json!({"name": "schemathesis"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    created["key"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("no key in {created}"))
}
