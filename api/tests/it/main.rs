//! Router tests without sockets: the API over an in-memory control plane.

// Test support code may unwrap: a panic there is a test failure with its cause.
#![allow(clippy::unwrap_used)]

mod audit;
mod events;
mod fake;
mod federation;
mod identity;
mod images;
mod isolation;
mod limits;
mod matrix;
mod openapi;
mod tenants;
mod users;
mod vm_metrics;
mod vms;
mod world;
