//! `cargo xtask package`: the Debian package of the `novacron` binary, and its CI checks.
//!
//! The package is staged as a plain directory tree and built with `dpkg-deb --build`, so no
//! packaging tool beyond dpkg is needed. It installs the binary, the hardened systemd unit, the
//! generated example configuration (as the conffile `/etc/default/novacron`) and the operations
//! guide; its maintainer scripts create the `novacron` system user and the state directory.
//!
//! `cargo xtask deploy-check` (a CI step) installs the package with dpkg (root only), verifies
//! the unit and starts a single-node cluster from the installed files; and validates the
//! Kubernetes manifests and the compose file offline with validators from PyPI that bundle their
//! schemas.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::process::{is_root, output_of, run_inherit, wait_for};

/// The validators CI installs from PyPI; pinned so a new release cannot change what passes.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
const CHECK_JSONSCHEMA: &str = "check-jsonschema==0.39.0";

#[derive(Args)]
pub(crate) struct PackageArgs {
    /// Package this binary instead of building `target/release/novacron`.
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Where to write the .deb (default: the target directory's `debian/`).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Builds the .deb and returns its path.
pub(crate) fn run(args: &PackageArgs) -> Result<()> {
    let deb = build(args.bin.clone(), args.out.clone())?;
    println!("{}", deb.display());
    Ok(())
}

/// The workspace version, from `[workspace.package]` of the root manifest.
fn workspace_version() -> Result<String> {
    let manifest = std::fs::read_to_string(crate::workspace_root().join("Cargo.toml"))?;
    let mut in_section = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_section = line == "[workspace.package]";
        } else if in_section {
            if let Some(v) = line.strip_prefix("version") {
                let v = v.trim_start().trim_start_matches('=').trim();
                return Ok(v.trim_matches('"').to_string());
            }
        }
    }
    bail!("no version in [workspace.package] of Cargo.toml")
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn write(to: &Path, text: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(to, text)?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Stages the package tree and builds the .deb.
pub(crate) fn build(bin: Option<PathBuf>, out: Option<PathBuf>) -> Result<PathBuf> {
    let root = crate::workspace_root();
    let bin = match bin {
        Some(b) => b,
        None => {
            run_inherit(crate::cargo().args([
                "build",
                "--release",
                "-p",
                "node",
                "--bin",
                "novacron",
            ]))?;
            crate::target_dir().join("release").join("novacron")
        }
    };
    let version = workspace_version()?;
    let arch = output_of(Command::new("dpkg").arg("--print-architecture"))?;
    let out = out.unwrap_or_else(|| crate::target_dir().join("debian"));
    let stage = out.join(format!("novacron_{version}_{arch}"));
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    let deploy = root.join("deploy");
    copy(&bin, &stage.join("usr/bin/novacron"), 0o755)?;
    copy(
        &deploy.join("novacron.service"),
        &stage.join("lib/systemd/system/novacron.service"),
        0o644,
    )?;
    copy(
        &deploy.join("novacron.env"),
        &stage.join("etc/default/novacron"),
        0o644,
    )?;
    copy(
        &root.join("docs/operations.md"),
        &stage.join("usr/share/doc/novacron/operations.md"),
        0o644,
    )?;
    write(
        &stage.join("usr/share/doc/novacron/copyright"),
        "NovaCron\nLicense: see the project's repository. The binary links libvirt (LGPL-2.1).\n",
        0o644,
    )?;
    for script in ["postinst", "prerm", "postrm"] {
        copy(
            &deploy.join("debian").join(script),
            &stage.join("DEBIAN").join(script),
            0o755,
        )?;
    }
    write(
        &stage.join("DEBIAN/conffiles"),
        "/etc/default/novacron\n",
        0o644,
    )?;
    let installed_kib = output_of(Command::new("du").args(["-sk"]).arg(stage.join("usr")))?
        .split_whitespace()
        .next()
        .unwrap_or("0")
        .to_string();
    write(
        &stage.join("DEBIAN/control"),
        &format!(
            "Package: novacron\n\
             Version: {version}\n\
             Architecture: {arch}\n\
             Maintainer: NovaCron developers <novacron@localhost>\n\
             Installed-Size: {installed_kib}\n\
             Depends: libc6, libvirt0, passwd\n\
             Recommends: libvirt-daemon-system\n\
             Section: admin\n\
             Priority: optional\n\
             Description: control plane for virtual machines\n \
             One binary per node: a replicated cluster state (Raft), the REST API and\n \
             dashboard on every node, and an agent driving the local libvirt.\n"
        ),
        0o644,
    )?;
    let deb = out.join(format!("novacron_{version}_{arch}.deb"));
    run_inherit(
        Command::new("dpkg-deb")
            // gzip: a debug binary is large and xz takes minutes on a busy CI machine.
            .args(["--build", "--root-owner-group", "-Zgzip"])
            .arg(&stage)
            .arg(&deb),
    )?;
    Ok(deb)
}

/// The CI step: offline validation of the manifests, then (as root) the package installed,
/// its unit verified and a single-node cluster started from it.
pub(crate) fn deploy_check() -> Result<()> {
    validate_manifests()?;
    if !is_root() {
        println!("not root: skipping the package install check");
        return Ok(());
    }
    run_inherit(crate::cargo().args(["build", "-p", "node", "--bin", "novacron"]))?;
    let out = tempfile::tempdir()?;
    let deb = build(
        Some(crate::target_dir().join("debug").join("novacron")),
        Some(out.path().to_path_buf()),
    )?;
    install_and_start(&deb)
}

/// kubernetes-validate and check-jsonschema carry their schemas: no network at validation.
fn validate_manifests() -> Result<()> {
    run_inherit(Command::new("python3").args([
        "-m",
        "pip",
        "install",
        "--quiet",
        KUBERNETES_VALIDATE,
        CHECK_JSONSCHEMA,
    ]))?;
    let deploy = crate::workspace_root().join("deploy");
    run_inherit(
        Command::new("kubernetes-validate")
            .args(["--strict", "--quiet"])
            .arg(deploy.join("k8s/novacron.yaml")),
    )?;
    run_inherit(
        Command::new("check-jsonschema")
            .args(["--builtin-schema", "vendor.compose-spec"])
            .arg(deploy.join("compose.yaml")),
    )?;
    Ok(())
}

/// Removes the package (and its state) when the check ends, however it ends.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "novacron"]).status();
    }
}

/// A free TCP port on loopback (the tiny race until the node binds it is acceptable here).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn install_and_start(deb: &Path) -> Result<()> {
    if Path::new("/usr/bin/novacron").exists() && !package_installed() {
        bail!("/usr/bin/novacron exists but does not belong to the package; refusing to overwrite");
    }
    run_inherit(Command::new("dpkg").arg("--install").arg(deb))?;
    let _purge = Purge;
    let unit = Path::new("/lib/systemd/system/novacron.service");
    let user = output_of(Command::new("getent").args(["passwd", "novacron"]))?;
    println!("service user: {user}");
    let api_port = free_port()?;
    let peer_port = free_port()?;
    let settings = format!(
        "NOVACRON_INIT=true\nNOVACRON_NAME=pkg1\nNOVACRON_API_ADDR=127.0.0.1:{api_port}\n\
         NOVACRON_PEER_ADDR=127.0.0.1:{peer_port}\nNOVACRON_LIBVIRT_URI=test:///default\n"
    );
    std::fs::write("/etc/default/novacron", &settings)?;
    let systemd_runs = Path::new("/run/systemd/system").exists();
    let mut child = None;
    if systemd_runs {
        run_inherit(Command::new("systemctl").arg("daemon-reload"))?;
        run_inherit(Command::new("systemctl").args(["start", "novacron.service"]))?;
    } else {
        // No systemd here (a container): check the unit offline, then run its ExecStart as
        // the unit would, as the service user with the unit's environment file.
        run_inherit(Command::new("systemd-analyze").arg("verify").arg(unit))?;
        let mut cmd = Command::new("runuser");
        cmd.args([
            "-u",
            "novacron",
            "--",
            "/usr/bin/novacron",
            "serve",
            "--data-dir",
            "/var/lib/novacron",
        ]);
        for line in settings.lines() {
            if let Some((k, v)) = line.split_once('=') {
                cmd.env(k, v);
            }
        }
        child = Some(cmd.spawn().context("starting the installed binary")?);
    }
    let ready = wait_for(
        "the packaged node to be ready",
        Duration::from_secs(60),
        || {
            Command::new("curl")
                .args(["-fsS", "-o", "/dev/null"])
                .arg(format!("http://127.0.0.1:{api_port}/readyz"))
                .status()
                .is_ok_and(|s| s.success())
        },
    );
    let owner =
        output_of(Command::new("stat").args(["-c", "%U %a", "/var/lib/novacron/node.json"]));
    if systemd_runs {
        let _ = Command::new("systemctl")
            .args(["stop", "novacron.service"])
            .status();
    } else if let Some(mut c) = child {
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let _ = c.wait();
    }
    ready?;
    let owner = owner?;
    if !owner.starts_with("novacron ") {
        bail!("the node's state is owned by {owner}, not by the service user");
    }
    println!("packaged node started a single-node cluster as user novacron ({owner})");
    Ok(())
}

fn package_installed() -> bool {
    output_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", "novacron"]))
        .is_ok_and(|s| s.contains("installed"))
}
