//! Feature gates of rolling upgrades, and the witness role.
//!
//! Every node advertises, through Raft, what it is ([`raft::model::NodeTraits`]): its release,
//! the command types it can apply and whether it is a witness. The write path ([`gate`])
//! refuses to propose a command type that some voter does not advertise, because that voter
//! could not apply the committed entry and would stop. A learner blocks only while it is up:
//! an offline learner never blocks an upgrade (it must be upgraded before it comes back).
//! A node that has advertised nothing yet is taken to understand the baseline command set.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use api::control::{MemberFeatures, MemberRole, UpgradeReport};
use raft::command::{known_commands, BASELINE_COMMANDS};
use raft::model::{NodeState, NodeTraits};
use raft::{keys, Command, NodeId, Request, Response};
use tokio::sync::watch;

use crate::control::NodeControl;

/// The release of this build.
pub const RELEASE: &str = env!("CARGO_PKG_VERSION");

/// What this node advertises: every command type it knows, minus those a test asks it to
/// pretend not to know (a node of an older release).
pub fn own_traits(
    witness: bool,
    missing: &[String],
    federation_addr: Option<String>,
) -> NodeTraits {
    let features = known_commands()
        .into_iter()
        .filter(|c| !missing.iter().any(|m| m == c))
        .map(str::to_string)
        .collect();
    let release = if missing.is_empty() {
        RELEASE.to_string()
    } else {
        format!("{RELEASE}-older")
    };
    NodeTraits {
        release,
        features,
        witness,
        federation_addr,
    }
}

/// Whether a member with these advertised traits (None: nothing advertised) can apply `command`.
fn understands(traits: Option<&NodeTraits>, command: &str) -> bool {
    match traits {
        Some(t) => t.features.iter().any(|f| f == command),
        None => BASELINE_COMMANDS.contains(&command),
    }
}

/// One member as the gate sees it.
struct Seen {
    id: NodeId,
    name: String,
    voter: bool,
    state: NodeState,
    traits: Option<NodeTraits>,
}

fn members(ctl: &NodeControl) -> Vec<Seen> {
    let m = ctl.raft.metrics().borrow().clone();
    let is_leader = m.current_leader == Some(ctl.id);
    let membership = m.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let records = ctl.reader.nodes().unwrap_or_default();
    membership
        .nodes()
        .map(|(id, member)| {
            let record = records.iter().find(|r| r.id == *id);
            Seen {
                id: *id,
                name: member.name.clone(),
                voter: voters.contains(id),
                state: ctl.health(*id, record, is_leader),
                traits: ctl.reader.get(&keys::node_traits(*id)).ok().flatten(),
            }
        })
        .collect()
}

/// Why `seen` blocks `command`, if it does.
fn blocks(seen: &Seen, command: &str) -> Option<String> {
    if understands(seen.traits.as_ref(), command) {
        return None;
    }
    let release = seen
        .traits
        .as_ref()
        .map(|t| t.release.clone())
        .unwrap_or_else(|| "baseline".to_string());
    if seen.voter {
        Some(format!(
            "voter {} (node {}, release {release}) does not understand {command}",
            seen.name, seen.id
        ))
    } else if seen.state != NodeState::Down {
        Some(format!(
            "learner {} (node {}, release {release}) is up and does not understand {command}",
            seen.name, seen.id
        ))
    } else {
        None
    }
}

/// The feature gate of the write path: Ok when every member that matters can apply `command`.
/// Command types this build does not list (added by a build that forgot to) are not gated.
pub fn gate(ctl: &NodeControl, command: &Command) -> Result<(), Vec<String>> {
    let name = command.name();
    if !known_commands().contains(&name) {
        return Ok(());
    }
    let blockers: Vec<String> = members(ctl)
        .iter()
        .filter_map(|s| blocks(s, name))
        .collect();
    if blockers.is_empty() {
        Ok(())
    } else {
        Err(blockers)
    }
}

/// `upgrade-check`: per member, what it lacks; overall, what is refused and what else blocks
/// a rolling restart (a voter down means restarting another one loses the quorum).
pub fn upgrade_report(ctl: &NodeControl) -> UpgradeReport {
    let seen = members(ctl);
    let known = known_commands();
    let mut blockers = Vec::new();
    let mut gated = BTreeSet::new();
    let mut out = Vec::new();
    for s in &seen {
        let missing: Vec<String> = known
            .iter()
            .filter(|c| !understands(s.traits.as_ref(), c))
            .map(|c| c.to_string())
            .collect();
        for c in &missing {
            if let Some(why) = blocks(s, c) {
                gated.insert(c.clone());
                if !blockers.contains(&why) {
                    blockers.push(why);
                }
            }
        }
        if s.voter && s.state == NodeState::Down {
            blockers.push(format!(
                "voter {} (node {}) is down: restarting another voter would lose the quorum",
                s.name, s.id
            ));
        }
        let witness = s.traits.as_ref().is_some_and(|t| t.witness);
        out.push(MemberFeatures {
            id: s.id,
            name: s.name.clone(),
            role: match (s.voter, witness) {
                (true, true) => MemberRole::Witness,
                (true, false) => MemberRole::Voter,
                (false, _) => MemberRole::Learner,
            },
            state: match s.state {
                NodeState::Up => "up",
                NodeState::Suspect => "suspect",
                NodeState::Down => "down",
            }
            .to_string(),
            release: s.traits.as_ref().map(|t| t.release.clone()),
            missing,
        });
    }
    UpgradeReport {
        release: RELEASE.to_string(),
        members: out,
        ok: blockers.is_empty(),
        blockers,
        gated_commands: gated.into_iter().collect(),
    }
}

/// Whether node `id` advertised itself as a witness.
pub fn is_witness(ctl: &NodeControl, id: NodeId) -> bool {
    ctl.reader
        .get::<NodeTraits>(&keys::node_traits(id))
        .ok()
        .flatten()
        .is_some_and(|t| t.witness)
}

/// Keeps this node's advertisement current: proposes it until the replicated state holds it
/// (retrying through elections), and, for a witness, keeps it unschedulable.
pub async fn advertise(ctl: Arc<NodeControl>, traits: NodeTraits, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let stored: Option<NodeTraits> = ctl.reader.get(&keys::node_traits(ctl.id)).ok().flatten();
        let schedulable = ctl
            .reader
            .node(ctl.id)
            .ok()
            .flatten()
            .map(|n| n.schedulable);
        let mut pending = Vec::new();
        if stored.as_ref() != Some(&traits) {
            pending.push(Command::AdvertiseNode {
                id: ctl.id,
                traits: traits.clone(),
            });
        }
        if traits.witness && schedulable == Some(true) {
            pending.push(Command::SetNodeSchedulable {
                id: ctl.id,
                schedulable: false,
            });
        }
        // Not registered yet (a joiner whose record is not applied here): wait for it.
        if schedulable.is_none() {
            pending.clear();
        }
        if pending.is_empty() && schedulable.is_some() {
            if traits.witness {
                // A witness re-checks now and then in case an operator undrains it.
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                }
            }
            return;
        }
        for command in pending {
            let req = Request::new(api::now_ms(), format!("node:{}", ctl.id), command);
            match ctl.cluster.write(req).await {
                Ok((_, Response::Rejected { message, .. })) => {
                    tracing::warn!(%message, "advertising this node was refused");
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "advertising this node; retrying"),
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulated_older_release_lacks_what_it_was_told_to() {
        let old = own_traits(false, &["api_key.create".to_string()], None);
        assert!(!understands(Some(&old), "api_key.create"));
        assert!(understands(Some(&old), "tenant.create"));
        assert_ne!(old.release, RELEASE);
        let new = own_traits(true, &[], None);
        assert!(new.witness && new.release == RELEASE);
        assert!(understands(Some(&new), "node.advertise"));
        // A node that advertised nothing is a baseline node.
        assert!(understands(None, "tenant.create"));
        assert!(!understands(None, "node.advertise"));
    }

    #[test]
    fn voters_always_block_and_learners_only_while_up() {
        let old = own_traits(false, &["api_key.create".to_string()], None);
        let seen = |voter, state| Seen {
            id: 3,
            name: "n3".into(),
            voter,
            state,
            traits: Some(old.clone()),
        };
        assert!(blocks(&seen(true, NodeState::Down), "api_key.create").is_some());
        assert!(blocks(&seen(false, NodeState::Up), "api_key.create").is_some());
        assert!(blocks(&seen(false, NodeState::Down), "api_key.create").is_none());
        assert!(blocks(&seen(true, NodeState::Up), "tenant.create").is_none());
    }
}
