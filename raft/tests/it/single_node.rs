//! The store under a real openraft node: writes, snapshots and log purging driven by
//! openraft's own policy, then a restart that must come back with the same state.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{Config, SnapshotPolicy};
use raft::command::{Command, Request, Response};
use raft::store::Store;
use raft::{Member, NodeId, Raft, TypeConfig};

use crate::fixtures::{member, tenant};

/// A network to nowhere: a one-node cluster never sends an RPC, and if it tried, the peer
/// would be unreachable.
struct NoPeers;

fn unreachable<E: std::error::Error>() -> RPCError<NodeId, Member, E> {
    let e = std::io::Error::new(std::io::ErrorKind::NotConnected, "single-node test");
    RPCError::Unreachable(Unreachable::new(&e))
}

impl RaftNetwork<TypeConfig> for NoPeers {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        Err(unreachable())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        Err(unreachable())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        Err(unreachable())
    }
}

impl RaftNetworkFactory<TypeConfig> for NoPeers {
    type Network = NoPeers;

    async fn new_client(&mut self, _target: NodeId, _node: &Member) -> NoPeers {
        NoPeers
    }
}

async fn start(store: &Store) -> Raft {
    let config = Config {
        // Snapshot often and keep no log behind it, so the test exercises purging.
        snapshot_policy: SnapshotPolicy::LogsSinceLast(5),
        max_in_snapshot_log_to_keep: 0,
        purge_batch_size: 1,
        ..Config::default()
    };
    let config = Arc::new(config.validate().expect("the test config is valid"));
    Raft::new(1, config, NoPeers, store.log_store(), store.state_machine())
        .await
        .expect("raft starts")
}

#[tokio::test]
async fn a_node_snapshots_purges_and_restarts_with_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let timeout = Some(Duration::from_secs(30));
    let (digest, last_index) = {
        let store = Store::open(dir.path()).unwrap();
        let raft = start(&store).await;
        raft.initialize(BTreeMap::from([(1, member("n1"))]))
            .await
            .unwrap();
        raft.wait(timeout)
            .state(openraft::ServerState::Leader, "leader")
            .await
            .unwrap();

        let mut last_index = 0;
        for i in 0..20u64 {
            let t = tenant(&format!("t{i:02}"), &format!("tenant-{i}"));
            let req = Request::new(i, "admin", Command::CreateTenant { tenant: t });
            let written = raft.client_write(req).await.unwrap();
            assert!(
                matches!(written.data, Response::Tenant(_)),
                "{:?}",
                written.data
            );
            last_index = written.log_id.index;
        }
        store
            .reader()
            .wait_applied(last_index, Duration::from_secs(30))
            .await
            .unwrap();
        // Twenty entries with a snapshot every five: openraft must have built several
        // snapshots and purged the log behind them (it keeps none).
        raft.wait(timeout)
            .metrics(
                |m| m.purged.map_or(0, |p| p.index) >= 10,
                "the log was purged behind a snapshot",
            )
            .await
            .unwrap();
        raft.shutdown().await.unwrap();
        (store.reader().digest().unwrap(), last_index)
    };

    let store = Store::open(dir.path()).unwrap();
    // Everything the node had applied is there before Raft even starts.
    assert_eq!(store.reader().last_applied_index(), last_index);
    assert_eq!(store.reader().digest().unwrap(), digest);
    let raft = start(&store).await;
    raft.wait(timeout)
        .state(openraft::ServerState::Leader, "leader again")
        .await
        .unwrap();
    let req = Request::new(
        99,
        "admin",
        Command::CreateTenant {
            tenant: tenant("t99", "late"),
        },
    );
    let written = raft.client_write(req).await.unwrap();
    assert!(written.log_id.index > last_index);
    let reader = store.reader();
    reader
        .wait_applied(written.log_id.index, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(reader.tenants().unwrap().len(), 21);
    raft.shutdown().await.unwrap();
}
