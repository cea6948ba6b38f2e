//! The simulated nodes: each one openraft `Raft` of the product's type configuration over a
//! [`SimStore`], started, crashed and restarted by the nemesis.
//!
//! Determinism: openraft draws each election timeout from `rand::thread_rng()` between the
//! configured minimum and maximum, which the seed does not control. Each incarnation of a node
//! therefore gets its own timeout drawn from the seed and a window one millisecond wide, so the
//! draw has one possible outcome while nodes still time out at different moments.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use raft::{Member, NodeId, Raft};
use rand::rngs::StdRng;
use rand::Rng;

use super::network::{Net, SimNetworkFactory};
use super::observer::Observer;
use super::store::{self, Durability, SharedDisk, SimStore};
use super::SimError;

/// Raft timers of the simulation (milliseconds), shorter than the product's LAN defaults so a
/// run sees many elections.
pub const HEARTBEAT_MS: u64 = 50;
const ELECTION_MIN_MS: u64 = 150;
const ELECTION_SPREAD_MS: u64 = 150;
/// Snapshot often, so snapshot building, transfer, installation and log purging all happen.
const SNAPSHOT_EVERY: u64 = 40;
const KEEP_AFTER_SNAPSHOT: u64 = 10;

struct Slot {
    disk: SharedDisk,
    raft: Option<Raft>,
}

/// The nodes of one simulated cluster.
pub struct SimCluster {
    pub net: Arc<Net>,
    pub observer: Arc<Observer>,
    pub members: BTreeMap<NodeId, Member>,
    durability: Durability,
    rng: Mutex<StdRng>,
    slots: Mutex<BTreeMap<NodeId, Slot>>,
}

impl SimCluster {
    /// `n` nodes with empty disks, none running yet.
    pub fn new(
        n: usize,
        net: Arc<Net>,
        observer: Arc<Observer>,
        durability: Durability,
        rng: StdRng,
    ) -> Self {
        let mut members = BTreeMap::new();
        let mut slots = BTreeMap::new();
        for id in 1..=n as NodeId {
            members.insert(
                id,
                Member {
                    name: format!("n{id}"),
                    api_addr: format!("sim-n{id}:8080"),
                    peer_addr: format!("sim-n{id}:7070"),
                },
            );
            slots.insert(
                id,
                Slot {
                    disk: SharedDisk::default(),
                    raft: None,
                },
            );
        }
        Self {
            net,
            observer,
            members,
            durability,
            rng: Mutex::new(rng),
            slots: Mutex::new(slots),
        }
    }

    fn slots(&self) -> MutexGuard<'_, BTreeMap<NodeId, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.members.keys().copied().collect()
    }

    /// The running Raft of `id`, if it is up.
    pub fn raft(&self, id: NodeId) -> Option<Raft> {
        self.slots().get(&id).and_then(|s| s.raft.clone())
    }

    /// The disk of `id`.
    pub fn disk(&self, id: NodeId) -> Option<SharedDisk> {
        self.slots().get(&id).map(|s| s.disk.clone())
    }

    /// Starts (or restarts) node `id` from what its disk holds.
    pub async fn start(&self, id: NodeId) -> Result<(), SimError> {
        let Some(disk) = self.disk(id) else {
            return Err(SimError::UnknownNode(id));
        };
        if self.raft(id).is_some() {
            return Ok(());
        }
        let election = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            ELECTION_MIN_MS + rng.gen_range(0..ELECTION_SPREAD_MS)
        };
        let config = openraft::Config {
            cluster_name: "sim".into(),
            heartbeat_interval: HEARTBEAT_MS,
            election_timeout_min: election,
            election_timeout_max: election + 1,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(SNAPSHOT_EVERY),
            max_in_snapshot_log_to_keep: KEEP_AFTER_SNAPSHOT,
            install_snapshot_timeout: 1000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| SimError::Config(e.to_string()))?;
        let store = SimStore::new(id, disk, self.observer.clone(), self.durability);
        let network = SimNetworkFactory {
            net: self.net.clone(),
            me: id,
        };
        let raft = Raft::new(id, Arc::new(config), network, store.clone(), store)
            .await
            .map_err(|e| SimError::Start(id, e.to_string()))?;
        self.observer
            .event(format_args!("n{id} start (election timeout {election} ms)"));
        self.net.state().nodes.insert(id, Some(raft.clone()));
        if let Some(slot) = self.slots().get_mut(&id) {
            slot.raft = Some(raft);
        }
        Ok(())
    }

    /// Kills node `id` at once: the network stops delivering to it, its unflushed writes are
    /// lost, and its Raft is shut down.
    pub async fn crash(&self, id: NodeId) {
        let (raft, disk) = {
            let mut slots = self.slots();
            let Some(slot) = slots.get_mut(&id) else {
                return;
            };
            (slot.raft.take(), slot.disk.clone())
        };
        let Some(raft) = raft else { return };
        self.net.state().nodes.insert(id, None);
        let lost = store::lock(&disk).crash();
        self.observer
            .event(format_args!("n{id} crash ({lost} unflushed writes lost)"));
        // The old incarnation's store refuses every call from here on, so whatever its tasks
        // still do cannot touch the restarted node.
        let _ = raft.shutdown().await;
    }

    /// Makes node 1 initialise the cluster with every node as a voter.
    pub async fn initialize(&self) -> Result<(), SimError> {
        let Some(raft) = self.raft(1) else {
            return Err(SimError::UnknownNode(1));
        };
        raft.initialize(self.members.clone())
            .await
            .map_err(|e| SimError::Start(1, e.to_string()))
    }

    /// Stops every node (end of the run), without losing anything.
    pub async fn shutdown(&self) {
        for id in self.ids() {
            if let Some(raft) = self.raft(id) {
                let _ = raft.shutdown().await;
            }
        }
    }
}
