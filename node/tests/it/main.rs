//! Integration tests of the `novacron` binary: real processes, real QUIC, real sled.

// Test support code may unwrap: a panic there is a test failure with its cause.
#![allow(clippy::unwrap_used)]

mod harness;

mod api_cluster;
mod cli;
mod cluster;
mod day2;
mod dev_up;
mod federation;
mod federation_sites;
mod ha;
mod images;
mod join;
mod join_race;
mod layering;
mod membership;
mod migration;
mod raft_failure;
mod real_migration;
mod real_vm;
mod scheduler;
mod site_move;
mod sites;
mod snapshot;
mod vm_metrics;
mod vms;
