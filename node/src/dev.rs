//! `novacron dev up`: a local N-node cluster, as child processes of this binary.
//!
//! Node i serves its API on `base_port + i`, QUIC on `base_port + 100 + i` and its federation
//! endpoint on `base_port + 200 + i` (the default, API port + 2, is another node's API port
//! here); with base port 0
//! every node picks free ports (tests run several clusters at once). The first node creates the
//! cluster; the others join it with its token. SIGINT (Ctrl-C), SIGTERM or SIGHUP, at any time,
//! even during start-up, stops the nodes and tears the libvirt hosts down.
//!
//! Run as root on a machine with libvirt and QEMU, each node gets its own libvirt host (its own
//! libvirtd in its own network, mount and UTS namespaces, see `hosts`) and runs real VMs that
//! can migrate live between nodes; the nodes then listen on the hosts' bridge addresses.
//! Elsewhere (or with `--test-driver`) the nodes listen on loopback and use libvirt's test
//! driver. It says which: a `mode:` line first, and once every node is ready one line
//! `dev-cluster-ready {json}` for programs (the mode, each node's API URL and pid, the libvirt
//! hosts, the admin password file), then the same for people.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::hosts::{Host, HostSet};

/// Every node of a dev cluster needs its own libvirt: nodes sharing one libvirtd would fence
/// each other's VMs. Without per-node libvirt hosts, each node uses libvirt's in-process test
/// driver, whose VMs are simulated.
const DEV_LIBVIRT_URI: &str = "test:///default";

/// Inside a node's own libvirt host this reaches that host's libvirtd.
const HOST_LIBVIRT_URI: &str = "qemu:///system";

/// The prefix of the machine-readable line printed once the cluster is up.
pub const READY_PREFIX: &str = "dev-cluster-ready ";

/// util-linux's `setpriv`, used to give each node a parent-death signal: a `dev up` killed
/// outright (SIGKILL) then still stops its nodes, which would otherwise hold their ports. The
/// signal fires when the *thread* that spawned the node ends: nodes are spawned from `up`'s own
/// future, which runs on the main thread (`block_on`), never from a pool thread that may retire.
const SETPRIV: &str = "/usr/bin/setpriv";

const NODE_START_TIMEOUT: Duration = Duration::from_secs(60);
const NODE_STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The signals that stop the dev cluster, registered before anything starts so that a signal
/// during start-up also tears down what was already started.
struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Signals {
    fn register() -> anyhow::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            hup: signal(SignalKind::hangup()).context("cannot handle SIGHUP")?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

/// A started node process.
struct NodeProcess {
    name: String,
    child: Child,
    /// `host:port` of its API, read back from its `node.json`.
    api: String,
}

/// What runs: the nodes, then the hosts they run in. Field order matters: on an unwinding
/// drop the nodes (killed on drop) go before their hosts.
#[derive(Default)]
struct Running {
    nodes: Vec<NodeProcess>,
    hosts: Option<HostSet>,
}

impl Running {
    /// SIGTERM to every node (each drains and flushes), a bounded wait, SIGKILL for any that
    /// did not exit; then the hosts: guests destroyed, libvirtds stopped, namespaces and the
    /// bridge deleted.
    async fn teardown(mut self) {
        for n in &self.nodes {
            if let Some(pid) = n.child.id() {
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await;
            }
        }
        for n in &mut self.nodes {
            if tokio::time::timeout(NODE_STOP_TIMEOUT, n.child.wait())
                .await
                .is_err()
            {
                eprintln!(
                    "{} did not stop within {NODE_STOP_TIMEOUT:?}; killing it",
                    n.name
                );
                let _ = n.child.kill().await;
            }
        }
        self.nodes.clear();
        if let Some(hosts) = self.hosts.take() {
            // Dropping a HostSet runs virsh, kill and ip and waits for them: blocking work.
            let _ = tokio::task::spawn_blocking(move || drop(hosts)).await;
        }
    }
}

/// Where node `i` runs and how it is reached.
struct Placement<'a> {
    host: Option<&'a Host>,
    ip: String,
}

fn spawn(exe: &Path, args: &[String], log: &Path, host: Option<&Host>) -> anyhow::Result<Child> {
    // Appended to: a cluster restarted from its data dir keeps the logs of its earlier runs.
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let err = out.try_clone()?;
    let mut argv: Vec<OsString> = Vec::new();
    if Path::new(SETPRIV).exists() {
        for a in [SETPRIV, "--pdeathsig", "TERM", "--"] {
            argv.push(a.into());
        }
    }
    if let Some(h) = host {
        argv.extend(h.enter_prefix().into_iter().map(OsString::from));
    }
    argv.push(exe.into());
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .args(args)
        .env(
            "NOVACRON_LIBVIRT_URI",
            if host.is_some() {
                HOST_LIBVIRT_URI
            } else {
                DEV_LIBVIRT_URI
            },
        )
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .kill_on_drop(true);
    cmd.spawn()
        .with_context(|| format!("cannot start {}", exe.display()))
}

/// Waits until the node wrote its API address to `node.json` and answers `/readyz` there;
/// fails early if the process exits (a port in use, a bad data dir).
async fn wait_node(
    http: &reqwest::Client,
    child: &mut Child,
    dir: &Path,
    log: &Path,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + NODE_START_TIMEOUT;
    let mut interval = tokio::time::interval(Duration::from_millis(100));
    loop {
        interval.tick().await;
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("exited with {status}:\n{}", tail.join("\n"));
        }
        if let Ok(cfg) = crate::config::NodeConfig::load(dir) {
            let ready = http
                .get(format!("http://{}/readyz", cfg.api_addr))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(cfg.api_addr);
            }
        }
        if Instant::now() > deadline {
            bail!("not ready within {NODE_START_TIMEOUT:?}");
        }
    }
}

/// Starts the nodes one after the other (each joins through the first), pushing each into
/// `running` as soon as it is spawned, so that whatever started is torn down if start-up fails
/// or is interrupted.
async fn start_nodes(
    running: &mut Running,
    root: &Path,
    nodes: usize,
    base_port: u16,
    site: Option<&str>,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the novacron binary")?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let port = |offset: usize| {
        if base_port == 0 {
            0
        } else {
            base_port as usize + offset
        }
    };
    for i in 0..nodes {
        let hosts = running.hosts.as_ref();
        let host = hosts.and_then(|h| h.hosts.get(i));
        let at = Placement {
            host,
            ip: host
                .map(|h| h.addr.to_string())
                .unwrap_or_else(|| "127.0.0.1".into()),
        };
        let name = format!("node{}", i + 1);
        let dir = root.join(&name);
        let mut args = vec![
            "serve".to_string(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--name".into(),
            name.clone(),
            "--api-addr".into(),
            format!("{}:{}", at.ip, port(i)),
            "--peer-addr".into(),
            format!("{}:{}", at.ip, port(100 + i)),
            "--federation-addr".into(),
            format!("{}:{}", at.ip, port(200 + i)),
        ];
        if !crate::config::NodeConfig::exists(&dir) {
            match running.nodes.first() {
                None => {
                    args.push("--init".into());
                    if let Some(site) = site {
                        args.extend(["--site".into(), site.to_string()]);
                    }
                }
                Some(first) => {
                    let token = std::fs::read_to_string(
                        root.join("node1").join(crate::config::JOIN_TOKEN_FILE),
                    )
                    .context("the first node wrote no join token")?;
                    args.extend([
                        "--join".into(),
                        format!("http://{}", first.api),
                        "--token".into(),
                        token.trim().to_string(),
                    ]);
                }
            }
        }
        let log = root.join(format!("{name}.log"));
        let mut child = spawn(&exe, &args, &log, at.host)?;
        let waited = wait_node(&http, &mut child, &dir, &log).await;
        running.nodes.push(NodeProcess {
            name: name.clone(),
            child,
            api: String::new(),
        });
        let api = waited.with_context(|| format!("{name} did not start; see {}", log.display()))?;
        if let Some(n) = running.nodes.last_mut() {
            n.api = api;
        }
    }
    Ok(())
}

/// The machine-readable description of the running cluster.
fn ready_line(running: &Running, root: &Path) -> Value {
    let nodes: Vec<Value> = running
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let host = running
                .hosts
                .as_ref()
                .and_then(|h| h.hosts.get(i))
                .map(|h| {
                    json!({
                        "name": h.name,
                        "netns": h.netns,
                        "addr": h.addr.to_string(),
                        "libvirtd_pid": h.libvirtd_pid,
                        "libvirt_uri": h.outside_uri(),
                    })
                });
            json!({
                "name": n.name,
                "api": format!("http://{}", n.api),
                "pid": n.child.id(),
                "host": host,
            })
        })
        .collect();
    json!({
        "mode": if running.hosts.is_some() { "libvirt-hosts" } else { "test-driver" },
        "nodes": nodes,
        "bridge": running.hosts.as_ref().map(|h| h.bridge.clone()),
        "admin_password_file": root.join("node1").join(crate::config::ADMIN_PASSWORD_FILE),
        "data_dir": root,
    })
}

fn print_banner(running: &Running, root: &Path) {
    let nodes = running.nodes.len();
    if running.hosts.is_some() {
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
    for (i, n) in running.nodes.iter().enumerate() {
        let label = if i == 0 {
            "dashboard and API:"
        } else {
            "also:             "
        };
        println!("  {label} http://{}/", n.api);
    }
    let password = std::fs::read_to_string(root.join("node1").join("admin-password"))
        .unwrap_or_else(|_| "(see node1/admin-password)".into());
    println!("  user: admin   password: {}", password.trim());
    println!("  data and logs:     {}", root.display());
    if let Some(first) = running.nodes.first() {
        println!(
            "Try: NOVACRON_URL=http://{} NOVACRON_PASSWORD=... novacron login && novacron cluster status",
            first.api
        );
    }
    println!("Ctrl-C stops the cluster.");
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
    let mut signals = Signals::register()?;
    let (root, _guard) = match data_dir {
        Some(d) => (d, None),
        None => {
            let t = tempfile_dir()?;
            (t.clone(), Some(TempDir(t)))
        }
    };
    std::fs::create_dir_all(&root)?;
    let mut running = Running::default();

    let use_hosts = if test_driver {
        println!(
            "mode: test driver (--test-driver): VMs are simulated by libvirt's {DEV_LIBVIRT_URI}"
        );
        false
    } else {
        match crate::hosts::available() {
            Ok(()) => {
                println!(
                    "mode: libvirt hosts: each of the {nodes} nodes gets its own libvirtd in its \
                     own network and mount namespace; VMs run under QEMU"
                );
                true
            }
            Err(e) => {
                println!(
                    "mode: test driver (per-node libvirt hosts unavailable: {e}): VMs are \
                     simulated by libvirt's {DEV_LIBVIRT_URI}"
                );
                false
            }
        }
    };
    if use_hosts {
        let dir = root.join("hosts");
        let mut starting = tokio::task::spawn_blocking(move || HostSet::start(&dir, nodes));
        let started = tokio::select! {
            r = &mut starting => r,
            s = signals.recv() => {
                // HostSet::start cannot be cut short; let it finish, then undo it.
                println!("{s}: stopping once the libvirt hosts being started are up");
                if let Ok(Ok(hosts)) = starting.await {
                    let _ = tokio::task::spawn_blocking(move || drop(hosts)).await;
                }
                println!("dev cluster stopped");
                return Ok(());
            }
        };
        running.hosts = Some(
            started
                .context("the libvirt hosts' start-up failed")?
                .context("cannot start the per-node libvirt hosts")?,
        );
    }

    let outcome = tokio::select! {
        r = start_nodes(&mut running, &root, nodes, base_port, site.as_deref()) => r.map(|()| true),
        s = signals.recv() => {
            println!("{s}: stopping during start-up");
            Ok(false)
        }
    };
    match outcome {
        Ok(true) => {
            println!("{READY_PREFIX}{}", ready_line(&running, &root));
            print_banner(&running, &root);
            let s = signals.recv().await;
            println!("{s}: stopping the dev cluster");
            running.teardown().await;
            println!("dev cluster stopped");
            Ok(())
        }
        Ok(false) => {
            running.teardown().await;
            println!("dev cluster stopped");
            Ok(())
        }
        Err(e) => {
            running.teardown().await;
            Err(e)
        }
    }
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
