//! Behaviour of the sled store beyond openraft's suite: restart, snapshot transfer, equality
//! with the in-memory `apply`, local reads and the progress signals.

use std::time::Duration;

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::{EntryPayload, RaftLogReader, RaftSnapshotBuilder, Vote};
use raft::apply::{self, MemState};
use raft::command::{Command, Request, Response};
use raft::keys;
use raft::model::{NodeState, Tenant, VmState};
use raft::store::{digest_of, Store, StoreError};

use crate::fixtures::{blank, history, history_entries, log_id, membership, normal, tenant};

fn open(dir: &tempfile::TempDir) -> Store {
    Store::open(dir.path()).expect("a store opens in a fresh directory")
}

#[tokio::test]
async fn the_state_machine_computes_what_apply_computes_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let entries = history_entries();
    let responses = store.state_machine().apply(entries.clone()).await.unwrap();
    assert_eq!(responses.len(), entries.len());

    let mem = MemState::default();
    for (entry, got) in entries.iter().zip(&responses) {
        let want = match &entry.payload {
            EntryPayload::Normal(req) => apply::apply(&mem, req, entry.log_id.index).unwrap(),
            _ => Response::Ok,
        };
        assert_eq!(got, &want, "entry {}", entry.log_id.index);
    }
    // The history is only a meaningful comparison if it produced refusals too.
    assert!(responses
        .iter()
        .any(|r| matches!(r, Response::Rejected { .. })));

    let map = mem.map.borrow();
    let in_memory = digest_of(map.iter().map(|(k, v)| (&k[..], &v[..])));
    assert_eq!(store.reader().digest().unwrap(), in_memory);
}

#[tokio::test]
async fn reads_see_the_applied_state_and_paginate() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let entries = history_entries();
    store.state_machine().apply(entries.clone()).await.unwrap();
    let r = store.reader();

    assert_eq!(r.last_applied_index(), entries.len() as u64);
    let ids = |ts: Vec<Tenant>| ts.into_iter().map(|t| t.id).collect::<Vec<_>>();
    assert_eq!(ids(r.tenants().unwrap()), vec!["system", "t1", "t4"]);
    assert_eq!(r.tenant_by_name("acme").unwrap().unwrap().id, "t1");
    assert_eq!(r.tenant("t1").unwrap().unwrap().quota.max_vms, Some(4));
    assert!(r.tenant_by_name("beta").unwrap().is_none());
    assert!(
        r.tenant("t5").unwrap().is_none(),
        "the idempotent retry must not apply"
    );
    assert_eq!(r.user_by_name("ann").unwrap().unwrap().id, "u1");
    assert!(r.user_by_name("bob").unwrap().is_none());
    let users: Vec<String> = r.users().unwrap().into_iter().map(|u| u.id).collect();
    assert_eq!(users, vec!["admin", "u1"]);
    let nodes = r.nodes().unwrap();
    assert_eq!(nodes.iter().map(|n| n.id).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(r.node(2).unwrap().unwrap().state, NodeState::Down);
    assert_eq!(r.secrets().unwrap().unwrap().jwt_keys.len(), 2);
    let vm = r.vm_by_name("t1", "web").unwrap().unwrap();
    assert_eq!(
        (vm.id.as_str(), vm.node, vm.state),
        ("v1", Some(1), VmState::Running)
    );
    assert!(vm.epoch >= 1);
    assert!(r.vm_by_name("t2", "web").unwrap().is_none());
    assert_eq!(r.vms().unwrap().len(), 1);
    assert_eq!(r.operation("o1").unwrap().unwrap().target, "vm/v1");
    assert_eq!(r.tenant("t1").unwrap().unwrap().usage.vms, 1);

    // Cursor pagination: each page starts after the last key of the previous one.
    let page1 = r.scan::<Tenant>(keys::TENANT_PREFIX, None, 2).unwrap();
    assert_eq!(page1.len(), 2);
    let cursor = page1.last().unwrap().0.clone();
    let page2 = r
        .scan::<Tenant>(keys::TENANT_PREFIX, Some(&cursor), 2)
        .unwrap();
    assert_eq!(
        page2.iter().map(|(_, t)| t.id.as_str()).collect::<Vec<_>>(),
        vec!["t4"]
    );
    let end = page2.last().unwrap().0.clone();
    assert!(r
        .scan::<Tenant>(keys::TENANT_PREFIX, Some(&end), 2)
        .unwrap()
        .is_empty());

    // The audit log pages the same way and stays hash-chained across pages.
    let all = r.audit(0, usize::MAX).unwrap();
    assert!(all.len() > 5);
    let mut paged = r.audit(0, 5).unwrap();
    paged.extend(r.audit(5, usize::MAX).unwrap());
    assert_eq!(paged, all);
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
        assert_eq!(apply::audit_hash(e), e.hash);
        if i > 0 {
            assert_eq!(e.prev_hash, all[i - 1].hash);
        }
    }
}

#[tokio::test]
async fn applied_requests_are_published_and_waiters_wake() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let reader = store.reader();
    let mut events = reader.subscribe();
    let entries = history_entries();
    let last = entries.len() as u64;

    let waiter = {
        let reader = reader.clone();
        tokio::spawn(async move { reader.wait_applied(last, Duration::from_secs(30)).await })
    };
    store.state_machine().apply(entries.clone()).await.unwrap();
    waiter.await.unwrap().unwrap();
    assert_eq!(*reader.applied_watch().borrow(), last);

    // Every normal entry is published, in log order; blank and membership entries are not.
    for entry in entries
        .iter()
        .filter(|e| matches!(e.payload, EntryPayload::Normal(_)))
    {
        let event = events.recv().await.unwrap();
        assert_eq!(event.index, entry.log_id.index);
        let EntryPayload::Normal(req) = &entry.payload else {
            unreachable!()
        };
        assert_eq!(&event.request, req);
    }
    assert!(events.try_recv().is_err());

    match reader
        .wait_applied(last + 1, Duration::from_millis(50))
        .await
    {
        Err(StoreError::WaitTimeout { index, reached }) => {
            assert_eq!((index, reached), (last + 1, last));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[tokio::test]
async fn a_reopened_store_keeps_log_vote_state_and_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let entries = history_entries();
    let n = entries.len() as u64;
    let vote = Vote::new_committed(3, 1);
    let (snapshot_meta, snapshot_data, digest) = {
        let store = open(&dir);
        let mut log = store.log_store();
        let mut sm = store.state_machine();
        log.save_vote(&vote).await.unwrap();
        log.blocking_append(entries.clone()).await.unwrap();
        log.save_committed(Some(log_id(1, n))).await.unwrap();
        sm.apply(entries[..10].to_vec()).await.unwrap();
        let snap = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        // Applied after the snapshot: the state must survive, not only the snapshot.
        sm.apply(entries[10..].to_vec()).await.unwrap();
        (
            snap.meta,
            snap.snapshot.into_inner(),
            store.reader().digest().unwrap(),
        )
    };

    let store = open(&dir);
    let mut log = store.log_store();
    let mut sm = store.state_machine();
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, n)));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(1, n)));
    assert_eq!(state.last_purged_log_id, None);
    let stored = log.try_get_log_entries(..).await.unwrap();
    assert_eq!(stored, entries);

    let (applied, members) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1, n)));
    assert_eq!(members.log_id(), &Some(log_id(1, 2)));
    assert_eq!(store.reader().last_applied_index(), n);
    assert_eq!(store.reader().digest().unwrap(), digest);

    let current = sm
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("snapshot kept");
    assert_eq!(current.meta, snapshot_meta);
    assert_eq!(current.meta.last_log_id, Some(log_id(1, 10)));
    assert_eq!(current.snapshot.into_inner(), snapshot_data);
}

#[tokio::test]
async fn a_snapshot_installs_on_another_store_with_the_same_digest() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (open(&dir_a), open(&dir_b));
    let mut sm_a = a.state_machine();
    let mut sm_b = b.state_machine();
    sm_a.apply(history_entries()).await.unwrap();

    // The follower had state of its own, which the snapshot must replace entirely.
    let stray = Request::new(
        1,
        "x",
        Command::CreateTenant {
            tenant: tenant("zz", "stray"),
        },
    );
    sm_b.apply(vec![blank(1), normal(2, stray)]).await.unwrap();
    assert!(b.reader().tenant("zz").unwrap().is_some());

    let snap = sm_a
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let mut incoming = sm_b.begin_receiving_snapshot().await.unwrap();
    incoming
        .get_mut()
        .extend_from_slice(snap.snapshot.get_ref());
    let index = snap.meta.last_log_id.unwrap().index;
    let mut watch = b.reader().applied_watch();
    sm_b.install_snapshot(&snap.meta, incoming).await.unwrap();
    watch.wait_for(|i| *i == index).await.unwrap();

    assert_eq!(b.reader().digest().unwrap(), a.reader().digest().unwrap());
    assert!(b.reader().tenant("zz").unwrap().is_none());
    assert_eq!(
        sm_b.applied_state().await.unwrap(),
        sm_a.applied_state().await.unwrap()
    );
    let current = sm_b.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, snap.meta);

    // Both replicas keep agreeing on what comes next.
    let next = Request::new(
        2,
        "admin",
        Command::CreateTenant {
            tenant: tenant("t9", "next"),
        },
    );
    let ra = sm_a
        .apply(vec![normal(index + 1, next.clone())])
        .await
        .unwrap();
    let rb = sm_b.apply(vec![normal(index + 1, next)]).await.unwrap();
    assert_eq!(ra, rb);
    assert_eq!(b.reader().digest().unwrap(), a.reader().digest().unwrap());
}

#[tokio::test]
async fn a_snapshot_whose_bytes_do_not_match_its_metadata_is_refused() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (open(&dir_a), open(&dir_b));
    let mut sm_a = a.state_machine();
    sm_a.apply(history_entries()).await.unwrap();
    let snap = sm_a
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let mut meta = snap.meta.clone();
    meta.last_log_id = Some(log_id(1, 999));
    let mut sm_b = b.state_machine();
    let result = sm_b.install_snapshot(&meta, snap.snapshot).await;
    assert!(
        result.is_err(),
        "installed a snapshot with the wrong metadata"
    );
    assert_eq!(sm_b.applied_state().await.unwrap().0, None);
    assert!(sm_b.get_current_snapshot().await.unwrap().is_none());
}

#[tokio::test]
async fn purging_keeps_the_state_and_records_the_purge_point() {
    let dir = tempfile::tempdir().unwrap();
    let entries = history_entries();
    let n = entries.len() as u64;
    {
        let store = open(&dir);
        let mut log = store.log_store();
        let mut sm = store.state_machine();
        log.blocking_append(entries.clone()).await.unwrap();
        sm.apply(entries.clone()).await.unwrap();
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        log.purge(log_id(1, 10)).await.unwrap();
        let remaining = log.try_get_log_entries(..).await.unwrap();
        assert_eq!(remaining.first().unwrap().log_id, log_id(1, 11));
    }
    let store = open(&dir);
    let mut log = store.log_store();
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 10)));
    assert_eq!(state.last_log_id, Some(log_id(1, n)));
    assert_eq!(
        log.try_get_log_entries(..).await.unwrap().len() as u64,
        n - 10
    );
    assert_eq!(store.reader().last_applied_index(), n);
    assert_eq!(
        store.reader().tenant_by_name("gamma").unwrap().unwrap().id,
        "t4"
    );
}

#[tokio::test]
async fn truncation_removes_the_suffix_and_membership_entries_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let mut log = store.log_store();
    let entries = vec![
        blank(1),
        membership(2, &[1, 2]),
        blank(3),
        membership(4, &[1, 2, 3]),
    ];
    log.blocking_append(entries.clone()).await.unwrap();
    assert_eq!(log.try_get_log_entries(2..=2).await.unwrap(), entries[1..2]);
    log.truncate(log_id(1, 3)).await.unwrap();
    assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries[..2]);
    assert_eq!(
        log.get_log_state().await.unwrap().last_log_id,
        Some(log_id(1, 2))
    );
    // The history keeps working on top of a truncated log.
    let next = history().remove(0);
    log.blocking_append(vec![normal(3, next)]).await.unwrap();
    assert_eq!(
        log.get_log_state().await.unwrap().last_log_id,
        Some(log_id(1, 3))
    );
}
