//! Integration tests of the QUIC transport over real sockets on 127.0.0.1 (port 0): mutual TLS
//! between nodes of one CA and refusal across CAs, and a three-node openraft cluster (with a
//! small in-memory store written here) electing a leader, forwarding writes from followers,
//! serving linearizable reads and shipping a snapshot to a late learner.

// Test helpers (the store, node setup) may unwrap too: a panic there is a test failure, which is
// what clippy.toml grants to test functions.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures::future::BoxFuture;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine};
use openraft::{
    Entry, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StoredMembership, Vote,
};
use raft::net::{
    Cluster, ClusterConfig, ErrorCode, ExtensionError, ExtensionHandler, NetError, NoExtensions,
    Transport, TransportConfig,
};
use raft::tls::{generate_ca, CaBundle, NodeIdentity};
use raft::{Command, Member, NodeId, Raft, Request, Response, TypeConfig};
use tokio::sync::{oneshot, watch};

fn localhost() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Echoes the body back, prefixed by the kind; counts calls.
#[derive(Default)]
struct Echo {
    calls: AtomicUsize,
}

impl ExtensionHandler for Echo {
    fn handle<'a>(
        &'a self,
        kind: &'a str,
        body: Vec<u8>,
    ) -> BoxFuture<'a, Result<Vec<u8>, ExtensionError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            match kind {
                "echo" => Ok([b"echo:".as_slice(), &body].concat()),
                "refuse" => Err(ExtensionError::Refused("no thanks".into())),
                other => Err(ExtensionError::UnknownKind(other.into())),
            }
        })
    }
}

/// A transport serving only extensions, stopped when the returned sender drops.
fn serve_ext(t: &Transport, ext: Arc<dyn ExtensionHandler>) -> oneshot::Sender<()> {
    let (tx, rx) = oneshot::channel::<()>();
    let t = t.clone();
    tokio::spawn(async move {
        t.serve_extensions(ext, async {
            let _ = rx.await;
        })
        .await
    });
    tx
}

#[tokio::test]
async fn extension_rpc_between_nodes_of_one_ca() -> anyhow::Result<()> {
    let ca = generate_ca("c1")?;
    let a = Transport::bind(localhost(), &NodeIdentity::issue(&ca, "a")?)?;
    let b = Transport::bind(localhost(), &NodeIdentity::issue(&ca, "b")?)?;
    let echo_a = Arc::new(Echo::default());
    let echo_b = Arc::new(Echo::default());
    let _stop_a = serve_ext(&a, echo_a.clone());
    let _stop_b = serve_ext(&b, echo_b.clone());

    let reply = a
        .call_extension(b.local_addr()?, "echo", b"hi".to_vec())
        .await?;
    assert_eq!(reply, b"echo:hi");
    let reply = b
        .call_extension(a.local_addr()?, "echo", b"yo".to_vec())
        .await?;
    assert_eq!(reply, b"echo:yo");
    // The cached connection serves a second call.
    let reply = a.call_extension(b.local_addr()?, "echo", vec![]).await?;
    assert_eq!(reply, b"echo:");

    match a.call_extension(b.local_addr()?, "refuse", vec![]).await {
        Err(NetError::Remote(f)) => {
            assert_eq!(f.code, ErrorCode::ExtensionFailed);
            assert_eq!(f.message, "no thanks");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    match a.call_extension(b.local_addr()?, "nope", vec![]).await {
        Err(NetError::Remote(f)) => assert_eq!(f.code, ErrorCode::UnknownExtension),
        other => panic!("expected unknown kind, got {other:?}"),
    }
    assert_eq!(echo_b.calls.load(Ordering::SeqCst), 4);
    assert_eq!(echo_a.calls.load(Ordering::SeqCst), 1);

    // The default handler knows no kinds and says so.
    let c = Transport::bind(localhost(), &NodeIdentity::issue(&ca, "c")?)?;
    let _stop_c = serve_ext(&c, Arc::new(NoExtensions));
    match a.call_extension(c.local_addr()?, "echo", vec![]).await {
        Err(NetError::Remote(f)) => assert_eq!(f.code, ErrorCode::UnknownExtension),
        other => panic!("expected unknown kind, got {other:?}"),
    }
    Ok(())
}

/// Splices every tunnel back to its opener (an echo), counting tunnels.
#[derive(Default)]
struct TunnelEcho {
    tunnels: Arc<AtomicUsize>,
}

impl ExtensionHandler for TunnelEcho {
    fn handle<'a>(
        &'a self,
        kind: &'a str,
        _body: Vec<u8>,
    ) -> BoxFuture<'a, Result<Vec<u8>, ExtensionError>> {
        Box::pin(async move { Err(ExtensionError::UnknownKind(kind.into())) })
    }

    fn tunnel(
        &self,
        _peer: std::net::SocketAddr,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> BoxFuture<'static, ()> {
        self.tunnels.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let _ = tokio::io::copy(&mut recv, &mut send).await;
            let _ = send.finish();
        })
    }
}

/// The test-only partition file cuts a link both ways from one side: the partitioned node's
/// calls fail before sending, the peer's calls get no answer (and reach no handler), and
/// removing the file heals the link.
#[tokio::test]
async fn the_partition_file_cuts_a_link_both_ways_and_heals() -> anyhow::Result<()> {
    let ca = generate_ca("c1")?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("partition");
    let quick = TransportConfig {
        rpc_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let a = Transport::bind_with(
        localhost(),
        &NodeIdentity::issue(&ca, "a")?,
        TransportConfig {
            partition_file: Some(file.clone()),
            ..quick.clone()
        },
    )?;
    let b = Transport::bind_with(localhost(), &NodeIdentity::issue(&ca, "b")?, quick)?;
    let echo_a = Arc::new(Echo::default());
    let _stop_a = serve_ext(&a, echo_a.clone());
    let _stop_b = serve_ext(&b, Arc::new(Echo::default()));
    b.call_extension(a.local_addr()?, "echo", vec![]).await?;
    let before = echo_a.calls.load(Ordering::SeqCst);

    std::fs::write(&file, format!("{}\n", b.local_addr()?))?;
    // The file is re-read within its refresh period: wait for the cut, not a fixed time.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match a.call_extension(b.local_addr()?, "echo", vec![]).await {
            Err(e) if e.certainly_not_sent() => break,
            other => {
                anyhow::ensure!(std::time::Instant::now() < deadline, "never cut: {other:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    match b.call_extension(a.local_addr()?, "echo", vec![]).await {
        Err(NetError::Timeout(_)) => {}
        other => panic!("a partitioned peer must not answer: {other:?}"),
    }
    assert_eq!(
        echo_a.calls.load(Ordering::SeqCst),
        before,
        "a handler ran across the cut"
    );

    std::fs::remove_file(&file)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while a
        .call_extension(b.local_addr()?, "echo", vec![])
        .await
        .is_err()
    {
        anyhow::ensure!(std::time::Instant::now() < deadline, "never healed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.call_extension(a.local_addr()?, "echo", vec![]).await?;
    Ok(())
}

#[tokio::test]
async fn a_tunnel_stream_reaches_the_extension_handler() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let ca = generate_ca("t")?;
    let a = Transport::bind(localhost(), &NodeIdentity::issue(&ca, "a")?)?;
    let b = Transport::bind(localhost(), &NodeIdentity::issue(&ca, "b")?)?;
    let handler = TunnelEcho::default();
    let tunnels = handler.tunnels.clone();
    let _stop = serve_ext(&b, Arc::new(handler));

    let (mut send, mut recv) = a.open_tunnel(b.local_addr()?).await?;
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    send.write_all(&payload).await?;
    send.shutdown().await?;
    let back = recv.read_to_end(1 << 20).await?;
    assert_eq!(back, payload);
    assert_eq!(tunnels.load(Ordering::SeqCst), 1);
    Ok(())
}

/// An identity whose certificate comes from `cert_ca` but that trusts `trust_ca`.
fn mixed_identity(cert_ca: &CaBundle, trust_ca: &CaBundle, name: &str) -> NodeIdentity {
    let mut id = NodeIdentity::issue(cert_ca, name).unwrap();
    id.ca_cert_pem = trust_ca.cert_pem.clone();
    id
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_both_ways() -> anyhow::Result<()> {
    let ca = generate_ca("good")?;
    let other = generate_ca("evil")?;
    let server = Transport::bind(localhost(), &NodeIdentity::issue(&ca, "server")?)?;
    let server_echo = Arc::new(Echo::default());
    let _stop = serve_ext(&server, server_echo.clone());

    // As client: a node trusting our CA but presenting a certificate of another CA is refused
    // by our server.
    let intruder = Transport::bind(localhost(), &mixed_identity(&other, &ca, "intruder"))?;
    let res = intruder
        .call_extension(server.local_addr()?, "echo", vec![])
        .await;
    assert!(res.is_err(), "server accepted a foreign client: {res:?}");

    // As server: our client refuses a server whose certificate is from another CA, even when
    // that server would accept our certificate.
    let fake_server = Transport::bind(localhost(), &mixed_identity(&other, &ca, "fake"))?;
    let fake_echo = Arc::new(Echo::default());
    let _stop_fake = serve_ext(&fake_server, fake_echo.clone());
    let client = Transport::bind(localhost(), &NodeIdentity::issue(&ca, "client")?)?;
    let res = client
        .call_extension(fake_server.local_addr()?, "echo", vec![])
        .await;
    assert!(res.is_err(), "client accepted a foreign server: {res:?}");

    // Neither handler ever ran; and the honest client still gets through to the real server.
    assert_eq!(server_echo.calls.load(Ordering::SeqCst), 0);
    assert_eq!(fake_echo.calls.load(Ordering::SeqCst), 0);
    let ok = client
        .call_extension(server.local_addr()?, "echo", b"x".to_vec())
        .await?;
    assert_eq!(ok, b"echo:x");
    Ok(())
}

// ---- a tiny in-memory openraft store ----------------------------------------------------------

#[derive(Default)]
struct LogInner {
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    log: BTreeMap<u64, Entry<TypeConfig>>,
    purged: Option<LogId<NodeId>>,
}

#[derive(Clone, Default)]
struct MemLog(Arc<Mutex<LogInner>>);

impl RaftLogReader<TypeConfig> for MemLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + std::fmt::Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let g = self.0.lock().unwrap();
        Ok(g.log.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for MemLog {
    type LogReader = MemLog;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let g = self.0.lock().unwrap();
        let last = g.log.values().next_back().map(|e| e.log_id).or(g.purged);
        Ok(LogState {
            last_purged_log_id: g.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> MemLog {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.0.lock().unwrap().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.0.lock().unwrap().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        self.0.lock().unwrap().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.0.lock().unwrap().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
    {
        {
            let mut g = self.0.lock().unwrap();
            for e in entries {
                g.log.insert(e.log_id.index, e);
            }
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.0.lock().unwrap().log.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut g = self.0.lock().unwrap();
        g.log = g.log.split_off(&(log_id.index + 1));
        g.purged = Some(log_id);
        Ok(())
    }
}

/// The state: how many Normal entries were applied, in order, with their actors.
#[derive(Clone, Default, serde::Serialize, serde::Deserialize)]
struct SmData {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Member>,
    actors: Vec<String>,
}

type StoredSnapshot = (SnapshotMeta<NodeId, Member>, Vec<u8>);

#[derive(Clone)]
struct MemSm {
    data: Arc<Mutex<SmData>>,
    snapshot: Arc<Mutex<Option<StoredSnapshot>>>,
    applied: Arc<watch::Sender<u64>>,
}

impl MemSm {
    fn new() -> (MemSm, watch::Receiver<u64>) {
        let (tx, rx) = watch::channel(0);
        (
            MemSm {
                data: Arc::default(),
                snapshot: Arc::default(),
                applied: Arc::new(tx),
            },
            rx,
        )
    }

    fn actors(&self) -> Vec<String> {
        self.data.lock().unwrap().actors.clone()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for MemSm {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let data = self.data.lock().unwrap().clone();
        let bytes = serde_json::to_vec(&data).unwrap();
        let meta = SnapshotMeta {
            last_log_id: data.last_applied,
            last_membership: data.membership.clone(),
            snapshot_id: format!("snap-{:?}", data.last_applied.map(|l| l.index)),
        };
        *self.snapshot.lock().unwrap() = Some((meta.clone(), bytes.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for MemSm {
    type SnapshotBuilder = MemSm;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Member>), StorageError<NodeId>>
    {
        let g = self.data.lock().unwrap();
        Ok((g.last_applied, g.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
    {
        let mut out = Vec::new();
        let mut g = self.data.lock().unwrap();
        for e in entries {
            g.last_applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(req) => g.actors.push(req.actor),
                EntryPayload::Membership(m) => {
                    g.membership = StoredMembership::new(Some(e.log_id), m)
                }
            }
            out.push(Response::Ok);
        }
        if let Some(l) = g.last_applied {
            self.applied.send_replace(l.index);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> MemSm {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = snapshot.into_inner();
        let data: SmData = serde_json::from_slice(&bytes).unwrap();
        *self.data.lock().unwrap() = data;
        if let Some(l) = meta.last_log_id {
            self.applied.send_replace(l.index);
        }
        *self.snapshot.lock().unwrap() = Some((meta.clone(), bytes));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        Ok(self
            .snapshot
            .lock()
            .unwrap()
            .clone()
            .map(|(meta, bytes)| Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(bytes)),
            }))
    }
}

// ---- a three-node cluster over QUIC -----------------------------------------------------------

struct TestNode {
    id: NodeId,
    raft: Raft,
    transport: Transport,
    sm: MemSm,
    cluster: Cluster,
    member: Member,
    _stop: oneshot::Sender<()>,
}

async fn start_node(ca: &CaBundle, id: NodeId, config: Arc<openraft::Config>) -> TestNode {
    let name = format!("n{id}");
    let transport = Transport::bind(localhost(), &NodeIdentity::issue(ca, &name).unwrap()).unwrap();
    let (sm, applied) = MemSm::new();
    let raft = Raft::new(
        id,
        config,
        transport.network_factory(id),
        MemLog::default(),
        sm.clone(),
    )
    .await
    .unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    {
        let transport = transport.clone();
        let raft = raft.clone();
        tokio::spawn(async move {
            transport
                .serve(raft, Arc::new(NoExtensions), async {
                    let _ = stopped.await;
                })
                .await
        });
    }
    let member = Member {
        name,
        api_addr: "127.0.0.1:1".into(),
        peer_addr: transport.local_addr().unwrap().to_string(),
    };
    let cluster = Cluster::new(
        raft.clone(),
        transport.clone(),
        applied,
        ClusterConfig::default(),
    );
    TestNode {
        id,
        raft,
        transport,
        sm,
        cluster,
        member,
        _stop: stop,
    }
}

fn noop(actor: &str) -> Request {
    Request::new(1, actor, Command::Noop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_forward_read_and_snapshot_over_quic() -> anyhow::Result<()> {
    let ca = generate_ca("c3")?;
    let config = Arc::new(
        openraft::Config {
            heartbeat_interval: 100,
            election_timeout_min: 400,
            election_timeout_max: 800,
            // Small, so that the late learner below must receive a snapshot.
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(5),
            max_in_snapshot_log_to_keep: 0,
            purge_batch_size: 1,
            ..Default::default()
        }
        .validate()?,
    );
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(start_node(&ca, id, config.clone()).await);
    }
    let members: BTreeMap<NodeId, Member> =
        nodes.iter().map(|n| (n.id, n.member.clone())).collect();
    nodes[0].raft.initialize(members).await?;

    let leader = nodes[0]
        .raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.current_leader.is_some(), "a leader")
        .await?
        .current_leader
        .context("leader")?;
    for n in &nodes {
        n.raft
            .wait(Some(Duration::from_secs(10)))
            .metrics(
                |m| m.current_leader == Some(leader),
                "all agree on the leader",
            )
            .await?;
    }

    // A write from every node, followers forwarding to the leader over QUIC.
    let mut indexes = Vec::new();
    for n in &nodes {
        let (index, resp) = n.cluster.write(noop(&format!("from-{}", n.id))).await?;
        assert_eq!(resp, Response::Ok);
        indexes.push(index);
    }
    assert!(indexes.windows(2).all(|w| w[0] < w[1]), "{indexes:?}");

    // A linearizable read on each follower sees all three writes.
    for n in nodes.iter().filter(|n| n.id != leader) {
        n.cluster.linearizable_read().await?;
        let actors = n.sm.actors();
        assert_eq!(actors, vec!["from-1", "from-2", "from-3"], "node {}", n.id);
        assert!(n.cluster.read_barrier().await? >= indexes[2]);
    }

    // The leader heard from every follower.
    let leader_node = nodes
        .iter()
        .find(|n| n.id == leader)
        .context("leader node")?;
    for n in nodes.iter().filter(|n| n.id != leader) {
        assert!(
            leader_node.transport.last_contact(n.id).is_some(),
            "node {}",
            n.id
        );
    }

    // Enough writes for a snapshot and a purge, then a learner that can only catch up from the
    // snapshot (chunked install_snapshot over QUIC).
    for i in 0..12 {
        nodes[i % 3]
            .cluster
            .write(noop(&format!("bulk-{i}")))
            .await?;
    }
    leader_node.raft.trigger().snapshot().await?;
    leader_node
        .raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.purged.is_some(), "leader purged its log")
        .await?;
    let learner = start_node(&ca, 4, config.clone()).await;
    leader_node
        .raft
        .add_learner(4, learner.member.clone(), true)
        .await?;
    learner.cluster.linearizable_read().await?;
    let actors = learner.sm.actors();
    assert_eq!(actors.len(), 15, "{actors:?}");
    assert!(learner.raft.metrics().borrow().snapshot.is_some());

    // Failover: stop the leader; a follower's write waits for the new leader and succeeds.
    let follower = nodes.iter().find(|n| n.id != leader).context("follower")?;
    leader_node.raft.shutdown().await?;
    let (_, resp) = follower.cluster.write(noop("after-failover")).await?;
    assert_eq!(resp, Response::Ok);
    let new_leader = follower.raft.metrics().borrow().current_leader;
    assert!(new_leader.is_some() && new_leader != Some(leader));
    Ok(())
}
