//! The replicated heart of NovaCron: the model, the closed `Command` set, the deterministic
//! `apply`, the sled-backed Raft log and state machine, and the QUIC transport between nodes.
//!
//! This crate never talks to a hypervisor and never reads a clock inside `apply`.

pub mod apply;
pub mod backup;
pub mod codec;
pub mod command;
pub mod federation;
pub mod image;
pub mod keys;
pub mod migration;
pub mod model;
pub mod net;
pub mod placement;
pub mod site_move;
pub mod store;
pub mod tls;

pub use command::{Command, RejectCode, Request, Response};
pub use model::{Member, NodeId};

openraft::declare_raft_types!(
    /// The openraft type configuration of a NovaCron cluster.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle every node holds.
pub type Raft = openraft::Raft<TypeConfig>;
