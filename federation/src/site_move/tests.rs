//! The whole saga between two in-memory sites (the real `apply` on each), with real disk files
//! and the real transfer: a move that completes, a link cut mid-copy that heals in time and
//! resumes, one that does not and rolls back, and a target that refuses.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use futures::StreamExt;
use raft::apply::{apply, MemState, StateTx};
use raft::federation::{CatalogChange, CatalogObject, SiteIdentity, SiteLink};
use raft::model::{
    DesiredState, Member, Operation, OperationState, Quota, Tenant, Usage, Vm, VmState,
};
use raft::Request;
use rand::{Rng, SeedableRng};

use super::*;
use crate::transfer::{ChunkStream, Receiver};

const SRC: &str = "ssssss";
const TGT: &str = "tttttt";
const VM: &str = "ssssss-vm1";
const TENANT: &str = "ssssss-t";
const MOVE: &str = "ssssss-move1";

/// A site: the real `apply` over an in-memory state.
struct MemLog {
    state: Mutex<(MemState, u64)>,
}

impl MemLog {
    fn new() -> MemLog {
        MemLog {
            state: Mutex::new((MemState::default(), 0)),
        }
    }

    fn run(&self, command: Command) -> Response {
        let mut guard = self.state.lock().unwrap();
        guard.1 += 1;
        let index = guard.1;
        apply(&guard.0, &Request::new(index, "node:1", command), index).unwrap()
    }

    fn read<T>(&self, key: &[u8]) -> Option<T>
    where
        T: rkyv::Archive,
        T::Archived: for<'a> rkyv::bytecheck::CheckBytes<
                rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>,
            > + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
    {
        let guard = self.state.lock().unwrap();
        let bytes = guard.0.get(key).unwrap()?;
        Some(raft::codec::decode(&bytes).unwrap())
    }
}

#[async_trait]
impl SiteLog for MemLog {
    async fn write(&self, command: Command) -> Result<Response, SagaError> {
        Ok(self.run(command))
    }
    fn site_move(&self, id: &str) -> Result<Option<SiteMove>, SagaError> {
        Ok(self.read(&raft::site_move::move_key(id)))
    }
    fn import(&self, id: &str) -> Result<Option<SiteImport>, SagaError> {
        Ok(self.read(&raft::site_move::import_key(id)))
    }
    fn vm(&self, id: &str) -> Result<Option<Vm>, SagaError> {
        Ok(self.read(&raft::keys::vm(id)))
    }
}

/// Disks at `<root>/node<N>/vms/<vm id>/root.qcow2`, like a node's image store.
struct Disks(PathBuf);

impl DiskLocator for Disks {
    fn disk_path(&self, node: NodeId, vm_id: &str) -> Option<PathBuf> {
        Some(
            self.0
                .join(format!("node{node}"))
                .join("vms")
                .join(vm_id)
                .join("root.qcow2"),
        )
    }
}

fn ok(r: Response) {
    assert!(!matches!(r, Response::Rejected { .. }), "{r:?}");
}

fn link(id: &str, name: &str) -> Command {
    Command::LinkSite {
        link: SiteLink {
            site: SiteIdentity {
                id: id.into(),
                name: name.into(),
            },
            ca_cert_pem: "ca".into(),
            addrs: vec![],
            created_at: 0,
            updated_at: 0,
        },
        token: None,
    }
}

fn register(log: &MemLog, name: &str) {
    ok(log.run(Command::RegisterNode {
        member: Member {
            name: name.into(),
            api_addr: "a".into(),
            peer_addr: "p".into(),
        },
    }));
}

fn tenant(max_vms: Option<u64>) -> Tenant {
    Tenant {
        id: TENANT.into(),
        name: "acme".into(),
        quota: Quota {
            max_vms,
            ..Default::default()
        },
        usage: Default::default(),
        created_at: 0,
        updated_at: 0,
        version: 0,
    }
}

fn operation(id: &str, kind: &str) -> Operation {
    Operation {
        id: id.into(),
        kind: kind.into(),
        tenant: TENANT.into(),
        target: format!("vm/{VM}"),
        state: OperationState::Pending,
        error: None,
        created_at: 0,
        updated_at: 0,
    }
}

struct World {
    _dir: tempfile::TempDir,
    src: Arc<MemLog>,
    tgt: Arc<MemLog>,
    src_disks: Arc<Disks>,
    tgt_disks: Arc<Disks>,
    target: Arc<LocalTarget>,
    sha256: String,
}

/// The source site runs the VM on node 1 with a disk of random bytes; the target site has
/// nodes 1 and 2, knows the tenant from the source's catalog and chooses node 2.
async fn world(max_vms_at_target: Option<u64>) -> World {
    let dir = tempfile::tempdir().unwrap();
    let src = Arc::new(MemLog::new());
    ok(src.run(link(TGT, "edge")));
    register(&src, "s1");
    ok(src.run(Command::CreateTenant {
        tenant: tenant(None),
    }));
    ok(src.run(Command::CreateVm {
        vm: Vm {
            id: VM.into(),
            name: "web".into(),
            tenant: TENANT.into(),
            vcpus: 1,
            memory_mib: 128,
            disk_gib: 1,
            image: None,
            labels: Default::default(),
            node: Some(1),
            desired_state: DesiredState::Running,
            state: VmState::Pending,
            ha: false,
            anti_affinity_group: None,
            epoch: 0,
            created_at: 0,
            updated_at: 0,
            version: 0,
            placement: Default::default(),
        },
        operation: operation("create", "vm.create"),
    }));
    ok(src.run(report(VmState::Running)));

    let tgt = Arc::new(MemLog::new());
    ok(tgt.run(link(SRC, "hq")));
    register(&tgt, "t1");
    register(&tgt, "t2");
    ok(tgt.run(Command::ApplyCatalog {
        site: SRC.into(),
        from: 0,
        to: 5,
        head: 5,
        latency_ms: 1,
        reset: false,
        stale_keys: vec![],
        changes: vec![CatalogChange {
            key: format!("t/{TENANT}"),
            object: Some(CatalogObject::Tenant(tenant(max_vms_at_target))),
        }],
    }));

    let src_disks = Arc::new(Disks(dir.path().join("src")));
    let tgt_disks = Arc::new(Disks(dir.path().join("tgt")));
    let seed: u64 = rand::thread_rng().gen();
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; 700 * 1024 + 3];
    rng.fill(&mut data[..]);
    let path = src_disks.disk_path(1, VM).unwrap();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &data).unwrap();
    use sha2::Digest;
    let sha256 = hex::encode(sha2::Sha256::digest(&data));

    let receivers: ReceiverOf = {
        let (tgt, disks) = (tgt.clone(), tgt_disks.clone());
        let made: Arc<Mutex<std::collections::BTreeMap<NodeId, Arc<Receiver>>>> =
            Default::default();
        Arc::new(move |node| {
            let (tgt, disks) = (tgt.clone(), disks.clone());
            made.lock()
                .unwrap()
                .entry(node)
                .or_insert_with(|| {
                    let staging = disks.0.join(format!("node{node}")).join("staging");
                    // A transfer lands where the VM it imports keeps its disk on this node.
                    Arc::new(Receiver::new(
                        staging,
                        Arc::new(move |spec: &TransferSpec| {
                            let imp = tgt
                                .import(&spec.id)
                                .ok()
                                .flatten()
                                .ok_or_else(|| TransferError::Unknown(spec.id.clone()))?;
                            disks
                                .disk_path(node, &imp.vm_id)
                                .ok_or_else(|| TransferError::Unknown(spec.id.clone()))
                        }),
                    ))
                })
                .clone()
        })
    };
    let target = Arc::new(LocalTarget {
        log: tgt.clone(),
        choose_node: Arc::new(|_vm: &Vm| Ok(2)),
        receivers,
        disks: tgt_disks.clone(),
    });
    World {
        _dir: dir,
        src,
        tgt,
        src_disks,
        tgt_disks,
        target,
        sha256,
    }
}

fn report(state: VmState) -> Command {
    Command::ReportVm {
        id: VM.into(),
        node: 1,
        epoch: 1,
        state,
        error: None,
    }
}

/// The source node's agent, reduced to what the move needs: it stops the guest when asked.
fn agent(src: Arc<MemLog>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Some(vm) = src.vm(VM).unwrap() {
                if vm.state == VmState::Running && vm.desired_state == DesiredState::Stopped {
                    src.run(report(VmState::Stopped));
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
}

fn request(w: &World) {
    ok(w.src.run(Command::RequestSiteMove {
        site_move: SiteMove {
            id: MOVE.into(),
            vm_id: VM.into(),
            tenant: String::new(),
            source_site: SRC.into(),
            target_site: TGT.into(),
            phase: MovePhase::Requested,
            previous_desired: DesiredState::Stopped,
            source_node: None,
            disk: None,
            target_node: None,
            reason: None,
            created_at: 0,
            updated_at: 0,
        },
        operation: operation(MOVE, raft::site_move::OPERATION_KIND),
    }));
}

fn settings(link_timeout: Duration) -> MoveSettings {
    MoveSettings {
        send: SendOptions {
            chunk_size: 64 * 1024,
            rate: None,
            burst: 64 * 1024,
        },
        retry: RetryPolicy {
            link_timeout,
            backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(50),
            checksum_retries: 1,
        },
    }
}

fn foreign_usage(log: &MemLog) -> Usage {
    log.read(&raft::federation::foreign_usage_key(TENANT))
        .unwrap_or_default()
}

fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// The link to the target site, which can be cut (all calls fail) and cut itself mid-push.
struct Link {
    inner: Arc<LocalTarget>,
    down: Arc<AtomicBool>,
    /// The next push breaks after this many bytes and takes the link down.
    cut_after: Arc<AtomicU64>,
}

impl Link {
    fn check(&self) -> Result<(), SagaError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(SagaError::Link("unreachable".into()));
        }
        Ok(())
    }
}

struct LinkSink {
    inner: Arc<dyn DiskSink>,
    down: Arc<AtomicBool>,
    cut_after: Arc<AtomicU64>,
}

#[async_trait]
impl DiskSink for LinkSink {
    async fn offer(&self, spec: &TransferSpec) -> Result<u64, TransferError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(TransferError::Link("unreachable".into()));
        }
        self.inner.offer(spec).await
    }

    async fn push(&self, chunks: ChunkStream) -> Result<u64, TransferError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(TransferError::Link("unreachable".into()));
        }
        let budget = self.cut_after.swap(u64::MAX, Ordering::SeqCst);
        let down = self.down.clone();
        let wrapped =
            futures::stream::unfold((chunks, 0u64, false), move |(mut inner, passed, cut)| {
                let down = down.clone();
                async move {
                    if cut {
                        return None;
                    }
                    match inner.next().await? {
                        Ok(c) if passed + c.data.len() as u64 > budget => {
                            down.store(true, Ordering::SeqCst);
                            Some((
                                Err(TransferError::Link("cut".into())),
                                (inner, passed, true),
                            ))
                        }
                        Ok(c) => {
                            let n = c.data.len() as u64;
                            Some((Ok(c), (inner, passed + n, false)))
                        }
                        Err(e) => Some((Err(e), (inner, passed, true))),
                    }
                }
            });
        self.inner.push(Box::pin(wrapped)).await
    }

    async fn commit(&self, spec: &TransferSpec) -> Result<(), TransferError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(TransferError::Link("unreachable".into()));
        }
        self.inner.commit(spec).await
    }
}

#[async_trait]
impl TargetSite for Link {
    async fn begin_import(&self, import: SiteImport) -> Result<NodeId, SagaError> {
        self.check()?;
        self.inner.begin_import(import).await
    }
    async fn import_phase(&self, id: &str) -> Result<Option<ImportPhase>, SagaError> {
        self.check()?;
        self.inner.import_phase(id).await
    }
    async fn settle(&self, id: &str, vm_id: &str, to: ImportSettle) -> Result<(), SagaError> {
        self.check()?;
        self.inner.settle(id, vm_id, to).await
    }
    fn disk_sink(&self, id: &str, node: NodeId) -> Arc<dyn DiskSink> {
        Arc::new(LinkSink {
            inner: self.inner.disk_sink(id, node),
            down: self.down.clone(),
            cut_after: self.cut_after.clone(),
        })
    }
}

fn link_to(w: &World) -> Link {
    Link {
        inner: w.target.clone(),
        down: Arc::new(AtomicBool::new(false)),
        cut_after: Arc::new(AtomicU64::new(u64::MAX)),
    }
}

fn assert_moved(w: &World) {
    let m = w.src.site_move(MOVE).unwrap().unwrap();
    assert_eq!(m.phase, MovePhase::Done);
    // The VM is at the target with the same id, on the node that received its disk, wanting
    // to run as it did before the move.
    let vm = w.tgt.vm(VM).unwrap().unwrap();
    assert_eq!(vm.id, VM);
    assert_eq!(vm.node, Some(2));
    assert_eq!(vm.desired_state, DesiredState::Running);
    assert_eq!(foreign_usage(&w.tgt).vms, 1);
    let arrived = w.tgt_disks.disk_path(2, VM).unwrap();
    use sha2::Digest;
    let sha = hex::encode(sha2::Sha256::digest(std::fs::read(&arrived).unwrap()));
    assert_eq!(sha, w.sha256, "the disk arrived identical");
    assert_eq!(
        files_under(&w.tgt_disks.0),
        vec![arrived],
        "nothing staged is left"
    );
    // At the source the VM is handed to the delete path: its agent removes domain and disk.
    let left = w.src.vm(VM).unwrap().unwrap();
    assert_eq!(left.state, VmState::Deleting);
    let t: Tenant = w.src.read(&raft::keys::tenant(TENANT)).unwrap();
    assert_eq!(t.usage.vms, 0);
    let op: Operation = w.src.read(&raft::keys::operation(MOVE)).unwrap();
    assert_eq!(op.state, OperationState::Succeeded);
}

#[tokio::test]
async fn a_stopped_vm_moves_with_its_id_and_an_identical_disk() {
    let w = world(None).await;
    let agent = agent(w.src.clone());
    request(&w);
    let link = link_to(&w);
    let phase = drive(
        w.src.as_ref(),
        &link,
        w.src_disks.as_ref(),
        &settings(Duration::from_secs(10)),
        MOVE,
        Duration::from_millis(2),
    )
    .await
    .unwrap();
    agent.abort();
    assert_eq!(phase, MovePhase::Done);
    assert_moved(&w);
}

#[tokio::test]
async fn a_link_cut_mid_copy_that_heals_in_time_resumes_the_copy() {
    let w = world(None).await;
    let agent = agent(w.src.clone());
    request(&w);
    let link = link_to(&w);
    link.cut_after.store(300 * 1024, Ordering::SeqCst);
    let down = link.down.clone();
    // The link comes back a moment after it broke, well within the timeout.
    let healer = tokio::spawn(async move {
        while !down.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        down.store(false, Ordering::SeqCst);
    });
    let phase = drive(
        w.src.as_ref(),
        &link,
        w.src_disks.as_ref(),
        &settings(Duration::from_secs(20)),
        MOVE,
        Duration::from_millis(2),
    )
    .await
    .unwrap();
    healer.await.unwrap();
    agent.abort();
    assert_eq!(phase, MovePhase::Done);
    assert_moved(&w);
}

#[tokio::test]
async fn a_link_cut_mid_copy_for_too_long_rolls_back_to_the_source_alone() {
    let w = world(None).await;
    let agent = agent(w.src.clone());
    request(&w);
    let link = link_to(&w);
    link.cut_after.store(300 * 1024, Ordering::SeqCst);
    let settings = settings(Duration::from_millis(200));
    // Drive until the source has decided; the link is still down, so the target cannot be
    // told yet.
    loop {
        let progress = step(w.src.as_ref(), &link, w.src_disks.as_ref(), &settings, MOVE).await;
        let m = w.src.site_move(MOVE).unwrap().unwrap();
        if m.phase == MovePhase::RolledBack {
            assert!(
                matches!(progress, Ok(Progress::Advanced(_))),
                "{progress:?}"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let m = w.src.site_move(MOVE).unwrap().unwrap();
    assert!(
        m.reason
            .as_deref()
            .unwrap_or("")
            .contains("disk copy failed"),
        "{:?}",
        m.reason
    );
    // The VM is at the source only, wanting to run again; it never existed at the target.
    let vm = w.src.vm(VM).unwrap().unwrap();
    assert_eq!(vm.desired_state, DesiredState::Running);
    assert_eq!(
        raft::site_move::active_move(&w.src.state.lock().unwrap().0, VM).unwrap(),
        None
    );
    assert_eq!(w.tgt.vm(VM).unwrap(), None);
    // While the link is down the abort cannot reach the target...
    assert!(matches!(
        step(w.src.as_ref(), &link, w.src_disks.as_ref(), &settings, MOVE).await,
        Err(SagaError::Link(_))
    ));
    // ...once it is back, the target drops its reservation and every byte it received.
    link.down.store(false, Ordering::SeqCst);
    let phase = drive(
        w.src.as_ref(),
        &link,
        w.src_disks.as_ref(),
        &settings,
        MOVE,
        Duration::from_millis(2),
    )
    .await
    .unwrap();
    agent.abort();
    assert_eq!(phase, MovePhase::RolledBack);
    let imp = w.tgt.import(MOVE).unwrap().unwrap();
    assert_eq!(imp.phase, ImportPhase::Aborted);
    assert_eq!(foreign_usage(&w.tgt), Usage::default());
    assert_eq!(files_under(&w.tgt_disks.0), Vec::<PathBuf>::new());
    let op: Operation = w.src.read(&raft::keys::operation(MOVE)).unwrap();
    assert_eq!(op.state, OperationState::Failed);
}

#[tokio::test]
async fn a_target_that_refuses_the_import_rolls_the_move_back() {
    // The tenant has no room at the target.
    let w = world(Some(0)).await;
    let agent = agent(w.src.clone());
    request(&w);
    let link = link_to(&w);
    let phase = drive(
        w.src.as_ref(),
        &link,
        w.src_disks.as_ref(),
        &settings(Duration::from_secs(10)),
        MOVE,
        Duration::from_millis(2),
    )
    .await
    .unwrap();
    agent.abort();
    assert_eq!(phase, MovePhase::RolledBack);
    let m = w.src.site_move(MOVE).unwrap().unwrap();
    assert!(
        m.reason.as_deref().unwrap_or("").contains("refused"),
        "{:?}",
        m.reason
    );
    assert_eq!(
        w.src.vm(VM).unwrap().unwrap().desired_state,
        DesiredState::Running
    );
    assert_eq!(w.tgt.vm(VM).unwrap(), None);
    assert_eq!(files_under(&w.tgt_disks.0), Vec::<PathBuf>::new());
}
