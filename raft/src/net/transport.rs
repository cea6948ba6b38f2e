//! The node's QUIC endpoint: server and client at once, with one cached connection per peer.
//!
//! Every stream starts with a [`StreamKind`] byte. RPC streams carry one [`RpcRequest`] and one
//! [`RpcResponse`]; tunnel streams are handed to the [`ExtensionHandler`] untouched. The server
//! side dispatches Raft RPCs to the local `Raft` handle and everything node-level to the
//! extension handler, so this module knows nothing about heartbeats or migrations.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use tokio::task::JoinSet;

use super::proto::{self, rpc_request, rpc_response, ErrorCode, PbError, RpcRequest, RpcResponse};
use super::wire::{self, StreamKind};
use super::{NetError, RemoteFailure};
use crate::codec;
use crate::tls::{NodeIdentity, CLUSTER_SERVER_NAME};
use crate::{NodeId, Raft};

/// Timers and limits of the transport.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// A connection with no traffic for this long is considered dead. Kept short because
    /// failover waits on it.
    pub idle_timeout: Duration,
    /// Ping interval that keeps a healthy idle connection alive (well under `idle_timeout`).
    pub keep_alive: Duration,
    /// Largest message accepted either way.
    pub max_message: usize,
    /// Timeout of RPCs that do not carry their own (extension calls, forwarding).
    pub rpc_timeout: Duration,
    /// How long the server waits for a request on a newly opened stream.
    pub server_read_timeout: Duration,
    /// Test-only fault injection: a file listing peers whose traffic is dropped both ways
    /// (see [`super::fault`]). `None`, the default, cuts nothing.
    pub partition_file: Option<std::path::PathBuf>,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            idle_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_secs(1),
            max_message: 64 * 1024 * 1024,
            rpc_timeout: Duration::from_secs(5),
            server_read_timeout: Duration::from_secs(30),
            partition_file: None,
        }
    }
}

/// Why an extension handler did not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExtensionError {
    #[error("unknown extension kind {0}")]
    UnknownKind(String),
    /// The handler understood the request and refused it; the reason goes back to the caller.
    #[error("refused: {0}")]
    Refused(String),
}

/// Node-level RPCs that are not Raft: implemented by the node crate (heartbeats, joins) and
/// tunnels (migration streams).
pub trait ExtensionHandler: Send + Sync + 'static {
    /// Answers one request of kind `kind`.
    fn handle<'a>(
        &'a self,
        kind: &'a str,
        body: Vec<u8>,
    ) -> BoxFuture<'a, Result<Vec<u8>, ExtensionError>>;

    /// Takes over a tunnel stream opened by `peer`. The default refuses it by dropping both
    /// halves, which resets the stream.
    fn tunnel(
        &self,
        peer: SocketAddr,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> BoxFuture<'static, ()> {
        let _ = (peer, send, recv);
        Box::pin(async {})
    }
}

/// An extension handler that knows no kinds and refuses tunnels.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoExtensions;

impl ExtensionHandler for NoExtensions {
    fn handle<'a>(
        &'a self,
        kind: &'a str,
        _body: Vec<u8>,
    ) -> BoxFuture<'a, Result<Vec<u8>, ExtensionError>> {
        Box::pin(async move { Err(ExtensionError::UnknownKind(kind.to_string())) })
    }
}

struct Inner {
    endpoint: quinn::Endpoint,
    config: TransportConfig,
    /// One connection per peer address, replaced when it dies.
    connections: Mutex<HashMap<SocketAddr, quinn::Connection>>,
    /// When each Raft peer last answered an RPC of ours.
    contacts: Mutex<HashMap<NodeId, Instant>>,
    /// Test-only partition (see [`super::fault`]).
    partition: Option<Arc<super::fault::PartitionFile>>,
}

/// The node's QUIC endpoint. Cheap to clone; clones share the endpoint and the caches.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("local_addr", &self.local_addr().ok())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these maps cannot leave them inconsistent (single inserts and
    // removes), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Transport {
    /// Binds a QUIC endpoint on `addr` (port 0 allowed) with the default timers.
    pub fn bind(addr: SocketAddr, identity: &NodeIdentity) -> Result<Transport, NetError> {
        Self::bind_with(addr, identity, TransportConfig::default())
    }

    /// Binds a QUIC endpoint on `addr` with `config`. Must run inside a tokio runtime.
    pub fn bind_with(
        addr: SocketAddr,
        identity: &NodeIdentity,
        config: TransportConfig,
    ) -> Result<Transport, NetError> {
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_idle_timeout(Some(
                quinn::IdleTimeout::try_from(config.idle_timeout)
                    .map_err(|_| NetError::Timeout(config.idle_timeout))?,
            ))
            .keep_alive_interval(Some(config.keep_alive))
            .max_concurrent_bidi_streams(quinn::VarInt::from_u32(1024));
        let transport = Arc::new(transport);

        let server_tls =
            quinn::crypto::rustls::QuicServerConfig::try_from(identity.server_config()?)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_tls));
        server.transport_config(transport.clone());

        let client_tls =
            quinn::crypto::rustls::QuicClientConfig::try_from(identity.client_config()?)?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_tls));
        client.transport_config(transport);

        let mut endpoint = quinn::Endpoint::server(server, addr).map_err(NetError::Bind)?;
        endpoint.set_default_client_config(client);
        let partition = config
            .partition_file
            .clone()
            .map(|p| Arc::new(super::fault::PartitionFile::new(p)));
        Ok(Transport {
            inner: Arc::new(Inner {
                endpoint,
                partition,
                config,
                connections: Mutex::new(HashMap::new()),
                contacts: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The bound UDP address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, NetError> {
        self.inner.endpoint.local_addr().map_err(NetError::Bind)
    }

    pub fn config(&self) -> &TransportConfig {
        &self.inner.config
    }

    /// The last time Raft peer `node_id` answered one of our RPCs.
    pub fn last_contact(&self, node_id: NodeId) -> Option<Instant> {
        lock(&self.inner.contacts).get(&node_id).copied()
    }

    pub(crate) fn record_contact(&self, node_id: NodeId) {
        lock(&self.inner.contacts).insert(node_id, Instant::now());
    }

    /// Resolves `HOST:PORT`; IP literals do not touch the resolver.
    pub async fn resolve(addr: &str) -> Result<SocketAddr, NetError> {
        if let Ok(a) = addr.parse::<SocketAddr>() {
            return Ok(a);
        }
        tokio::net::lookup_host(addr)
            .await
            .map_err(|_| NetError::Resolve(addr.to_string()))?
            .next()
            .ok_or_else(|| NetError::Resolve(addr.to_string()))
    }

    /// A live connection to `addr`, from the cache or newly made.
    async fn connection(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<quinn::Connection, NetError> {
        if self.partitioned(addr) {
            // Nothing leaves for a partitioned peer: like a handshake that never completes.
            return Err(NetError::Connection(quinn::ConnectionError::TimedOut));
        }
        if let Some(c) = lock(&self.inner.connections).get(&addr) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let connecting = self.inner.endpoint.connect(addr, CLUSTER_SERVER_NAME)?;
        let conn = match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(NetError::Connection(e)),
            // Nothing was sent on an unfinished handshake: report it as a connection failure.
            Err(_) => return Err(NetError::Connection(quinn::ConnectionError::TimedOut)),
        };
        // Two concurrent callers may both connect; the last one wins the cache and the other
        // connection is closed when its last user drops it.
        lock(&self.inner.connections).insert(addr, conn.clone());
        Ok(conn)
    }

    /// Whether the test-only partition file cuts traffic with `addr`.
    fn partitioned(&self, addr: SocketAddr) -> bool {
        self.inner
            .partition
            .as_ref()
            .is_some_and(|p| p.blocks(addr))
    }

    fn forget_if_dead(&self, addr: SocketAddr) {
        let mut conns = lock(&self.inner.connections);
        if conns.get(&addr).is_some_and(|c| c.close_reason().is_some()) {
            conns.remove(&addr);
        }
    }

    /// Sends one RPC to `addr` and waits for the reply for at most `timeout` in total.
    /// A remote [`PbError`] comes back as [`NetError::Remote`].
    pub(crate) async fn call(
        &self,
        addr: SocketAddr,
        req: &RpcRequest,
        timeout: Duration,
    ) -> Result<rpc_response::Kind, NetError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let result = async {
            let conn = self.connection(addr, timeout).await?;
            let (mut send, mut recv) = tokio::time::timeout_at(deadline, conn.open_bi())
                .await
                .map_err(|_| NetError::Connection(quinn::ConnectionError::TimedOut))?
                .map_err(NetError::Connection)?;
            let limit = self.inner.config.max_message;
            let exchange = async {
                wire::write_message(&mut send, Some(StreamKind::Rpc), req, limit).await?;
                send.finish()?;
                wire::read_message::<RpcResponse>(&mut recv, limit).await
            };
            tokio::time::timeout_at(deadline, exchange)
                .await
                .map_err(|_| NetError::Timeout(timeout))?
        }
        .await;
        match result {
            Ok(resp) => match resp.kind {
                Some(rpc_response::Kind::Error(e)) => Err(NetError::Remote(remote_failure(e))),
                Some(kind) => Ok(kind),
                None => Err(NetError::UnexpectedReply),
            },
            Err(e) => {
                self.forget_if_dead(addr);
                Err(e)
            }
        }
    }

    /// Calls the extension `kind` on the node at `addr`.
    pub async fn call_extension(
        &self,
        addr: SocketAddr,
        kind: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, NetError> {
        let req = RpcRequest {
            kind: Some(rpc_request::Kind::Extension(proto::PbExtensionRequest {
                kind: kind.to_string(),
                body,
            })),
        };
        match self.call(addr, &req, self.inner.config.rpc_timeout).await? {
            rpc_response::Kind::Extension(r) => Ok(r.body),
            _ => Err(NetError::UnexpectedReply),
        }
    }

    /// Opens a raw byte tunnel to the node at `addr`; its extension handler receives the other
    /// end. The tunnel shares the peer connection (and its mTLS) with the RPCs.
    pub async fn open_tunnel(
        &self,
        addr: SocketAddr,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), NetError> {
        let timeout = self.inner.config.rpc_timeout;
        let conn = self.connection(addr, timeout).await?;
        let (mut send, recv) = conn.open_bi().await.map_err(NetError::Connection)?;
        send.write_all(&[StreamKind::Tunnel as u8]).await?;
        Ok((send, recv))
    }

    /// Serves Raft RPCs to `raft` and extension RPCs to `extension` until `shutdown` completes.
    pub async fn serve(
        &self,
        raft: Raft,
        extension: Arc<dyn ExtensionHandler>,
        shutdown: impl Future<Output = ()>,
    ) {
        self.serve_inner(Some(raft), extension, shutdown).await
    }

    /// Serves extension RPCs only (a node that has no Raft yet, for example while joining);
    /// Raft RPCs are refused with [`ErrorCode::Fatal`].
    pub async fn serve_extensions(
        &self,
        extension: Arc<dyn ExtensionHandler>,
        shutdown: impl Future<Output = ()>,
    ) {
        self.serve_inner(None, extension, shutdown).await
    }

    async fn serve_inner(
        &self,
        raft: Option<Raft>,
        extension: Arc<dyn ExtensionHandler>,
        shutdown: impl Future<Output = ()>,
    ) {
        let server = Arc::new(Server {
            raft,
            extension,
            partition: self.inner.partition.clone(),
            config: self.inner.config.clone(),
        });
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                incoming = self.inner.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let server = server.clone();
                    tasks.spawn(async move { server.connection(incoming).await });
                }
                // Reap finished connection tasks so the set does not grow.
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        // Dropping the set aborts the connection tasks; peers see their streams reset and
        // retry elsewhere.
        tasks.abort_all();
    }
}

fn remote_failure(e: PbError) -> RemoteFailure {
    RemoteFailure {
        code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
        message: e.message,
        leader_id: e.leader_id,
        leader_addr: e.leader_addr,
        raw_raft_error: e.raft_error,
    }
}

/// The server half: what a connection needs to answer streams.
struct Server {
    raft: Option<Raft>,
    extension: Arc<dyn ExtensionHandler>,
    partition: Option<Arc<super::fault::PartitionFile>>,
    config: TransportConfig,
}

fn error(code: ErrorCode, message: impl Into<String>) -> rpc_response::Kind {
    rpc_response::Kind::Error(PbError {
        code: code as i32,
        message: message.into(),
        ..Default::default()
    })
}

/// A remote openraft error: the code for the caller's logic plus the JSON for `RemoteError`.
fn raft_error<E: serde::Serialize + std::fmt::Display>(
    e: &RaftError<NodeId, E>,
) -> rpc_response::Kind {
    let code = match e {
        RaftError::Fatal(_) => ErrorCode::Fatal,
        RaftError::APIError(_) => ErrorCode::Raft,
    };
    rpc_response::Kind::Error(PbError {
        code: code as i32,
        message: e.to_string(),
        raft_error: serde_json::to_vec(e).unwrap_or_default(),
        ..Default::default()
    })
}

fn no_raft() -> rpc_response::Kind {
    error(ErrorCode::Fatal, "raft is not running on this node")
}

fn not_leader(leader_id: Option<NodeId>, leader_addr: Option<String>) -> rpc_response::Kind {
    rpc_response::Kind::Error(PbError {
        code: ErrorCode::NotLeader as i32,
        message: "not the leader".into(),
        leader_id,
        leader_addr,
        raft_error: Vec::new(),
    })
}

impl Server {
    async fn connection(self: Arc<Self>, incoming: quinn::Incoming) {
        let peer = incoming.remote_address();
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                // Includes peers whose certificate does not chain to our CA.
                tracing::debug!(%peer, error = %e, "inbound QUIC handshake failed");
                return;
            }
        };
        let mut streams = JoinSet::new();
        loop {
            tokio::select! {
                accepted = conn.accept_bi() => match accepted {
                    // A partitioned peer's stream is swallowed: read, never answered, held
                    // until the caller gives up, like packets lost on the wire. (A reset
                    // would come back at once and make the caller retry in a tight loop.)
                    Ok((send, mut recv))
                        if self.partition.as_ref().is_some_and(|p| p.blocks(peer)) =>
                    {
                        let (hold, limit) = (self.config.server_read_timeout, self.config.max_message);
                        streams.spawn(async move {
                            let swallow = async {
                                let _ = recv.read_to_end(limit).await;
                                let _ = send.stopped().await;
                            };
                            let _ = tokio::time::timeout(hold, swallow).await;
                        });
                    }
                    Ok((send, recv)) => {
                        let this = self.clone();
                        streams.spawn(async move { this.stream(peer, send, recv).await });
                    }
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "inbound connection closed");
                        break;
                    }
                },
                Some(_) = streams.join_next(), if !streams.is_empty() => {}
            }
        }
    }

    async fn stream(
        &self,
        peer: SocketAddr,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let read = async {
            match wire::read_kind(&mut recv).await? {
                StreamKind::Tunnel => Ok(None),
                StreamKind::Rpc => {
                    wire::read_message::<RpcRequest>(&mut recv, self.config.max_message)
                        .await
                        .map(Some)
                }
            }
        };
        let request = match tokio::time::timeout(self.config.server_read_timeout, read).await {
            Ok(Ok(Some(req))) => req,
            Ok(Ok(None)) => {
                self.extension.tunnel(peer, send, recv).await;
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "bad inbound stream");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "inbound stream sent no request in time");
                return;
            }
        };
        let reply = RpcResponse {
            kind: Some(self.dispatch(request).await),
        };
        let written = async {
            wire::write_message(&mut send, None, &reply, self.config.max_message).await?;
            send.finish()?;
            Ok::<_, NetError>(())
        };
        if let Err(e) = written.await {
            tracing::debug!(%peer, error = %e, "cannot send reply");
        }
    }

    async fn dispatch(&self, req: RpcRequest) -> rpc_response::Kind {
        use rpc_request::Kind as K;
        use rpc_response::Kind as R;
        let Some(kind) = req.kind else {
            return error(ErrorCode::BadRequest, "empty request");
        };
        match kind {
            K::AppendEntries(r) => {
                let Some(raft) = &self.raft else {
                    return no_raft();
                };
                match proto::append_request_from_pb(&r) {
                    Err(e) => error(ErrorCode::BadRequest, e.to_string()),
                    Ok(r) => match raft.append_entries(r).await {
                        Ok(resp) => R::AppendEntries(proto::append_response_to_pb(&resp)),
                        Err(e) => raft_error(&e),
                    },
                }
            }
            K::Vote(r) => {
                let Some(raft) = &self.raft else {
                    return no_raft();
                };
                match proto::vote_request_from_pb(&r) {
                    Err(e) => error(ErrorCode::BadRequest, e.to_string()),
                    Ok(r) => match raft.vote(r).await {
                        Ok(resp) => R::Vote(proto::vote_response_to_pb(&resp)),
                        Err(e) => raft_error(&e),
                    },
                }
            }
            K::InstallSnapshot(r) => {
                let Some(raft) = &self.raft else {
                    return no_raft();
                };
                match proto::snapshot_request_from_pb(r) {
                    Err(e) => error(ErrorCode::BadRequest, e.to_string()),
                    Ok(r) => match raft.install_snapshot(r).await {
                        Ok(resp) => R::InstallSnapshot(proto::snapshot_response_to_pb(&resp)),
                        Err(e) => raft_error(&e),
                    },
                }
            }
            K::Forward(f) => {
                let Some(raft) = &self.raft else {
                    return no_raft();
                };
                // A stopped Raft proposes nothing: say so, so the caller may resend safely.
                if raft.metrics().borrow().running_state.is_err() {
                    return error(ErrorCode::Stopped, "raft has stopped on this node");
                }
                let request = match codec::decode(&f.request) {
                    Ok(r) => r,
                    Err(e) => return error(ErrorCode::BadRequest, e.to_string()),
                };
                match raft.client_write(request).await {
                    Ok(resp) => match codec::encode(&resp.data) {
                        Ok(bytes) => R::Forward(proto::PbForwardResponse {
                            log_index: resp.log_id.index,
                            response: bytes,
                        }),
                        // Committed but unencodable: the caller must not retry blindly.
                        Err(e) => error(ErrorCode::Fatal, e.to_string()),
                    },
                    Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                        not_leader(f.leader_id, f.leader_node.map(|n| n.peer_addr))
                    }
                    Err(e) => raft_error(&e),
                }
            }
            K::ReadIndex(_) => {
                let Some(raft) = &self.raft else {
                    return no_raft();
                };
                read_index(raft).await
            }
            K::Extension(x) => match self.extension.handle(&x.kind, x.body).await {
                Ok(body) => R::Extension(proto::PbExtensionResponse { body }),
                Err(ExtensionError::UnknownKind(k)) => error(
                    ErrorCode::UnknownExtension,
                    format!("unknown extension kind {k}"),
                ),
                Err(ExtensionError::Refused(reason)) => error(ErrorCode::ExtensionFailed, reason),
            },
        }
    }
}

/// The leader's read index: the log index a follower must have applied before it may answer a
/// read that is linearizable from the moment of this call. Leadership is confirmed with a
/// quorum first (`get_read_log_id`); the leader's own apply need not catch up for that.
pub(crate) async fn read_index(raft: &Raft) -> rpc_response::Kind {
    match raft.get_read_log_id().await {
        Ok((read_log_id, _applied)) => rpc_response::Kind::ReadIndex(proto::PbReadIndexResponse {
            index: read_log_id.map(|l| l.index).unwrap_or(0),
        }),
        Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
            not_leader(f.leader_id, f.leader_node.map(|n| n.peer_addr))
        }
        Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => {
            error(ErrorCode::QuorumNotEnough, q.to_string())
        }
        Err(e) => raft_error(&e),
    }
}
