//! The leader's membership controller: keeps the number of voters at its target, replaces
//! voters that have been unreachable too long with healthy learners, and removes removed nodes.
//! Reachability here is Raft replication health; node liveness (up, suspect, down) comes from
//! heartbeats and is committed by `liveness`.
//!
//! It runs on every node but acts only while that node leads. It makes at most one membership
//! change per tick, so each change is committed before the next is decided.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::ChangeMembers;
use raft::NodeId;

use crate::control::NodeControl;

/// 3 voters, or 5 once the cluster has 5 or more nodes.
pub fn voter_target(nodes: usize) -> usize {
    if nodes >= 5 {
        5
    } else {
        3
    }
}

/// What the controller decided to do this tick. A pure function of what it saw, so it is
/// tested as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Nothing,
    /// Replace the whole voter set (promotion or replacement).
    SetVoters(BTreeSet<NodeId>),
    /// Remove nodes from the membership altogether.
    RemoveNodes(BTreeSet<NodeId>),
}

#[derive(Debug, Clone)]
pub struct View {
    pub me: NodeId,
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
    /// Nodes that answer the leader (and are caught up, for learners).
    pub healthy: BTreeSet<NodeId>,
    /// Voters unreachable for longer than the replacement timeout.
    pub dead: BTreeSet<NodeId>,
    /// Nodes marked removed in the replicated state.
    pub removed: BTreeSet<NodeId>,
}

pub fn decide(v: &View) -> Decision {
    let members = v.voters.len() + v.learners.len();
    // 1. Removed nodes leave the voter set first, then the membership.
    let removed_voters: BTreeSet<NodeId> = v.voters.intersection(&v.removed).copied().collect();
    if !removed_voters.is_empty() {
        let mut voters: BTreeSet<NodeId> = v.voters.difference(&removed_voters).copied().collect();
        // Keep the voter count up when a healthy learner can take the place.
        if let Some(l) = v
            .learners
            .iter()
            .find(|l| v.healthy.contains(l) && !v.removed.contains(l))
        {
            voters.insert(*l);
        }
        if !voters.is_empty() {
            return Decision::SetVoters(voters);
        }
    }
    let removed_learners: BTreeSet<NodeId> = v.learners.intersection(&v.removed).copied().collect();
    if !removed_learners.is_empty() {
        return Decision::RemoveNodes(removed_learners);
    }
    let candidates: Vec<NodeId> = v
        .learners
        .iter()
        .copied()
        .filter(|l| v.healthy.contains(l) && !v.removed.contains(l))
        .collect();
    // 2. A voter gone too long is replaced by a healthy learner; it stays a learner itself.
    if let (Some(dead), Some(learner)) = (v.dead.iter().find(|d| **d != v.me), candidates.first()) {
        let mut voters = v.voters.clone();
        voters.remove(dead);
        voters.insert(*learner);
        return Decision::SetVoters(voters);
    }
    // 3. Fill the voter set up to its target.
    let target = voter_target(members);
    if v.voters.len() < target {
        if let Some(learner) = candidates.first() {
            let mut voters = v.voters.clone();
            voters.insert(*learner);
            return Decision::SetVoters(voters);
        }
    }
    Decision::Nothing
}

/// Runs until `shutdown` fires.
pub async fn run(ctl: Arc<NodeControl>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let tick = Duration::from_millis((ctl.tuning.heartbeat_ms * 3).clamp(100, 1000));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leading_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => return,
        }
        let m = ctl.raft.metrics().borrow().clone();
        if m.current_leader != Some(ctl.id) {
            leading_since = None;
            continue;
        }
        let since = *leading_since.get_or_insert_with(tokio::time::Instant::now);
        if let Err(e) = tick_once(&ctl, &m, since.elapsed()).await {
            tracing::debug!(error = %e, "membership controller tick failed");
        }
    }
}

async fn tick_once(
    ctl: &NodeControl,
    m: &openraft::RaftMetrics<u64, raft::Member>,
    leading_for: Duration,
) -> anyhow::Result<()> {
    let membership = m.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
    let last_log = m.last_log_index.unwrap_or(0);
    let matched = m.replication.clone().unwrap_or_default();
    let records = ctl.reader.nodes()?;
    let removed: BTreeSet<NodeId> = records.iter().filter(|r| r.removed).map(|r| r.id).collect();

    let mut healthy = BTreeSet::new();
    let mut dead = BTreeSet::new();
    for id in voters.iter().chain(learners.iter()) {
        if *id == ctl.id {
            healthy.insert(*id);
            continue;
        }
        let contact = ctl.transport.last_contact(*id).map(|t| t.elapsed());
        let caught_up = matched
            .get(id)
            .copied()
            .flatten()
            .is_some_and(|l| l.index + 100 >= last_log);
        match contact {
            Some(age) if age < ctl.tuning.suspect_after() && caught_up => {
                healthy.insert(*id);
            }
            Some(age) if age >= ctl.tuning.voter_down_after() => {
                dead.insert(*id);
            }
            // Never reached since this node became leader, for longer than the timeout.
            None if leading_for >= ctl.tuning.voter_down_after() => {
                dead.insert(*id);
            }
            _ => {}
        }
    }

    let view = View {
        me: ctl.id,
        voters: voters.clone(),
        learners,
        healthy,
        dead: dead.intersection(&voters).copied().collect(),
        removed,
    };
    match decide(&view) {
        Decision::Nothing => {}
        Decision::SetVoters(new_voters) => {
            tracing::info!(?voters, ?new_voters, "changing voters");
            ctl.raft
                .change_membership(ChangeMembers::ReplaceAllVoters(new_voters), true)
                .await?;
        }
        Decision::RemoveNodes(ids) => {
            tracing::info!(?ids, "removing nodes from the membership");
            ctl.raft
                .change_membership(ChangeMembers::RemoveNodes(ids), false)
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[u64]) -> BTreeSet<u64> {
        ids.iter().copied().collect()
    }

    fn view(
        voters: &[u64],
        learners: &[u64],
        healthy: &[u64],
        dead: &[u64],
        removed: &[u64],
    ) -> View {
        View {
            me: 1,
            voters: set(voters),
            learners: set(learners),
            healthy: set(healthy),
            dead: set(dead),
            removed: set(removed),
        }
    }

    #[test]
    fn targets() {
        assert_eq!(voter_target(1), 3);
        assert_eq!(voter_target(4), 3);
        assert_eq!(voter_target(5), 5);
        assert_eq!(voter_target(100), 5);
    }

    #[test]
    fn decisions() {
        // (case, view, expected)
        let cases = [
            (
                "promote while below 3",
                view(&[1], &[2], &[1, 2], &[], &[]),
                Decision::SetVoters(set(&[1, 2])),
            ),
            (
                "unhealthy learner waits",
                view(&[1], &[2], &[1], &[], &[]),
                Decision::Nothing,
            ),
            (
                "3 voters of 4 nodes is enough",
                view(&[1, 2, 3], &[4], &[1, 2, 3, 4], &[], &[]),
                Decision::Nothing,
            ),
            (
                "5 nodes want 5 voters",
                view(&[1, 2, 3], &[4, 5], &[1, 2, 3, 4, 5], &[], &[]),
                Decision::SetVoters(set(&[1, 2, 3, 4])),
            ),
            (
                "6 nodes stop at 5",
                view(&[1, 2, 3, 4, 5], &[6], &[1, 2, 3, 4, 5, 6], &[], &[]),
                Decision::Nothing,
            ),
            (
                "dead voter replaced",
                view(&[1, 2, 3, 4, 5], &[6], &[1, 2, 3, 4, 6], &[5], &[]),
                Decision::SetVoters(set(&[1, 2, 3, 4, 6])),
            ),
            (
                "dead voter, no learner",
                view(&[1, 2, 3], &[], &[1, 2], &[3], &[]),
                Decision::Nothing,
            ),
            (
                "removed voter leaves",
                view(&[1, 2, 3], &[], &[1, 2, 3], &[], &[3]),
                Decision::SetVoters(set(&[1, 2])),
            ),
            (
                "removed voter replaced",
                view(&[1, 2, 3], &[4], &[1, 2, 3, 4], &[], &[3]),
                Decision::SetVoters(set(&[1, 2, 4])),
            ),
            (
                "removed learner leaves",
                view(&[1, 2, 3], &[4], &[1, 2, 3], &[], &[4]),
                Decision::RemoveNodes(set(&[4])),
            ),
            (
                "removed learner not promoted",
                view(&[1], &[2], &[1, 2], &[], &[2]),
                Decision::RemoveNodes(set(&[2])),
            ),
        ];
        for (name, v, expected) in cases {
            assert_eq!(decide(&v), expected, "case: {name}");
        }
    }
}
