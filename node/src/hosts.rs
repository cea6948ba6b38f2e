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

use std::net::Ipv4Addr;
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

    /// A command that runs `program` inside this host's network, mount and UTS namespaces.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        // Without --pid nsenter execs the program itself, so the child's pid is the program's.
        c.args(["-t", &self.libvirtd_pid.to_string(), "-m", "-n", "-u", "--"])
            .arg(program);
        c
    }

    /// The same as [`Host::command`], for tokio.
    pub fn tokio_command(&self, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        tokio::process::Command::from(self.command(program))
    }

    fn stop(&self) {
        stop_libvirtd(&self.root, self.libvirtd_pid);
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

/// Several hosts on one bridge; dropping it tears everything down.
#[derive(Debug)]
pub struct HostSet {
    pub hosts: Vec<Host>,
    pub bridge: String,
    /// The bridge's own address (the root namespace's foot on the hosts' network).
    pub gateway: Ipv4Addr,
    root: PathBuf,
}

impl HostSet {
    /// Starts `n` hosts under `root` (created if needed). The bridge and namespace names and the
    /// /24 are derived from this process's id, so concurrent test processes do not collide.
    pub fn start(root: &Path, n: usize) -> Result<HostSet, HostError> {
        available()?;
        ensure_system_bits()?;
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{}{}", pid % 100_000, seq % 10);
        // 10.250.X.0/24 with X from the pid and sequence: distinct for concurrent processes.
        let third =
            u8::try_from((pid.wrapping_mul(7).wrapping_add(seq * 31)) % 250).unwrap_or(0) + 1;
        let subnet = [10u8, 250, third];
        let bridge = format!("ncb{tag}");
        let gateway = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 254);
        std::fs::create_dir_all(root)?;
        let mut set = HostSet {
            hosts: Vec::new(),
            bridge: bridge.clone(),
            gateway,
            root: root.to_path_buf(),
        };
        run(Command::new("ip").args(["link", "add", &bridge, "type", "bridge"]))?;
        run(Command::new("ip").args(["addr", "add", &format!("{gateway}/24"), "dev", &bridge]))?;
        run(Command::new("ip").args(["link", "set", &bridge, "up"]))?;
        for i in 0..n {
            match set.start_host(&tag, subnet, i) {
                Ok(host) => set.hosts.push(host),
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
                    let _ = run(Command::new("ip").args([
                        "netns",
                        "del",
                        &format!("nc{tag}h{}", i + 1),
                    ]));
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
        })
    }
}

impl Drop for HostSet {
    fn drop(&mut self) {
        for h in &self.hosts {
            h.stop();
        }
        let _ = run(Command::new("ip").args(["link", "del", &self.bridge]));
    }
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
