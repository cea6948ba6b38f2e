//! The Hypervisor trait and its libvirt driver.
