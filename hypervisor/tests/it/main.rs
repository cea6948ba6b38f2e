//! The hypervisor crate's one integration test binary: golden domain XML, the libvirt driver
//! against libvirt's in-process test driver, the image store on temporary directories, and a
//! real QEMU boot when a libvirt daemon is provided.

// Helpers outside `#[test]` functions fail the test on error just like the tests themselves;
// clippy.toml's allow-unwrap-in-tests covers only the latter.
#![allow(clippy::unwrap_used)]

mod golden;
mod images;
mod real_qemu;
mod test_driver;

use std::path::PathBuf;

use hypervisor::{DirectBoot, DiskFormat, DiskSpec, DomainType, NicSource, NicSpec, VmSpec};
use uuid::Uuid;

/// A spec like the tiny test guest's: direct kernel boot, one disk, one NIC, a serial console.
pub fn tiny_spec(vm_id: &str, epoch: u64) -> VmSpec {
    VmSpec {
        vm_id: vm_id.to_string(),
        uuid: Uuid::new_v4(),
        vcpus: 2,
        memory_mib: 128,
        domain_type: DomainType::Qemu,
        boot: Some(DirectBoot {
            kernel: PathBuf::from("/var/lib/novacron/guest/vmlinuz"),
            initrd: Some(PathBuf::from("/var/lib/novacron/guest/initrd.gz")),
            cmdline: Some("console=ttyS0 panic=-1".into()),
        }),
        disks: vec![DiskSpec {
            path: PathBuf::from(format!("/var/lib/novacron/vms/{vm_id}/root.qcow2")),
            format: DiskFormat::Qcow2,
            target_dev: "vda".into(),
            readonly: false,
        }],
        nics: vec![NicSpec {
            source: NicSource::Network("default".into()),
            mac: "52:54:00:12:34:56".into(),
        }],
        serial_console: true,
        epoch,
        owner: "cluster-a/1".into(),
    }
}
