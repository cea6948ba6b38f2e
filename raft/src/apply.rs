//! The deterministic `apply`: how one committed [`Request`] changes the replicated state.
//!
//! `apply` sees the state only through [`StateTx`], a transaction over one ordered key space,
//! and reads no clock, no randomness and no environment: every replica computes the same
//! result from the same log. Refusals (`Response::Rejected`) are outcomes too, identical
//! everywhere. Every command that reaches here is also appended to the hash-chained audit log.

use sha2::{Digest, Sha256};

use crate::codec::{self, CodecError};
use crate::command::{Command, RejectCode, Request, Response};
use crate::keys;
use crate::model::{AuditEntry, ClusterSecrets, NodeRecord, NodeState, Tenant, User};

/// A read-your-writes transaction over the state key space.
///
/// Implemented by the sled store (one sled transaction per entry) and by an in-memory map in
/// tests. This is the whole surface `apply` may touch.
pub trait StateTx {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ApplyError>;
    fn put(&self, key: &[u8], value: Vec<u8>) -> Result<(), ApplyError>;
    fn remove(&self, key: &[u8]) -> Result<(), ApplyError>;
}

/// A failure of the storage under `apply`, as opposed to a refusal of the command.
/// Storage failures are fatal for the state machine: the node stops applying.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("state storage failed: {0}")]
    Storage(String),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

fn get<T>(tx: &dyn StateTx, key: &[u8]) -> Result<Option<T>, ApplyError>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<
            rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>,
        > + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    match tx.get(key)? {
        Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
        None => Ok(None),
    }
}

fn put<T>(tx: &dyn StateTx, key: &[u8], value: &T) -> Result<(), ApplyError>
where
    T: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<
            rkyv::util::AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rkyv::rancor::Error,
        >,
    >,
{
    tx.put(key, codec::encode(value)?)
}

fn reject(code: RejectCode, message: impl Into<String>) -> Response {
    Response::Rejected {
        code,
        message: message.into(),
    }
}

/// Applies one request. `log_index` is the index of the entry that carries it.
pub fn apply(tx: &dyn StateTx, req: &Request, log_index: u64) -> Result<Response, ApplyError> {
    if let Some(key) = &req.idempotency_key {
        let ikey = keys::idempotency(&req.actor, key);
        if let Some(previous) = get::<Response>(tx, &ikey)? {
            return Ok(previous);
        }
        let response = apply_command(tx, req)?;
        put(tx, &ikey, &response)?;
        record_audit(tx, req, &response, log_index)?;
        return Ok(response);
    }
    let response = apply_command(tx, req)?;
    record_audit(tx, req, &response, log_index)?;
    Ok(response)
}

fn apply_command(tx: &dyn StateTx, req: &Request) -> Result<Response, ApplyError> {
    let at = req.at;
    match &req.command {
        Command::Noop => Ok(Response::Ok),
        Command::Audit { .. } => Ok(Response::Ok),
        Command::InitCluster { secrets, admin } => {
            if tx.get(keys::SECRETS)?.is_some() {
                return Ok(reject(RejectCode::AlreadyInitialized, "cluster is already initialised"));
            }
            put::<ClusterSecrets>(tx, keys::SECRETS, secrets)?;
            let system = Tenant {
                id: crate::model::SYSTEM_TENANT.to_string(),
                name: crate::model::SYSTEM_TENANT.to_string(),
                quota: Default::default(),
                usage: Default::default(),
                created_at: at,
                updated_at: at,
                version: 1,
            };
            put(tx, &keys::tenant(&system.id), &system)?;
            put(tx, &keys::tenant_name(&system.name), &system.id)?;
            create_user(tx, admin.clone())
        }
        Command::RegisterNode { member } => {
            if let Some(id) = get::<u64>(tx, &keys::node_name(&member.name))? {
                // A node that re-registers under its name (a retried join) gets its record back
                // unless it was removed.
                let Some(mut node) = get::<NodeRecord>(tx, &keys::node(id))? else {
                    return Ok(reject(RejectCode::NotFound, format!("node {id} is missing")));
                };
                if node.removed {
                    return Ok(reject(
                        RejectCode::AlreadyExists,
                        format!("node name {:?} belonged to a removed node", member.name),
                    ));
                }
                node.member = member.clone();
                node.updated_at = at;
                put(tx, &keys::node(id), &node)?;
                return Ok(Response::Node(node));
            }
            let id = get::<u64>(tx, keys::NEXT_NODE_ID)?.unwrap_or(1);
            put(tx, keys::NEXT_NODE_ID, &(id + 1))?;
            let node = NodeRecord {
                id,
                member: member.clone(),
                state: NodeState::Up,
                schedulable: true,
                labels: Default::default(),
                joined_at: at,
                updated_at: at,
                removed: false,
            };
            put(tx, &keys::node(id), &node)?;
            put(tx, &keys::node_name(&member.name), &id)?;
            Ok(Response::Node(node))
        }
        Command::RemoveNode { id } => update_node(tx, *id, at, |n| n.removed = true),
        Command::SetNodeState { id, state } => update_node(tx, *id, at, |n| n.state = *state),
        Command::SetNodeSchedulable { id, schedulable } => {
            update_node(tx, *id, at, |n| n.schedulable = *schedulable)
        }
        Command::RotateJwtKey { key, keep } => {
            let Some(mut secrets) = get::<ClusterSecrets>(tx, keys::SECRETS)? else {
                return Ok(reject(RejectCode::NotFound, "cluster is not initialised"));
            };
            secrets.jwt_keys.insert(0, key.clone());
            secrets.jwt_keys.truncate((*keep).max(1) as usize);
            put(tx, keys::SECRETS, &secrets)?;
            Ok(Response::Ok)
        }
        Command::CreateTenant { tenant } => {
            if tenant.name.is_empty() || tenant.id.is_empty() {
                return Ok(reject(RejectCode::Invalid, "tenant id and name must not be empty"));
            }
            if tx.get(&keys::tenant_name(&tenant.name))?.is_some() {
                return Ok(reject(
                    RejectCode::AlreadyExists,
                    format!("tenant {:?} already exists", tenant.name),
                ));
            }
            if tx.get(&keys::tenant(&tenant.id))?.is_some() {
                return Ok(reject(RejectCode::AlreadyExists, "tenant id is taken"));
            }
            let mut tenant = tenant.clone();
            tenant.usage = Default::default();
            tenant.created_at = at;
            tenant.updated_at = at;
            tenant.version = 1;
            put(tx, &keys::tenant(&tenant.id), &tenant)?;
            put(tx, &keys::tenant_name(&tenant.name), &tenant.id)?;
            Ok(Response::Tenant(tenant))
        }
        Command::UpdateTenantQuota {
            id,
            quota,
            expected_version,
        } => {
            let Some(mut tenant) = get::<Tenant>(tx, &keys::tenant(id))? else {
                return Ok(reject(RejectCode::NotFound, format!("tenant {id} not found")));
            };
            if let Some(v) = expected_version {
                if *v != tenant.version {
                    return Ok(reject(
                        RejectCode::VersionMismatch,
                        format!("tenant is at version {}, not {v}", tenant.version),
                    ));
                }
            }
            tenant.quota = quota.clone();
            tenant.updated_at = at;
            tenant.version += 1;
            put(tx, &keys::tenant(id), &tenant)?;
            Ok(Response::Tenant(tenant))
        }
        Command::DeleteTenant {
            id,
            expected_version,
        } => {
            let Some(tenant) = get::<Tenant>(tx, &keys::tenant(id))? else {
                return Ok(reject(RejectCode::NotFound, format!("tenant {id} not found")));
            };
            if id == crate::model::SYSTEM_TENANT {
                return Ok(reject(RejectCode::Invalid, "the system tenant cannot be deleted"));
            }
            if let Some(v) = expected_version {
                if *v != tenant.version {
                    return Ok(reject(
                        RejectCode::VersionMismatch,
                        format!("tenant is at version {}, not {v}", tenant.version),
                    ));
                }
            }
            let users = get::<u64>(tx, &keys::tenant_user_count(id))?.unwrap_or(0);
            if tenant.usage.vms > 0 || users > 0 {
                return Ok(reject(
                    RejectCode::NotEmpty,
                    format!("tenant still has {} VMs and {users} users", tenant.usage.vms),
                ));
            }
            tx.remove(&keys::tenant(id))?;
            tx.remove(&keys::tenant_name(&tenant.name))?;
            Ok(Response::Tenant(tenant))
        }
        Command::CreateUser { user } => create_user(tx, user.clone()),
        Command::UpdateUser {
            id,
            password_hash,
            role,
            expected_version,
        } => {
            let Some(mut user) = get::<User>(tx, &keys::user(id))? else {
                return Ok(reject(RejectCode::NotFound, format!("user {id} not found")));
            };
            if let Some(v) = expected_version {
                if *v != user.version {
                    return Ok(reject(
                        RejectCode::VersionMismatch,
                        format!("user is at version {}, not {v}", user.version),
                    ));
                }
            }
            if let Some(hash) = password_hash {
                user.password_hash = hash.clone();
            }
            if let Some(role) = role {
                user.role = *role;
            }
            user.updated_at = at;
            user.version += 1;
            put(tx, &keys::user(id), &user)?;
            Ok(Response::User(user))
        }
        Command::DeleteUser { id } => {
            let Some(user) = get::<User>(tx, &keys::user(id))? else {
                return Ok(reject(RejectCode::NotFound, format!("user {id} not found")));
            };
            tx.remove(&keys::user(id))?;
            tx.remove(&keys::user_name(&user.username))?;
            let count = get::<u64>(tx, &keys::tenant_user_count(&user.tenant))?.unwrap_or(1);
            put(tx, &keys::tenant_user_count(&user.tenant), &count.saturating_sub(1))?;
            Ok(Response::User(user))
        }
    }
}

fn create_user(tx: &dyn StateTx, mut user: User) -> Result<Response, ApplyError> {
    if user.username.is_empty() || user.id.is_empty() {
        return Ok(reject(RejectCode::Invalid, "user id and username must not be empty"));
    }
    if tx.get(&keys::tenant(&user.tenant))?.is_none() {
        return Ok(reject(
            RejectCode::NotFound,
            format!("tenant {} not found", user.tenant),
        ));
    }
    if tx.get(&keys::user_name(&user.username))?.is_some() {
        return Ok(reject(
            RejectCode::AlreadyExists,
            format!("user {:?} already exists", user.username),
        ));
    }
    user.version = 1;
    put(tx, &keys::user(&user.id), &user)?;
    put(tx, &keys::user_name(&user.username), &user.id)?;
    let count = get::<u64>(tx, &keys::tenant_user_count(&user.tenant))?.unwrap_or(0);
    put(tx, &keys::tenant_user_count(&user.tenant), &(count + 1))?;
    Ok(Response::User(user))
}

fn update_node(
    tx: &dyn StateTx,
    id: u64,
    at: u64,
    change: impl FnOnce(&mut NodeRecord),
) -> Result<Response, ApplyError> {
    let Some(mut node) = get::<NodeRecord>(tx, &keys::node(id))? else {
        return Ok(reject(RejectCode::NotFound, format!("node {id} not found")));
    };
    change(&mut node);
    node.updated_at = at;
    put(tx, &keys::node(id), &node)?;
    Ok(Response::Node(node))
}

/// The hash that links an audit entry to its predecessor.
pub fn audit_hash(e: &AuditEntry) -> String {
    let mut h = Sha256::new();
    for part in [
        e.prev_hash.as_bytes(),
        &e.seq.to_be_bytes(),
        &e.at.to_be_bytes(),
        e.actor.as_bytes(),
        e.tenant.as_bytes(),
        e.action.as_bytes(),
        e.target.as_bytes(),
        e.result.as_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    hex::encode(h.finalize())
}

fn record_audit(
    tx: &dyn StateTx,
    req: &Request,
    response: &Response,
    log_index: u64,
) -> Result<(), ApplyError> {
    if matches!(req.command, Command::Noop) {
        return Ok(());
    }
    let (seq, prev_hash) = get::<(u64, String)>(tx, keys::AUDIT_HEAD)?.unwrap_or((0, String::new()));
    let seq = seq + 1;
    let mut entry = match &req.command {
        Command::Audit { entry } => entry.clone(),
        other => AuditEntry {
            seq,
            at: req.at,
            actor: req.actor.clone(),
            tenant: target_tenant(other, response),
            action: other.name().to_string(),
            target: target_of(other, response),
            result: match response {
                Response::Rejected { code, .. } => format!("rejected:{}", code.as_str()),
                _ => format!("ok@{log_index}"),
            },
            prev_hash: String::new(),
            hash: String::new(),
        },
    };
    entry.seq = seq;
    entry.prev_hash = prev_hash;
    entry.hash = audit_hash(&entry);
    put(tx, &keys::audit(seq), &entry)?;
    put(tx, keys::AUDIT_HEAD, &(seq, entry.hash.clone()))?;
    Ok(())
}

fn target_tenant(cmd: &Command, response: &Response) -> String {
    match (cmd, response) {
        (Command::CreateTenant { tenant }, _) => tenant.id.clone(),
        (Command::UpdateTenantQuota { id, .. } | Command::DeleteTenant { id, .. }, _) => id.clone(),
        (Command::CreateUser { user }, _) => user.tenant.clone(),
        (_, Response::User(u)) => u.tenant.clone(),
        _ => crate::model::SYSTEM_TENANT.to_string(),
    }
}

fn target_of(cmd: &Command, response: &Response) -> String {
    match (cmd, response) {
        (Command::RegisterNode { member }, _) => format!("node/{}", member.name),
        (
            Command::RemoveNode { id }
            | Command::SetNodeState { id, .. }
            | Command::SetNodeSchedulable { id, .. },
            _,
        ) => format!("node/{id}"),
        (Command::CreateTenant { tenant }, _) => format!("tenant/{}", tenant.id),
        (Command::UpdateTenantQuota { id, .. } | Command::DeleteTenant { id, .. }, _) => {
            format!("tenant/{id}")
        }
        (Command::CreateUser { user }, _) => format!("user/{}", user.id),
        (Command::UpdateUser { id, .. } | Command::DeleteUser { id }, _) => format!("user/{id}"),
        _ => "cluster".to_string(),
    }
}

/// An in-memory [`StateTx`] for tests of `apply` and of code built on it.
#[derive(Default)]
pub struct MemState {
    pub map: std::cell::RefCell<std::collections::BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl StateTx for MemState {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ApplyError> {
        Ok(self.map.borrow().get(key).cloned())
    }
    fn put(&self, key: &[u8], value: Vec<u8>) -> Result<(), ApplyError> {
        self.map.borrow_mut().insert(key.to_vec(), value);
        Ok(())
    }
    fn remove(&self, key: &[u8]) -> Result<(), ApplyError> {
        self.map.borrow_mut().remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Quota, Role, Tenant};

    fn tenant(id: &str, name: &str) -> Tenant {
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

    fn user(id: &str, name: &str, tenant: &str) -> User {
        User {
            id: id.into(),
            username: name.into(),
            password_hash: "x".into(),
            tenant: tenant.into(),
            role: Role::Viewer,
            created_at: 0,
            updated_at: 0,
            version: 0,
        }
    }

    fn run(st: &MemState, cmd: Command) -> Response {
        apply(st, &Request::new(5, "tester", cmd), 1).unwrap()
    }

    #[test]
    fn tenant_names_are_unique_and_versions_checked() {
        let st = MemState::default();
        assert!(matches!(
            run(&st, Command::CreateTenant { tenant: tenant("t1", "acme") }),
            Response::Tenant(t) if t.version == 1 && t.created_at == 5
        ));
        assert!(matches!(
            run(&st, Command::CreateTenant { tenant: tenant("t2", "acme") }),
            Response::Rejected { code: RejectCode::AlreadyExists, .. }
        ));
        let stale = Command::UpdateTenantQuota {
            id: "t1".into(),
            quota: Quota::default(),
            expected_version: Some(9),
        };
        assert!(matches!(
            run(&st, stale),
            Response::Rejected { code: RejectCode::VersionMismatch, .. }
        ));
    }

    #[test]
    fn tenant_with_users_cannot_be_deleted() {
        let st = MemState::default();
        run(&st, Command::CreateTenant { tenant: tenant("t1", "acme") });
        run(&st, Command::CreateUser { user: user("u1", "ann", "t1") });
        let del = || Command::DeleteTenant { id: "t1".into(), expected_version: None };
        assert!(matches!(
            run(&st, del()),
            Response::Rejected { code: RejectCode::NotEmpty, .. }
        ));
        run(&st, Command::DeleteUser { id: "u1".into() });
        assert!(matches!(run(&st, del()), Response::Tenant(_)));
        // The name is free again.
        assert!(matches!(
            run(&st, Command::CreateTenant { tenant: tenant("t3", "acme") }),
            Response::Tenant(_)
        ));
    }

    #[test]
    fn node_ids_are_allocated_in_order_and_reregistration_keeps_the_id() {
        let st = MemState::default();
        let m = |n: &str| crate::model::Member { name: n.into(), api_addr: "a".into(), peer_addr: "p".into() };
        let id = |r: Response| match r {
            Response::Node(n) => n.id,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(id(run(&st, Command::RegisterNode { member: m("a") })), 1);
        assert_eq!(id(run(&st, Command::RegisterNode { member: m("b") })), 2);
        assert_eq!(id(run(&st, Command::RegisterNode { member: m("a") })), 1);
        run(&st, Command::RemoveNode { id: 1 });
        assert!(matches!(
            run(&st, Command::RegisterNode { member: m("a") }),
            Response::Rejected { .. }
        ));
    }

    #[test]
    fn idempotent_requests_apply_once() {
        let st = MemState::default();
        let mut req = Request::new(1, "u", Command::CreateTenant { tenant: tenant("t1", "acme") });
        req.idempotency_key = Some("k1".into());
        let first = apply(&st, &req, 1).unwrap();
        let mut retry = req.clone();
        retry.command = Command::CreateTenant { tenant: tenant("t9", "acme") };
        let second = apply(&st, &retry, 2).unwrap();
        assert_eq!(first, second);
    }

    #[test]
    fn audit_entries_are_chained() {
        let st = MemState::default();
        run(&st, Command::CreateTenant { tenant: tenant("t1", "acme") });
        run(&st, Command::CreateTenant { tenant: tenant("t2", "acme") });
        let e1: AuditEntry = get(&st, &keys::audit(1)).unwrap().unwrap();
        let e2: AuditEntry = get(&st, &keys::audit(2)).unwrap().unwrap();
        assert_eq!(e2.prev_hash, e1.hash);
        assert_eq!(audit_hash(&e2), e2.hash);
        assert!(e2.result.starts_with("rejected:"));
        let mut forged = e1.clone();
        forged.actor = "someone-else".into();
        assert_ne!(audit_hash(&forged), e1.hash);
    }
}
