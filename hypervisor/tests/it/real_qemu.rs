//! Boots the tiny guest (kernel + busybox initramfs) under real QEMU through a libvirt daemon,
//! reads its serial console until the boot marker, then destroys and undefines it.
//!
//! Needs `NOVACRON_LIBVIRT_URI` (for example `qemu:///system`), `NOVACRON_GUEST_KERNEL` and
//! `NOVACRON_GUEST_INITRD`; `NOVACRON_GUEST_MARKER` overrides the line waited for. Without the
//! URI the test prints why it skips and passes: a developer machine may have no libvirtd.

use std::path::PathBuf;
use std::time::Duration;

use hypervisor::{
    DirectBoot, DomainState, DomainType, Hypervisor, LibvirtConfig, LibvirtHypervisor, VmSpec,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// The two tests share one daemon and one of them restarts it: they take turns.
/// Tests that use the one system libvirtd take turns, across test processes too (nextest runs
/// each test in its own process), because one of them restarts the daemon.
fn daemon_turn() -> std::fs::File {
    let path = std::env::temp_dir().join("novacron-libvirtd.lock");
    let f = std::fs::File::create(path).expect("lock file");
    f.lock().expect("lock the libvirtd turn");
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_the_tiny_guest_and_reads_its_console() {
    let Ok(uri) = std::env::var("NOVACRON_LIBVIRT_URI") else {
        println!("SKIP real_qemu: NOVACRON_LIBVIRT_URI is not set (no libvirt daemon to use)");
        return;
    };
    let _turn = daemon_turn();
    let kernel = std::env::var("NOVACRON_GUEST_KERNEL")
        .expect("NOVACRON_GUEST_KERNEL must be set when NOVACRON_LIBVIRT_URI is");
    let initrd = std::env::var("NOVACRON_GUEST_INITRD")
        .expect("NOVACRON_GUEST_INITRD must be set when NOVACRON_LIBVIRT_URI is");
    let marker =
        std::env::var("NOVACRON_GUEST_MARKER").unwrap_or_else(|_| "TINYVM BOOTED".to_string());

    let mut config = LibvirtConfig::new(uri);
    // KVM exists on some CI machines without working for Linux guests: TCG always boots.
    config.force_domain_type = Some(DomainType::Qemu);
    let hv = LibvirtHypervisor::connect_with(config).await.unwrap();
    let caps = hv.capabilities().await.unwrap();

    let vm_id = format!("realqemu-{}", std::process::id());
    let spec = VmSpec {
        vm_id: vm_id.clone(),
        uuid: uuid::Uuid::new_v4(),
        vcpus: 1,
        memory_mib: 128,
        domain_type: caps.domain_type,
        boot: Some(DirectBoot {
            kernel: PathBuf::from(kernel),
            initrd: Some(PathBuf::from(initrd)),
            cmdline: Some("console=ttyS0 panic=-1 quiet".into()),
        }),
        disks: vec![],
        nics: vec![],
        serial_console: true,
        epoch: 1,
        owner: String::new(),
    };
    let name = spec.domain_name();
    hv.define(&spec).await.unwrap();
    hv.start(&name).await.unwrap();

    let mut console = hv.console(&name).await.unwrap();
    let mut seen = String::new();
    let found = tokio::time::timeout(BOOT_TIMEOUT, async {
        while let Some(chunk) = console.next_chunk().await {
            seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if seen.contains(&marker) {
                return true;
            }
        }
        false
    })
    .await;

    // Clean up before asserting, so a failure leaves no domain behind.
    let state = hv.state(&name).await.unwrap();
    hv.destroy(&name).await.unwrap();
    hv.undefine(&name).await.unwrap();
    assert_eq!(hv.state(&name).await.unwrap(), None);

    assert_eq!(state, Some(DomainState::Running));
    assert_eq!(
        found,
        Ok(true),
        "marker {marker:?} not seen on the console; got:\n{seen}"
    );
}

/// The same driver value keeps working across a libvirtd restart: calls fail with
/// `Unavailable` while the daemon is away and succeed again once it is back, without the caller
/// reconnecting. Needs `NOVACRON_LIBVIRT_URI` and `NOVACRON_LIBVIRTD_RESTART_CMD`, a shell
/// command that restarts the daemon behind that URI and returns once it is listening again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_after_a_libvirtd_restart() {
    let (Ok(uri), Ok(restart)) = (
        std::env::var("NOVACRON_LIBVIRT_URI"),
        std::env::var("NOVACRON_LIBVIRTD_RESTART_CMD"),
    ) else {
        println!(
            "SKIP libvirtd restart: NOVACRON_LIBVIRT_URI and NOVACRON_LIBVIRTD_RESTART_CMD are not both set"
        );
        return;
    };
    let _turn = daemon_turn();
    let hv = LibvirtHypervisor::connect(&uri).await.unwrap();
    hv.list().await.unwrap();

    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&restart)
        .status()
        .await
        .unwrap();
    assert!(status.success(), "restart command failed: {status}");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match hv.list().await {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    e.is_unavailable(),
                    "unexpected error while reconnecting: {e:?}"
                );
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "libvirt still unavailable after restart: {e}"
                );
                // Waiting on an external daemon: there is no event to await, so poll.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
