//! `cargo xtask guest`: builds the tiny test guest from Debian packages: the cloud kernel and a
//! busybox initramfs whose init prints `TINYVM BOOTED`, then a `tick N` line every second.
//!
//! Output: `target/guest/vmlinuz` and `target/guest/initrd.gz`. Reused when already built.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::process::{output_of, run_inherit};

/// The marker the init script prints once the guest has booted.
pub(crate) const MARKER: &str = "TINYVM BOOTED";

pub(crate) struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

pub(crate) fn dir() -> PathBuf {
    crate::target_dir().join("guest")
}

/// Builds the guest unless both files exist already.
pub(crate) fn ensure() -> Result<Guest> {
    let dir = dir();
    let guest = Guest {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.gz"),
    };
    if guest.kernel.exists() && guest.initrd.exists() {
        println!("guest already built in {}", dir.display());
        return Ok(guest);
    }
    std::fs::create_dir_all(&dir)?;
    build_kernel(&dir, &guest.kernel)?;
    build_initrd(&dir, &guest.initrd)?;
    println!(
        "guest built: {} and {}",
        guest.kernel.display(),
        guest.initrd.display()
    );
    Ok(guest)
}

fn build_kernel(dir: &Path, out: &Path) -> Result<()> {
    // The metapackage names the current kernel package; download only that one.
    let mut depends =
        output_of(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]))
            .unwrap_or_default();
    if !depends.contains("Depends: linux-image-") {
        // A machine that never ran `apt-get update` has no package lists yet.
        run_inherit(Command::new("apt-get").args(["update", "-q"]))?;
        depends = output_of(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]))
            .context("apt-cache is needed to find the guest kernel")?;
    }
    let package = depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| {
            p.starts_with("linux-image-") && p.chars().nth(12).is_some_and(|c| c.is_ascii_digit())
        })
        .map(str::to_string)
        .context("no kernel package behind linux-image-cloud-amd64 (run apt-get update?)")?;
    run_inherit(
        Command::new("apt-get")
            .args(["download", "-q", &package])
            .current_dir(dir),
    )?;
    let deb = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&package) && n.ends_with(".deb"))
        })
        .context("apt-get download left no .deb")?;
    let tar = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(&deb)
        .output()
        .context("dpkg-deb")?;
    if !tar.status.success() {
        bail!("dpkg-deb failed on {}", deb.display());
    }
    let extract = dir.join("kernel-tree");
    std::fs::create_dir_all(&extract)?;
    let mut child = Command::new("tar")
        .args(["-x", "--wildcards", "./boot/vmlinuz-*"])
        .current_dir(&extract)
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().context("tar stdin")?;
        stdin.write_all(&tar.stdout)?;
    }
    if !child.wait()?.success() {
        bail!("tar could not extract the kernel");
    }
    let vmlinuz = std::fs::read_dir(extract.join("boot"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .context("no vmlinuz in the kernel package")?;
    std::fs::rename(&vmlinuz, out)?;
    std::fs::remove_dir_all(&extract)?;
    std::fs::remove_file(&deb)?;
    Ok(())
}

fn build_initrd(dir: &Path, out: &Path) -> Result<()> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        bail!("/bin/busybox is missing: apt-get install busybox-static");
    }
    let root = dir.join("initrd-root");
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    for d in ["bin", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy(busybox, root.join("bin/busybox"))?;
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nmount -t proc proc /proc\n\
         echo \"{MARKER}\"\ni=0; while true; do i=$((i+1)); echo \"tick $i\"; sleep 1; done\n"
    );
    let init_path = root.join("init");
    std::fs::write(&init_path, init)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&init_path, std::fs::Permissions::from_mode(0o755))?;
    }
    let script = format!(
        "cd '{}' && find . | /bin/busybox cpio -o -H newc 2>/dev/null | gzip -9 > '{}'",
        root.display(),
        out.display()
    );
    run_inherit(Command::new("sh").args(["-c", &script]))?;
    std::fs::remove_dir_all(&root)?;
    Ok(())
}
