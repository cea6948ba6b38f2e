//! `novacron dev up`: a local N-node cluster, as child processes of this binary.
//!
//! Node i serves its API on `base_port + i` and QUIC on `base_port + 100 + i`. The first node
//! creates the cluster; the others join it with its token. Ctrl-C stops them all.
//!
//! Run as root on a machine with libvirt and QEMU, each node gets its own libvirt host (its own
//! libvirtd in its own network, mount and UTS namespaces, see `hosts`) and runs real VMs that
//! can migrate live between nodes; the nodes then listen on the hosts' bridge addresses.
//! Elsewhere (or with `--test-driver`) the nodes listen on loopback and use libvirt's test
//! driver. It says which.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

/// Every node of a dev cluster needs its own libvirt: nodes sharing one libvirtd would fence
/// each other's VMs. Without per-node libvirt hosts, each node uses libvirt's in-process test
/// driver, whose VMs are simulated.
const DEV_LIBVIRT_URI: &str = "test:///default";

/// Inside a node's own libvirt host this reaches that host's libvirtd.
const HOST_LIBVIRT_URI: &str = "qemu:///system";

fn spawn(
    exe: &Path,
    args: &[String],
    log: &Path,
    host: Option<&crate::hosts::Host>,
) -> anyhow::Result<Child> {
    let out =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out.try_clone()?;
    let (mut cmd, uri) = match host {
        Some(h) => (h.tokio_command(exe), HOST_LIBVIRT_URI),
        None => (Command::new(exe), DEV_LIBVIRT_URI),
    };
    cmd.args(args)
        .env("NOVACRON_LIBVIRT_URI", uri)
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))
}

/// Polls `url` until it answers 200 or the deadline passes.
async fn wait_ready(http: &reqwest::Client, url: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    let mut interval = tokio::time::interval(Duration::from_millis(100));
    loop {
        interval.tick().await;
        if let Ok(r) = http.get(url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{url} did not become ready within {within:?}");
        }
    }
}

pub async fn up(
    nodes: usize,
    base_port: u16,
    data_dir: Option<PathBuf>,
    test_driver: bool,
    site: Option<String>,
) -> anyhow::Result<()> {
    if nodes == 0 || nodes > 9 {
        bail!("--nodes must be between 1 and 9");
    }
    let exe = std::env::current_exe().context("cannot find the novacron binary")?;
    let (root, _guard) = match data_dir {
        Some(d) => (d, None),
        None => {
            let t = tempfile_dir()?;
            (t.clone(), Some(TempDir(t)))
        }
    };
    std::fs::create_dir_all(&root)?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    // Declared before the children so they are dropped (killed) before their hosts go.
    let hosts = if test_driver {
        None
    } else {
        match crate::hosts::available() {
            Ok(()) => {
                println!(
                    "starting {nodes} libvirt hosts (one libvirtd per node, own namespaces)..."
                );
                Some(
                    crate::hosts::HostSet::start(&root.join("hosts"), nodes)
                        .context("cannot start the per-node libvirt hosts")?,
                )
            }
            Err(e) => {
                println!("per-node libvirt hosts unavailable ({e}); using libvirt's test driver");
                None
            }
        }
    };
    let mut children = Vec::new();
    let ip = |i: usize| {
        hosts
            .as_ref()
            .and_then(|h| h.hosts.get(i))
            .map(|h| h.addr.to_string())
            .unwrap_or_else(|| "127.0.0.1".into())
    };
    let api = |i: usize| format!("{}:{}", ip(i), base_port as usize + i);
    let peer = |i: usize| format!("{}:{}", ip(i), base_port as usize + 100 + i);
    // Explicit, because the default (API port + 2) is another node's API port here.
    let federation = |i: usize| format!("{}:{}", ip(i), base_port as usize + 200 + i);
    for i in 0..nodes {
        let dir = root.join(format!("node{}", i + 1));
        let mut args = vec![
            "serve".to_string(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--name".into(),
            format!("node{}", i + 1),
            "--api-addr".into(),
            api(i),
            "--peer-addr".into(),
            peer(i),
            "--federation-addr".into(),
            federation(i),
        ];
        let restarting = dir.join(crate::config::CONFIG_FILE).exists();
        if !restarting {
            if i == 0 {
                args.push("--init".into());
                if let Some(site) = &site {
                    args.extend(["--site".into(), site.clone()]);
                }
            } else {
                let token = std::fs::read_to_string(root.join("node1").join("join-token"))
                    .context("the first node wrote no join token")?;
                args.extend([
                    "--join".into(),
                    format!("http://{}", api(0)),
                    "--token".into(),
                    token,
                ]);
            }
        }
        let log = root.join(format!("node{}.log", i + 1));
        let host = hosts.as_ref().and_then(|h| h.hosts.get(i));
        children.push(spawn(&exe, &args, &log, host)?);
        wait_ready(
            &http,
            &format!("http://{}/readyz", api(i)),
            Duration::from_secs(60),
        )
        .await
        .with_context(|| format!("node{} did not start; see {}", i + 1, log.display()))?;
    }
    let password = std::fs::read_to_string(root.join("node1").join("admin-password"))
        .unwrap_or_else(|_| "(see node1/admin-password)".into());
    if hosts.is_some() {
        println!(
            "NovaCron dev cluster of {nodes} nodes is up; each node runs inside its own libvirt \
             host (own libvirtd, network and mount namespace): real VMs under QEMU that migrate \
             live between nodes. Set NOVACRON_GUEST_KERNEL/NOVACRON_GUEST_INITRD for image \"tiny\"."
        );
    } else {
        println!(
            "NovaCron dev cluster of {nodes} nodes is up; VMs run on libvirt's test driver \
             ({DEV_LIBVIRT_URI}, simulated guests, one private hypervisor per node)."
        );
    }
    println!("  dashboard and API: http://{}/", api(0));
    for i in 1..nodes {
        println!("  also:              http://{}/", api(i));
    }
    println!("  user: admin   password: {}", password.trim());
    println!("  data and logs:     {}", root.display());
    println!("Try: NOVACRON_URL=http://{} NOVACRON_PASSWORD=... novacron login && novacron cluster status", api(0));
    println!("Ctrl-C stops the cluster.");
    crate::server::shutdown_signal().await;
    for c in &mut children {
        if let Some(pid) = c.id() {
            // SIGTERM first so each node drains and flushes.
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        }
    }
    for c in &mut children {
        let _ = tokio::time::timeout(Duration::from_secs(10), c.wait()).await;
    }
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let base = std::env::temp_dir().join(format!("novacron-dev-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    Ok(base)
}

/// Removes a temporary cluster directory when the dev cluster stops.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
