//! `VmSpec`: everything the hypervisor needs to define one VM, as plain serialisable data, and
//! its validation. The domain XML is derived from it in `xml.rs`; nothing here talks to libvirt.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::HypervisorError;

/// Every libvirt domain we own is named with this prefix, so the agent can tell ours apart from
/// domains someone else defined on the same host.
pub const DOMAIN_NAME_PREFIX: &str = "nc-";

/// The libvirt domain name of a VM id.
pub fn domain_name(vm_id: &str) -> String {
    format!("{DOMAIN_NAME_PREFIX}{vm_id}")
}

/// The VM id of one of our domain names, or `None` for a domain we do not manage.
pub fn vm_id_of(domain_name: &str) -> Option<&str> {
    domain_name
        .strip_prefix(DOMAIN_NAME_PREFIX)
        .filter(|id| !id.is_empty())
}

/// How the guest is virtualised: hardware-assisted or emulated (TCG).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DomainType {
    Kvm,
    Qemu,
}

impl DomainType {
    /// The value of libvirt's `<domain type='...'>`.
    pub fn as_str(self) -> &'static str {
        match self {
            DomainType::Kvm => "kvm",
            DomainType::Qemu => "qemu",
        }
    }
}

/// The on-disk format of a disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    /// The value of libvirt's `<driver type='...'>` and qemu-img's `-f`.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// One disk attached to the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Absolute path of the image file on the host.
    pub path: PathBuf,
    pub format: DiskFormat,
    /// Guest device name; its prefix picks the bus: `vd*` virtio, `sd*` SATA.
    pub target_dev: String,
    pub readonly: bool,
}

impl DiskSpec {
    /// The bus implied by the target device name, or `None` when the prefix is not one we use.
    pub fn bus(&self) -> Option<&'static str> {
        if self.target_dev.starts_with("vd") {
            Some("virtio")
        } else if self.target_dev.starts_with("sd") {
            Some("sata")
        } else {
            None
        }
    }
}

/// What a NIC plugs into on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "name")]
pub enum NicSource {
    /// A libvirt virtual network (`<interface type='network'>`).
    Network(String),
    /// An existing host bridge (`<interface type='bridge'>`).
    Bridge(String),
}

/// One virtio network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    pub source: NicSource,
    /// `52:54:00:xx:xx:xx` style address; fixed by the control plane so it survives migration.
    pub mac: String,
}

/// Direct kernel boot, used by the tiny test guest (kernel + busybox initramfs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
}

/// Everything needed to define one VM on a hypervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// The control plane's VM id; the domain is named `nc-<vm_id>`.
    pub vm_id: String,
    pub uuid: Uuid,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub domain_type: DomainType,
    /// Direct kernel boot; `None` boots from the first disk.
    pub boot: Option<DirectBoot>,
    pub disks: Vec<DiskSpec>,
    pub nics: Vec<NicSpec>,
    /// A serial console on a pty (`console()` reads it).
    pub serial_console: bool,
    /// The Raft-issued fencing token this definition was made under; stored in the domain
    /// metadata so the agent can read which epoch a running domain was started with.
    pub epoch: u64,
    /// Who defined the domain (`<cluster id>/<node id>`); an agent only ever touches domains
    /// it owns, so several nodes (or clusters) sharing one libvirtd never fence each other.
    #[serde(default)]
    pub owner: String,
}

impl VmSpec {
    /// The libvirt domain name of this VM.
    pub fn domain_name(&self) -> String {
        domain_name(&self.vm_id)
    }

    /// Checks what libvirt would otherwise reject late or, worse, accept with surprising
    /// meaning (a vm id that escapes a directory, a MAC libvirt would replace).
    pub fn validate(&self) -> Result<(), HypervisorError> {
        validate_id(&self.vm_id)?;
        if self.vcpus == 0 {
            return Err(HypervisorError::invalid("vcpus must be at least 1"));
        }
        if self.memory_mib < 16 {
            return Err(HypervisorError::invalid("memory_mib must be at least 16"));
        }
        let mut targets = std::collections::BTreeSet::new();
        for disk in &self.disks {
            if !disk.path.is_absolute() {
                return Err(HypervisorError::invalid(format!(
                    "disk path {} is not absolute",
                    disk.path.display()
                )));
            }
            if disk.bus().is_none() {
                return Err(HypervisorError::invalid(format!(
                    "disk target {:?} must start with vd or sd",
                    disk.target_dev
                )));
            }
            if !disk.target_dev.chars().all(|c| c.is_ascii_lowercase()) {
                return Err(HypervisorError::invalid(format!(
                    "disk target {:?} must be lowercase letters",
                    disk.target_dev
                )));
            }
            if !targets.insert(disk.target_dev.as_str()) {
                return Err(HypervisorError::invalid(format!(
                    "disk target {:?} used twice",
                    disk.target_dev
                )));
            }
        }
        for nic in &self.nics {
            if !is_mac(&nic.mac) {
                return Err(HypervisorError::invalid(format!(
                    "{:?} is not a MAC address",
                    nic.mac
                )));
            }
        }
        if let Some(boot) = &self.boot {
            if !boot.kernel.is_absolute() {
                return Err(HypervisorError::invalid("kernel path is not absolute"));
            }
        }
        Ok(())
    }
}

/// A VM id is used in domain names and file names: keep it to a safe alphabet.
pub fn validate_id(id: &str) -> Result<(), HypervisorError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(HypervisorError::invalid(format!(
            "{id:?} is not a valid id (1-64 of [A-Za-z0-9._-], not starting with a dot)"
        )))
    }
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}
