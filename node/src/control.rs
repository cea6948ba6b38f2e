//! The node's implementation of `api::ControlPlane` over Raft, the sled replica and QUIC.

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::control::{MemberRole, MemberStatus};
use api::{ClusterError, ClusterStatus, Consistency, ControlPlane, JoinRequest, JoinResponse};
use async_trait::async_trait;
use raft::model::{NodeRecord, NodeState};
use raft::net::{Cluster, Transport};
use raft::store::StateReader;
use raft::tls::{self, CaBundle, JoinToken};
use raft::{Command, NodeId, Raft, Request, Response};

use crate::config::Tuning;
use crate::metrics::RaftMetrics;

pub struct NodeControl {
    pub id: NodeId,
    pub name: String,
    pub raft: Raft,
    pub cluster: Cluster,
    pub reader: StateReader,
    pub transport: Transport,
    pub tuning: Tuning,
    pub metrics: RaftMetrics,
    pub started: Instant,
    pub hv: crate::console::SharedHypervisor,
    pub stats: crate::stats::VmStatsStore,
    pub images: Arc<crate::images::NodeImages>,
    /// Heartbeats, leases and the leader's verdict on each node.
    pub liveness: Arc<crate::liveness::Liveness>,
    /// The scheduler settings this node uses while it leads.
    pub placement: crate::placement::PlacementConfig,
    /// Site links: clients of linked sites, pull metrics, the federation endpoint.
    pub federation: Arc<crate::federation::NodeFederation>,
}

fn internal(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Internal(e.to_string())
}

/// How long a join waits for a membership change already in progress (the membership
/// controller promoting an earlier joiner) before giving up.
const JOIN_MEMBERSHIP_WAIT: Duration = Duration::from_secs(20);

/// Adds `id` as a learner, waiting up to `within` while another membership change is in
/// progress.
///
/// openraft refuses a membership change while the previous one is uncommitted. A node joining
/// just after another one meets the membership controller promoting the first: refusing it
/// then (as an internal error) left the new node registered but never a member, and its
/// process gave up. The chaos long tier found it by starting 5 nodes back to back.
pub async fn add_learner_when_free(
    raft: &Raft,
    id: NodeId,
    member: raft::Member,
    within: Duration,
) -> Result<
    (),
    openraft::error::RaftError<NodeId, openraft::error::ClientWriteError<NodeId, raft::Member>>,
> {
    use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match raft.add_learner(id, member.clone(), false).await {
            Ok(_) => return Ok(()),
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::InProgress(_),
            ))) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

impl NodeControl {
    /// The health of `id` as this node can judge it: exact on the leader (from the node's
    /// heartbeats), and the leader's last committed verdict elsewhere.
    pub fn health(&self, id: NodeId, record: Option<&NodeRecord>, is_leader: bool) -> NodeState {
        if id == self.id {
            return NodeState::Up;
        }
        if is_leader {
            if let Some(state) = self.liveness.state_of(id) {
                return state;
            }
        }
        record.map(|r| r.state).unwrap_or(NodeState::Up)
    }

    fn leader_api(&self) -> Option<String> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        m.membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.api_addr.clone())
    }
}

#[async_trait]
impl ControlPlane for NodeControl {
    async fn write(&self, req: Request) -> Result<(u64, Response), ClusterError> {
        // Feature gate of rolling upgrades: never commit what some voter could not apply.
        // A refusal is confirmed on an up-to-date replica first: this one may not have applied
        // a member's newer advertisement yet.
        if crate::features::gate(self, &req.command).is_err() {
            self.read_barrier(Consistency::Linearizable).await?;
            if let Err(blockers) = crate::features::gate(self, &req.command) {
                return Err(ClusterError::FeatureUnavailable {
                    command: req.command.name().to_string(),
                    blockers,
                });
            }
        }
        let start = Instant::now();
        let result = self.cluster.write(req).await;
        // Read-your-writes on the serving node: its own replica has the write before the
        // caller hears of it (local reads such as credential checks depend on it).
        if let Ok((index, _)) = &result {
            if let Err(e) = self
                .reader
                .wait_applied(*index, Duration::from_secs(3))
                .await
            {
                tracing::warn!(error = %e, "the local replica lags behind an acknowledged write");
            }
        }
        self.metrics
            .write_seconds
            .observe(start.elapsed().as_secs_f64());
        result.map_err(|e| match e {
            raft::net::WriteError::NoLeader => ClusterError::NoLeader,
            // The outcome is unknown (the leader died mid-request): like a timeout, the client
            // may retry, with an Idempotency-Key to be safe.
            raft::net::WriteError::Timeout | raft::net::WriteError::Indeterminate(_) => {
                ClusterError::Timeout
            }
            other => internal(other),
        })
    }

    async fn wait_all_applied(&self, index: u64) {
        let members: Vec<(NodeId, raft::Member)> = {
            let m = self.raft.metrics().borrow().membership_config.clone();
            m.membership()
                .nodes()
                .map(|(id, n)| (*id, n.clone()))
                .collect()
        };
        let waits =
            members
                .into_iter()
                .filter(|(id, _)| *id != self.id)
                .map(|(id, member)| async move {
                    let ask = async {
                        let addr = raft::net::Transport::resolve(&member.peer_addr).await?;
                        self.transport
                            .call_extension(
                                addr,
                                crate::console::WAIT_APPLIED,
                                index.to_be_bytes().to_vec(),
                            )
                            .await
                    };
                    // A member that cannot be reached within the bound is not waited for.
                    match tokio::time::timeout(Duration::from_secs(3), ask).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(node = id, error = %e, "member did not confirm apply")
                        }
                        Err(_) => tracing::warn!(node = id, "member did not confirm apply in time"),
                    }
                });
        let local = self.reader.wait_applied(index, Duration::from_secs(3));
        let (_, local) = tokio::join!(futures::future::join_all(waits), local);
        if let Err(e) = local {
            tracing::warn!(error = %e, "local apply did not reach the written index in time");
        }
    }

    async fn read_barrier(&self, consistency: Consistency) -> Result<(), ClusterError> {
        match consistency {
            Consistency::Stale => Ok(()),
            Consistency::Linearizable => {
                self.cluster.linearizable_read().await.map_err(|e| match e {
                    raft::net::ReadError::NoLeader => ClusterError::NoLeader,
                    raft::net::ReadError::Timeout => ClusterError::Timeout,
                    other => internal(other),
                })
            }
        }
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ClusterError> {
        self.reader.get_raw(key).map_err(internal)
    }

    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<raft::store::RawRows, ClusterError> {
        self.reader.scan_raw(prefix, after, limit).map_err(internal)
    }

    async fn status(&self) -> Result<ClusterStatus, ClusterError> {
        let m = self.raft.metrics().borrow().clone();
        let is_leader = m.current_leader == Some(self.id);
        let membership = m.membership_config.membership();
        // During a membership change (joint consensus) a node counts as a voter only once it is
        // one in every configuration: then "3 voters" means a quorum survives any one loss.
        let voters: std::collections::BTreeSet<NodeId> =
            membership.get_joint_config().iter().skip(1).fold(
                membership
                    .get_joint_config()
                    .first()
                    .cloned()
                    .unwrap_or_default(),
                |acc, c| acc.intersection(c).copied().collect(),
            );
        let records = self.reader.nodes().map_err(internal)?;
        let matched = m.replication.clone().unwrap_or_default();
        let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
        let members = membership
            .nodes()
            .map(|(id, member)| {
                let record = records.iter().find(|r| r.id == *id);
                let state = match self.health(*id, record, is_leader) {
                    NodeState::Up => "up",
                    NodeState::Suspect => "suspect",
                    NodeState::Down => "down",
                };
                MemberStatus {
                    id: *id,
                    name: member.name.clone(),
                    role: if voters.contains(id) {
                        if crate::features::is_witness(self, *id) {
                            MemberRole::Witness
                        } else {
                            MemberRole::Voter
                        }
                    } else {
                        MemberRole::Learner
                    },
                    api_addr: member.api_addr.clone(),
                    peer_addr: member.peer_addr.clone(),
                    state: state.to_string(),
                    matched_index: if *id == self.id {
                        m.last_log_index
                    } else {
                        matched.get(id).copied().flatten().map(|l| l.index)
                    },
                    last_applied: (*id == self.id).then_some(applied),
                }
            })
            .collect();
        let leader_name = m
            .current_leader
            .and_then(|l| membership.get_node(&l).map(|n| n.name.clone()));
        let cluster_id = self
            .reader
            .secrets()
            .map_err(internal)?
            .map(|s| s.cluster_id)
            .unwrap_or_default();
        Ok(ClusterStatus {
            cluster_id,
            node_id: self.id,
            node_name: self.name.clone(),
            leader: m.current_leader,
            leader_name,
            term: m.current_term,
            commit_index: applied,
            last_applied: applied,
            last_log_index: m.last_log_index.unwrap_or(0),
            members,
        })
    }

    async fn join(&self, req: JoinRequest) -> Result<JoinResponse, ClusterError> {
        let is_leader = self.raft.metrics().borrow().current_leader == Some(self.id);
        if !is_leader {
            return Err(ClusterError::NotLeader {
                leader_api: self.leader_api(),
            });
        }
        let refused = |why: &str| ClusterError::JoinRefused(why.to_string());
        let token: JoinToken = req
            .token
            .parse()
            .map_err(|_| refused("malformed join token"))?;
        let secrets = self
            .reader
            .secrets()
            .map_err(internal)?
            .ok_or(ClusterError::NoLeader)?;
        let fingerprint = tls::ca_fingerprint(&secrets.ca_cert_pem).map_err(internal)?;
        if token.ca_fingerprint != fingerprint || !token.verify_secret(&secrets.join_secret_sha256)
        {
            tracing::warn!(node = %req.member.name, "join refused: wrong token");
            return Err(refused("the join token is not valid for this cluster"));
        }
        let ca = CaBundle {
            cert_pem: secrets.ca_cert_pem.clone(),
            key_pem: secrets.ca_key_pem.clone(),
        };
        let cert_pem = tls::sign_node_csr(&ca, &req.csr_pem, &req.member.name)
            .map_err(|e| ClusterError::JoinRefused(format!("bad certificate request: {e}")))?;
        let (_, outcome) = self
            .write(Request::new(
                api::now_ms(),
                format!("node:{}", req.member.name),
                Command::RegisterNode {
                    member: req.member.clone(),
                },
            ))
            .await?;
        let node_id = match outcome {
            Response::Node(n) => n.id,
            Response::Rejected { message, .. } => return Err(ClusterError::JoinRefused(message)),
            other => return Err(internal(format!("unexpected outcome {other:?}"))),
        };
        // Non-blocking: the learner catches up once its transport is up; the membership
        // controller promotes it when it is healthy.
        add_learner_when_free(
            &self.raft,
            node_id,
            req.member.clone(),
            JOIN_MEMBERSHIP_WAIT,
        )
        .await
        .map_err(internal)?;
        tracing::info!(node = %req.member.name, node_id, "node admitted as learner");
        Ok(JoinResponse {
            node_id,
            cluster_id: secrets.cluster_id,
            ca_cert_pem: secrets.ca_cert_pem,
            cert_pem,
        })
    }

    async fn console(&self, vm_id: &str) -> Result<api::control::ConsoleStream, ClusterError> {
        use futures::StreamExt;
        let vm = self
            .reader
            .vm(vm_id)
            .map_err(internal)?
            .ok_or_else(|| internal(format!("vm {vm_id} not found")))?;
        let node = vm
            .node
            .ok_or_else(|| internal(format!("vm {vm_id} is not placed")))?;
        if node == self.id {
            return crate::console::local_console(&self.hv, vm_id)
                .await
                .map_err(internal);
        }
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let peer = membership
            .membership()
            .get_node(&node)
            .map(|m| m.peer_addr.clone())
            .ok_or_else(|| internal(format!("node {node} is not a member")))?;
        let addr = raft::net::Transport::resolve(&peer)
            .await
            .map_err(internal)?;
        let (mut send, recv) = self.transport.open_tunnel(addr).await.map_err(internal)?;
        send.write_all(format!("console {vm_id}\n").as_bytes())
            .await
            .map_err(internal)?;
        let stream = futures::stream::unfold((recv, send), |(mut recv, send)| async move {
            let mut buf = vec![0u8; 4096];
            match recv.read(&mut buf).await {
                Ok(Some(n)) => {
                    buf.truncate(n);
                    Some((Ok(buf), (recv, send)))
                }
                Ok(None) => None,
                Err(e) => Some((Err(std::io::Error::other(e)), (recv, send))),
            }
        });
        Ok(stream.boxed())
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<raft::store::Applied> {
        self.reader.subscribe()
    }

    fn ready(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.current_leader.is_some()
            && m.running_state.is_ok()
            && matches!(self.reader.secrets(), Ok(Some(_)))
    }

    async fn vm_metrics(
        &self,
        vm_id: &str,
        since_ms: Option<u64>,
    ) -> Result<api::control::VmMetrics, ClusterError> {
        let vm = self
            .reader
            .vm(vm_id)
            .map_err(internal)?
            .ok_or_else(|| internal(format!("vm {vm_id} not found")))?;
        let node = vm
            .node
            .ok_or_else(|| ClusterError::Unavailable(format!("vm {vm_id} is not placed")))?;
        if node == self.id {
            return Ok(self.stats.metrics(vm_id, since_ms));
        }
        let unavailable =
            |e: &dyn std::fmt::Display| ClusterError::Unavailable(format!("node {node}: {e}"));
        let peer = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&node)
            .map(|m| m.peer_addr.clone())
            .ok_or_else(|| unavailable(&"not a member"))?;
        let body = serde_json::to_vec(&crate::console::VmMetricsRequest {
            vm_id: vm_id.to_string(),
            since_ms,
        })
        .map_err(internal)?;
        let ask = async {
            let addr = raft::net::Transport::resolve(&peer).await?;
            self.transport
                .call_extension(addr, crate::console::VM_METRICS, body)
                .await
        };
        let reply = tokio::time::timeout(Duration::from_secs(5), ask)
            .await
            .map_err(|_| unavailable(&"did not answer in time"))?
            .map_err(|e| unavailable(&e))?;
        serde_json::from_slice(&reply).map_err(internal)
    }

    async fn image_upload_offset(
        &self,
        image: &raft::image::Image,
    ) -> Result<u64, api::control::ImageBytesError> {
        self.images.upload_offset(image).await
    }

    async fn image_write_chunk(
        &self,
        image: &raft::image::Image,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<u64, api::control::ImageBytesError> {
        self.images.write_chunk(image, offset, data).await
    }

    async fn image_finish_upload(
        &self,
        image: &raft::image::Image,
    ) -> Result<(), api::control::ImageBytesError> {
        self.images.finish_upload(image).await
    }

    async fn link_site(
        &self,
        token: &str,
        addrs: Vec<String>,
    ) -> Result<raft::federation::SiteLink, ClusterError> {
        crate::federation::link_site(self, token, addrs).await
    }

    async fn forward_to_site(
        &self,
        site: &str,
        call: api::control::ForwardedCall,
    ) -> Result<api::control::ForwardedReply, ClusterError> {
        crate::federation::forward_to_site(self, site, call).await
    }

    fn federation_addrs(&self) -> Vec<String> {
        crate::federation::federation_addrs(&self.reader)
    }

    fn metrics_text(&self) -> String {
        let mut text = self.metrics.render();
        text.push_str(&self.federation.metrics.render());
        text.push_str(&self.stats.render());
        let applied = *self.reader.applied_watch().borrow();
        text.push_str(&self.liveness.local.metrics_text(applied));
        text
    }

    async fn backup(&self) -> Result<api::control::BackupBlob, ClusterError> {
        // Everything acknowledged before the request began is in the copy.
        self.read_barrier(Consistency::Linearizable).await?;
        let export = self.reader.export().await.map_err(internal)?;
        let cluster_id = self
            .reader
            .secrets()
            .map_err(internal)?
            .map(|s| s.cluster_id)
            .unwrap_or_default();
        let body = raft::backup::BackupBody {
            cluster_id,
            taken_at: api::now_ms(),
            last_applied_index: export.last_applied_index,
            pairs: export.pairs,
        };
        let (bytes, sha256) = raft::backup::encode(&body).map_err(internal)?;
        Ok(api::control::BackupBlob {
            bytes,
            sha256,
            last_applied_index: body.last_applied_index,
        })
    }

    async fn upgrade_check(&self) -> Result<api::control::UpgradeReport, ClusterError> {
        self.read_barrier(Consistency::Linearizable).await?;
        Ok(crate::features::upgrade_report(self))
    }

    async fn simulate(
        &self,
        req: api::scheduler::SimulateRequest,
    ) -> Result<api::scheduler::SimulateResult, ClusterError> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader.ok_or(ClusterError::NoLeader)?;
        if leader == self.id {
            return crate::placement::simulate(&self.reader, self.placement.policy, &req).map_err(
                |e| match e {
                    crate::placement::PlacementError::UnknownNode(_) => {
                        ClusterError::Invalid(e.to_string())
                    }
                    other => internal(other),
                },
            );
        }
        // The leader's view: it has every committed placement and the nodes' loads.
        let member = m
            .membership_config
            .membership()
            .get_node(&leader)
            .cloned()
            .ok_or(ClusterError::NoLeader)?;
        let addr = raft::net::Transport::resolve(&member.peer_addr)
            .await
            .map_err(internal)?;
        let body = serde_json::to_vec(&req).map_err(internal)?;
        let answer = self
            .transport
            .call_extension(addr, crate::console::SIMULATE, body)
            .await
            .map_err(|e| {
                // The leader refuses an unknown node in words; anything else is a failure.
                let message = e.to_string();
                if message.contains("does not exist") {
                    ClusterError::Invalid(message)
                } else {
                    internal(message)
                }
            })?;
        serde_json::from_slice(&answer).map_err(internal)
    }
}

/// Waits until `check` holds on the Raft metrics, or the timeout passes.
pub async fn wait_metrics(
    raft: &Raft,
    timeout: Duration,
    what: &str,
    check: impl Fn(&openraft::RaftMetrics<u64, raft::Member>) -> bool + Send,
) -> anyhow::Result<()> {
    raft.wait(Some(timeout))
        .metrics(check, what)
        .await
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("waiting for {what}: {e}"))
}

pub type SharedControl = Arc<NodeControl>;
