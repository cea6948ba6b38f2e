//! The QUIC transport between nodes: mutual TLS from the cluster CA, one QUIC connection per
//! peer, one bidirectional stream per RPC.
//!
//! - [`proto`]: the prost wire messages and their mapping to openraft types.
//! - [`Transport`]: the endpoint (server and client at once), the connection cache, the server
//!   loop that dispatches RPCs to the local Raft and to an [`ExtensionHandler`].
//! - [`NetworkFactory`]: openraft's `RaftNetworkFactory` over the transport.
//! - [`Cluster`]: the write and linearizable-read path every node uses, forwarding to the leader.

mod cluster;
pub mod fault;
mod network;
pub mod proto;
mod transport;
mod wire;

use std::time::Duration;

pub use cluster::{Cluster, ClusterConfig, ReadError, WriteError};
pub use network::{NetworkClient, NetworkFactory};
pub use proto::ErrorCode;
pub use transport::{ExtensionError, ExtensionHandler, NoExtensions, Transport, TransportConfig};
pub use wire::StreamKind;

use crate::NodeId;

/// An error answered by the remote node (it received the request and refused it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct RemoteFailure {
    pub code: ErrorCode,
    pub message: String,
    /// For [`ErrorCode::NotLeader`]: the leader the remote node knows of, if any.
    pub leader_id: Option<NodeId>,
    pub leader_addr: Option<String>,
    /// The peer's openraft error as JSON, when the refusal came from its Raft.
    pub(crate) raw_raft_error: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("TLS configuration failed")]
    Tls(#[from] crate::tls::TlsError),
    #[error("QUIC does not accept the TLS configuration")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("cannot bind the QUIC endpoint")]
    Bind(#[source] std::io::Error),
    #[error("cannot resolve peer address {0}")]
    Resolve(String),
    #[error("cannot start a connection")]
    Connect(#[from] quinn::ConnectError),
    /// The handshake failed or the connection was lost before the request went out.
    #[error("no connection to the peer")]
    Connection(#[source] quinn::ConnectionError),
    #[error("sending on the stream failed")]
    Write(#[from] quinn::WriteError),
    #[error("the stream was closed")]
    ClosedStream(#[from] quinn::ClosedStream),
    #[error("receiving on the stream failed")]
    Read(#[from] quinn::ReadExactError),
    #[error("message of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("malformed message")]
    Proto(#[from] proto::ProtoError),
    #[error("the peer answered with the wrong message kind")]
    UnexpectedReply,
    #[error("unknown stream kind {0}")]
    UnknownStreamKind(u8),
    #[error("remote node refused: {0}")]
    Remote(RemoteFailure),
    /// The peer stopped being the leader while the request was in flight; its outcome is
    /// unknown, and waiting for the dead leader's timeout would only delay the client.
    #[error("the leader changed while the request was in flight")]
    LeaderChanged,
}

impl NetError {
    /// True when the request certainly never reached the peer, so resending it cannot apply it
    /// twice. After a timeout or a broken stream the outcome is unknown.
    pub fn certainly_not_sent(&self) -> bool {
        matches!(
            self,
            NetError::Tls(_)
                | NetError::Quic(_)
                | NetError::Bind(_)
                | NetError::Resolve(_)
                | NetError::Connect(_)
                | NetError::Connection(_)
        )
    }
}
