//! The `novacron` node: configuration, wiring of store, Raft, transport and API, the leader's
//! membership controller, the local development cluster and the CLI client.
//!
//! This is the only crate that sees both the replicated state and (through `hypervisor`) the
//! machine's VMs.

pub mod agent;
pub mod backup;
pub mod bench;
pub mod capacity;
pub mod client;
pub mod config;
pub mod console;
pub mod control;
pub mod dev;
pub mod features;
pub mod federation;
pub mod hosts;
pub mod image_client;
pub mod images;
pub mod liveness;
pub mod membership;
pub mod metrics;
pub mod migration;
pub mod placement;
pub mod recover;
pub mod scheduler;
pub mod server;
pub mod site_move;
pub mod sitenet;
pub mod stats;
