//! Live-migration primitives: the request the agent hands to `Hypervisor::migrate`, the progress
//! it can watch while the job runs, and the report of a finished migration. Also the rewrite of
//! our metadata in the domain XML the destination defines, so the migrated domain arrives already
//! owned by the target node at the epoch the cluster will give it.

use serde::{Deserialize, Serialize};

use crate::xml::{escape, METADATA_PREFIX};

/// Which of libvirt's migration flags to use. The default is what NovaCron migrates with:
/// live, peer-to-peer, tunnelled through the connection to the destination (so no migration
/// port is opened), the definition persisted on the destination and removed from the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateFlags {
    pub live: bool,
    pub peer_to_peer: bool,
    pub tunnelled: bool,
    pub persist_dest: bool,
    pub undefine_source: bool,
}

impl Default for MigrateFlags {
    fn default() -> Self {
        MigrateFlags {
            live: true,
            peer_to_peer: true,
            tunnelled: true,
            persist_dest: true,
            undefine_source: true,
        }
    }
}

impl MigrateFlags {
    /// libvirt's `VIR_MIGRATE_*` bit set.
    pub fn bits(self) -> u32 {
        use virt::sys;
        let mut bits = 0;
        for (on, bit) in [
            (self.live, sys::VIR_MIGRATE_LIVE),
            (self.peer_to_peer, sys::VIR_MIGRATE_PEER2PEER),
            (self.tunnelled, sys::VIR_MIGRATE_TUNNELLED),
            (self.persist_dest, sys::VIR_MIGRATE_PERSIST_DEST),
            (self.undefine_source, sys::VIR_MIGRATE_UNDEFINE_SOURCE),
        ] {
            if on {
                bits |= bit;
            }
        }
        bits
    }
}

/// One migration of one domain to another host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateRequest {
    /// The destination libvirt, as the SOURCE libvirtd reaches it (peer-to-peer), for example
    /// `qemu+ext://node-2/system?command=/path/novacron-tunnel-2`.
    pub dest_uri: String,
    pub flags: MigrateFlags,
    /// Our metadata on the destination: the epoch the cluster will issue when it switches the
    /// owner, and the owner (`<cluster id>/<target node id>`).
    pub dest_epoch: u64,
    pub dest_owner: String,
    /// Bandwidth cap in MiB/s; `None` leaves libvirt's default (unlimited).
    pub bandwidth_mib_s: Option<u64>,
}

/// Where a running migration job is, polled from the source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationProgress {
    pub elapsed_ms: u64,
    pub data_processed: u64,
    pub data_remaining: u64,
    pub data_total: u64,
}

/// What a finished migration cost. `downtime_ms` is libvirt's measure of the pause at the
/// switch-over, known on the destination once the job completed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationReport {
    pub total_ms: u64,
    pub downtime_ms: Option<u64>,
    pub bytes: u64,
}

/// Replaces the epoch and owner in our metadata element of a full domain XML (as `dumpxml`
/// returns it, with our namespace prefix). Returns `None` when the XML has no such element:
/// a domain we did not define must not be migrated by us.
pub fn with_metadata(domain_xml: &str, epoch: u64, owner: &str) -> Option<String> {
    let epoch_xml = replace_element(domain_xml, "epoch", &epoch.to_string())?;
    replace_element(&epoch_xml, "owner", &escape(owner))
}

fn replace_element(xml: &str, name: &str, value: &str) -> Option<String> {
    let open = format!("<{METADATA_PREFIX}:{name}>");
    let close = format!("</{METADATA_PREFIX}:{name}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&close)?;
    Some(format!("{}{}{}", &xml[..start], value, &xml[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DomainType, VmSpec};

    #[test]
    fn metadata_is_rewritten_for_the_destination() {
        let spec = VmSpec {
            vm_id: "0b3c4c56-3a4c-4f2e-9d62-0b1d1f0a9a11".into(),
            uuid: uuid::Uuid::parse_str("0b3c4c56-3a4c-4f2e-9d62-0b1d1f0a9a11").unwrap(),
            vcpus: 1,
            memory_mib: 128,
            domain_type: DomainType::Qemu,
            boot: None,
            disks: vec![],
            nics: vec![],
            serial_console: true,
            epoch: 4,
            owner: "c/1".into(),
        };
        let xml = crate::domain_xml(&spec);
        let moved = with_metadata(&xml, 5, "c/2").unwrap();
        assert_eq!(crate::xml::parse_epoch(&moved), Some(5));
        assert_eq!(crate::xml::parse_owner(&moved).as_deref(), Some("c/2"));
        assert_eq!(
            moved
                .replace("<nc:epoch>5", "<nc:epoch>4")
                .replace("c/2", "c/1"),
            xml
        );
        assert_eq!(with_metadata("<domain/>", 1, "x"), None);
    }

    #[test]
    fn default_flags_are_live_p2p_tunnelled() {
        use virt::sys;
        let bits = MigrateFlags::default().bits();
        for b in [
            sys::VIR_MIGRATE_LIVE,
            sys::VIR_MIGRATE_PEER2PEER,
            sys::VIR_MIGRATE_TUNNELLED,
            sys::VIR_MIGRATE_PERSIST_DEST,
            sys::VIR_MIGRATE_UNDEFINE_SOURCE,
        ] {
            assert_ne!(bits & b, 0);
        }
    }
}
