//! The write and read path every node uses: propose locally when leader, otherwise forward to
//! the leader over QUIC; linearizable reads through the leader's read index.
//!
//! Retries are safe by construction: a write is only resent when it certainly was not
//! proposed (the node was not leader, or the request never left this node), or when it carries
//! an idempotency key (then `apply` answers a duplicate with the first outcome). Otherwise an
//! ambiguous failure is reported as [`WriteError::Indeterminate`] instead of risking a double
//! apply.

use std::time::Duration;

use openraft::error::{ChangeMembershipError, ClientWriteError, Fatal, RaftError};
use tokio::sync::watch;
use tokio::time::Instant;

use super::proto::{self, rpc_request, rpc_response, ErrorCode, RpcRequest};
use super::transport::Transport;
use super::{NetError, RemoteFailure};
use crate::codec::{self, CodecError};
use crate::{Member, NodeId, Raft, Request, Response};

/// Deadlines of the write and read paths.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Total time a write may spend waiting for a leader and retrying.
    pub write_timeout: Duration,
    /// Total time a linearizable read may spend (read index plus local catch-up).
    pub read_timeout: Duration,
    /// Longest pause between two attempts when nothing signals a change of leader.
    pub retry_backoff: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            write_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(10),
            retry_backoff: Duration::from_millis(100),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("no leader was known before the deadline")]
    NoLeader,
    /// Every attempt failed before the request was proposed; it was not applied.
    #[error("the write was not accepted before the deadline")]
    Timeout,
    /// The request may or may not have been applied (lost reply without an idempotency key).
    #[error("the outcome of the write is unknown")]
    Indeterminate(#[source] NetError),
    /// The local Raft has stopped.
    #[error("raft has stopped on this node")]
    Fatal(#[source] Box<Fatal<NodeId>>),
    #[error("the request cannot be encoded")]
    Codec(#[from] CodecError),
    #[error("the leader refused the request")]
    Remote(RemoteFailure),
    #[error("membership change refused")]
    Membership(#[source] ChangeMembershipError<NodeId>),
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("no leader was known before the deadline")]
    NoLeader,
    #[error("the read could not be confirmed before the deadline")]
    Timeout,
    #[error("raft has stopped on this node")]
    Fatal(#[source] Box<Fatal<NodeId>>),
    #[error("the leader refused the read index")]
    Remote(RemoteFailure),
}

/// What the write and read paths need of a node. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    raft: Raft,
    transport: Transport,
    applied: watch::Receiver<u64>,
    config: ClusterConfig,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("transport", &self.transport)
            .field("config", &self.config)
            .finish()
    }
}

/// Who this node believes leads, and how to reach it.
enum Leader {
    None,
    Me,
    Peer(NodeId, Option<Member>),
}

/// Why one attempt failed and whether another may follow.
enum Attempt<T, E> {
    Done(T),
    /// Try again once the leader may have changed (or after the backoff).
    Retry {
        tried: Option<NodeId>,
        last: E,
    },
    Fail(E),
}

impl Cluster {
    /// `applied` follows the index of the last entry applied to the local state machine.
    pub fn new(
        raft: Raft,
        transport: Transport,
        applied: watch::Receiver<u64>,
        config: ClusterConfig,
    ) -> Cluster {
        Cluster {
            raft,
            transport,
            applied,
            config,
        }
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    fn leader(&self) -> Leader {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        match m.current_leader {
            None => Leader::None,
            Some(id) if id == m.id => Leader::Me,
            Some(id) => Leader::Peer(id, m.membership_config.membership().get_node(&id).cloned()),
        }
    }

    /// Waits until the known leader differs from `tried` (or one is known at all), for at most
    /// `max`. Returns early on the change, so a failover is followed without sleeping.
    async fn wait_leader_change(&self, tried: Option<NodeId>, max: Duration) {
        let mut rx = self.raft.metrics();
        let _ = tokio::time::timeout(
            max,
            rx.wait_for(|m| m.current_leader.is_some() && m.current_leader != tried),
        )
        .await;
    }

    /// Proposes `req` and returns the log index it was committed at with its outcome.
    pub async fn write(&self, req: Request) -> Result<(u64, Response), WriteError> {
        let deadline = Instant::now() + self.config.write_timeout;
        let encoded = codec::encode(&req)?;
        let retry_ambiguous = req.idempotency_key.is_some();
        let mut last = WriteError::NoLeader;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(match last {
                    WriteError::NoLeader => WriteError::NoLeader,
                    WriteError::Indeterminate(e) => WriteError::Indeterminate(e),
                    _ => WriteError::Timeout,
                });
            }
            let remaining = deadline - now;
            let attempt = match self.leader() {
                Leader::None => Attempt::Retry {
                    tried: None,
                    last: WriteError::NoLeader,
                },
                Leader::Me => self.write_local(req.clone()).await,
                Leader::Peer(id, node) => {
                    self.write_forward(id, node, &encoded, remaining, retry_ambiguous)
                        .await
                }
            };
            match attempt {
                Attempt::Done(out) => return Ok(out),
                Attempt::Fail(e) => return Err(e),
                Attempt::Retry { tried, last: e } => {
                    last = e;
                    let pause = if tried.is_none() {
                        remaining
                    } else {
                        self.config.retry_backoff
                    };
                    self.wait_leader_change(tried, pause.min(remaining)).await;
                }
            }
        }
    }

    async fn write_local(&self, req: Request) -> Attempt<(u64, Response), WriteError> {
        match self.raft.client_write(req).await {
            Ok(resp) => Attempt::Done((resp.log_id.index, resp.data)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Attempt::Retry {
                tried: Some(self.raft.metrics().borrow().id),
                last: WriteError::NoLeader,
            },
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Attempt::Fail(WriteError::Membership(e))
            }
            Err(RaftError::Fatal(f)) => Attempt::Fail(WriteError::Fatal(Box::new(f))),
        }
    }

    async fn write_forward(
        &self,
        leader: NodeId,
        node: Option<Member>,
        encoded: &[u8],
        remaining: Duration,
        retry_ambiguous: bool,
    ) -> Attempt<(u64, Response), WriteError> {
        let tried = Some(leader);
        let Some(node) = node else {
            // Leader known by id but not yet by address: wait for the membership to catch up.
            return Attempt::Retry {
                tried,
                last: WriteError::NoLeader,
            };
        };
        let req = RpcRequest {
            kind: Some(rpc_request::Kind::Forward(proto::PbForwardRequest {
                request: encoded.to_vec(),
            })),
        };
        let timeout = remaining.min(self.transport.config().rpc_timeout);
        let call = async {
            match Transport::resolve(&node.peer_addr).await {
                Ok(addr) => self.transport.call(addr, &req, timeout).await,
                Err(e) => Err(e),
            }
        };
        // A killed leader does not answer. When the request may be resent safely (it carries
        // an idempotency key), stop waiting as soon as the leader changes instead of running
        // into the RPC timeout; otherwise wait for the answer, so that a request that was in
        // fact applied is not reported as failed.
        let mut metrics = self.raft.metrics();
        let leader_moved = async move {
            let moved = retry_ambiguous
                && metrics
                    .wait_for(|m| m.current_leader != Some(leader))
                    .await
                    .is_ok();
            if !moved {
                std::future::pending::<()>().await;
            }
        };
        let result = tokio::select! {
            r = call => r,
            () = leader_moved => Err(NetError::LeaderChanged),
        };
        match result {
            Ok(rpc_response::Kind::Forward(r)) => match codec::decode::<Response>(&r.response) {
                Ok(resp) => Attempt::Done((r.log_index, resp)),
                Err(e) => Attempt::Fail(WriteError::Codec(e)),
            },
            Ok(_) => Attempt::Fail(WriteError::Indeterminate(NetError::UnexpectedReply)),
            Err(NetError::Remote(f)) => match f.code {
                // Refused before proposing: always safe to resend.
                ErrorCode::NotLeader | ErrorCode::Stopped => Attempt::Retry {
                    tried,
                    last: WriteError::Remote(f),
                },
                // The leader's Raft stopped while (maybe) proposing: a new leader will come.
                ErrorCode::Fatal if retry_ambiguous => Attempt::Retry {
                    tried,
                    last: WriteError::Remote(f),
                },
                ErrorCode::Fatal => Attempt::Fail(WriteError::Indeterminate(NetError::Remote(f))),
                _ => Attempt::Fail(WriteError::Remote(f)),
            },
            Err(e) if e.certainly_not_sent() => Attempt::Retry {
                tried,
                last: WriteError::Timeout,
            },
            Err(e) if retry_ambiguous => Attempt::Retry {
                tried,
                last: WriteError::Indeterminate(e),
            },
            Err(e) => Attempt::Fail(WriteError::Indeterminate(e)),
        }
    }

    /// A log index such that a state machine that has applied it answers reads that are
    /// linearizable with respect to this call.
    pub async fn read_barrier(&self) -> Result<u64, ReadError> {
        self.read_barrier_until(Instant::now() + self.config.read_timeout)
            .await
    }

    async fn read_barrier_until(&self, deadline: Instant) -> Result<u64, ReadError> {
        let mut last = ReadError::NoLeader;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(match last {
                    ReadError::NoLeader => ReadError::NoLeader,
                    _ => ReadError::Timeout,
                });
            }
            let remaining = deadline - now;
            let (tried, reply) = match self.leader() {
                Leader::None => (None, Err(ReadError::NoLeader)),
                Leader::Me => {
                    // Read the id before awaiting: a metrics borrow must not live across it.
                    let me = self.raft.metrics().borrow().id;
                    (Some(me), self.local_read_index().await)
                }
                Leader::Peer(id, None) => (Some(id), Err(ReadError::NoLeader)),
                Leader::Peer(id, Some(node)) => {
                    let req = RpcRequest {
                        kind: Some(rpc_request::Kind::ReadIndex(proto::PbReadIndexRequest {})),
                    };
                    let timeout = remaining.min(self.transport.config().rpc_timeout);
                    let call = async {
                        match Transport::resolve(&node.peer_addr).await {
                            Ok(addr) => self.transport.call(addr, &req, timeout).await,
                            Err(e) => Err(e),
                        }
                    };
                    // As for writes: a dead leader is given up on once another is known.
                    let mut metrics = self.raft.metrics();
                    let leader_moved = async move {
                        if metrics
                            .wait_for(|m| m.current_leader != Some(id))
                            .await
                            .is_err()
                        {
                            std::future::pending::<()>().await;
                        }
                    };
                    let result = tokio::select! {
                        r = call => r,
                        () = leader_moved => Err(NetError::LeaderChanged),
                    };
                    (Some(id), interpret_read(result))
                }
            };
            match reply {
                Ok(index) => return Ok(index),
                Err(e @ ReadError::Fatal(_)) => return Err(e),
                Err(e) => {
                    last = e;
                    let pause = if tried.is_none() {
                        remaining
                    } else {
                        self.config.retry_backoff
                    };
                    self.wait_leader_change(tried, pause.min(remaining)).await;
                }
            }
        }
    }

    async fn local_read_index(&self) -> Result<u64, ReadError> {
        match self.raft.get_read_log_id().await {
            Ok((read_log_id, _)) => Ok(read_log_id.map(|l| l.index).unwrap_or(0)),
            Err(RaftError::Fatal(f)) => Err(ReadError::Fatal(Box::new(f))),
            // Lost leadership or quorum meanwhile: retry once the leader is known again.
            Err(RaftError::APIError(_)) => Err(ReadError::NoLeader),
        }
    }

    /// Returns once the local state machine reflects every write acknowledged before this call:
    /// a read of local state after it is linearizable.
    pub async fn linearizable_read(&self) -> Result<(), ReadError> {
        let deadline = Instant::now() + self.config.read_timeout;
        let index = self.read_barrier_until(deadline).await?;
        let mut applied = self.applied.clone();
        let caught_up = tokio::time::timeout_at(deadline, applied.wait_for(|a| *a >= index))
            .await
            .map(|r| r.map(|_| ()));
        match caught_up {
            Ok(Ok(())) => Ok(()),
            // The sender is gone: the state machine stopped.
            Ok(Err(_)) => Err(ReadError::Fatal(Box::new(Fatal::Stopped))),
            Err(_) => Err(ReadError::Timeout),
        }
    }
}

fn interpret_read(result: Result<rpc_response::Kind, NetError>) -> Result<u64, ReadError> {
    match result {
        Ok(rpc_response::Kind::ReadIndex(r)) => Ok(r.index),
        Ok(rpc_response::Kind::Error(e)) => Err(ReadError::Remote(RemoteFailure {
            code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
            message: e.message,
            leader_id: e.leader_id,
            leader_addr: e.leader_addr,
            raw_raft_error: e.raft_error,
        })),
        Ok(_) => Err(ReadError::Timeout),
        Err(NetError::Remote(f)) => Err(ReadError::Remote(f)),
        // Reads change nothing, so any transport failure is simply retried.
        Err(_) => Err(ReadError::Timeout),
    }
}
