//! `cargo xtask libvirtd`: make `qemu:///system` answer, starting libvirtd by hand if needed.
//!
//! Containers and CI machines have no systemd, so nothing starts libvirtd for us. A hand-started
//! monolithic libvirtd needs the `libvirt-qemu` user (libvirt looks it up before reading
//! qemu.conf), `/var/log/libvirt/qemu`, and a qemu.conf that turns off what a container lacks
//! (security drivers, cgroup controllers, mount namespaces).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::process::{is_root, run_inherit, succeeds_within, wait_for};

const URI: &str = "qemu:///system";
const SOCKET: &str = "/run/libvirt/libvirt-sock";
const QEMU_CONF: &str = "/etc/libvirt/qemu.conf";
/// The first connection probes QEMU's capabilities, which takes several seconds on a busy machine.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// The settings a hand-started libvirtd needs inside a container; VMs run as root without
/// confinement there, which is acceptable for tests and not meant for production hosts.
const QEMU_CONF_BODY: &str = "\
# Written by `cargo xtask libvirtd` for a libvirtd started by hand in a container or CI machine.
user = \"root\"
group = \"root\"
dynamic_ownership = 0
remember_owner = 0
security_driver = \"none\"
stdio_handler = \"file\"
cgroup_controllers = [ ]
namespaces = [ ]
";

/// A shell command that restarts the hand-started libvirtd and returns once it answers again;
/// the tests that check recovery from a libvirtd restart run it.
pub(crate) const RESTART_CMD: &str = "pkill -x libvirtd; \
while pgrep -x libvirtd >/dev/null; do sleep 0.1; done; \
/usr/sbin/libvirtd --daemon --pid-file /run/libvirtd.pid; \
until virsh -q -c qemu:///system version >/dev/null 2>&1; do sleep 0.2; done";

/// Whether a libvirtd answers on `qemu:///system` right now.
fn answers() -> bool {
    succeeds_within(
        Command::new("virsh").args(["-q", "-c", URI, "version"]),
        Duration::from_secs(60),
    )
}

pub(crate) fn ensure() -> Result<()> {
    if Path::new(SOCKET).exists() && answers() {
        println!("libvirtd already answers on {URI}");
        return Ok(());
    }
    if !is_root() {
        bail!("no libvirtd answers on {URI} and only root can start one");
    }
    let libvirtd = ["/usr/sbin/libvirtd", "/usr/bin/libvirtd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("libvirtd is not installed (package libvirt-daemon)")?;

    let user_exists = succeeds_within(
        Command::new("getent").args(["passwd", "libvirt-qemu"]),
        Duration::from_secs(10),
    );
    if !user_exists {
        run_inherit(Command::new("useradd").args([
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
    std::fs::create_dir_all("/var/log/libvirt/qemu").context("creating /var/log/libvirt/qemu")?;
    write_qemu_conf()?;

    println!("starting {libvirtd} --daemon");
    // With --daemon libvirtd forks and its first process exits once the daemon is set up.
    run_inherit(Command::new(libvirtd).args(["--daemon", "--pid-file", "/run/libvirtd.pid"]))?;
    wait_for("the libvirtd socket", START_TIMEOUT, || {
        Path::new(SOCKET).exists()
    })?;
    wait_for(
        &format!("libvirtd to answer on {URI}"),
        START_TIMEOUT,
        answers,
    )?;
    println!("libvirtd answers on {URI}");
    Ok(())
}

/// Writes our qemu.conf, keeping a copy of a different one that was there before.
fn write_qemu_conf() -> Result<()> {
    let path = Path::new(QEMU_CONF);
    if let Ok(existing) = std::fs::read_to_string(path) {
        if existing == QEMU_CONF_BODY {
            return Ok(());
        }
        let backup = path.with_extension("conf.before-xtask");
        if !backup.exists() {
            std::fs::copy(path, &backup)
                .with_context(|| format!("keeping {QEMU_CONF} as {}", backup.display()))?;
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, QEMU_CONF_BODY).with_context(|| format!("writing {QEMU_CONF}"))
}
