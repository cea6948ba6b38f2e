//! `cargo xtask bench vm`: how long a VM takes from `POST /api/v1/vms` to state `running`, for
//! rounds of concurrent creates on a 3-node cluster, first on libvirt's test driver (the control
//! plane alone: Raft, placement, agent, reports) and then on real QEMU with the tiny guest (when
//! a libvirtd answers or can be started and the guest can be built).
//!
//! Each create is timed by its own client: the POST goes to member `k mod 3`, then the client
//! reads the VM from that member every 50 ms (a local read, so polling does not load the leader)
//! until it is `running`. Between rounds every VM is deleted and gone, so rounds do not pile up.
//! The results go into the "VM lifecycle" section of `docs/benchmarks.md`, between markers, so
//! the other benchmarks' sections of that file are kept.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use reqwest::Client;
use serde_json::{json, Value};

use super::novacron::Novacron;

/// Markers around this benchmark's section of the shared report file.
pub(crate) const BEGIN: &str = "<!-- vm-lifecycle:begin -->";
pub(crate) const END: &str = "<!-- vm-lifecycle:end -->";

const POLL: Duration = Duration::from_millis(50);
/// A VM not running after this long counts as failed (TCG guests on a busy 2-core machine).
const VM_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Drivers {
    Both,
    Test,
    Qemu,
}

#[derive(Args)]
pub(crate) struct VmArgs {
    /// Concurrent creates per round on the test driver.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 10, 50])]
    counts: Vec<usize>,
    /// Concurrent creates per round on real QEMU; a 2-core machine runs few TCG guests at once.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 3])]
    qemu_counts: Vec<usize>,
    /// Rounds per count; every VM of every round is one sample.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, value_enum, default_value = "both")]
    only: Drivers,
    /// Use this novacron binary instead of building one with `cargo build --release -p node`.
    #[arg(long)]
    novacron_bin: Option<PathBuf>,
    /// Where to write the report (default: docs/benchmarks.md in the workspace).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The samples of one (driver, concurrency) pair.
struct Row {
    driver: &'static str,
    concurrency: usize,
    took: Vec<Duration>,
    failed: usize,
    first_error: Option<String>,
}

/// What one driver run produced, or why it did not run.
struct DriverReport {
    driver: &'static str,
    rows: Vec<Row>,
    error: Option<String>,
}

pub(crate) fn run_vm(args: &VmArgs) -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| crate::workspace_root().join("docs").join("benchmarks.md"));
    let binary = match &args.novacron_bin {
        Some(path) if path.exists() => path.clone(),
        Some(path) => bail!("{} does not exist", path.display()),
        None => super::novacron::build()?,
    };
    // A debug build is what a busy machine can afford; the report says which one ran.
    let profile = if binary.components().any(|c| c.as_os_str() == "debug") {
        "debug build"
    } else {
        "release build"
    };
    let version = format!("{} ({profile})", super::novacron::version(&binary));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let tmp = tempfile::Builder::new()
        .prefix("novacron-bench-vm-")
        .tempdir()
        .context("creating the data directory")?;

    let mut reports = Vec::new();
    if args.only != Drivers::Qemu {
        let env = vec![(
            "NOVACRON_LIBVIRT_URI".to_owned(),
            "test:///default".to_owned(),
        )];
        let dir = tmp.path().join("test");
        reports.push(runtime.block_on(run_driver(
            "test driver",
            &binary,
            &dir,
            env,
            &args.counts,
            args.rounds,
        )));
    }
    if args.only != Drivers::Test {
        let report = match qemu_env() {
            Ok(env) => {
                let dir = tmp.path().join("qemu");
                runtime.block_on(run_driver(
                    "QEMU (TCG), tiny guest",
                    &binary,
                    &dir,
                    env,
                    &args.qemu_counts,
                    args.rounds,
                ))
            }
            Err(e) => DriverReport {
                driver: "QEMU (TCG), tiny guest",
                rows: Vec::new(),
                error: Some(format!("not run: {e:#}")),
            },
        };
        reports.push(report);
    }

    let section = render(&reports, args, &version);
    let old = std::fs::read_to_string(&out).unwrap_or_default();
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&out, replace_section(&old, &section))
        .with_context(|| format!("writing {}", out.display()))?;
    println!("{section}");
    println!("written to {}", out.display());
    if reports.iter().any(|r| {
        r.error
            .as_deref()
            .is_some_and(|e| !e.starts_with("not run"))
    }) {
        let kept = tmp.keep();
        eprintln!("data and logs kept in {}", kept.display());
        bail!("the VM benchmark failed");
    }
    Ok(())
}

/// The environment that points every node at the system libvirtd and the tiny guest, starting
/// libvirtd and building the guest if needed.
fn qemu_env() -> Result<Vec<(String, String)>> {
    crate::libvirtd::ensure().context("no libvirtd for real VMs")?;
    let guest = crate::guest::ensure().context("cannot build the tiny guest")?;
    Ok(vec![
        (
            "NOVACRON_LIBVIRT_URI".to_owned(),
            "qemu:///system".to_owned(),
        ),
        (
            "NOVACRON_GUEST_KERNEL".to_owned(),
            guest.kernel.to_string_lossy().into_owned(),
        ),
        (
            "NOVACRON_GUEST_INITRD".to_owned(),
            guest.initrd.to_string_lossy().into_owned(),
        ),
        // KVM is a shim on these machines that hangs Linux guests (ENVIRONMENT.md).
        ("NOVACRON_DOMAIN_TYPE".to_owned(), "qemu".to_owned()),
    ])
}

async fn run_driver(
    driver: &'static str,
    binary: &Path,
    dir: &Path,
    env: Vec<(String, String)>,
    counts: &[usize],
    rounds: usize,
) -> DriverReport {
    let mut report = DriverReport {
        driver,
        rows: Vec::new(),
        error: None,
    };
    let mut created = Vec::new();
    let outcome = async {
        std::fs::create_dir_all(dir)?;
        println!("{driver}: starting a 3-node cluster");
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let cluster = Novacron::start_with_env(binary, dir, &env).await?;
        let client = super::load::http_client(64)?;
        let run_id = super::run_id();
        for &count in counts {
            let mut row = Row {
                driver,
                concurrency: count,
                took: Vec::new(),
                failed: 0,
                first_error: None,
            };
            for r in 0..rounds {
                let prefix = format!("b{run_id}-{count}-{r}");
                let results = round(&client, &cluster, count, &prefix, &mut created).await;
                for res in results {
                    match res {
                        Ok(d) => row.took.push(d),
                        Err(e) => {
                            row.failed += 1;
                            row.first_error.get_or_insert(format!("{e:#}"));
                        }
                    }
                }
                clean_up(&client, &cluster, &mut created).await?;
            }
            row.took.sort();
            println!(
                "{driver}: {count} concurrent: {} ok, {} failed, p50 {:?}, max {:?}",
                row.took.len(),
                row.failed,
                quantile(&row.took, 0.5),
                row.took.last()
            );
            report.rows.push(row);
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    if let Err(e) = outcome {
        eprintln!("{driver}: {e:#}");
        report.error = Some(format!("{e:#}"));
    }
    // Domains outlive their nodes in a real libvirtd: remove what a failed run left behind.
    for id in created {
        let name = format!("nc-{id}");
        let virsh = |cmd: &str| {
            let _ = std::process::Command::new("virsh")
                .args(["-c", "qemu:///system", cmd, &name])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        };
        if env.iter().any(|(_, v)| v == "qemu:///system") {
            virsh("destroy");
            virsh("undefine");
        }
    }
    report
}

/// `count` concurrent creates; each result is the time from POST to `running`.
async fn round(
    client: &Client,
    cluster: &Novacron,
    count: usize,
    prefix: &str,
    created: &mut Vec<String>,
) -> Vec<Result<Duration>> {
    let urls = cluster.urls();
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..count {
        let (client, token) = (client.clone(), cluster.token().to_owned());
        let url = urls[k % urls.len()].clone();
        let name = format!("{prefix}-{k}");
        tasks.spawn(async move { create_and_wait(&client, &url, &token, &name).await });
    }
    let mut out = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((id, result)) => {
                created.extend(id);
                out.push(result);
            }
            Err(e) => out.push(Err(anyhow::anyhow!("client task failed: {e}"))),
        }
    }
    out
}

/// Creates one VM and waits until it runs; returns its id (when created) and the time taken.
async fn create_and_wait(
    client: &Client,
    url: &str,
    token: &str,
    name: &str,
) -> (Option<String>, Result<Duration>) {
    let start = Instant::now();
    let body = json!({"name": name, "vcpus": 1, "memory_mib": 128, "image": "tiny"});
    let created = async {
        let resp = client
            .post(format!("{url}/api/v1/vms"))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or_default();
        if status.as_u16() != 202 {
            bail!("POST /api/v1/vms: HTTP {status}: {v}");
        }
        v["vm"]["id"]
            .as_str()
            .map(str::to_owned)
            .context("the answer has no VM id")
    }
    .await;
    let id = match created {
        Ok(id) => id,
        Err(e) => return (None, Err(e)),
    };
    let waited = async {
        loop {
            let v: Value = client
                .get(format!("{url}/api/v1/vms/{id}?consistency=stale"))
                .bearer_auth(token)
                .send()
                .await?
                .json()
                .await?;
            match v["state"].as_str() {
                Some("running") => return Ok(start.elapsed()),
                Some("failed") => bail!("VM {id} failed: {v}"),
                _ => {}
            }
            if start.elapsed() > VM_TIMEOUT {
                bail!("VM {id} not running after {VM_TIMEOUT:?}: {v}");
            }
            tokio::time::sleep(POLL).await;
        }
    }
    .await;
    (Some(id), waited)
}

/// Deletes every VM of the round and waits until their records are gone.
async fn clean_up(client: &Client, cluster: &Novacron, created: &mut Vec<String>) -> Result<()> {
    let url = &cluster.urls()[0];
    let token = cluster.token();
    for id in created.iter() {
        client
            .delete(format!("{url}/api/v1/vms/{id}"))
            .bearer_auth(token)
            .send()
            .await?;
    }
    let deadline = Instant::now() + VM_TIMEOUT;
    for id in created.iter() {
        loop {
            let status = client
                .get(format!("{url}/api/v1/vms/{id}"))
                .bearer_auth(token)
                .send()
                .await?
                .status();
            if status.as_u16() == 404 {
                break;
            }
            if Instant::now() > deadline {
                bail!("VM {id} was not deleted within {VM_TIMEOUT:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }
    created.clear();
    Ok(())
}

/// Nearest-rank quantile of sorted samples.
fn quantile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".to_owned(), |d| {
        format!("{:.0}", d.as_secs_f64() * 1000.0)
    })
}

fn render(reports: &[DriverReport], args: &VmArgs, version: &str) -> String {
    let mut s = String::new();
    s.push_str(BEGIN);
    s.push_str("\n## VM lifecycle: POST /api/v1/vms to state running\n\n");
    let date = crate::process::output_of(
        std::process::Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]),
    )
    .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    s.push_str(&format!(
        "Generated by `cargo xtask bench vm --rounds {}` on {date} with {version}; load average (1, 5, 15 min) when written: {}.\n\n",
        args.rounds,
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    ));
    s.push_str(
        "- A 3-node cluster on loopback. Each round sends N creates at once (client k to member k mod 3) \
         and times each VM from its POST until a read of that member shows `running` (polled every 50 ms, \
         so figures are rounded up by up to 50 ms). Every VM is deleted before the next round.\n\
         - `running` is the state the node's agent reports once libvirt runs the domain (for QEMU: the \
         process started, not the guest booted).\n\
         - test driver: libvirt's in-process fake hypervisor; what is measured is the control plane \
         (Raft commit, placement, the agent's reconcile pass, the report back through Raft).\n\
         - QEMU: the tiny guest (kernel + busybox initramfs, 128 MiB) under TCG on the system libvirtd. \
         The 2-core machine runs few TCG guests at once, so QEMU is measured with smaller counts.\n\n",
    );
    s.push_str(
        "| driver | concurrent creates | VMs timed | p50 (ms) | p99 (ms) | max (ms) | failed |\n",
    );
    s.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    for r in reports {
        for row in &r.rows {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                row.driver,
                row.concurrency,
                row.took.len(),
                ms(quantile(&row.took, 0.5)),
                ms(quantile(&row.took, 0.99)),
                ms(row.took.last().copied()),
                row.failed
            ));
        }
    }
    s.push('\n');
    for r in reports {
        if let Some(e) = &r.error {
            s.push_str(&format!("- {}: {e}\n", r.driver));
        }
        for row in &r.rows {
            if let Some(e) = &row.first_error {
                s.push_str(&format!(
                    "- {} at {}: first failure: {e}\n",
                    row.driver, row.concurrency
                ));
            }
        }
    }
    s.push_str(END);
    s.push('\n');
    s
}

/// `old` with its VM lifecycle section replaced by `section`, or `section` appended.
pub(crate) fn replace_section(old: &str, section: &str) -> String {
    match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if e > b => {
            let after = &old[e + END.len()..];
            format!("{}{}{}", &old[..b], section.trim_end_matches('\n'), after)
        }
        _ if old.trim().is_empty() => section.to_owned(),
        _ => format!("{}\n\n{section}", old.trim_end()),
    }
}

/// The VM lifecycle section of `old`, if any, to carry over when another benchmark rewrites
/// the file.
pub(crate) fn section_of(old: &str) -> Option<&str> {
    let b = old.find(BEGIN)?;
    let e = old.find(END)?;
    (e > b).then(|| &old[b..e + END.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_is_replaced_in_place_or_appended() {
        let section = format!("{BEGIN}\nnew\n{END}\n");
        assert_eq!(replace_section("", &section), section);
        let appended = replace_section("# Raft\n", &section);
        assert_eq!(appended, format!("# Raft\n\n{section}"));
        let old = format!("# Raft\n\n{BEGIN}\nold\n{END}\n\n## After\n");
        let replaced = replace_section(&old, &section);
        assert_eq!(
            replaced,
            format!("# Raft\n\n{BEGIN}\nnew\n{END}\n\n## After\n")
        );
        assert_eq!(
            section_of(&replaced),
            Some(format!("{BEGIN}\nnew\n{END}").as_str())
        );
    }

    #[test]
    fn quantiles_use_nearest_rank() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&d, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(quantile(&d, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
