//! Node liveness and fencing leases: heartbeats from every node to the leader over QUIC (never
//! through Raft), the leader's verdict on each node (up, suspect, down: committed through Raft
//! only when it changes), the lease each heartbeat reply grants, and the HA restart of a down
//! node's VMs.
//!
//! Safety argument (a VM never runs on two nodes):
//! - A node's lease ends `lease` after it SENT the heartbeat that earned it, on its own
//!   monotonic clock; a slow reply or a skewed wall clock can only shorten it. Without a valid
//!   lease the agent destroys its HA VMs and starts nothing (`agent::plan`).
//! - The leader grants a lease only while a quorum confirmed its leadership within
//!   `margin / 2` (a read-index round it started). A deposed leader therefore stops granting
//!   at most `margin / 2` after its successor was elected.
//! - The leader restarts a VM elsewhere only when its node is down and has been silent for
//!   `lease + margin`, silence counted from its last heartbeat received by THIS leader and never
//!   from before this leader started leading. By then every lease the node could hold, from
//!   this leader or a predecessor, has ended. The restart goes through `PlaceVm`, which bumps
//!   the VM's epoch, so the old node's agent refuses to run it when it comes back.
//! - A lease carries the leader's applied index at the grant, and counts as held only once the
//!   node's own replica has applied that far: a node coming back cannot start a VM from a
//!   stale replica that still places it there. While the leader re-places a node's VMs it
//!   grants that node nothing (checked under the same lock that records heartbeats), so every
//!   later grant carries an index at or after the re-placement.
//!
//! What this module does not own: voter replacement (Raft replication health decides it, in
//! `membership`), and placement policy beyond the interim [`choose_target`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raft::model::{NodeId, NodeRecord, NodeState, Vm, VmState};
use raft::{keys, Command, Raft, Request, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::Tuning;
use crate::control::NodeControl;

/// Extension RPC kind of heartbeats (JSON [`Heartbeat`] in, JSON [`HeartbeatReply`] out).
pub const HEARTBEAT: &str = "heartbeat";

/// What a node has in use, as its agent last observed it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLoad {
    pub vcpus_used: u64,
    pub memory_used_mib: u64,
    pub running_vms: u64,
}

/// What a node's hypervisor offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub vcpus: u64,
    pub memory_mib: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node: NodeId,
    /// `None` until the agent has reached its hypervisor.
    pub capacity: Option<Capacity>,
    pub load: NodeLoad,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// The lease granted, in milliseconds from the moment the node sent the heartbeat; `None`
    /// when the receiver is not a leader with a fresh quorum confirmation.
    pub lease_ms: Option<u64>,
    /// The leader's applied index at the grant: the lease is usable only once the node's
    /// replica has applied this far.
    #[serde(default)]
    pub applied_index: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LivenessError {
    #[error("no leader is known")]
    NoLeader,
    #[error("leader {0} is not in the membership")]
    UnknownLeader(NodeId),
    #[error("heartbeat transport failed")]
    Net(#[from] raft::net::NetError),
    #[error("malformed heartbeat message")]
    Codec(#[from] serde_json::Error),
    #[error("no heartbeat reply within {0:?}")]
    Timeout(Duration),
    #[error("cannot read the replica")]
    Store(#[from] raft::store::StoreError),
    #[error("cannot commit a liveness change")]
    Write(#[from] raft::net::WriteError),
}

/// The liveness timers, from [`Tuning`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    pub heartbeat: Duration,
    pub suspect_after: Duration,
    pub down_after: Duration,
    pub lease: Duration,
    pub margin: Duration,
}

impl Timers {
    pub fn from_tuning(t: &Tuning) -> Self {
        Self {
            heartbeat: Duration::from_millis(t.node_heartbeat_ms),
            suspect_after: Duration::from_millis(t.suspect_after_ms),
            down_after: Duration::from_millis(t.node_down_after_ms),
            lease: Duration::from_millis(t.lease_ms),
            margin: Duration::from_millis(t.lease_margin_ms),
        }
    }

    /// How fresh the leader's quorum confirmation must be for it to grant a lease.
    pub fn grant_window(&self) -> Duration {
        self.margin / 2
    }

    /// Silence after which a down node's HA VMs may run elsewhere.
    pub fn restart_after(&self) -> Duration {
        self.lease + self.margin
    }
}

// ---- Pure arithmetic (unit tested) ----------------------------------------------------------

/// Whether this node may run VMs now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStatus {
    Held,
    /// Never granted, or expired: HA VMs must not run and nothing may start.
    Lapsed,
}

/// When a lease granted for `granted` in reply to a heartbeat sent at `sent_at` ends. Measured
/// from the sending on this node's monotonic clock, so reply delay only shortens it; never
/// longer than this node's own `max` (a leader with other settings cannot stretch it).
pub fn lease_end(sent_at: Instant, granted: Duration, max: Duration) -> Instant {
    sent_at + granted.min(max)
}

/// A lease is held while it runs and once the local replica has applied at least the index
/// the leader had applied when it granted it.
pub fn lease_status(
    end: Option<Instant>,
    needs_applied: u64,
    now: Instant,
    applied: u64,
) -> LeaseStatus {
    match end {
        Some(end) if now < end && applied >= needs_applied => LeaseStatus::Held,
        _ => LeaseStatus::Lapsed,
    }
}

/// Whether a leader whose leadership a quorum confirmed in a round started at `confirmed_at`
/// may grant a lease at `now`.
pub fn may_grant(confirmed_at: Option<Instant>, now: Instant, window: Duration) -> bool {
    confirmed_at.is_some_and(|t| now.saturating_duration_since(t) < window)
}

/// How long the leader counts a node as silent: since its last heartbeat, but never since
/// before this leader began leading (it cannot know what its predecessor saw or granted).
/// `leading_since` may be later (the first time this leader looked at a node that joined
/// during its leadership): starting later only delays verdicts, never hastens a restart.
pub fn silence(last_beat: Option<Instant>, leading_since: Instant, now: Instant) -> Duration {
    let from = last_beat.map_or(leading_since, |b| b.max(leading_since));
    now.saturating_duration_since(from)
}

pub fn node_state(silence: Duration, t: &Timers) -> NodeState {
    if silence >= t.down_after {
        NodeState::Down
    } else if silence >= t.suspect_after {
        NodeState::Suspect
    } else {
        NodeState::Up
    }
}

/// What the leader does about the VMs of down nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// Report a VM whose node is down as `unknown` (non-HA VMs stay there).
    MarkUnknown {
        vm: String,
        node: NodeId,
        epoch: u64,
    },
    /// Re-place an HA VM (compare-and-set on its version; `PlaceVm` bumps the epoch).
    Restart {
        vm: String,
        version: u64,
        from: NodeId,
        to: NodeId,
    },
    /// An HA VM that is due but fits nowhere now; retried on the next tick.
    NoRoom { vm: String, from: NodeId },
}

/// The target of an HA restart: the up, schedulable node (other than the VM's own) with room
/// for it and the fewest VMs placed, ties to the lowest id; a node holding a VM of the same
/// anti-affinity group is skipped. Interim policy until the scheduler owns this choice.
/// `reserved` is what is placed per node (VMs' vcpus and memory), `capacity` what each node
/// reported in its heartbeats; a node that has not reported is not a target.
pub fn choose_target(
    vm: &Vm,
    nodes: &[NodeRecord],
    capacity: &BTreeMap<NodeId, Capacity>,
    reserved: &BTreeMap<NodeId, (NodeLoad, BTreeSet<String>)>,
) -> Option<NodeId> {
    nodes
        .iter()
        .filter(|n| !n.removed && n.schedulable && n.state == NodeState::Up)
        .filter(|n| Some(n.id) != vm.node)
        .filter_map(|n| {
            let cap = capacity.get(&n.id)?;
            let (used, groups) = reserved.get(&n.id).cloned().unwrap_or_default();
            let fits = used.vcpus_used + u64::from(vm.vcpus) <= cap.vcpus
                && used.memory_used_mib + vm.memory_mib <= cap.memory_mib;
            let apart = vm
                .anti_affinity_group
                .as_ref()
                .is_none_or(|g| !groups.contains(g));
            (fits && apart).then_some((used.running_vms, n.id))
        })
        .min()
        .map(|(_, id)| id)
}

/// What is placed on each node: the sum of its VMs' vcpus and memory, their count, and their
/// anti-affinity groups.
pub fn reservations(vms: &[Vm]) -> BTreeMap<NodeId, (NodeLoad, BTreeSet<String>)> {
    let mut out: BTreeMap<NodeId, (NodeLoad, BTreeSet<String>)> = BTreeMap::new();
    for vm in vms.iter().filter(|v| v.state != VmState::Deleting) {
        if let Some(n) = vm.node {
            reserve(&mut out, n, vm);
        }
    }
    out
}

fn reserve(out: &mut BTreeMap<NodeId, (NodeLoad, BTreeSet<String>)>, node: NodeId, vm: &Vm) {
    let e = out.entry(node).or_default();
    e.0.vcpus_used += u64::from(vm.vcpus);
    e.0.memory_used_mib += vm.memory_mib;
    e.0.running_vms += 1;
    if let Some(g) = &vm.anti_affinity_group {
        e.1.insert(g.clone());
    }
}

/// The leader's decision for the VMs of down nodes. `nodes` carry the committed states;
/// `silences` how long each node has been silent for this leader.
pub fn plan_recovery(
    nodes: &[NodeRecord],
    vms: &[Vm],
    silences: &BTreeMap<NodeId, Duration>,
    capacity: &BTreeMap<NodeId, Capacity>,
    t: &Timers,
) -> Vec<Recovery> {
    let mut out = Vec::new();
    let mut reserved = reservations(vms);
    for node in nodes
        .iter()
        .filter(|n| !n.removed && n.state == NodeState::Down)
    {
        // The committed state says down, and this leader's own count agrees: a node that has
        // spoken again since is about to be marked up, not restarted from.
        let Some(silent) = silences.get(&node.id).copied() else {
            continue;
        };
        if silent < t.down_after {
            continue;
        }
        let due = silent >= t.restart_after();
        for vm in vms
            .iter()
            .filter(|v| v.node == Some(node.id) && v.state != VmState::Deleting)
        {
            if vm.ha && due {
                match choose_target(vm, nodes, capacity, &reserved) {
                    Some(to) => {
                        reserve(&mut reserved, to, vm);
                        out.push(Recovery::Restart {
                            vm: vm.id.clone(),
                            version: vm.version,
                            from: node.id,
                            to,
                        });
                    }
                    None => out.push(Recovery::NoRoom {
                        vm: vm.id.clone(),
                        from: node.id,
                    }),
                }
            } else if vm.state != VmState::Unknown {
                out.push(Recovery::MarkUnknown {
                    vm: vm.id.clone(),
                    node: node.id,
                    epoch: vm.epoch,
                });
            }
        }
    }
    out
}

// ---- This node's own view: lease and observed domains ---------------------------------------

/// One domain of ours as the agent last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedDomain {
    pub epoch: Option<u64>,
    pub active: bool,
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// What this node knows about itself: its lease and what its agent last observed (the source
/// of its heartbeats' load and of the `novacron_agent_domain_active` metric).
pub struct LocalState {
    /// End of the lease and the applied index it requires.
    lease: Mutex<(Option<Instant>, u64)>,
    max_lease: Duration,
    /// Bumped each time a lapsed lease is granted again, so the agent wakes at once.
    regained: watch::Sender<u64>,
    capacity: Mutex<Option<Capacity>>,
    domains: Mutex<BTreeMap<String, ObservedDomain>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each critical section is a single read or replace, so a poisoned lock holds no torn data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LocalState {
    pub fn new(max_lease: Duration) -> Self {
        Self {
            lease: Mutex::new((None, 0)),
            max_lease,
            regained: watch::channel(0).0,
            capacity: Mutex::new(None),
            domains: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records a lease granted for `granted` in reply to a heartbeat sent at `sent_at`, usable
    /// once the replica has applied `applied_index`.
    pub fn renew(&self, sent_at: Instant, granted: Duration, applied_index: u64) {
        let end = lease_end(sent_at, granted, self.max_lease);
        let now = Instant::now();
        let mut cur = lock(&self.lease);
        let was_running = cur.0.is_some_and(|e| now < e);
        // Replies may arrive out of order: a lease never moves backwards, and the index it
        // requires never drops.
        if cur.0.is_none_or(|c| end > c) {
            cur.0 = Some(end);
        }
        cur.1 = cur.1.max(applied_index);
        if !was_running && cur.0.is_some_and(|e| now < e) {
            drop(cur);
            self.regained.send_modify(|n| *n += 1);
        }
    }

    pub fn lease_end(&self) -> Option<Instant> {
        lock(&self.lease).0
    }

    /// Whether this node may run VMs now, given how far its replica has applied.
    pub fn lease_status(&self, now: Instant, applied: u64) -> LeaseStatus {
        let (end, needs) = *lock(&self.lease);
        lease_status(end, needs, now, applied)
    }

    pub fn subscribe_regained(&self) -> watch::Receiver<u64> {
        self.regained.subscribe()
    }

    pub fn set_capacity(&self, c: Capacity) {
        *lock(&self.capacity) = Some(c);
    }

    /// Replaces the observed domains (after a fresh listing).
    pub fn set_domains(&self, domains: BTreeMap<String, ObservedDomain>) {
        *lock(&self.domains) = domains;
    }

    /// Updates one domain after the agent started or stopped it, so observers never see a
    /// stopped domain as still running for the rest of a long pass.
    pub fn mark(&self, vm: &str, active: bool) {
        if let Some(d) = lock(&self.domains).get_mut(vm) {
            d.active = active;
        }
    }

    pub fn domains(&self) -> BTreeMap<String, ObservedDomain> {
        lock(&self.domains).clone()
    }

    pub fn heartbeat(&self, me: NodeId) -> Heartbeat {
        let domains = lock(&self.domains);
        let mut load = NodeLoad::default();
        for d in domains.values().filter(|d| d.active) {
            load.vcpus_used += u64::from(d.vcpus);
            load.memory_used_mib += d.memory_mib;
            load.running_vms += 1;
        }
        Heartbeat {
            node: me,
            capacity: *lock(&self.capacity),
            load,
        }
    }

    /// Prometheus text: the lease and every domain of ours with its state, so tests and
    /// operators see each hypervisor's truth through the node that owns it.
    pub fn metrics_text(&self, applied: u64) -> String {
        use std::fmt::Write;
        let now = Instant::now();
        let remaining = self
            .lease_end()
            .map_or(0, |e| e.saturating_duration_since(now).as_millis());
        let held = u8::from(self.lease_status(now, applied) == LeaseStatus::Held);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP novacron_lease_held 1 while this node holds a fencing lease\n\
             # TYPE novacron_lease_held gauge\nnovacron_lease_held {held}\n\
             # HELP novacron_lease_remaining_ms Time left on this node's lease\n\
             # TYPE novacron_lease_remaining_ms gauge\nnovacron_lease_remaining_ms {remaining}\n\
             # HELP novacron_agent_domain_active 1 while a domain of ours runs on this node's hypervisor\n\
             # TYPE novacron_agent_domain_active gauge"
        );
        for (vm, d) in self.domains() {
            let epoch = d.epoch.map(|e| e.to_string()).unwrap_or_default();
            let _ = writeln!(
                s,
                "novacron_agent_domain_active{{vm=\"{vm}\",epoch=\"{epoch}\"}} {}",
                u8::from(d.active)
            );
        }
        s
    }
}

// ---- The leader's side ----------------------------------------------------------------------

#[derive(Default)]
struct LeaderView {
    /// The term this view belongs to; a new term starts an empty view.
    term: u64,
    leading_since: Option<Instant>,
    /// Start of the last read-index round that a quorum confirmed.
    confirmed_at: Option<Instant>,
    beats: BTreeMap<NodeId, (Instant, Heartbeat)>,
    /// When this leader first looked at each node: a node that joined during this leadership
    /// is not silent since before it existed.
    first_seen: BTreeMap<NodeId, Instant>,
    /// Nodes whose VMs are being re-placed: they get no lease until that is committed.
    recovering: BTreeSet<NodeId>,
}

/// Liveness of the cluster as the leader sees it, and this node's own [`LocalState`].
pub struct Liveness {
    pub me: NodeId,
    raft: Raft,
    pub timers: Timers,
    pub local: LocalState,
    view: Mutex<LeaderView>,
}

impl Liveness {
    pub fn new(me: NodeId, raft: Raft, timers: Timers) -> Self {
        Self {
            me,
            raft,
            timers,
            local: LocalState::new(timers.lease),
            view: Mutex::new(LeaderView::default()),
        }
    }

    /// The term this node leads in, if it leads.
    fn leading_term(&self) -> Option<u64> {
        let m = self.raft.metrics().borrow().clone();
        (m.current_leader == Some(self.me)).then_some(m.current_term)
    }

    /// The view for `term`, reset when the term changed (heartbeats seen in an earlier
    /// leadership say nothing about what happened in between).
    fn view_for(&self, term: u64, now: Instant) -> std::sync::MutexGuard<'_, LeaderView> {
        let mut v = lock(&self.view);
        if v.term != term || v.leading_since.is_none() {
            *v = LeaderView {
                term,
                leading_since: Some(now),
                ..Default::default()
            };
        }
        v
    }

    /// Answers a heartbeat (from a peer, or from this node itself).
    pub fn handle(&self, hb: Heartbeat) -> HeartbeatReply {
        let now = Instant::now();
        let Some(term) = self.leading_term() else {
            return HeartbeatReply {
                lease_ms: None,
                applied_index: 0,
            };
        };
        let applied_index = self
            .raft
            .metrics()
            .borrow()
            .last_applied
            .map_or(0, |l| l.index);
        let mut v = self.view_for(term, now);
        let grant = may_grant(v.confirmed_at, now, self.timers.grant_window())
            && !v.recovering.contains(&hb.node);
        v.beats.insert(hb.node, (now, hb));
        HeartbeatReply {
            lease_ms: grant.then_some(self.timers.lease.as_millis() as u64),
            applied_index,
        }
    }

    /// Starts re-placing `node`'s VMs if it is still silent for `lease + margin` (checked under
    /// the lock that records heartbeats, so no grant can slip in between). Until
    /// [`Self::end_recovery`], `node` is granted no lease.
    pub fn begin_recovery(&self, node: NodeId) -> bool {
        let now = Instant::now();
        let Some(term) = self.leading_term() else {
            return false;
        };
        let mut v = self.view_for(term, now);
        let since = v.leading_since.unwrap_or(now);
        let first = *v.first_seen.entry(node).or_insert(now);
        let silent = silence(v.beats.get(&node).map(|(at, _)| *at), since.max(first), now);
        if silent < self.timers.restart_after() {
            return false;
        }
        v.recovering.insert(node);
        true
    }

    pub fn end_recovery(&self, node: NodeId) {
        lock(&self.view).recovering.remove(&node);
    }

    /// Confirms leadership with a quorum (a read-index round); leases are granted only while
    /// the last confirmation is fresh.
    pub async fn confirm_quorum(&self) {
        let Some(term) = self.leading_term() else {
            *lock(&self.view) = LeaderView::default();
            return;
        };
        let started = Instant::now();
        let round = tokio::time::timeout(self.timers.grant_window(), self.raft.get_read_log_id());
        if let Ok(Ok(_)) = round.await {
            // Still the same leadership: a new term would have reset the view.
            if self.leading_term() == Some(term) {
                self.view_for(term, started).confirmed_at = Some(started);
            }
        }
    }

    /// How long each node has been silent for this leader (empty when not leading).
    pub fn silences(&self, nodes: impl IntoIterator<Item = NodeId>) -> BTreeMap<NodeId, Duration> {
        let now = Instant::now();
        let Some(term) = self.leading_term() else {
            return BTreeMap::new();
        };
        let mut v = self.view_for(term, now);
        let since = v.leading_since.unwrap_or(now);
        nodes
            .into_iter()
            .map(|id| {
                let s = if id == self.me {
                    Duration::ZERO
                } else {
                    let first = *v.first_seen.entry(id).or_insert(now);
                    silence(v.beats.get(&id).map(|(at, _)| *at), since.max(first), now)
                };
                (id, s)
            })
            .collect()
    }

    /// The leader's verdict on `id` now; `None` when this node does not lead.
    pub fn state_of(&self, id: NodeId) -> Option<NodeState> {
        self.silences([id])
            .get(&id)
            .map(|s| node_state(*s, &self.timers))
    }

    /// The load each node last reported (leader only; empty elsewhere). Input of the
    /// scheduler's weights.
    pub fn loads(&self) -> BTreeMap<NodeId, NodeLoad> {
        if self.leading_term().is_none() {
            return BTreeMap::new();
        }
        lock(&self.view)
            .beats
            .iter()
            .map(|(id, (_, hb))| (*id, hb.load))
            .collect()
    }

    /// The capacity each node last reported (leader only).
    pub fn capacities(&self) -> BTreeMap<NodeId, Capacity> {
        if self.leading_term().is_none() {
            return BTreeMap::new();
        }
        lock(&self.view)
            .beats
            .iter()
            .filter_map(|(id, (_, hb))| hb.capacity.map(|c| (*id, c)))
            .collect()
    }
}

// ---- Tasks ----------------------------------------------------------------------------------

/// Every node: sends a heartbeat to the current leader each interval and renews its lease from
/// the reply. The leader answers its own heartbeat locally.
pub async fn run_heartbeats(ctl: Arc<NodeControl>, mut stop: watch::Receiver<bool>) {
    let live = ctl.liveness.clone();
    let mut tick = tokio::time::interval(live.timers.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let hb = live.local.heartbeat(ctl.id);
        let sent_at = Instant::now();
        match send_heartbeat(&ctl, hb).await {
            Ok(HeartbeatReply {
                lease_ms: Some(ms),
                applied_index,
            }) => live
                .local
                .renew(sent_at, Duration::from_millis(ms), applied_index),
            Ok(HeartbeatReply { lease_ms: None, .. }) => {
                tracing::debug!("heartbeat answered without a lease");
            }
            Err(e) => tracing::debug!(error = %e, "heartbeat failed"),
        }
    }
}

async fn send_heartbeat(ctl: &NodeControl, hb: Heartbeat) -> Result<HeartbeatReply, LivenessError> {
    let (leader, member) = {
        let m = ctl.raft.metrics().borrow().clone();
        let leader = m.current_leader.ok_or(LivenessError::NoLeader)?;
        let member = m.membership_config.membership().get_node(&leader).cloned();
        (leader, member)
    };
    if leader == ctl.id {
        return Ok(ctl.liveness.handle(hb));
    }
    let member = member.ok_or(LivenessError::UnknownLeader(leader))?;
    // A reply later than the heartbeat interval is useless: the next heartbeat is due.
    let wait = ctl.liveness.timers.heartbeat * 2;
    let call = async {
        let addr = raft::net::Transport::resolve(&member.peer_addr).await?;
        let body = serde_json::to_vec(&hb)?;
        let reply = ctl.transport.call_extension(addr, HEARTBEAT, body).await?;
        Ok::<_, LivenessError>(serde_json::from_slice(&reply)?)
    };
    tokio::time::timeout(wait, call)
        .await
        .map_err(|_| LivenessError::Timeout(wait))?
}

/// Leader only: keeps the quorum confirmation behind lease grants fresh.
pub async fn run_quorum_probe(ctl: Arc<NodeControl>, mut stop: watch::Receiver<bool>) {
    let live = ctl.liveness.clone();
    let mut tick = tokio::time::interval(live.timers.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        live.confirm_quorum().await;
    }
}

/// Leader only: commits changes of node state and recovers the VMs of down nodes.
pub async fn run_controller(ctl: Arc<NodeControl>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(ctl.liveness.timers.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if ctl.raft.metrics().borrow().current_leader != Some(ctl.id) {
            continue;
        }
        if let Err(e) = controller_tick(&ctl).await {
            tracing::debug!(error = %e, "liveness controller tick failed");
        }
    }
}

async fn write(ctl: &NodeControl, command: Command) -> Result<Response, LivenessError> {
    let req = Request::new(api::now_ms(), format!("node:{}", ctl.id), command);
    Ok(ctl.cluster.write(req).await?.1)
}

async fn controller_tick(ctl: &NodeControl) -> Result<(), LivenessError> {
    let live = &ctl.liveness;
    let records = ctl.reader.nodes()?;
    let silences = live.silences(records.iter().filter(|r| !r.removed).map(|r| r.id));
    if silences.is_empty() {
        return Ok(());
    }
    for record in records.iter().filter(|r| !r.removed) {
        let Some(silent) = silences.get(&record.id) else {
            continue;
        };
        let state = node_state(*silent, &live.timers);
        if state != record.state {
            tracing::info!(
                node = record.id,
                ?state,
                silent_ms = silent.as_millis() as u64,
                "node state changed"
            );
            write(
                ctl,
                Command::SetNodeState {
                    id: record.id,
                    state,
                },
            )
            .await?;
        }
    }
    let vms: Vec<Vm> = ctl
        .reader
        .scan::<Vm>(keys::VM_PREFIX, None, usize::MAX)?
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let plan = plan_recovery(&records, &vms, &silences, &live.capacities(), &live.timers);
    let from_nodes: BTreeSet<NodeId> = plan
        .iter()
        .filter_map(|r| match r {
            Recovery::Restart { from, .. } => Some(*from),
            _ => None,
        })
        .collect();
    let mut recovering = BTreeSet::new();
    for node in from_nodes {
        if live.begin_recovery(node) {
            recovering.insert(node);
        }
    }
    let result = recover(ctl, plan, &recovering, &silences).await;
    for node in recovering {
        live.end_recovery(node);
    }
    result
}

async fn recover(
    ctl: &NodeControl,
    plan: Vec<Recovery>,
    recovering: &BTreeSet<NodeId>,
    silences: &BTreeMap<NodeId, Duration>,
) -> Result<(), LivenessError> {
    for step in plan {
        match step {
            Recovery::MarkUnknown { vm, node, epoch } => {
                tracing::info!(%vm, node, "VM on a down node: state unknown");
                write(
                    ctl,
                    Command::MarkVmUnknown {
                        id: vm,
                        node,
                        epoch,
                        reason: "node down".into(),
                    },
                )
                .await?;
            }
            Recovery::Restart {
                vm,
                version,
                from,
                to,
            } => {
                // The node spoke since the plan was made: it keeps its VMs.
                if !recovering.contains(&from) {
                    continue;
                }
                let silent = silences.get(&from).copied().unwrap_or_default();
                let r = write(
                    ctl,
                    Command::PlaceVm {
                        id: vm.clone(),
                        node: Some(to),
                        expected_version: Some(version),
                    },
                )
                .await?;
                match r {
                    Response::Vm { vm: placed, .. } => tracing::info!(
                        vm = %vm, from, to, epoch = placed.epoch,
                        silent_ms = silent.as_millis() as u64,
                        "HA restart: VM re-placed away from a down node"
                    ),
                    // A concurrent change (the VM was deleted or moved): next tick decides anew.
                    other => tracing::info!(vm = %vm, ?other, "HA restart not applied"),
                }
            }
            Recovery::NoRoom { vm, from } => {
                tracing::warn!(%vm, from, "HA VM of a down node fits on no other node; retrying");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::model::{DesiredState, Member};

    fn timers() -> Timers {
        Timers {
            heartbeat: Duration::from_millis(100),
            suspect_after: Duration::from_millis(500),
            down_after: Duration::from_millis(1000),
            lease: Duration::from_millis(1500),
            margin: Duration::from_millis(600),
        }
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn a_lease_runs_from_the_sending_and_is_capped_by_the_node() {
        let sent = Instant::now();
        // A reply that arrives late does not extend the lease: it still ends at sent + lease.
        assert_eq!(lease_end(sent, MS(1500), MS(5000)), sent + MS(1500));
        // A leader configured with a longer lease cannot stretch this node's.
        assert_eq!(lease_end(sent, MS(9000), MS(1500)), sent + MS(1500));
        let end = Some(sent + MS(1500));
        assert_eq!(
            lease_status(end, 10, sent + MS(1499), 10),
            LeaseStatus::Held
        );
        assert_eq!(
            lease_status(end, 10, sent + MS(1500), 10),
            LeaseStatus::Lapsed
        );
        assert_eq!(lease_status(None, 0, sent, 10), LeaseStatus::Lapsed);
        // A running lease is not usable from a replica behind the leader's grant.
        assert_eq!(lease_status(end, 11, sent, 10), LeaseStatus::Lapsed);
    }

    #[test]
    fn grants_need_a_fresh_quorum_confirmation() {
        let t0 = Instant::now();
        let w = MS(300);
        assert!(!may_grant(None, t0, w));
        assert!(may_grant(Some(t0), t0 + MS(299), w));
        assert!(!may_grant(Some(t0), t0 + MS(300), w));
    }

    #[test]
    fn silence_never_counts_from_before_this_leadership() {
        let t0 = Instant::now();
        // Heard before this leader led: silence counts from the leadership start.
        assert_eq!(silence(Some(t0), t0 + MS(100), t0 + MS(400)), MS(300));
        assert_eq!(silence(None, t0 + MS(100), t0 + MS(400)), MS(300));
        assert_eq!(
            silence(Some(t0 + MS(350)), t0 + MS(100), t0 + MS(400)),
            MS(50)
        );
        let t = timers();
        assert_eq!(node_state(MS(499), &t), NodeState::Up);
        assert_eq!(node_state(MS(500), &t), NodeState::Suspect);
        assert_eq!(node_state(MS(1000), &t), NodeState::Down);
    }

    /// The whole timeline: a node partitioned right after its last grant has fenced before the
    /// leader may restart its VMs, even when a predecessor leader granted the last lease.
    #[test]
    fn the_leader_restarts_only_after_every_possible_lease_ended() {
        let t = timers();
        let base = Instant::now();
        // Worst case for a deposed leader: it confirmed quorum just before being deposed at
        // `elected` and keeps granting for the whole window; the node sends right then.
        let elected = base + MS(1000);
        let last_grant_send = elected + t.grant_window() - MS(1);
        let node_lease_end = lease_end(last_grant_send, t.lease, t.lease);
        // The new leader counts silence from its own start at the earliest.
        let restart_at = elected + t.restart_after();
        assert!(
            restart_at >= node_lease_end,
            "{restart_at:?} < {node_lease_end:?}"
        );
        assert!(silence(None, elected, restart_at) >= t.restart_after());
    }

    fn node(id: NodeId, state: NodeState) -> NodeRecord {
        NodeRecord {
            id,
            member: Member {
                name: format!("n{id}"),
                api_addr: String::new(),
                peer_addr: String::new(),
            },
            state,
            schedulable: true,
            labels: Default::default(),
            joined_at: 0,
            updated_at: 0,
            removed: false,
            capacity: None,
        }
    }

    fn vm(id: &str, node: NodeId, ha: bool, state: VmState) -> Vm {
        Vm {
            id: id.into(),
            name: id.into(),
            tenant: "t".into(),
            vcpus: 1,
            memory_mib: 128,
            disk_gib: 0,
            image: None,
            labels: Default::default(),
            node: Some(node),
            desired_state: DesiredState::Running,
            state,
            ha,
            anti_affinity_group: None,
            placement: Default::default(),
            epoch: 3,
            created_at: 0,
            updated_at: 0,
            version: 7,
        }
    }

    fn caps(ids: &[NodeId], vcpus: u64) -> BTreeMap<NodeId, Capacity> {
        ids.iter()
            .map(|i| {
                (
                    *i,
                    Capacity {
                        vcpus,
                        memory_mib: 4096,
                    },
                )
            })
            .collect()
    }

    fn silent(pairs: &[(NodeId, u64)]) -> BTreeMap<NodeId, Duration> {
        pairs.iter().map(|(i, ms)| (*i, MS(*ms))).collect()
    }

    #[test]
    fn recovery_table() {
        use NodeState::{Down, Suspect, Up};
        let t = timers();
        let restart = |vm: &str, to| Recovery::Restart {
            vm: vm.into(),
            version: 7,
            from: 3,
            to,
        };
        let unknown = |vm: &str| Recovery::MarkUnknown {
            vm: vm.into(),
            node: 3,
            epoch: 3,
        };
        #[allow(clippy::type_complexity)]
        let cases: Vec<(
            &str,
            Vec<NodeRecord>,
            Vec<Vm>,
            Vec<(NodeId, u64)>,
            u64,
            Vec<Recovery>,
        )> = vec![
            (
                "suspect node: nothing moves",
                vec![node(1, Up), node(2, Up), node(3, Suspect)],
                vec![vm("a", 3, true, VmState::Running)],
                vec![(3, 5000)],
                8,
                vec![],
            ),
            (
                "down, lease may still run: HA VM waits, marked unknown",
                vec![node(1, Up), node(2, Up), node(3, Down)],
                vec![vm("a", 3, true, VmState::Running)],
                vec![(3, 1200)],
                8,
                vec![unknown("a")],
            ),
            (
                "down past lease + margin: HA VM restarts on the least loaded node",
                vec![node(1, Up), node(2, Up), node(3, Down)],
                vec![
                    vm("a", 3, true, VmState::Unknown),
                    vm("x", 1, false, VmState::Running),
                ],
                vec![(3, 2100)],
                8,
                vec![restart("a", 2)],
            ),
            (
                "non-HA VM is reported, never moved; already unknown: nothing",
                vec![node(1, Up), node(2, Up), node(3, Down)],
                vec![
                    vm("b", 3, false, VmState::Running),
                    vm("c", 3, false, VmState::Unknown),
                ],
                vec![(3, 9000)],
                8,
                vec![unknown("b")],
            ),
            (
                "committed down but heard again since: nothing",
                vec![node(1, Up), node(2, Up), node(3, Down)],
                vec![vm("a", 3, true, VmState::Running)],
                vec![(3, 50)],
                8,
                vec![],
            ),
            (
                "two HA VMs spread over the targets as they are placed",
                vec![node(1, Up), node(2, Up), node(3, Down)],
                vec![
                    vm("a", 3, true, VmState::Unknown),
                    vm("b", 3, true, VmState::Unknown),
                ],
                vec![(3, 2100)],
                8,
                vec![restart("a", 1), restart("b", 2)],
            ),
            (
                "no room anywhere",
                vec![node(1, Up), node(3, Down)],
                vec![
                    vm("a", 3, true, VmState::Unknown),
                    vm("x", 1, false, VmState::Running),
                ],
                vec![(3, 2100)],
                1,
                vec![Recovery::NoRoom {
                    vm: "a".into(),
                    from: 3,
                }],
            ),
            (
                "deleting VM is left to the delete",
                vec![node(1, Up), node(3, Down)],
                vec![vm("a", 3, true, VmState::Deleting)],
                vec![(3, 2100)],
                8,
                vec![],
            ),
        ];
        for (name, nodes, vms, s, vcpus, want) in cases {
            let got = plan_recovery(&nodes, &vms, &silent(&s), &caps(&[1, 2, 3], vcpus), &t);
            assert_eq!(got, want, "case: {name}");
        }
    }

    #[test]
    fn targets_skip_down_drained_unreported_and_anti_affine_nodes() {
        let mut drained = node(2, NodeState::Up);
        drained.schedulable = false;
        let nodes = vec![
            node(1, NodeState::Suspect),
            drained,
            node(3, NodeState::Up),
            node(4, NodeState::Up),
            node(5, NodeState::Up),
        ];
        let mut a = vm("a", 9, true, VmState::Unknown);
        a.anti_affinity_group = Some("g".into());
        let mut other = vm("o", 4, false, VmState::Running);
        other.anti_affinity_group = Some("g".into());
        let vms = vec![a.clone(), other];
        // Node 5 never reported its capacity.
        let capacity = caps(&[1, 2, 3, 4], 8);
        let got = choose_target(&a, &nodes, &capacity, &reservations(&vms));
        assert_eq!(got, Some(3));
    }

    #[tokio::test]
    async fn a_regained_lease_wakes_the_agent_and_leases_never_shrink() {
        let local = LocalState::new(MS(1000));
        let mut woken = local.subscribe_regained();
        let now = Instant::now();
        assert_eq!(local.lease_status(now, 0), LeaseStatus::Lapsed);
        local.renew(now, MS(1000), 7);
        assert!(woken.has_changed().unwrap());
        woken.borrow_and_update();
        assert_eq!(local.lease_status(now, 6), LeaseStatus::Lapsed);
        assert_eq!(local.lease_status(now, 7), LeaseStatus::Held);
        // An older reply arriving late does not move the end backwards, nor lower the index
        // the lease requires, nor wake anyone.
        local.renew(now - MS(500), MS(1000), 3);
        assert_eq!(local.lease_end(), Some(now + MS(1000)));
        assert_eq!(local.lease_status(now, 6), LeaseStatus::Lapsed);
        assert!(!woken.has_changed().unwrap());
    }
}
