//! Separate libvirt "hosts" on one machine: each host is a libvirtd in its own network, mount and
//! UTS namespace (its own `/run/libvirt`, `/etc/libvirt`, `/var/lib/libvirt`, host UUID and host
//! name), and the `novacron` node of that host runs inside the same namespaces, so
//! `qemu:///system` inside reaches the host's own libvirtd and live migration between nodes is a
//! real migration between hosts. The namespaces share a bridge in the root namespace on a private
//! /24 of our own, so the hosts and the process that started them reach each other.
//!
//! Used by `novacron dev up` (when run as root with libvirt and QEMU installed) and by the
//! integration tests of migration. Needs root, `ip`, `unshare`, `nsenter` and `libvirtd`.
//! Everything is undone when the [`HostSet`] is dropped: domains destroyed, daemons stopped,
//! namespaces and the bridge deleted.
//!
//! A process that dies without dropping its `HostSet` (SIGKILL, a crash) leaves QEMU, libvirtd,
//! the namespaces and the bridge behind: libvirtd daemonises and QEMU outlives it. So every
//! `HostSet` records what it creates in a registry file (`/run/novacron-hosts/`), with its
//! owner's pid and start time, and [`HostSet::start`] first removes what the records of dead
//! owners name: every process inside their network namespaces, the namespaces, the bridge.

use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The settings a hand-started libvirtd needs without systemd; VMs run as root without
/// confinement, which is acceptable for tests and development only.
const QEMU_CONF: &str = "\
user = \"root\"
group = \"root\"
dynamic_ownership = 0
remember_owner = 0
security_driver = \"none\"
stdio_handler = \"file\"
cgroup_controllers = [ ]
namespaces = [ ]
";

/// libvirt directories bind-mounted per host: (mount point, sub-directory of the host root).
const BIND_MOUNTS: [(&str, &str); 5] = [
    ("/etc/libvirt", "etc"),
    ("/run/libvirt", "run"),
    ("/var/lib/libvirt", "lib"),
    ("/var/log/libvirt", "log"),
    ("/var/cache/libvirt", "cache"),
];

/// QEMU's capabilities probe costs seconds per daemon; its result is shared between hosts.
const CAPS_CACHE: &str = "novacron-qemu-caps";

const START_TIMEOUT: Duration = Duration::from_secs(90);

/// Where each live [`HostSet`] records what it created. Under `/run` because namespaces,
/// bridges and processes do not survive a reboot either, so neither should their records.
pub const REGISTRY_DIR: &str = "/run/novacron-hosts";

static SEQ: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("separate libvirt hosts need root")]
    NotRoot,
    #[error("{0} is not installed")]
    Missing(&'static str),
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{what} did not happen within {within:?}")]
    Timeout { what: String, within: Duration },
    #[error(
        "the subnet 10.250.{0}.0/24 of {1} is in use: is another cluster running on this data dir?"
    )]
    SubnetInUse(u8, PathBuf),
    #[error("every subnet 10.250.X.0/24 is in use")]
    NoFreeSubnet,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Whether this machine can run separate libvirt hosts: root, libvirtd, QEMU and the tools.
pub fn available() -> Result<(), HostError> {
    // Namespaces and bridges need the effective uid 0, not merely a root-like home.
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|r| r.split_whitespace().nth(1).map(str::to_string))
        })
        .unwrap_or_default();
    if uid != "0" {
        return Err(HostError::NotRoot);
    }
    for (bin, name) in [
        ("/usr/sbin/libvirtd", "libvirtd (libvirt-daemon)"),
        ("/usr/bin/qemu-system-x86_64", "qemu-system-x86_64"),
        ("/usr/bin/nsenter", "nsenter (util-linux)"),
        ("/usr/bin/unshare", "unshare (util-linux)"),
        ("/usr/bin/virsh", "virsh (libvirt-clients)"),
    ] {
        if !Path::new(bin).exists() {
            return Err(HostError::Missing(name));
        }
    }
    if !(Path::new("/usr/sbin/ip").exists() || Path::new("/usr/bin/ip").exists()) {
        return Err(HostError::Missing("ip (iproute2)"));
    }
    Ok(())
}

fn run(cmd: &mut Command) -> Result<String, HostError> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(HostError::Command {
            command: format!("{cmd:?}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Result<(), HostError> {
    let deadline = Instant::now() + within;
    while !f() {
        if Instant::now() > deadline {
            return Err(HostError::Timeout {
                what: what.to_string(),
                within,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// One libvirt host: a libvirtd in its own namespaces.
#[derive(Debug)]
pub struct Host {
    /// The host name inside its UTS namespace (libvirt refuses to migrate to "the same host").
    pub name: String,
    pub netns: String,
    /// This host's address on the shared bridge.
    pub addr: Ipv4Addr,
    /// The directory holding this host's libvirt directories.
    pub root: PathBuf,
    /// The libvirtd process; its namespaces are the host's.
    pub libvirtd_pid: u32,
    /// The network namespace's inode: every process inside it (libvirtd, QEMU, the node, the
    /// migration tunnels) shows it in `/proc/PID/ns/net`, even once the name is deleted.
    pub netns_inode: u64,
}

impl Host {
    /// The libvirt socket as seen from outside the host's mount namespace.
    pub fn socket(&self) -> PathBuf {
        libvirt_socket(&self.root)
    }

    /// A URI reaching this host's libvirtd from outside its namespaces (virsh in tests).
    pub fn outside_uri(&self) -> String {
        libvirt_outside_uri(&self.root)
    }

    /// The command line prefix that runs a program inside this host's network, mount and UTS
    /// namespaces: `nsenter ... --`, to be followed by the program and its arguments.
    pub fn enter_prefix(&self) -> Vec<String> {
        // Without --pid nsenter execs the program itself, so the child's pid is the program's.
        [
            "nsenter",
            "-t",
            &self.libvirtd_pid.to_string(),
            "-m",
            "-n",
            "-u",
            "--",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    }

    /// A command that runs `program` inside this host's network, mount and UTS namespaces.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let prefix = self.enter_prefix();
        let mut c = Command::new(&prefix[0]);
        c.args(&prefix[1..]).arg(program);
        c
    }

    /// Processes inside this host's network namespace (libvirtd, QEMU, the node, tunnels).
    pub fn processes(&self) -> Vec<u32> {
        processes_in_netns(self.netns_inode)
    }

    /// The same as [`Host::command`], for tokio.
    pub fn tokio_command(&self, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        tokio::process::Command::from(self.command(program))
    }

    fn stop(&self) {
        stop_libvirtd(&self.root, self.libvirtd_pid);
        // What is still inside (a QEMU whose destroy failed, a tunnel, a node that outlived its
        // parent) would keep the namespace, and its guest, alive after the name is gone.
        kill_netns_processes(self.netns_inode);
        let _ = run(Command::new("ip").args(["netns", "del", &self.netns]));
    }
}

/// The libvirt socket of a libvirtd started by [`start_libvirtd`] under `root`, as seen from
/// outside its mount namespace.
pub fn libvirt_socket(root: &Path) -> PathBuf {
    root.join("run").join("libvirt-sock")
}

/// A URI reaching the libvirtd under `root` from outside its namespaces.
pub fn libvirt_outside_uri(root: &Path) -> String {
    format!(
        "qemu+unix:///system?socket={}",
        libvirt_socket(root).display()
    )
}

fn virsh(root: &Path, args: &[&str]) -> Result<String, HostError> {
    run(Command::new("virsh")
        .args(["-q", "-c", &libvirt_outside_uri(root)])
        .args(args))
}

/// Starts a libvirtd inside the existing network namespace `netns`, in a private mount and UTS
/// namespace of its own (host name `hostname`, libvirt directories under `root`, its own host
/// UUID), and waits until it answers. Returns its pid: `nsenter -t PID -m -n -u` enters the
/// host. Used by [`HostSet`] and by `sitenet` for sites with their own libvirt.
pub fn start_libvirtd(netns: &str, hostname: &str, root: &Path) -> Result<u32, HostError> {
    available()?;
    ensure_system_bits()?;
    // A run that died leaves libvirtd's pid file and socket behind; the pid wait below would
    // take the dead daemon's pid for the new one's.
    let _ = std::fs::remove_dir_all(root.join("run"));
    for (_, sub) in BIND_MOUNTS {
        std::fs::create_dir_all(root.join(sub))?;
    }
    std::fs::create_dir_all(root.join("log").join("qemu"))?;
    let caps = root.join("cache").join("qemu").join("capabilities");
    std::fs::create_dir_all(&caps)?;
    let shared_caps = std::env::temp_dir().join(CAPS_CACHE);
    copy_dir(&shared_caps, &caps);
    let uuid = uuid::Uuid::new_v4();
    std::fs::write(
        root.join("etc").join("libvirtd.conf"),
        format!(
            "listen_tls = 0\nlisten_tcp = 0\nauth_unix_rw = \"none\"\nhost_uuid = \"{uuid}\"\n\
             log_outputs = \"3:file:/var/log/libvirt/libvirtd.log\"\n"
        ),
    )?;
    std::fs::write(root.join("etc").join("qemu.conf"), QEMU_CONF)?;

    let mut script = format!("hostname {hostname}\n");
    for (mount_point, sub) in BIND_MOUNTS {
        std::fs::create_dir_all(mount_point)?;
        script.push_str(&format!(
            "mount --bind '{}' {mount_point}\n",
            root.join(sub).display()
        ));
    }
    script.push_str("exec /usr/sbin/libvirtd --daemon --pid-file /run/libvirt/libvirtd.pid\n");
    run(Command::new("ip").args([
        "netns",
        "exec",
        netns,
        "unshare",
        "-m",
        "-u",
        "--propagation",
        "private",
        "sh",
        "-ec",
        &script,
    ]))?;
    let pid_file = root.join("run").join("libvirtd.pid");
    let mut pid = 0;
    wait_until("libvirtd to write its pid", START_TIMEOUT, || {
        std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .map(|p| pid = p)
            .is_some()
    })?;
    let socket = libvirt_socket(root);
    let answered = wait_until("libvirtd's socket", START_TIMEOUT, || socket.exists()).and_then(
        // The first connection runs QEMU's capabilities probe; wait for it once here.
        |()| {
            wait_until("libvirtd to answer", START_TIMEOUT, || {
                virsh(root, &["version"]).is_ok()
            })
        },
    );
    if let Err(e) = answered {
        stop_libvirtd(root, pid);
        return Err(e);
    }
    let _ = std::fs::create_dir_all(&shared_caps);
    copy_dir(&caps, &shared_caps);
    Ok(pid)
}

/// Destroys the domains of the libvirtd under `root` and stops it (best effort).
pub fn stop_libvirtd(root: &Path, pid: u32) {
    if let Ok(names) = virsh(root, &["list", "--name"]) {
        for d in names.lines().map(str::trim).filter(|d| !d.is_empty()) {
            let _ = virsh(root, &["destroy", d]);
        }
    }
    let _ = run(Command::new("kill").arg(pid.to_string()));
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let _ = wait_until("libvirtd to exit", Duration::from_secs(10), || {
        !proc_dir.exists()
    });
}

/// What a [`HostSet`] created, written to [`REGISTRY_DIR`] before each piece is made.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Record {
    owner_pid: u32,
    /// The owner's start time (clock ticks after boot): a recycled pid is not the owner.
    owner_start: u64,
    bridge: String,
    hosts: Vec<RecordedHost>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct RecordedHost {
    netns: String,
    /// Known once the namespace exists.
    netns_inode: Option<u64>,
}

impl Record {
    fn path(&self) -> PathBuf {
        Path::new(REGISTRY_DIR).join(format!("{}.json", self.bridge))
    }

    fn save(&self) -> Result<(), HostError> {
        std::fs::create_dir_all(REGISTRY_DIR)?;
        let path = self.path();
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, text)?;
        // A rename, so a reader never sees half a record.
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    fn remove(&self) {
        let _ = std::fs::remove_file(self.path());
    }

    /// Removes everything the record names. Processes are killed outright: their owner is
    /// gone, nothing will ever talk to them again.
    fn clean(&self) {
        for h in &self.hosts {
            // Only while the name still holds the namespace: once a namespace is gone its
            // inode number is reused, and the processes of someone else's namespace are not
            // ours to kill. The name is deleted last (see `Host::stop`), so while anything of
            // ours runs in it, it is there.
            match netns_inode(&h.netns) {
                Ok(inode) if h.netns_inode.is_none_or(|r| r == inode) => {
                    kill_netns_processes(inode)
                }
                _ => {}
            }
            let _ = run(Command::new("ip").args(["netns", "del", &h.netns]));
        }
        let _ = run(Command::new("ip").args(["link", "del", &self.bridge]));
    }
}

/// The start time of process `pid` (field 22 of `/proc/PID/stat`), if it runs; a zombie (dead,
/// not yet reaped by its parent) does not run.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    if fields.next()? == "Z" {
        return None;
    }
    // Field 3 (the state) was taken; the start time is field 22.
    fields.nth(18)?.parse().ok()
}

fn netns_inode(name: &str) -> Result<u64, HostError> {
    Ok(std::fs::metadata(Path::new("/run/netns").join(name))?.ino())
}

/// Every process whose network namespace is the one with `inode`.
pub fn processes_in_netns(inode: u64) -> Vec<u32> {
    let want = format!("net:[{inode}]");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let ns = std::fs::read_link(e.path().join("ns").join("net")).ok()?;
            (ns.to_str() == Some(want.as_str())).then_some(pid)
        })
        .collect()
}

/// SIGKILLs every process in the network namespace and waits until they are gone.
fn kill_netns_processes(inode: u64) {
    let _ = wait_until(
        "the namespace's processes to exit",
        Duration::from_secs(10),
        || {
            let pids = processes_in_netns(inode);
            if pids.is_empty() {
                return true;
            }
            let _ = run(Command::new("kill")
                .arg("-KILL")
                .args(pids.iter().map(u32::to_string)));
            false
        },
    );
}

/// Removes what earlier `HostSet`s whose process died without dropping them left behind, and
/// returns their bridges' names. Records of live owners (concurrent test processes, another
/// `dev up`) are left alone.
pub fn remove_leftovers() -> Vec<String> {
    remove_leftovers_in(Path::new(REGISTRY_DIR))
}

fn remove_leftovers_in(registry: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(registry) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let Ok(text) = std::fs::read(&path) else {
            continue;
        };
        let Ok(record) = serde_json::from_slice::<Record>(&text) else {
            // Records are renamed into place whole; one that does not parse is not ours.
            continue;
        };
        if process_start(record.owner_pid) == Some(record.owner_start) {
            continue;
        }
        record.clean();
        let _ = std::fs::remove_file(&path);
        removed.push(record.bridge);
    }
    removed
}

/// Several hosts on one bridge; dropping it tears everything down.
#[derive(Debug)]
pub struct HostSet {
    pub hosts: Vec<Host>,
    pub bridge: String,
    /// The bridge's own address (the root namespace's foot on the hosts' network).
    pub gateway: Ipv4Addr,
    root: PathBuf,
    record: Record,
}

impl HostSet {
    /// Starts `n` hosts under `root` (created if needed). The bridge and namespace names are
    /// derived from this process's id, so concurrent test processes do not collide; the /24 is
    /// a free one, kept under `root` for the next start (see [`choose_subnet`]).
    /// Leftovers of earlier sets whose process died are removed first (see [`remove_leftovers`]).
    pub fn start(root: &Path, n: usize) -> Result<HostSet, HostError> {
        available()?;
        ensure_system_bits()?;
        for bridge in remove_leftovers() {
            tracing::warn!(%bridge, "removed the libvirt hosts a dead process left behind");
        }
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{}{}", pid % 100_000, seq % 10);
        std::fs::create_dir_all(root)?;
        // Candidates start from the pid and sequence, so concurrent processes start apart.
        let third = choose_subnet(root, pid.wrapping_mul(7).wrapping_add(seq * 31))?;
        let subnet = [10u8, 250, third];
        let bridge = format!("ncb{tag}");
        let gateway = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 254);
        let record = Record {
            owner_pid: pid,
            owner_start: process_start(pid).unwrap_or_default(),
            bridge: bridge.clone(),
            hosts: (0..n)
                .map(|i| RecordedHost {
                    netns: format!("nc{tag}h{}", i + 1),
                    netns_inode: None,
                })
                .collect(),
        };
        // Recorded before anything exists, so a death at any point leaves nothing unnamed.
        record.save()?;
        let mut set = HostSet {
            hosts: Vec::new(),
            bridge: bridge.clone(),
            gateway,
            root: root.to_path_buf(),
            record,
        };
        run(Command::new("ip").args(["link", "add", &bridge, "type", "bridge"]))?;
        run(Command::new("ip").args(["addr", "add", &format!("{gateway}/24"), "dev", &bridge]))?;
        run(Command::new("ip").args(["link", "set", &bridge, "up"]))?;
        for i in 0..n {
            match set.start_host(&tag, subnet, i) {
                Ok(host) => {
                    if let Some(r) = set.record.hosts.get_mut(i) {
                        r.netns_inode = Some(host.netns_inode);
                    }
                    set.record.save()?;
                    set.hosts.push(host);
                }
                Err(e) => {
                    // The hosts already started go with `set`; this one's pieces go here.
                    let root = set.root.join(format!("nchost{}", i + 1));
                    if let Some(pid) =
                        std::fs::read_to_string(root.join("run").join("libvirtd.pid"))
                            .ok()
                            .and_then(|p| p.trim().parse::<u32>().ok())
                    {
                        let _ = run(Command::new("kill").arg(pid.to_string()));
                    }
                    let netns = format!("nc{tag}h{}", i + 1);
                    if let Ok(inode) = netns_inode(&netns) {
                        kill_netns_processes(inode);
                    }
                    let _ = run(Command::new("ip").args(["netns", "del", &netns]));
                    return Err(e);
                }
            }
        }
        Ok(set)
    }

    fn start_host(&self, tag: &str, subnet: [u8; 3], i: usize) -> Result<Host, HostError> {
        let index = u8::try_from(i + 1).unwrap_or(253).min(253);
        let name = format!("nchost{}", i + 1);
        let netns = format!("nc{tag}h{}", i + 1);
        let addr = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], index);
        let root = self.root.join(&name);

        run(Command::new("ip").args(["netns", "add", &netns]))?;
        let netns_inode = netns_inode(&netns)?;
        let veth_out = format!("ncv{tag}{}", i + 1);
        run(Command::new("ip").args([
            "link", "add", &veth_out, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ]))?;
        run(Command::new("ip").args(["link", "set", &veth_out, "master", &self.bridge]))?;
        run(Command::new("ip").args(["link", "set", &veth_out, "up"]))?;
        let in_ns = |args: &[&str]| run(Command::new("ip").args(["-n", &netns]).args(args));
        in_ns(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        in_ns(&["link", "set", "eth0", "up"])?;
        in_ns(&["link", "set", "lo", "up"])?;

        let libvirtd_pid = start_libvirtd(&netns, &name, &root)?;
        Ok(Host {
            name,
            netns,
            addr,
            root,
            libvirtd_pid,
            netns_inode,
        })
    }
}

impl Drop for HostSet {
    fn drop(&mut self) {
        for h in &self.hosts {
            h.stop();
        }
        let _ = run(Command::new("ip").args(["link", "del", &self.bridge]));
        self.record.remove();
    }
}

/// Remembers the subnet of the hosts under a root (see [`choose_subnet`]).
const SUBNET_FILE: &str = "subnet";

/// The X of the hosts' 10.250.X.0/24: the one the hosts under `root` had before, so that nodes
/// restarted from their data dirs (which stored their addresses) find them again; else the first
/// one no interface of this namespace uses, trying from `start` on.
fn choose_subnet(root: &Path, start: u32) -> Result<u8, HostError> {
    let addrs = run(Command::new("ip").args(["-4", "-o", "addr", "show"]))?;
    // "inet 10.250.1." does not match 10.250.10.x: the dot ends the octet.
    let used = |x: u8| addrs.contains(&format!("inet 10.250.{x}."));
    let file = root.join(SUBNET_FILE);
    if let Some(x) = std::fs::read_to_string(&file)
        .ok()
        .and_then(|s| s.trim().parse::<u8>().ok())
    {
        if used(x) {
            return Err(HostError::SubnetInUse(x, root.to_path_buf()));
        }
        return Ok(x);
    }
    for k in 0..250u32 {
        let x = u8::try_from(start.wrapping_add(k) % 250).unwrap_or(0) + 1;
        if !used(x) {
            std::fs::write(&file, format!("{x}\n"))?;
            return Ok(x);
        }
    }
    Err(HostError::NoFreeSubnet)
}

/// libvirt looks its compiled-in QEMU user up before reading qemu.conf: it must exist.
fn ensure_system_bits() -> Result<(), HostError> {
    let exists = Command::new("getent")
        .args(["passwd", "libvirt-qemu"])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !exists {
        run(Command::new("useradd").args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/var/lib/libvirt",
            "--shell",
            "/usr/sbin/nologin",
            "libvirt-qemu",
        ]))?;
    }
    Ok(())
}

/// Best-effort copy of the files of one directory (the capabilities cache is an optimisation).
fn copy_dir(from: &Path, to: &Path) {
    if let Ok(entries) = std::fs::read_dir(from) {
        for e in entries.flatten() {
            if e.path().is_file() {
                let _ = std::fs::copy(e.path(), to.join(e.file_name()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(owner_pid: u32, owner_start: u64, bridge: &str) -> Record {
        Record {
            owner_pid,
            owner_start,
            bridge: bridge.into(),
            hosts: vec![RecordedHost {
                // Names no namespace: cleaning it is a no-op that must not fail.
                netns: format!("{bridge}-none"),
                netns_inode: None,
            }],
        }
    }

    fn write(dir: &Path, r: &Record) {
        std::fs::write(
            dir.join(format!("{}.json", r.bridge)),
            serde_json::to_vec(r).unwrap(),
        )
        .unwrap();
    }

    #[test]
    fn a_process_start_time_names_a_running_process_only() {
        let me = std::process::id();
        let start = process_start(me).unwrap();
        assert_eq!(process_start(me), Some(start), "stable while it runs");
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert_eq!(process_start(pid), None, "a reaped process does not run");
    }

    #[test]
    fn only_records_of_dead_owners_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let mine = record(me, process_start(me).unwrap(), "nctestlive");
        // Same pid, other start time: the pid was recycled, the owner is gone.
        let recycled = record(me, process_start(me).unwrap() + 1, "nctestrecycled");
        let mut child = Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap();
        let dead = record(dead_pid, 1, "nctestdead");
        for r in [&mine, &recycled, &dead] {
            write(dir.path(), r);
        }
        std::fs::write(dir.path().join("garbage.json"), b"{").unwrap();

        let mut removed = remove_leftovers_in(dir.path());
        removed.sort();
        assert_eq!(removed, vec!["nctestdead", "nctestrecycled"]);
        assert!(dir.path().join("nctestlive.json").exists());
        assert!(!dir.path().join("nctestdead.json").exists());
        assert!(!dir.path().join("nctestrecycled.json").exists());
        // Not ours to judge: left as it is.
        assert!(dir.path().join("garbage.json").exists());
        assert!(remove_leftovers_in(&dir.path().join("absent")).is_empty());
    }
}
