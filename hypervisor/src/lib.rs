//! The hypervisor layer of a node: the `Hypervisor` trait the agent programs against, its
//! libvirt driver, the domain XML we generate, and the per-node image store (base images,
//! per-VM overlays, cloud-init seeds). It depends on no sibling crate and knows nothing of Raft:
//! callers pass plain specs and names, and fencing (refusing stale epochs) is the agent's job;
//! this crate only records the epoch in the domain so the agent can read it back.

pub mod api;
pub mod error;
pub mod images;
pub mod libvirt;
pub mod migrate;
pub mod spec;
pub mod xml;

pub use api::{
    Capabilities, ConsoleStream, DomainInfo, DomainState, DomainStats, Hypervisor, ShutdownOutcome,
};
pub use error::HypervisorError;
pub use images::{ImageError, ImageInfo, ImageStore};
pub use libvirt::{LibvirtConfig, LibvirtHypervisor};
pub use migrate::{MigrateFlags, MigrateRequest, MigrationProgress, MigrationReport};
pub use spec::{
    domain_name, vm_id_of, DirectBoot, DiskFormat, DiskSpec, DomainType, NicSource, NicSpec, VmSpec,
};
pub use xml::domain_xml;
