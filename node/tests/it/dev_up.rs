//! `novacron dev up` as a user runs it: the real binary as a child process, read through what it
//! prints, driven through its REST API, stopped with a signal; then nothing of it may be left.
//!
//! On the test driver this runs everywhere. On per-node libvirt hosts it needs root, libvirt,
//! QEMU and the tiny guest (CI provides them, see `real_vm.rs`); elsewhere those tests print
//! SKIP and return, as the other real-QEMU tests do.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;

use crate::harness::{eventually, TestCluster, BIN};
use crate::migration::{create_on, migrate, node_id};
use crate::real_vm::{console_shows, daemon_turn, real_env, RealEnv};
use crate::vms::{vm, wait_op, wait_state};

/// The line `dev up` prints once every node is ready (see `node::dev::READY_PREFIX`).
const READY: &str = node::dev::READY_PREFIX;

/// A running `novacron dev up`.
struct DevUp {
    child: tokio::process::Child,
    /// Everything it printed on stdout so far.
    lines: Arc<Mutex<Vec<String>>>,
    /// Its stderr (the log of `dev up` itself; the nodes log into the data dir).
    log: PathBuf,
    /// Holds the log and, unless `dev up` makes its own, the data dir.
    dir: tempfile::TempDir,
}

impl DevUp {
    /// Starts `dev up ARGS`, with `--data-dir` under a test directory when `own_data_dir`.
    fn spawn(args: &[&str], env: &[(&str, &str)], own_data_dir: bool) -> anyhow::Result<DevUp> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("dev-up.log");
        let mut cmd = tokio::process::Command::new(BIN);
        cmd.args(["dev", "up"]).args(args);
        if own_data_dir {
            cmd.arg("--data-dir").arg(dir.path().join("data"));
        }
        let mut child = cmd
            .envs(env.iter().copied())
            .env("NOVACRON_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                println!("dev up: {line}");
                sink.lock().unwrap().push(line);
            }
        });
        Ok(DevUp {
            child,
            lines,
            log,
            dir,
        })
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits for the ready line and returns its JSON; fails at once if `dev up` exits first.
    async fn ready(&mut self, within: Duration) -> anyhow::Result<Value> {
        let lines = self.lines.clone();
        let child = &mut self.child;
        let r = eventually("dev up to be ready", within, || {
            let found = lines
                .lock()
                .unwrap()
                .iter()
                .find_map(|l| l.strip_prefix(READY).map(str::to_string));
            let exited = child.try_wait().ok().flatten();
            async move {
                match (found, exited) {
                    (Some(json), _) => {
                        Some(serde_json::from_str::<Value>(&json).map_err(Into::into))
                    }
                    (None, Some(status)) => Some(Err(anyhow::anyhow!(
                        "dev up exited with {status} before ready"
                    ))),
                    (None, None) => None,
                }
            }
        })
        .await
        .and_then(|r| r);
        if r.is_err() {
            self.dump();
        }
        r
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .child
            .id()
            .ok_or_else(|| anyhow::anyhow!("dev up already exited"))?;
        let ok = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()?
            .success();
        anyhow::ensure!(ok, "kill -{signal} {pid} failed");
        Ok(())
    }

    async fn exit(&mut self, within: Duration) -> anyhow::Result<ExitStatus> {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                self.dump();
                anyhow::bail!("dev up did not exit within {within:?}")
            }
        }
    }

    fn dump(&self) {
        eprintln!("==== dev up stdout ====\n{}", self.output());
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        eprintln!("==== dev up stderr ====\n{log}");
        // The data dir is the ready line's, or ours when we gave it.
        let data_dir = self
            .output()
            .lines()
            .find_map(|l| l.strip_prefix(READY))
            .and_then(|j| serde_json::from_str::<Value>(j).ok())
            .and_then(|v| v["data_dir"].as_str().map(PathBuf::from))
            .unwrap_or_else(|| self.data_dir());
        for entry in std::fs::read_dir(data_dir).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("==== {} (last 40 lines) ====", p.display());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

impl Drop for DevUp {
    fn drop(&mut self) {
        // A failed test still stops the cluster the way a user would, so it tears its hosts down.
        if let Ok(None) = self.child.try_wait() {
            if std::thread::panicking() {
                self.dump();
            }
            let _ = self.signal("TERM");
            for _ in 0..600 {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.start_kill();
        }
    }
}

/// A client of the cluster `dev up` described in its ready line, logged in as admin.
async fn client(ready: &Value) -> anyhow::Result<TestCluster> {
    let data = PathBuf::from(ready["data_dir"].as_str().unwrap());
    let nodes = ready["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let name = n["name"].as_str().unwrap().to_string();
            let api = n["api"]
                .as_str()
                .unwrap()
                .trim_start_matches("http://")
                .to_string();
            (name.clone(), api, data.join(name))
        })
        .collect();
    let mut c = TestCluster::attach(nodes)?;
    let password = std::fs::read_to_string(ready["admin_password_file"].as_str().unwrap())?;
    c.token = Some(c.login(0, "admin", password.trim()).await?);
    // The scheduler places only on nodes that are up and have reported their capacity.
    let n = c.nodes.len();
    eventually(
        "every node up with its capacity known",
        Duration::from_secs(60),
        || async {
            let (_, v) = c
                .request(0, reqwest::Method::GET, "/api/v1/nodes", None)
                .await
                .ok()?;
            let nodes = v.as_array().or_else(|| v["items"].as_array())?;
            let up = nodes
                .iter()
                .filter(|n| n["state"] == "up" && !n["capacity"].is_null())
                .count();
            (up == n).then_some(())
        },
    )
    .await?;
    Ok(c)
}

/// The start time of a running (not zombie) process: with its pid, it names the process.
fn started(pid: u64) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    (fields.first() != Some(&"Z")).then(|| fields.get(19).map(|s| s.to_string()))?
}

/// Every process inside the run's host namespaces now, named by pid and start time. Checked
/// after the run by identity, not by namespace: a freed namespace's inode number is soon
/// reused by another one (other tests, other users of the machine).
fn inside_hosts(hosts: &RunHosts) -> Vec<(u64, String)> {
    hosts
        .netns_inodes
        .iter()
        .flat_map(|i| node::hosts::processes_in_netns(*i))
        .filter_map(|pid| started(u64::from(pid)).map(|t| (u64::from(pid), t)))
        .collect()
}

fn alive(pid: u64) -> bool {
    // A zombie is dead for our purpose: it holds no port, namespace or guest.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .map(|i| !s[i + 1..].trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn node_pids(ready: &Value) -> Vec<u64> {
    ready["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["pid"].as_u64().unwrap())
        .collect()
}

/// Processes whose command line mentions `needle` (a VM id, a data dir).
fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            if pid == std::process::id() {
                return None;
            }
            let raw = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            cmdline.contains(needle).then_some((pid, cmdline))
        })
        .collect()
}

fn netns_list() -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn link_exists(name: &str) -> bool {
    std::process::Command::new("ip")
        .args(["link", "show", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// The libvirt hosts of a run, as its ready line names them.
struct RunHosts {
    bridge: String,
    netns: Vec<String>,
    netns_inodes: Vec<u64>,
    libvirtd_pids: Vec<u64>,
    uris: Vec<String>,
}

fn run_hosts(ready: &Value) -> RunHosts {
    let hosts: Vec<&Value> = ready["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| &n["host"])
        .collect();
    let netns: Vec<String> = hosts
        .iter()
        .map(|h| h["netns"].as_str().unwrap().to_string())
        .collect();
    RunHosts {
        bridge: ready["bridge"].as_str().unwrap().to_string(),
        netns_inodes: netns
            .iter()
            .map(|n| {
                std::fs::metadata(Path::new("/run/netns").join(n))
                    .unwrap()
                    .ino()
            })
            .collect(),
        netns,
        libvirtd_pids: hosts
            .iter()
            .map(|h| h["libvirtd_pid"].as_u64().unwrap())
            .collect(),
        uris: hosts
            .iter()
            .map(|h| h["libvirt_uri"].as_str().unwrap().to_string())
            .collect(),
    }
}

/// `virsh domstate` of the VM's domain through a host's libvirt URI; "absent" when it has none.
fn domstate(uri: &str, id: &str) -> String {
    let out = std::process::Command::new("virsh")
        .args(["-q", "-c", uri, "domstate", &format!("nc-{id}")])
        .output()
        .unwrap();
    if !out.status.success() {
        return "absent".into();
    }
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Asserts that nothing of the run is left: nodes, libvirtds, the processes that were inside
/// its namespaces (`inside`, taken before it stopped), any process of its VMs, the namespaces,
/// the bridge, its registry record.
fn assert_nothing_left(
    ready: &Value,
    hosts: &RunHosts,
    inside: &[(u64, String)],
    vm_ids: &[String],
) {
    for pid in node_pids(ready) {
        assert!(!alive(pid), "node process {pid} outlived dev up");
    }
    for pid in &hosts.libvirtd_pids {
        assert!(!alive(*pid), "libvirtd {pid} outlived dev up");
    }
    for (pid, start) in inside {
        assert!(
            started(*pid).as_ref() != Some(start),
            "process {pid} of a host's namespace left: {:?}",
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        );
    }
    for id in vm_ids {
        let left = processes_mentioning(id);
        assert!(left.is_empty(), "processes of VM {id} left: {left:?}");
    }
    let namespaces = netns_list();
    for ns in &hosts.netns {
        assert!(
            !namespaces
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns)),
            "network namespace {ns} left: {namespaces}"
        );
    }
    assert!(!link_exists(&hosts.bridge), "bridge {} left", hosts.bridge);
    let record = Path::new(node::hosts::REGISTRY_DIR).join(format!("{}.json", hosts.bridge));
    assert!(
        !record.exists(),
        "registry record {} left",
        record.display()
    );
}

fn hosts_env(test: &str) -> Option<RealEnv> {
    let env = real_env(test)?;
    if let Err(e) = node::hosts::available() {
        println!("SKIP {test}: separate libvirt hosts unavailable: {e}");
        return None;
    }
    Some(env)
}

fn guest_env(env: &RealEnv) -> Vec<(&str, &str)> {
    vec![
        ("NOVACRON_GUEST_KERNEL", env.kernel.as_str()),
        ("NOVACRON_GUEST_INITRD", env.initrd.as_str()),
        // KVM may exist without working for Linux guests (nested); TCG always boots.
        ("NOVACRON_DOMAIN_TYPE", "qemu"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_libvirt_hosts_dev_up_boots_and_live_migrates_a_real_guest_and_leaves_nothing(
) -> anyhow::Result<()> {
    let test = "on_libvirt_hosts_dev_up_boots_and_live_migrates_a_real_guest_and_leaves_nothing";
    let Some(env) = hosts_env(test) else {
        return Ok(());
    };
    let _turn = daemon_turn();
    let mut dev = DevUp::spawn(
        &["--nodes", "2", "--base-port", "0"],
        &guest_env(&env),
        true,
    )?;
    let ready = dev.ready(Duration::from_secs(240)).await?;
    assert!(
        dev.output().contains("mode: libvirt hosts"),
        "{}",
        dev.output()
    );
    assert_eq!(ready["mode"], "libvirt-hosts", "{ready}");
    let hosts = run_hosts(&ready);
    assert_eq!(hosts.netns.len(), 2);
    let c = client(&ready).await?;

    let id = create_on(&c, "node1", "devguest", Some("tiny")).await?;
    console_shows(&c, &id, &env.marker).await?;
    assert_eq!(domstate(&hosts.uris[0], &id), "running");
    let qemu: Vec<(u32, String)> = processes_mentioning(&id)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("qemu-system"))
        .collect();
    assert_eq!(qemu.len(), 1, "one QEMU runs the guest: {qemu:?}");
    // The guest's QEMU runs inside node1's host, not in the machine's own network namespace.
    assert!(node::hosts::processes_in_netns(hosts.netns_inodes[0]).contains(&qemu[0].0));

    let op = migrate(&c, 0, &id, json!({"target_node": "node2"})).await?;
    let done = wait_op(&c, 0, &op).await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    // A real migration between the hosts' libvirtds, not the test driver's hand-off.
    assert_eq!(done["result"]["mode"], "live", "{done}");
    let v = wait_state(&c, 0, &id, "running").await?;
    assert_eq!(v["node"], node_id(&c, "node2").await?, "{v}");
    assert_eq!(domstate(&hosts.uris[1], &id), "running");
    assert_eq!(
        domstate(&hosts.uris[0], &id),
        "absent",
        "debris on the source"
    );
    // The guest goes on ticking on its new host.
    console_shows(&c, &id, "tick ").await?;
    let qemu2: Vec<u32> = processes_mentioning(&id)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("qemu-system"))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(qemu2.len(), 1, "{qemu2:?}");
    assert!(node::hosts::processes_in_netns(hosts.netns_inodes[1]).contains(&qemu2[0]));

    let inside = inside_hosts(&hosts);
    // libvirtd, the node and the guest's QEMU, on each host.
    assert!(inside.len() >= 4, "{inside:?}");
    // Ctrl-C, as a user stops it.
    dev.signal("INT")?;
    let status = dev.exit(Duration::from_secs(120)).await?;
    assert!(status.success(), "dev up exited with {status}");
    assert!(
        dev.output().contains("dev cluster stopped"),
        "{}",
        dev.output()
    );
    assert_nothing_left(&ready, &hosts, &inside, &[id]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_libvirt_hosts_a_killed_dev_up_is_cleaned_up_by_the_next_start() -> anyhow::Result<()> {
    let test = "on_libvirt_hosts_a_killed_dev_up_is_cleaned_up_by_the_next_start";
    let Some(env) = hosts_env(test) else {
        return Ok(());
    };
    let _turn = daemon_turn();
    let mut dev = DevUp::spawn(
        &["--nodes", "1", "--base-port", "0"],
        &guest_env(&env),
        true,
    )?;
    let ready = dev.ready(Duration::from_secs(240)).await?;
    assert_eq!(ready["mode"], "libvirt-hosts", "{ready}");
    let hosts = run_hosts(&ready);
    let c = client(&ready).await?;
    let id = create_on(&c, "node1", "orphan", Some("tiny")).await?;
    let qemu: Vec<u32> = processes_mentioning(&id)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("qemu-system"))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(qemu.len(), 1, "{qemu:?}");

    let inside = inside_hosts(&hosts);
    // SIGKILL: no handler, no Drop. The node goes with its parent (parent-death signal), but
    // libvirtd (a daemon) and QEMU (libvirtd's child) stay, with the namespace and bridge.
    dev.signal("KILL")?;
    dev.exit(Duration::from_secs(30)).await?;
    eventually(
        "the orphaned node to stop",
        Duration::from_secs(30),
        || async { node_pids(&ready).iter().all(|p| !alive(*p)).then_some(()) },
    )
    .await?;
    assert!(
        alive(u64::from(qemu[0])),
        "QEMU {} should outlive a killed dev up",
        qemu[0]
    );
    assert!(
        alive(hosts.libvirtd_pids[0]),
        "libvirtd should outlive a killed dev up"
    );
    assert!(netns_list().contains(&hosts.netns[0]));
    assert!(link_exists(&hosts.bridge));

    // The next start, on the same data dir (its stale libvirtd pid file included), removes all
    // of it before making its own host.
    let hosts_dir = dev.data_dir().join("hosts");
    let set =
        tokio::task::spawn_blocking(move || node::hosts::HostSet::start(&hosts_dir, 1)).await??;
    assert_nothing_left(&ready, &hosts, &inside, &[id]);
    let fresh = &set.hosts[0];
    assert_ne!(u64::from(fresh.libvirtd_pid), hosts.libvirtd_pids[0]);
    assert!(
        alive(u64::from(fresh.libvirtd_pid)),
        "the new host's libvirtd runs"
    );
    let version = std::process::Command::new("virsh")
        .args(["-q", "-c", &fresh.outside_uri(), "version"])
        .output()?;
    assert!(version.status.success(), "the new host's libvirtd answers");
    let fresh_inode = fresh.netns_inode;
    let fresh_pid = fresh.libvirtd_pid;
    let fresh_inside: Vec<u32> = node::hosts::processes_in_netns(fresh_inode);
    assert!(fresh_inside.contains(&fresh_pid), "{fresh_inside:?}");
    tokio::task::spawn_blocking(move || drop(set)).await?;
    assert!(!alive(u64::from(fresh_pid)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_test_driver_dev_up_runs_a_vm_and_stops_cleanly() -> anyhow::Result<()> {
    // No --data-dir: the temporary one it makes must go with it too.
    let mut dev = DevUp::spawn(
        &["--test-driver", "--nodes", "3", "--base-port", "0"],
        &[],
        false,
    )?;
    let ready = dev.ready(Duration::from_secs(120)).await?;
    assert!(
        dev.output().contains("mode: test driver"),
        "{}",
        dev.output()
    );
    assert_eq!(ready["mode"], "test-driver", "{ready}");
    assert_eq!(ready["nodes"].as_array().unwrap().len(), 3, "{ready}");
    assert!(ready["bridge"].is_null(), "{ready}");
    let data_dir = PathBuf::from(ready["data_dir"].as_str().unwrap());
    let c = client(&ready).await?;
    let id = create_on(&c, "node3", "simulated", None).await?;
    let v = vm(&c, 1, &id).await.unwrap();
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["node"], node_id(&c, "node3").await?, "{v}");

    dev.signal("TERM")?;
    let status = dev.exit(Duration::from_secs(60)).await?;
    assert!(status.success(), "dev up exited with {status}");
    assert!(
        dev.output().contains("dev cluster stopped"),
        "{}",
        dev.output()
    );
    for pid in node_pids(&ready) {
        assert!(!alive(pid), "node process {pid} outlived dev up");
    }
    assert!(!data_dir.exists(), "{} left", data_dir.display());
    Ok(())
}

/// The registry record (see `node::hosts::REGISTRY_DIR`) of the hosts process `pid` is making.
fn record_of(pid: u32) -> Option<Value> {
    std::fs::read_dir(node::hosts::REGISTRY_DIR)
        .ok()?
        .flatten()
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice::<Value>(&b).ok())
        .find(|r| r["owner_pid"] == pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_libvirt_hosts_a_signal_during_start_up_leaves_nothing() -> anyhow::Result<()> {
    let test = "on_libvirt_hosts_a_signal_during_start_up_leaves_nothing";
    let Some(env) = hosts_env(test) else {
        return Ok(());
    };
    let _turn = daemon_turn();
    let mut dev = DevUp::spawn(
        &["--nodes", "2", "--base-port", "0"],
        &guest_env(&env),
        true,
    )?;
    let pid = dev.child.id().unwrap();
    // SIGTERM once the first host's namespace exists, while the hosts are still starting.
    let record = eventually(
        "the first host's namespace",
        Duration::from_secs(120),
        || async {
            let r = record_of(pid)?;
            let ns = r["hosts"][0]["netns"].as_str()?;
            Path::new("/run/netns").join(ns).exists().then_some(r)
        },
    )
    .await?;
    dev.signal("TERM")?;
    let bridge = record["bridge"].as_str().unwrap().to_string();
    let names: Vec<String> = record["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["netns"].as_str().unwrap().to_string())
        .collect();
    // Until it exits, note every process that enters one of its namespaces.
    let mut seen: Vec<(u64, String)> = Vec::new();
    let exited = tokio::time::timeout(Duration::from_secs(180), async {
        loop {
            for ns in &names {
                if let Ok(m) = std::fs::metadata(Path::new("/run/netns").join(ns)) {
                    for p in node::hosts::processes_in_netns(m.ino()) {
                        if let Some(t) = started(u64::from(p)) {
                            if !seen.contains(&(u64::from(p), t.clone())) {
                                seen.push((u64::from(p), t));
                            }
                        }
                    }
                }
            }
            if let Ok(Some(status)) = dev.child.try_wait() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let Ok(status) = exited else {
        dev.dump();
        anyhow::bail!("dev up did not exit within 180 s of SIGTERM");
    };
    assert!(status.success(), "dev up exited with {status}");
    assert!(!dev.output().contains(READY), "{}", dev.output());
    assert!(
        dev.output().contains("dev cluster stopped"),
        "{}",
        dev.output()
    );
    assert!(!seen.is_empty(), "libvirtd ran in the first namespace");
    for (p, t) in &seen {
        assert!(
            started(*p).as_ref() != Some(t),
            "process {p} of the run left"
        );
    }
    let namespaces = netns_list();
    for ns in &names {
        assert!(
            !namespaces
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns.as_str())),
            "network namespace {ns} left: {namespaces}"
        );
    }
    assert!(!link_exists(&bridge), "bridge {bridge} left");
    assert!(record_of(pid).is_none(), "registry record left");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_libvirt_hosts_dev_up_restarts_from_its_data_dir_with_its_guests() -> anyhow::Result<()>
{
    let test = "on_libvirt_hosts_dev_up_restarts_from_its_data_dir_with_its_guests";
    let Some(env) = hosts_env(test) else {
        return Ok(());
    };
    let _turn = daemon_turn();
    let data = tempfile::tempdir()?;
    let data_dir = data.path().join("cluster");
    let args = [
        "--nodes",
        "2",
        "--base-port",
        "0",
        "--data-dir",
        data_dir.to_str().unwrap(),
    ];
    let mut first = DevUp::spawn(&args, &guest_env(&env), false)?;
    let ready = first.ready(Duration::from_secs(240)).await?;
    let hosts = run_hosts(&ready);
    let c = client(&ready).await?;
    let id = create_on(&c, "node2", "keeper", Some("tiny")).await?;
    first.signal("TERM")?;
    assert!(first.exit(Duration::from_secs(120)).await?.success());
    drop(c);

    // The same data dir again: the nodes come back on the addresses they stored, and the guest
    // the cluster wants running runs again, under QEMU on node2's host.
    let mut second = DevUp::spawn(&args, &guest_env(&env), false)?;
    let again = second.ready(Duration::from_secs(240)).await?;
    assert_eq!(again["mode"], "libvirt-hosts", "{again}");
    for i in 0..2 {
        assert_eq!(
            again["nodes"][i]["api"], ready["nodes"][i]["api"],
            "{again}"
        );
    }
    let hosts2 = run_hosts(&again);
    assert_ne!(hosts2.bridge, hosts.bridge, "a new set of hosts");
    let c = client(&again).await?;
    let v = wait_state(&c, 0, &id, "running").await?;
    assert_eq!(v["node"], node_id(&c, "node2").await?, "{v}");
    eventually(
        "the guest to run on node2's host",
        Duration::from_secs(60),
        || async { (domstate(&hosts2.uris[1], &id) == "running").then_some(()) },
    )
    .await?;
    console_shows(&c, &id, &env.marker).await?;
    let inside = inside_hosts(&hosts2);
    second.signal("TERM")?;
    assert!(second.exit(Duration::from_secs(120)).await?.success());
    assert_nothing_left(&again, &hosts2, &inside, &[id]);
    Ok(())
}
