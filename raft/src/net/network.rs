//! openraft's network traits over the QUIC [`Transport`].
//!
//! Errors are mapped so openraft reacts as intended: a peer we cannot connect to is
//! `Unreachable` (openraft backs off), a broken or slow stream is `Network` / `Timeout` (it
//! retries at once), and an error the peer's Raft returned is rebuilt as a `RemoteError`.

use std::error::Error;
use std::time::Duration;

use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::RPCTypes;

use super::proto::{self, rpc_request, rpc_response, ErrorCode, RpcRequest};
use super::transport::Transport;
use super::NetError;
use crate::{Member, NodeId, TypeConfig};

/// Creates one [`NetworkClient`] per replication target.
#[derive(Clone, Debug)]
pub struct NetworkFactory {
    transport: Transport,
    self_id: NodeId,
}

impl Transport {
    /// The openraft network factory of node `self_id` (used in timeout reports).
    pub fn network_factory(&self, self_id: NodeId) -> NetworkFactory {
        NetworkFactory {
            transport: self.clone(),
            self_id,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = NetworkClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> NetworkClient {
        NetworkClient {
            transport: self.transport.clone(),
            self_id: self.self_id,
            target,
            node: node.clone(),
        }
    }
}

/// Sends Raft RPCs to one peer. The address is resolved per call, so a peer that changed
/// address in its membership entry is reached at the new one once openraft recreates clients.
#[derive(Debug)]
pub struct NetworkClient {
    transport: Transport,
    self_id: NodeId,
    target: NodeId,
    node: Member,
}

type RpcErr<E> = RPCError<NodeId, Member, RaftError<NodeId, E>>;

impl NetworkClient {
    async fn call<E>(
        &self,
        kind: rpc_request::Kind,
        timeout: Duration,
        action: RPCTypes,
    ) -> Result<rpc_response::Kind, RpcErr<E>>
    where
        E: Error + serde::de::DeserializeOwned,
    {
        let addr = Transport::resolve(&self.node.peer_addr)
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let req = RpcRequest { kind: Some(kind) };
        let result = self.transport.call(addr, &req, timeout).await;
        if matches!(&result, Ok(_) | Err(NetError::Remote(_))) {
            self.transport.record_contact(self.target);
        }
        result.map_err(|e| self.map_error(e, timeout, action))
    }

    fn map_error<E>(&self, e: NetError, timeout: Duration, action: RPCTypes) -> RpcErr<E>
    where
        E: Error + serde::de::DeserializeOwned,
    {
        match e {
            NetError::Timeout(_) => RPCError::Timeout(Timeout {
                action,
                id: self.self_id,
                target: self.target,
                timeout,
            }),
            NetError::Remote(failure) => {
                // The peer's Raft answered with an error: rebuild it so openraft sees exactly
                // what the peer said. Anything else the peer refused is fatal on its side
                // (it cannot serve Raft) or a protocol bug; both stop this RPC.
                let source = match failure.code {
                    ErrorCode::Fatal | ErrorCode::Raft if !failure.raw_raft_error.is_empty() => {
                        serde_json::from_slice::<RaftError<NodeId, E>>(&failure.raw_raft_error).ok()
                    }
                    _ => None,
                };
                match source {
                    Some(source) => RPCError::RemoteError(RemoteError::new_with_node(
                        self.target,
                        self.node.clone(),
                        source,
                    )),
                    None if matches!(failure.code, ErrorCode::Fatal | ErrorCode::Stopped) => {
                        RPCError::RemoteError(RemoteError::new_with_node(
                            self.target,
                            self.node.clone(),
                            RaftError::Fatal(Fatal::Stopped),
                        ))
                    }
                    None => RPCError::Network(NetworkError::new(&NetError::Remote(failure))),
                }
            }
            e if e.certainly_not_sent() => RPCError::Unreachable(Unreachable::new(&e)),
            e => RPCError::Network(NetworkError::new(&e)),
        }
    }
}

fn network<E: Error>(e: impl Error + 'static) -> RpcErr<E> {
    RPCError::Network(NetworkError::new(&e))
}

impl RaftNetwork<TypeConfig> for NetworkClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr<openraft::error::Infallible>> {
        let pb = proto::append_request_to_pb(&rpc).map_err(network)?;
        match self
            .call(
                rpc_request::Kind::AppendEntries(pb),
                option.hard_ttl(),
                RPCTypes::AppendEntries,
            )
            .await?
        {
            rpc_response::Kind::AppendEntries(r) => {
                proto::append_response_from_pb(&r).map_err(network)
            }
            _ => Err(network(NetError::UnexpectedReply)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        let pb = proto::snapshot_request_to_pb(&rpc).map_err(network)?;
        match self
            .call(
                rpc_request::Kind::InstallSnapshot(pb),
                option.hard_ttl(),
                RPCTypes::InstallSnapshot,
            )
            .await?
        {
            rpc_response::Kind::InstallSnapshot(r) => {
                proto::snapshot_response_from_pb(&r).map_err(network)
            }
            _ => Err(network(NetError::UnexpectedReply)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr<openraft::error::Infallible>> {
        let pb = proto::vote_request_to_pb(&rpc);
        match self
            .call(
                rpc_request::Kind::Vote(pb),
                option.hard_ttl(),
                RPCTypes::Vote,
            )
            .await?
        {
            rpc_response::Kind::Vote(r) => proto::vote_response_from_pb(&r).map_err(network),
            _ => Err(network(NetError::UnexpectedReply)),
        }
    }
}
