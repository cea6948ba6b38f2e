//! `cargo xtask axe`: fetches axe-core, the accessibility engine the dashboard's browser tests
//! inject into each page, from npm at a pinned version and checks it against a pinned digest.
//!
//! The package is only a test tool: it lands under `target/axe-core/` and is never embedded in
//! the binary, so the build of `novacron` still needs no Node toolchain. `npm pack` downloads the
//! exact tarball (npm itself checks the registry's integrity field); the SHA-512 written here is
//! checked again, so a changed upstream tarball or a different registry cannot slip in unnoticed.
//! The browser tests find the script through `NOVACRON_AXE_JS`, which `cargo xtask ci` sets.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use base64::Engine;
use sha2::{Digest, Sha512};

/// The axe-core release the tests run (MPL-2.0; its licence is kept next to it).
pub(crate) const VERSION: &str = "4.14.1";
/// npm's `dist.integrity` of that release: base64 of the SHA-512 of the tarball.
const INTEGRITY_SHA512: &str =
    "FHfa+lmNjQZfJz1q8wKqIDwC6DExcHt/pkjNQb09a3NPjCKg2rhu5qb2S4r76ASyFNNtuFooJpZe37OgudVGtQ==";

/// Where the unpacked package lives.
fn dir() -> PathBuf {
    crate::target_dir().join("axe-core").join(VERSION)
}

/// The script the tests inject (`NOVACRON_AXE_JS`).
pub(crate) fn script() -> PathBuf {
    dir().join("package").join("axe.min.js")
}

/// Fetches and unpacks axe-core unless this version is already there; returns the script's path.
pub(crate) fn ensure() -> Result<PathBuf> {
    let script = script();
    if script.exists() {
        println!("axe-core {VERSION} already at {}", script.display());
        return Ok(script);
    }
    // npm often comes with Node.js from elsewhere; Debian's `npm` is installed only when none
    // answers, because it conflicts with those builds of Node.js.
    if !crate::process::succeeds_within(
        Command::new("npm").arg("--version"),
        std::time::Duration::from_secs(60),
    ) {
        crate::ci::install_packages(&["npm"])?;
    }
    let dir = dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::process::run_inherit(
        Command::new("npm")
            .args(["pack", "--silent", &format!("axe-core@{VERSION}")])
            .arg("--pack-destination")
            .arg(&dir)
            .current_dir(&dir),
    )
    .context("fetching axe-core with npm (is npm installed?)")?;
    let tarball = dir.join(format!("axe-core-{VERSION}.tgz"));
    let bytes =
        std::fs::read(&tarball).with_context(|| format!("reading {}", tarball.display()))?;
    let digest = base64::engine::general_purpose::STANDARD.encode(Sha512::digest(&bytes));
    if digest != INTEGRITY_SHA512 {
        // Leave nothing behind that a later run could mistake for the checked package.
        let _ = std::fs::remove_file(&tarball);
        bail!(
            "axe-core {VERSION} from npm has sha512-{digest}, expected sha512-{INTEGRITY_SHA512}"
        );
    }
    crate::process::run_inherit(
        Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&dir),
    )?;
    if !script.exists() {
        bail!("{} missing from the axe-core package", script.display());
    }
    println!("axe-core {VERSION} unpacked at {}", script.display());
    Ok(script)
}
