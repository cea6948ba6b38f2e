//! Golden tests of `domain_xml`: each spec's XML is compared byte for byte with
//! `tests/golden/<name>.xml`. Set `UPDATE_GOLDEN=1` to rewrite the files after an intended
//! change, then review the diff.

use std::path::PathBuf;

use hypervisor::{
    domain_xml, DirectBoot, DiskFormat, DiskSpec, DomainType, NicSource, NicSpec, VmSpec,
};
use uuid::Uuid;

fn check(name: &str, spec: &VmSpec) {
    let xml = domain_xml(spec);
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.xml"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &xml).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}; run with UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    assert_eq!(
        xml, expected,
        "domain XML for {name} changed; rerun with UPDATE_GOLDEN=1 if intended"
    );
}

fn fixed_uuid(n: u8) -> Uuid {
    Uuid::from_bytes([n; 16])
}

fn minimal() -> VmSpec {
    VmSpec {
        vm_id: "min".into(),
        uuid: fixed_uuid(1),
        vcpus: 1,
        memory_mib: 64,
        domain_type: DomainType::Qemu,
        boot: None,
        disks: vec![],
        nics: vec![],
        serial_console: false,
        epoch: 0,
        owner: String::new(),
    }
}

#[test]
fn golden_minimal() {
    check("minimal", &minimal());
}

#[test]
fn golden_tiny_guest() {
    let mut spec = crate::tiny_spec("tiny-1", 3);
    spec.uuid = fixed_uuid(2);
    check("tiny_guest", &spec);
}

#[test]
fn golden_full_kvm() {
    let spec = VmSpec {
        vm_id: "web-7".into(),
        uuid: fixed_uuid(3),
        vcpus: 4,
        memory_mib: 4096,
        domain_type: DomainType::Kvm,
        boot: None,
        disks: vec![
            DiskSpec {
                path: PathBuf::from("/srv/nc/vms/web-7/root.qcow2"),
                format: DiskFormat::Qcow2,
                target_dev: "vda".into(),
                readonly: false,
            },
            DiskSpec {
                path: PathBuf::from("/srv/nc/vms/web-7/seed.img"),
                format: DiskFormat::Raw,
                target_dev: "vdb".into(),
                readonly: true,
            },
        ],
        nics: vec![
            NicSpec {
                source: NicSource::Network("default".into()),
                mac: "52:54:00:aa:bb:01".into(),
            },
            NicSpec {
                source: NicSource::Bridge("br0".into()),
                mac: "52:54:00:aa:bb:02".into(),
            },
        ],
        serial_console: true,
        epoch: 18_446_744_073_709_551_615,
        owner: String::new(),
    };
    spec.validate().unwrap();
    check("full_kvm", &spec);
}

/// Values full of markup characters: this spec would not pass `validate` (its id), which is
/// the point: the writer must escape whatever it is given.
fn hostile() -> VmSpec {
    VmSpec {
        vm_id: "a&b<c>'d\"e".into(),
        uuid: fixed_uuid(4),
        vcpus: 1,
        memory_mib: 128,
        domain_type: DomainType::Qemu,
        boot: Some(DirectBoot {
            kernel: PathBuf::from("/boot/k&<'>\""),
            initrd: None,
            cmdline: Some("console=ttyS0 x='<y>' z=\"&amp;\"\u{7}".into()),
        }),
        disks: vec![DiskSpec {
            path: PathBuf::from("/d/it's <mine>&.img"),
            format: DiskFormat::Raw,
            target_dev: "sda".into(),
            readonly: false,
        }],
        nics: vec![NicSpec {
            source: NicSource::Bridge("br'0\"<".into()),
            mac: "52:54:00:00:00:09".into(),
        }],
        serial_console: false,
        epoch: 1,
        owner: String::new(),
    }
}

#[test]
fn golden_escaping() {
    let spec = hostile();
    assert!(
        spec.validate().is_err(),
        "markup in a vm id must be refused"
    );
    check("escaping", &spec);
}

/// The escaped document is not only stable but correct: libvirt parses it and gives back the
/// exact name we meant.
#[test]
fn escaped_names_round_trip_through_libvirt() {
    virt::error::clear_error_callback();
    let conn = virt::connect::Connect::open(Some("test:///default")).unwrap();
    let mut spec = hostile();
    spec.uuid = Uuid::new_v4();
    let dom = conn.define_domain_xml(&domain_xml(&spec)).unwrap();
    assert_eq!(dom.name().unwrap(), "nc-a&b<c>'d\"e");
    let xml = dom.xml_desc(0).unwrap();
    assert!(
        xml.contains("&lt;y&gt;") && xml.contains("&amp;amp;"),
        "{xml}"
    );
    dom.undefine().unwrap();
}

#[test]
fn same_spec_same_bytes() {
    let spec = crate::tiny_spec("det", 9);
    assert_eq!(domain_xml(&spec), domain_xml(&spec.clone()));
}
