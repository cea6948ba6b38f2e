//! The simulated network: every message between nodes (Raft RPCs and the client's forwarded
//! requests) goes through [`Net::call`], which drops, delays, reorders and cuts links as the
//! nemesis asks, drawing every decision from the run's seeded generator.
//!
//! A message is delivered after a random delay (so two messages can overtake each other), or
//! lost; a lost request or reply leaves the caller waiting for its own timeout, as a real
//! network would. A message to a crashed node is refused after one delay (the "connection
//! refused" of a dead process). Raft messages are converted to the product's protobuf messages
//! and back ([`raft::net::proto`]) and encoded to bytes, so the simulation also exercises the wire
//! mapping. Failures are reported to openraft as network errors, never as `Unreachable`, which
//! would make openraft back off through an unbiased `select!` whose fairness draws from tokio's
//! process-random generator and would break replay.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use prost::Message;
use raft::net::proto;
use raft::{Member, NodeId, Raft, TypeConfig};
use rand::rngs::StdRng;
use rand::Rng;

use super::observer::Observer;

/// Why a message did not come back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Lost {
    /// The target was down: certainly not delivered.
    #[error("connection refused")]
    Refused,
    /// The request or the reply was lost, or a link is cut: the caller timed out and cannot
    /// tell whether the request was handled.
    #[error("timed out")]
    Timeout,
    /// The message could not be converted to the wire format.
    #[error("wire encoding failed: {0}")]
    Wire(String),
}

/// The faults currently in force and the generator behind every decision.
pub struct NetState {
    pub rng: StdRng,
    /// Directed links that drop everything: (from, to).
    pub blocked: BTreeSet<(NodeId, NodeId)>,
    /// Chance of losing each message, in percent.
    pub loss_percent: u32,
    /// Delay of each message, uniform in this range (milliseconds).
    pub delay_ms: (u64, u64),
    /// The running Raft of each node; `None` while it is down.
    pub nodes: BTreeMap<NodeId, Option<Raft>>,
}

/// The network of one simulated cluster.
pub struct Net {
    observer: Arc<Observer>,
    state: Mutex<NetState>,
}

enum Route {
    Deliver(Duration),
    Refuse(Duration),
    Drop,
}

impl Net {
    pub fn new(observer: Arc<Observer>, rng: StdRng) -> Self {
        Self {
            observer,
            state: Mutex::new(NetState {
                rng,
                blocked: BTreeSet::new(),
                loss_percent: 0,
                delay_ms: (1, 5),
                nodes: BTreeMap::new(),
            }),
        }
    }

    /// The faults and the generator, for the nemesis.
    pub fn state(&self) -> MutexGuard<'_, NetState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn route(&self, from: NodeId, to: NodeId) -> Route {
        let mut st = self.state();
        let (lo, hi) = st.delay_ms;
        let delay = Duration::from_millis(st.rng.gen_range(lo..=hi.max(lo)));
        let lost = st.loss_percent > 0 && st.rng.gen_range(0..100) < st.loss_percent;
        if st.blocked.contains(&(from, to)) || lost {
            Route::Drop
        } else if !matches!(st.nodes.get(&to), Some(Some(_))) {
            Route::Refuse(delay)
        } else {
            Route::Deliver(delay)
        }
    }

    fn target(&self, to: NodeId) -> Option<Raft> {
        self.state().nodes.get(&to).cloned().flatten()
    }

    /// Sends a request from `from` to `to`, runs `handle` on the target's Raft and brings the
    /// answer back, unless the network loses either half. `timeout` is how long the caller
    /// waits for a lost message.
    pub async fn call<T, F, Fut>(
        &self,
        from: NodeId,
        to: NodeId,
        kind: &str,
        timeout: Duration,
        handle: F,
    ) -> Result<T, Lost>
    where
        F: FnOnce(Raft) -> Fut,
        Fut: Future<Output = T>,
    {
        let started = tokio::time::Instant::now();
        let give_up = |what: &'static str| {
            self.observer
                .event(format_args!("net n{from}->n{to} {kind} {what}"));
            async move {
                tokio::time::sleep_until(started + timeout).await;
                Err(Lost::Timeout)
            }
        };
        let delay = match self.route(from, to) {
            Route::Drop => return give_up("request lost").await,
            Route::Refuse(d) => {
                self.observer
                    .event(format_args!("net n{from}->n{to} {kind} refused"));
                tokio::time::sleep(d).await;
                return Err(Lost::Refused);
            }
            Route::Deliver(d) => d,
        };
        tokio::time::sleep(delay).await;
        // The target may have crashed while the message was in flight.
        let Some(raft) = self.target(to) else {
            return give_up("request reached a dead node").await;
        };
        self.observer
            .event(format_args!("net n{from}->n{to} {kind} delivered"));
        let answer = handle(raft).await;
        match self.route(to, from) {
            Route::Drop => give_up("reply lost").await,
            // A dead caller is nobody's concern: its task is gone with it.
            Route::Refuse(d) | Route::Deliver(d) => {
                tokio::time::sleep(d).await;
                Ok(answer)
            }
        }
    }
}

/// Encodes a protobuf message to bytes and decodes it again, as the QUIC transport would.
fn through_wire<M: Message + Default>(m: &M) -> Result<M, Lost> {
    M::decode(m.encode_to_vec().as_slice()).map_err(|e| Lost::Wire(e.to_string()))
}

/// openraft's network factory for one node.
pub struct SimNetworkFactory {
    pub net: Arc<Net>,
    pub me: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for SimNetworkFactory {
    type Network = SimNetworkClient;

    async fn new_client(&mut self, target: NodeId, _node: &Member) -> SimNetworkClient {
        SimNetworkClient {
            net: self.net.clone(),
            me: self.me,
            target,
        }
    }
}

/// openraft's connection from one node to another.
pub struct SimNetworkClient {
    net: Arc<Net>,
    me: NodeId,
    target: NodeId,
}

type RpcErr<E> = RPCError<NodeId, Member, RaftError<NodeId, E>>;

fn net_err<E: std::error::Error>(e: impl std::error::Error + 'static) -> RpcErr<E> {
    RPCError::Network(NetworkError::new(&e))
}

impl RaftNetwork<TypeConfig> for SimNetworkClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr<openraft::error::Infallible>> {
        let pb = proto::append_request_to_pb(&rpc).map_err(net_err)?;
        let pb = through_wire(&pb).map_err(net_err)?;
        let rpc = proto::append_request_from_pb(&pb).map_err(net_err)?;
        let kind = format!("append[{}]", rpc.entries.len());
        let answer = self
            .net
            .call(
                self.me,
                self.target,
                &kind,
                option.hard_ttl(),
                |raft| async move {
                    raft.append_entries(rpc)
                        .await
                        .map(|r| proto::append_response_to_pb(&r))
                },
            )
            .await
            .map_err(net_err)?;
        match answer {
            Ok(pb) => {
                let pb = through_wire(&pb).map_err(net_err)?;
                proto::append_response_from_pb(&pb).map_err(net_err)
            }
            Err(e) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        let pb = proto::snapshot_request_to_pb(&rpc).map_err(net_err)?;
        let pb = through_wire(&pb).map_err(net_err)?;
        let rpc = proto::snapshot_request_from_pb(pb).map_err(net_err)?;
        let answer = self
            .net
            .call(
                self.me,
                self.target,
                "snapshot",
                option.hard_ttl(),
                |raft| async move {
                    raft.install_snapshot(rpc)
                        .await
                        .map(|r| proto::snapshot_response_to_pb(&r))
                },
            )
            .await
            .map_err(net_err)?;
        match answer {
            Ok(pb) => {
                let pb = through_wire(&pb).map_err(net_err)?;
                proto::snapshot_response_from_pb(&pb).map_err(net_err)
            }
            Err(e) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr<openraft::error::Infallible>> {
        let pb = through_wire(&proto::vote_request_to_pb(&rpc)).map_err(net_err)?;
        let rpc = proto::vote_request_from_pb(&pb).map_err(net_err)?;
        let answer = self
            .net
            .call(
                self.me,
                self.target,
                "vote",
                option.hard_ttl(),
                |raft| async move { raft.vote(rpc).await.map(|r| proto::vote_response_to_pb(&r)) },
            )
            .await
            .map_err(net_err)?;
        match answer {
            Ok(pb) => {
                let pb = through_wire(&pb).map_err(net_err)?;
                proto::vote_response_from_pb(&pb).map_err(net_err)
            }
            Err(e) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
        }
    }
}
