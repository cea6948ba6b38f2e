//! Builders of requests and log entries shared by the integration tests.

use std::collections::{BTreeMap, BTreeSet};

use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership};
use raft::command::{Command, Request};
use raft::model::{
    ClusterSecrets, DesiredState, Member, NodeState, Operation, OperationState, Quota, Role,
    Tenant, User, Vm, VmState, SYSTEM_TENANT,
};
use raft::TypeConfig;

pub fn log_id(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

pub fn normal(index: u64, req: Request) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Normal(req),
    }
}

pub fn blank(index: u64) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Blank,
    }
}

pub fn member(name: &str) -> Member {
    Member {
        name: name.into(),
        api_addr: format!("{name}:8080"),
        peer_addr: format!("{name}:7000"),
    }
}

/// A membership entry with voters `ids`, each reachable under its own name.
pub fn membership(index: u64, ids: &[u64]) -> Entry<TypeConfig> {
    let voters: BTreeSet<u64> = ids.iter().copied().collect();
    let nodes: BTreeMap<u64, Member> = ids.iter().map(|&i| (i, member(&format!("n{i}")))).collect();
    Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Membership(Membership::new(vec![voters], nodes)),
    }
}

pub fn tenant(id: &str, name: &str) -> Tenant {
    Tenant {
        id: id.into(),
        name: name.into(),
        quota: Quota::default(),
        usage: Default::default(),
        created_at: 0,
        updated_at: 0,
        version: 0,
    }
}

pub fn user(id: &str, username: &str, tenant: &str, role: Role) -> User {
    User {
        id: id.into(),
        username: username.into(),
        password_hash: "$argon2id$not-a-real-hash".into(),
        tenant: tenant.into(),
        role,
        created_at: 0,
        updated_at: 0,
        version: 0,
    }
}

pub fn vm(id: &str, name: &str, tenant: &str) -> Vm {
    Vm {
        id: id.into(),
        name: name.into(),
        tenant: tenant.into(),
        vcpus: 2,
        memory_mib: 512,
        disk_gib: 10,
        image: None,
        labels: Default::default(),
        node: None,
        desired_state: DesiredState::Running,
        state: VmState::Pending,
        ha: true,
        anti_affinity_group: None,
        epoch: 0,
        created_at: 0,
        updated_at: 0,
        version: 0,
        placement: Default::default(),
    }
}

pub fn operation(id: &str, kind: &str, tenant: &str, target: &str) -> Operation {
    Operation {
        id: id.into(),
        kind: kind.into(),
        tenant: tenant.into(),
        target: target.into(),
        state: OperationState::Pending,
        error: None,
        created_at: 0,
        updated_at: 0,
    }
}

fn secrets() -> ClusterSecrets {
    ClusterSecrets {
        cluster_id: "c-1".into(),
        ca_cert_pem: "cert".into(),
        ca_key_pem: "key".into(),
        jwt_keys: vec![vec![1; 32]],
        join_secret_sha256: "00".into(),
        created_at: 1,
    }
}

/// A history that touches every kind of object and includes refusals and a replayed
/// idempotent request, so that equal results mean more than "both did nothing".
pub fn history() -> Vec<Request> {
    let at = |i: u64| 1_000 + i;
    let mut out = vec![
        Request::new(
            at(0),
            "node:1",
            Command::InitCluster {
                secrets: secrets(),
                admin: user("admin", "admin", SYSTEM_TENANT, Role::Admin),
            },
        ),
        Request::new(
            at(1),
            "node:1",
            Command::RegisterNode {
                member: member("a"),
            },
        ),
        Request::new(
            at(2),
            "node:1",
            Command::RegisterNode {
                member: member("b"),
            },
        ),
        Request::new(
            at(3),
            "admin",
            Command::CreateTenant {
                tenant: tenant("t1", "acme"),
            },
        ),
        Request::new(
            at(4),
            "admin",
            Command::CreateTenant {
                tenant: tenant("t2", "beta"),
            },
        ),
        // Refused: the name is taken.
        Request::new(
            at(5),
            "admin",
            Command::CreateTenant {
                tenant: tenant("t3", "acme"),
            },
        ),
        Request::new(
            at(6),
            "admin",
            Command::CreateUser {
                user: user("u1", "ann", "t1", Role::TenantAdmin),
            },
        ),
        Request::new(
            at(7),
            "admin",
            Command::CreateUser {
                user: user("u2", "bob", "t2", Role::Viewer),
            },
        ),
        // Refused: no such tenant.
        Request::new(
            at(8),
            "admin",
            Command::CreateUser {
                user: user("u3", "cid", "nope", Role::Viewer),
            },
        ),
        Request::new(
            at(9),
            "admin",
            Command::UpdateTenantQuota {
                id: "t1".into(),
                quota: Quota {
                    max_vms: Some(4),
                    ..Quota::default()
                },
                expected_version: Some(1),
            },
        ),
        Request::new(
            at(10),
            "node:1",
            Command::SetNodeState {
                id: 2,
                state: NodeState::Down,
            },
        ),
        Request::new(at(11), "admin", Command::DeleteUser { id: "u2".into() }),
        Request::new(
            at(12),
            "admin",
            Command::DeleteTenant {
                id: "t2".into(),
                expected_version: None,
            },
        ),
        Request::new(
            at(13),
            "node:1",
            Command::RotateJwtKey {
                key: vec![2; 32],
                keep: 2,
            },
        ),
        Request::new(at(14), "admin", Command::Noop),
        Request::new(
            at(15),
            "u1",
            Command::CreateVm {
                vm: vm("v1", "web", "t1"),
                operation: operation("o1", "vm.create", "t1", "vm/v1"),
            },
        ),
        Request::new(
            at(16),
            "node:1",
            Command::PlaceVm {
                id: "v1".into(),
                node: Some(1),
                expected_version: None,
            },
        ),
        Request::new(
            at(17),
            "node:1",
            Command::ReportVm {
                id: "v1".into(),
                node: 1,
                epoch: 1,
                state: VmState::Running,
                error: None,
            },
        ),
        // Stale epoch: ignored the same way everywhere.
        Request::new(
            at(18),
            "node:2",
            Command::ReportVm {
                id: "v1".into(),
                node: 2,
                epoch: 0,
                state: VmState::Stopped,
                error: None,
            },
        ),
    ];
    let mut once = Request::new(
        at(19),
        "admin",
        Command::CreateTenant {
            tenant: tenant("t4", "gamma"),
        },
    );
    once.idempotency_key = Some("k-1".into());
    out.push(once.clone());
    // The retry carries a different body; the first outcome must win on every replica.
    once.command = Command::CreateTenant {
        tenant: tenant("t5", "delta"),
    };
    out.push(once);
    out
}

/// The history as log entries from index 1, with a blank and a membership entry mixed in.
pub fn history_entries() -> Vec<Entry<TypeConfig>> {
    let mut entries = vec![blank(1), membership(2, &[1, 2, 3])];
    for req in history() {
        let index = entries.len() as u64 + 1;
        entries.push(normal(index, req));
    }
    entries
}
