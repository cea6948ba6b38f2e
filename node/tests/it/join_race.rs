//! A join that arrives while another membership change is in progress waits for it instead of
//! failing: the chaos long tier's 5-node clusters hit "the cluster is already undergoing a
//! configuration change" (HTTP 500) when a node joined while the membership controller was
//! promoting the previous one, and the joiner gave up.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use node::control::add_learner_when_free;
use node::server::{Node, ServeOptions};
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::ChangeMembers;

fn ghost(name: &str) -> raft::Member {
    raft::Member {
        name: name.into(),
        api_addr: "127.0.0.1:9".into(),
        peer_addr: "127.0.0.1:9".into(),
    }
}

#[tokio::test]
async fn adding_a_learner_waits_while_a_membership_change_is_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(ServeOptions {
        data_dir: dir.path().join("n1"),
        name: Some("n1".into()),
        api_addr: Some("127.0.0.1:0".parse().unwrap()),
        peer_addr: Some("127.0.0.1:0".parse().unwrap()),
        init: true,
        libvirt_uri: Some("test:///default".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let raft = node.control.raft.clone();
    let mut metrics = raft.metrics();
    tokio::time::timeout(
        Duration::from_secs(30),
        metrics.wait_for(|m| m.current_leader.is_some()),
    )
    .await
    .unwrap()
    .unwrap();

    // A change that cannot commit: promoting a learner that does not exist.
    raft.add_learner(50, ghost("ghost-50"), false)
        .await
        .unwrap();
    let stuck = raft.clone();
    let _change = tokio::spawn(async move {
        let _ = stuck
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([50])), false)
            .await;
    });
    tokio::time::timeout(
        Duration::from_secs(10),
        metrics.wait_for(|m| m.membership_config.membership().get_joint_config().len() > 1),
    )
    .await
    .expect("the change never became pending")
    .unwrap();

    // Without waiting, openraft refuses at once; the join path must retry until its deadline.
    let started = Instant::now();
    let within = Duration::from_millis(1500);
    let result = add_learner_when_free(&raft, 51, ghost("ghost-51"), within).await;
    assert!(
        started.elapsed() >= within,
        "gave up after {:?} instead of waiting {within:?}",
        started.elapsed()
    );
    assert!(
        matches!(
            result,
            Err(RaftError::APIError(
                ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(_))
            ))
        ),
        "{result:?}"
    );
    node.stop().await.unwrap();
}
