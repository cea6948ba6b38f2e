//! The image store on temporary directories: checksummed and resumable imports, listing and
//! deletion, qcow2 overlays through qemu-img, and the cloud-init seed image.

use std::io::Read;

use bytes::Bytes;
use hypervisor::{ImageError, ImageStore};
use sha2::{Digest, Sha256};

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn body(
    chunks: Vec<Vec<u8>>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Unpin {
    futures::stream::iter(chunks.into_iter().map(|c| Ok(Bytes::from(c))))
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

async fn store() -> (tempfile::TempDir, ImageStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path().join("store")).await.unwrap();
    (dir, store)
}

#[tokio::test]
async fn import_list_delete() {
    let (_dir, store) = store().await;
    let data = payload(300_000);
    let chunks = data.chunks(64 * 1024).map(<[u8]>::to_vec).collect();
    let info = store
        .import_stream("base.img", &sha(&data), 0, body(chunks))
        .await
        .unwrap();
    assert_eq!(info.size_bytes, data.len() as u64);
    assert_eq!(std::fs::read(&info.path).unwrap(), data);

    let listed = store.list().await.unwrap();
    assert_eq!(listed, vec![info.clone()]);
    assert_eq!(listed[0].sha256.as_deref(), Some(sha(&data).as_str()));

    // A second import under the same name is refused rather than overwriting a base image
    // that overlays may depend on.
    let err = store
        .import_stream("base.img", &sha(&data), 0, body(vec![data.clone()]))
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::AlreadyExists(_)), "{err:?}");

    store.delete("base.img").await.unwrap();
    assert!(store.list().await.unwrap().is_empty());
    let err = store.delete("base.img").await.unwrap_err();
    assert!(matches!(err, ImageError::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn a_wrong_checksum_discards_the_upload() {
    let (_dir, store) = store().await;
    let data = payload(10_000);
    let err = store
        .import_stream("bad.img", &sha(b"something else"), 0, body(vec![data]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ImageError::ChecksumMismatch { .. }),
        "{err:?}"
    );
    assert!(store.list().await.unwrap().is_empty());
    assert_eq!(store.upload_offset("bad.img").await.unwrap(), 0);
}

#[tokio::test]
async fn an_interrupted_import_resumes_at_its_offset() {
    let (_dir, store) = store().await;
    let data = payload(200_000);
    let (first, rest) = data.split_at(120_000);

    // The body fails after the first chunk, as a dropped connection would.
    let failing = futures::stream::iter(vec![
        Ok(Bytes::copy_from_slice(first)),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "gone",
        )),
    ]);
    let err = store
        .import_stream("big.img", &sha(&data), 0, failing)
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::Upload(_)), "{err:?}");
    let offset = store.upload_offset("big.img").await.unwrap();
    assert_eq!(offset, first.len() as u64);

    // A chunk at the wrong offset (a retry of what already landed) is refused.
    let err = store.write_chunk("big.img", 0, first).await.unwrap_err();
    match err {
        ImageError::OffsetMismatch { expected, got, .. } => {
            assert_eq!((expected, got), (offset, 0));
        }
        other => panic!("expected OffsetMismatch, got {other:?}"),
    }

    let info = store
        .import_stream("big.img", &sha(&data), offset, body(vec![rest.to_vec()]))
        .await
        .unwrap();
    assert_eq!(std::fs::read(info.path).unwrap(), data);
    assert_eq!(store.upload_offset("big.img").await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chunks_racing_for_one_offset_store_exactly_one() {
    let (_dir, store) = store().await;
    for round in 0..5 {
        let name = format!("race-{round}");
        let tasks: Vec<_> = (0..16u8)
            .map(|k| {
                let store = store.clone();
                let name = name.clone();
                tokio::spawn(async move { store.write_chunk(&name, 0, &[k; 4096]).await })
            })
            .collect();
        let mut stored = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(end) => {
                    assert_eq!(end, 4096);
                    stored += 1;
                }
                Err(ImageError::OffsetMismatch { expected, .. }) => assert_eq!(expected, 4096),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(stored, 1, "round {round}");
        assert_eq!(store.upload_offset(&name).await.unwrap(), 4096);
    }
}

#[tokio::test]
async fn names_that_are_not_file_names_are_refused() {
    let (_dir, store) = store().await;
    for name in ["../escape", "a/b", ".hidden", ""] {
        let err = store.write_chunk(name, 0, b"x").await.unwrap_err();
        assert!(
            matches!(err, ImageError::InvalidName(_)),
            "{name:?}: {err:?}"
        );
    }
    let err = store.remove_vm_files("..").await.unwrap_err();
    assert!(matches!(err, ImageError::InvalidName(_)), "{err:?}");
}

fn qemu_img_info(path: &std::path::Path) -> serde_json::Value {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn overlays_are_backed_by_the_base_and_removed_with_the_vm() {
    let (dir, store) = store().await;
    // A real qcow2 base, imported the way an upload would be.
    let base_src = dir.path().join("src.qcow2");
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base_src)
        .arg("1G")
        .status()
        .unwrap();
    assert!(status.success());
    let base_bytes = std::fs::read(&base_src).unwrap();
    let base = store
        .import_stream(
            "debian.qcow2",
            &sha(&base_bytes),
            0,
            body(vec![base_bytes.clone()]),
        )
        .await
        .unwrap();

    let overlay = store
        .create_overlay("debian.qcow2", "vm-1", Some(2))
        .await
        .unwrap();
    let info = qemu_img_info(&overlay);
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 2u64 << 30);
    assert_eq!(
        info["backing-filename"].as_str().unwrap(),
        base.path.to_str().unwrap()
    );
    assert_eq!(info["backing-filename-format"], "qcow2");

    // Again: the existing disk is kept, not recreated.
    std::fs::write(overlay.with_file_name("marker"), b"x").unwrap();
    let again = store
        .create_overlay("debian.qcow2", "vm-1", Some(2))
        .await
        .unwrap();
    assert_eq!(again, overlay);

    let inherit = store
        .create_overlay("debian.qcow2", "vm-2", None)
        .await
        .unwrap();
    assert_eq!(qemu_img_info(&inherit)["virtual-size"], 1u64 << 30);

    let err = store
        .create_overlay("missing.qcow2", "vm-3", None)
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::NotFound(_)), "{err:?}");

    store.remove_vm_files("vm-1").await.unwrap();
    assert!(!overlay.parent().unwrap().exists());
    store.remove_vm_files("vm-1").await.unwrap();
    assert!(inherit.exists());
}

#[tokio::test]
async fn a_vm_without_an_image_gets_a_blank_disk_that_is_never_wiped() {
    let (_dir, store) = store().await;
    let disk = store.create_blank("vm-b", 3).await.unwrap();
    assert_eq!(disk, store.vm_disk_path("vm-b").unwrap());
    let info = qemu_img_info(&disk);
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 3u64 << 30);
    assert!(info.get("backing-filename").is_none());
    // A disk already there (kept from before, or copied from another site) stays as it is.
    let before = std::fs::read(&disk).unwrap();
    let mut changed = before.clone();
    changed.extend_from_slice(b"written by the guest");
    std::fs::write(&disk, &changed).unwrap();
    assert_eq!(store.create_blank("vm-b", 3).await.unwrap(), disk);
    assert_eq!(std::fs::read(&disk).unwrap(), changed);
    store.remove_vm_files("vm-b").await.unwrap();
    assert!(!disk.exists());
}

fn read_fat_file(image: &[u8], name: &str) -> String {
    let fs = fatfs::FileSystem::new(
        std::io::Cursor::new(image.to_vec()),
        fatfs::FsOptions::new(),
    )
    .unwrap();
    let mut s = String::new();
    fs.root_dir()
        .open_file(name)
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    s
}

#[tokio::test]
async fn cloud_init_seed_is_a_cidata_volume() {
    let (_dir, store) = store().await;
    let keys = vec!["ssh-ed25519 AAAAC3Nza test@example".to_string()];
    let user_data = "#cloud-config\npackages: [htop]\n";
    let path = store
        .cloud_init_seed("vm-9", "web-9", &keys, Some(user_data))
        .await
        .unwrap();
    let image = std::fs::read(&path).unwrap();
    let fs = fatfs::FileSystem::new(std::io::Cursor::new(image.clone()), fatfs::FsOptions::new())
        .unwrap();
    assert_eq!(fs.volume_label().trim(), "cidata");
    drop(fs);
    assert_eq!(
        read_fat_file(&image, "meta-data"),
        "instance-id: \"vm-9\"\nlocal-hostname: \"web-9\"\npublic-keys:\n  - \"ssh-ed25519 AAAAC3Nza test@example\"\n"
    );
    assert_eq!(read_fat_file(&image, "user-data"), user_data);

    // Without user data the guest still gets a valid, empty cloud-config.
    let path = store
        .cloud_init_seed("vm-9", "web-9", &[], None)
        .await
        .unwrap();
    let image = std::fs::read(&path).unwrap();
    assert_eq!(read_fat_file(&image, "user-data"), "#cloud-config\n");

    let err = store
        .cloud_init_seed("vm-9", "bad host", &[], None)
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::InvalidSeed(_)), "{err:?}");
}
