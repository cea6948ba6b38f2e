//! `ImageStore`: the per-node directory of disk images.
//!
//! Layout under the store root:
//! - `images/<name>`: imported base images, each with `<name>.sha256` beside it;
//! - `uploads/<name>.part`: imports in progress, resumable at their current length;
//! - `vms/<vm id>/`: per-VM files (the copy-on-write overlay `root.qcow2`, the cloud-init seed
//!   `seed.img`), removed together by `remove_vm_files`.
//!
//! Every file that appears under its final name got there by write to a temporary name, fsync,
//! rename, fsync of the directory: a crash leaves either the old state or the new, never half.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// What can go wrong in the image store.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Names become file names: only `[A-Za-z0-9._-]`, no leading dot.
    #[error("{0:?} is not a valid image or VM name")]
    InvalidName(String),
    #[error("image {0} not found")]
    NotFound(String),
    #[error("image {0} already exists")]
    AlreadyExists(String),
    /// A chunk must start where the upload stopped; the caller resumes at `expected`.
    #[error("upload of {name} is at byte {expected}, the chunk starts at byte {got}")]
    OffsetMismatch {
        name: String,
        expected: u64,
        got: u64,
    },
    /// The whole upload is discarded: its bytes are wrong and resuming cannot fix them.
    #[error("checksum of {name} is {actual}, expected {expected}")]
    ChecksumMismatch {
        name: String,
        expected: String,
        actual: String,
    },
    #[error("invalid cloud-init input: {0}")]
    InvalidSeed(String),
    #[error("I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Reading the upload body failed; what was written so far stays and can be resumed.
    #[error("reading the upload failed")]
    Upload(#[source] std::io::Error),
    #[error("cannot run qemu-img")]
    QemuImgSpawn(#[source] std::io::Error),
    #[error("qemu-img failed ({status}): {stderr}")]
    QemuImg { status: String, stderr: String },
    #[error("image store worker task failed")]
    Task(#[source] tokio::task::JoinError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One imported base image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub name: String,
    pub size_bytes: u64,
    /// Hex SHA-256 recorded at import.
    pub sha256: Option<String>,
    pub path: PathBuf,
}

/// One lock per image name, shared by the clones of a store.
type NameLocks = Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>;

/// The image directory of one node. Clones share the per-image locks that serialise writers
/// of one import (a chunk's offset is checked and then appended, so two chunks racing for the
/// same offset must not both pass the check).
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
    locks: NameLocks,
}

/// Image and VM names are used as file names.
fn check_name(name: &str) -> Result<(), ImageError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && !name.ends_with(".sha256")
        && !name.ends_with(".tmp")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(ImageError::InvalidName(name.to_string()))
    }
}

/// Makes a rename durable: the directory entry itself must reach the disk.
fn fsync_dir(dir: &Path) -> Result<(), ImageError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Writes `data` to `path` atomically (temp, fsync, rename, fsync dir).
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        fsync_dir(dir)?;
    }
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String, ImageError> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ImageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ImageError::Task)?
}

impl ImageStore {
    /// Opens (creating if needed) the store at `root`.
    pub async fn open(root: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let store = ImageStore {
            root: root.into(),
            locks: NameLocks::default(),
        };
        for dir in [store.images_dir(), store.uploads_dir(), store.vms_dir()] {
            tokio::fs::create_dir_all(&dir)
                .await
                .map_err(io_err(&dir))?;
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The lock of one image name; locks nobody holds are forgotten so the map stays small.
    fn lock_for(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        // A panic while holding this map's lock cannot leave it inconsistent (one insert).
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks.entry(name.to_string()).or_default().clone()
    }

    fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }
    fn uploads_dir(&self) -> PathBuf {
        self.root.join("uploads")
    }
    fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }
    fn part_path(&self, name: &str) -> PathBuf {
        self.uploads_dir().join(format!("{name}.part"))
    }
    fn sha_path(&self, name: &str) -> PathBuf {
        self.images_dir().join(format!("{name}.sha256"))
    }

    /// The path of an imported image.
    pub fn image_path(&self, name: &str) -> Result<PathBuf, ImageError> {
        check_name(name)?;
        Ok(self.images_dir().join(name))
    }

    /// The directory of one VM's files.
    pub fn vm_dir(&self, vm_id: &str) -> Result<PathBuf, ImageError> {
        check_name(vm_id)?;
        Ok(self.vms_dir().join(vm_id))
    }

    /// How many bytes of an interrupted import are stored: the offset to resume at.
    pub async fn upload_offset(&self, name: &str) -> Result<u64, ImageError> {
        check_name(name)?;
        let part = self.part_path(name);
        match tokio::fs::metadata(&part).await {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io_err(&part)(e)),
        }
    }

    /// Appends one chunk of an import. `offset` must equal `upload_offset`, so a retried or
    /// reordered chunk is refused instead of corrupting the image. The chunk is durable when
    /// this returns.
    pub async fn write_chunk(
        &self,
        name: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<u64, ImageError> {
        let lock = self.lock_for(name);
        let _writer = lock.lock().await;
        if tokio::fs::try_exists(self.image_path(name)?)
            .await
            .unwrap_or(false)
        {
            return Err(ImageError::AlreadyExists(name.to_string()));
        }
        let expected = self.upload_offset(name).await?;
        if offset != expected {
            return Err(ImageError::OffsetMismatch {
                name: name.to_string(),
                expected,
                got: offset,
            });
        }
        let part = self.part_path(name);
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .await
            .map_err(io_err(&part))?;
        f.write_all(data).await.map_err(io_err(&part))?;
        f.sync_data().await.map_err(io_err(&part))?;
        Ok(expected + data.len() as u64)
    }

    /// Checks the finished upload against `expected_sha256` (hex) and moves it into place.
    /// On a mismatch the upload is deleted.
    pub async fn finish_import(
        &self,
        name: &str,
        expected_sha256: &str,
    ) -> Result<ImageInfo, ImageError> {
        let final_path = self.image_path(name)?;
        let lock = self.lock_for(name);
        let _writer = lock.lock().await;
        let part = self.part_path(name);
        if !tokio::fs::try_exists(&part).await.unwrap_or(false) {
            return Err(ImageError::NotFound(name.to_string()));
        }
        let sha_path = self.sha_path(name);
        let images_dir = self.images_dir();
        let name = name.to_string();
        let expected = expected_sha256.to_ascii_lowercase();
        blocking(move || {
            let actual = sha256_file(&part)?;
            if actual != expected {
                std::fs::remove_file(&part).map_err(io_err(&part))?;
                return Err(ImageError::ChecksumMismatch {
                    name,
                    expected,
                    actual,
                });
            }
            let size_bytes = std::fs::File::open(&part)
                .and_then(|f| {
                    f.sync_all()?;
                    f.metadata()
                })
                .map_err(io_err(&part))?
                .len();
            // The checksum first: an image without its sidecar would look imported but
            // unverified after a crash between the two renames.
            write_atomic(&sha_path, format!("{actual}\n").as_bytes())?;
            std::fs::rename(&part, &final_path).map_err(io_err(&final_path))?;
            fsync_dir(&images_dir)?;
            Ok(ImageInfo {
                name,
                size_bytes,
                sha256: Some(actual),
                path: final_path,
            })
        })
        .await
    }

    /// Imports an image from a byte stream that starts at `offset` (0 for a new import, or
    /// `upload_offset` to resume), then verifies and installs it.
    pub async fn import_stream<S>(
        &self,
        name: &str,
        expected_sha256: &str,
        offset: u64,
        mut body: S,
    ) -> Result<ImageInfo, ImageError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Unpin,
    {
        let mut at = offset;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(ImageError::Upload)?;
            at = self.write_chunk(name, at, &chunk).await?;
        }
        self.finish_import(name, expected_sha256).await
    }

    /// Drops an unfinished import.
    pub async fn abort_import(&self, name: &str) -> Result<(), ImageError> {
        check_name(name)?;
        let lock = self.lock_for(name);
        let _writer = lock.lock().await;
        let part = self.part_path(name);
        match tokio::fs::remove_file(&part).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&part)(e)),
        }
    }

    /// The imported images, sorted by name.
    pub async fn list(&self) -> Result<Vec<ImageInfo>, ImageError> {
        let dir = self.images_dir();
        let mut entries = tokio::fs::read_dir(&dir).await.map_err(io_err(&dir))?;
        let mut out = Vec::new();
        while let Some(entry) = entries.next_entry().await.map_err(io_err(&dir))? {
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if check_name(&name).is_err() {
                continue; // sidecars and temporary files
            }
            let path = entry.path();
            let meta = entry.metadata().await.map_err(io_err(&path))?;
            let sha256 = tokio::fs::read_to_string(self.sha_path(&name))
                .await
                .ok()
                .map(|s| s.trim().to_string());
            out.push(ImageInfo {
                name,
                size_bytes: meta.len(),
                sha256,
                path,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Deletes an imported image. Overlays built on it stop working: the caller checks that no
    /// VM uses it.
    pub async fn delete(&self, name: &str) -> Result<(), ImageError> {
        let path = self.image_path(name)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::NotFound(name.to_string()))
            }
            Err(e) => return Err(io_err(&path)(e)),
        }
        let sha = self.sha_path(name);
        match tokio::fs::remove_file(&sha).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&sha)(e)),
        }
    }

    /// Creates the VM's copy-on-write root disk `vms/<vm_id>/root.qcow2` on top of base image
    /// `base`, with a virtual size of `size_gib` (or the base's size when `None`). If the overlay
    /// already exists it is returned as is, so a retried reconcile does not wipe the disk.
    pub async fn create_overlay(
        &self,
        base: &str,
        vm_id: &str,
        size_gib: Option<u64>,
    ) -> Result<PathBuf, ImageError> {
        let base_path = self.image_path(base)?;
        if !tokio::fs::try_exists(&base_path).await.unwrap_or(false) {
            return Err(ImageError::NotFound(base.to_string()));
        }
        let dir = self.vm_dir(vm_id)?;
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io_err(&dir))?;
        let overlay = dir.join("root.qcow2");
        if tokio::fs::try_exists(&overlay).await.unwrap_or(false) {
            return Ok(overlay);
        }
        let tmp = dir.join("root.qcow2.tmp");
        let mut cmd = tokio::process::Command::new("qemu-img");
        cmd.arg("create")
            .args(["-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&base_path)
            .arg(&tmp);
        if let Some(gib) = size_gib {
            cmd.arg(format!("{gib}G"));
        }
        let output = cmd.output().await.map_err(ImageError::QemuImgSpawn)?;
        if !output.status.success() {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(ImageError::QemuImg {
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        let overlay_for_task = overlay.clone();
        blocking(move || {
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io_err(&tmp))?;
            std::fs::rename(&tmp, &overlay_for_task).map_err(io_err(&overlay_for_task))?;
            fsync_dir(&dir)
        })
        .await?;
        Ok(overlay)
    }

    /// The root disk of a VM, wherever it came from (an overlay, a blank disk, a disk copied
    /// from another site): `vms/<vm_id>/root.qcow2`.
    pub fn vm_disk_path(&self, vm_id: &str) -> Result<PathBuf, ImageError> {
        Ok(self.vm_dir(vm_id)?.join("root.qcow2"))
    }

    /// Creates an empty qcow2 root disk of `size_gib` for a VM without an image, so that every
    /// VM with a disk size has a disk file (moved between sites by checksum). An existing disk
    /// is returned as is: a retried reconcile, or a disk that arrived from another site, is
    /// never wiped.
    pub async fn create_blank(&self, vm_id: &str, size_gib: u64) -> Result<PathBuf, ImageError> {
        let dir = self.vm_dir(vm_id)?;
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io_err(&dir))?;
        let disk = dir.join("root.qcow2");
        if tokio::fs::try_exists(&disk).await.unwrap_or(false) {
            return Ok(disk);
        }
        let tmp = dir.join("root.qcow2.tmp");
        let output = tokio::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&tmp)
            .arg(format!("{size_gib}G"))
            .output()
            .await
            .map_err(ImageError::QemuImgSpawn)?;
        if !output.status.success() {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(ImageError::QemuImg {
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        let disk_for_task = disk.clone();
        blocking(move || {
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io_err(&tmp))?;
            std::fs::rename(&tmp, &disk_for_task).map_err(io_err(&disk_for_task))?;
            fsync_dir(&dir)
        })
        .await?;
        Ok(disk)
    }

    /// Removes every file of a VM (overlay, seed). Missing files are not an error.
    pub async fn remove_vm_files(&self, vm_id: &str) -> Result<(), ImageError> {
        let dir = self.vm_dir(vm_id)?;
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&dir)(e)),
        }
    }

    /// Writes the VM's cloud-init NoCloud seed `vms/<vm_id>/seed.img`: a FAT image labelled
    /// `cidata` holding `meta-data` (instance id, hostname, SSH keys) and `user-data`. Attach
    /// it as a read-only raw disk. Rewritten on every call (hostname or keys may change).
    pub async fn cloud_init_seed(
        &self,
        vm_id: &str,
        hostname: &str,
        ssh_keys: &[String],
        user_data: Option<&str>,
    ) -> Result<PathBuf, ImageError> {
        let dir = self.vm_dir(vm_id)?;
        let meta_data = seed_meta_data(vm_id, hostname, ssh_keys)?;
        let user_data = user_data.unwrap_or("#cloud-config\n").to_string();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io_err(&dir))?;
        let path = dir.join("seed.img");
        let out = path.clone();
        blocking(move || {
            let image = fat_seed_image(&meta_data, &user_data).map_err(io_err(&out))?;
            write_atomic(&out, &image)
        })
        .await?;
        Ok(path)
    }
}

/// RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens.
fn check_hostname(hostname: &str) -> Result<(), ImageError> {
    let ok = !hostname.is_empty()
        && hostname.len() <= 253
        && hostname.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if ok {
        Ok(())
    } else {
        Err(ImageError::InvalidSeed(format!(
            "{hostname:?} is not a valid host name"
        )))
    }
}

/// A YAML double-quoted scalar.
fn yaml_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The NoCloud `meta-data` document.
fn seed_meta_data(vm_id: &str, hostname: &str, ssh_keys: &[String]) -> Result<String, ImageError> {
    check_hostname(hostname)?;
    let mut out = format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        yaml_quote(vm_id),
        yaml_quote(hostname)
    );
    if !ssh_keys.is_empty() {
        out.push_str("public-keys:\n");
        for key in ssh_keys {
            if key.contains(['\n', '\r']) || key.trim().is_empty() {
                return Err(ImageError::InvalidSeed(
                    "an SSH key must be one non-empty line".into(),
                ));
            }
            out.push_str(&format!("  - {}\n", yaml_quote(key.trim())));
        }
    }
    Ok(out)
}

/// Builds the FAT seed image in memory. Built with a library rather than `genisoimage` or
/// `mkfs.vfat` so a node needs no extra host tools; cloud-init accepts a vfat volume labelled
/// `cidata` as well as an ISO.
fn fat_seed_image(meta_data: &str, user_data: &str) -> std::io::Result<Vec<u8>> {
    const MIB: usize = 1 << 20;
    // Room for both files and FAT overhead, in whole MiB, at least 2 MiB.
    let size = (meta_data.len() + user_data.len()).div_ceil(MIB) * MIB + 2 * MIB;
    let mut disk = std::io::Cursor::new(vec![0u8; size]);
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new().volume_label(*b"cidata     "),
    )?;
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())?;
        for (name, content) in [("meta-data", meta_data), ("user-data", user_data)] {
            let mut f = fs.root_dir().create_file(name)?;
            f.truncate()?;
            f.write_all(content.as_bytes())?;
            f.flush()?;
        }
        fs.unmount()?;
    }
    Ok(disk.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_the_directory_are_refused() {
        for bad in ["", ".", "..", "../x", "a/b", ".hidden", "x.sha256", "a b"] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        check_name("debian-12.qcow2").unwrap();
    }

    #[test]
    fn meta_data_quotes_values_and_checks_hostnames() {
        let md =
            seed_meta_data("vm1", "web-1.example", &["ssh-ed25519 AAAA \"me\"".into()]).unwrap();
        assert_eq!(
            md,
            "instance-id: \"vm1\"\nlocal-hostname: \"web-1.example\"\npublic-keys:\n  - \"ssh-ed25519 AAAA \\\"me\\\"\"\n"
        );
        assert!(seed_meta_data("vm1", "-bad", &[]).is_err());
        assert!(seed_meta_data("vm1", "ok", &["a\nb".into()]).is_err());
    }
}
