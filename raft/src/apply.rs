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
use crate::model::{
    ApiKey, AuditEntry, ClusterSecrets, DesiredState, NodeRecord, NodeState, NodeTraits, Operation,
    OperationState, Tenant, User, UserSecurity, Vm, VmState,
};
use crate::placement::{PlacementEntry, PlacementOutcome};

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

pub(crate) fn get<T>(tx: &dyn StateTx, key: &[u8]) -> Result<Option<T>, ApplyError>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    match tx.get(key)? {
        Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
        None => Ok(None),
    }
}

pub(crate) fn put<T>(tx: &dyn StateTx, key: &[u8], value: &T) -> Result<(), ApplyError>
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

pub(crate) fn reject(code: RejectCode, message: impl Into<String>) -> Response {
    Response::Rejected {
        code,
        message: message.into(),
    }
}

/// Applies one request. `log_index` is the index of the entry that carries it.
pub fn apply(tx: &dyn StateTx, req: &Request, log_index: u64) -> Result<Response, ApplyError> {
    // Every change to a published object is also recorded in the federation change feed.
    let recording = crate::federation::Recording::new(tx);
    let response = apply_recorded(&recording, req, log_index)?;
    recording.record(log_index)?;
    Ok(response)
}

fn apply_recorded(tx: &dyn StateTx, req: &Request, log_index: u64) -> Result<Response, ApplyError> {
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
    if let Some(response) = crate::image::apply(tx, &req.command, at)? {
        return Ok(response);
    }
    if let Some(response) = crate::federation::apply(tx, &req.command, at)? {
        return Ok(response);
    }
    match &req.command {
        Command::Noop => Ok(Response::Ok),
        Command::Audit { .. } => Ok(Response::Ok),
        Command::InitCluster { secrets, admin } => {
            if tx.get(keys::SECRETS)?.is_some() {
                return Ok(reject(
                    RejectCode::AlreadyInitialized,
                    "cluster is already initialised",
                ));
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
                    return Ok(reject(
                        RejectCode::NotFound,
                        format!("node {id} is missing"),
                    ));
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
                capacity: None,
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
                return Ok(reject(
                    RejectCode::Invalid,
                    "tenant id and name must not be empty",
                ));
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
                return Ok(reject(
                    RejectCode::NotFound,
                    format!("tenant {id} not found"),
                ));
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
                return Ok(reject(
                    RejectCode::NotFound,
                    format!("tenant {id} not found"),
                ));
            };
            if id == crate::model::SYSTEM_TENANT {
                return Ok(reject(
                    RejectCode::Invalid,
                    "the system tenant cannot be deleted",
                ));
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
                    format!(
                        "tenant still has {} VMs and {users} users",
                        tenant.usage.vms
                    ),
                ));
            }
            tx.remove(&keys::tenant(id))?;
            tx.remove(&keys::tenant_name(&tenant.name))?;
            Ok(Response::Tenant(tenant))
        }
        Command::CreateUser { user } => create_user(tx, user.clone()),
        Command::CreateVm { vm, operation } => create_vm(tx, vm, operation, at),
        Command::SetVmDesired {
            id,
            desired,
            operation,
            expected_version,
        } => {
            let mut vm = match load_vm(tx, id, *expected_version)? {
                Ok(vm) => vm,
                Err(r) => return Ok(r),
            };
            if vm.state == VmState::Deleting {
                return Ok(reject(RejectCode::Invalid, "the VM is being deleted"));
            }
            vm.desired_state = *desired;
            vm.updated_at = at;
            vm.version += 1;
            put(tx, &keys::vm(id), &vm)?;
            let op = new_operation(tx, operation, at)?;
            Ok(Response::Vm {
                vm,
                operation: Some(op),
            })
        }
        Command::DeleteVm {
            id,
            operation,
            expected_version,
        } => {
            let mut vm = match load_vm(tx, id, *expected_version)? {
                Ok(vm) => vm,
                Err(r) => return Ok(r),
            };
            if vm.state != VmState::Deleting {
                release_usage(tx, &vm)?;
            }
            vm.state = VmState::Deleting;
            vm.desired_state = DesiredState::Stopped;
            vm.updated_at = at;
            vm.version += 1;
            let op = new_operation(tx, operation, at)?;
            if vm.node.is_none() {
                // Never placed: nothing runs anywhere, so the record can go at once.
                tx.remove(&keys::vm(id))?;
                tx.remove(&keys::vm_name(&vm.tenant, &vm.name))?;
                let mut done = op.clone();
                done.state = OperationState::Succeeded;
                put(tx, &keys::operation(&done.id), &done)?;
                return Ok(Response::Vm {
                    vm,
                    operation: Some(done),
                });
            }
            put(tx, &keys::vm(id), &vm)?;
            Ok(Response::Vm {
                vm,
                operation: Some(op),
            })
        }
        Command::PlaceVm {
            id,
            node,
            expected_version,
        } => {
            let mut vm = match load_vm(tx, id, *expected_version)? {
                Ok(vm) => vm,
                Err(r) => return Ok(r),
            };
            // A guest between hosts is the migration's until it is settled (done or rolled
            // back); a re-placement now would issue the epoch the migrated domain carries.
            if crate::migration::in_flight(tx, id)? {
                return Ok(reject(
                    RejectCode::Invalid,
                    "the VM is migrating; it can be placed once the migration is settled",
                ));
            }
            if let Some(n) = node {
                match get::<NodeRecord>(tx, &keys::node(*n))? {
                    Some(rec) if !rec.removed => {}
                    _ => return Ok(reject(RejectCode::NotFound, format!("node {n} not found"))),
                }
            }
            vm.node = *node;
            vm.epoch += 1;
            if vm.state != VmState::Deleting {
                vm.state = if node.is_some() {
                    VmState::Scheduled
                } else {
                    VmState::Pending
                };
            }
            vm.updated_at = at;
            vm.version += 1;
            put(tx, &keys::vm(id), &vm)?;
            Ok(Response::Vm {
                vm,
                operation: None,
            })
        }
        Command::ReportVm {
            id,
            node,
            epoch,
            state,
            error: _,
        } => {
            let Some(mut vm) = get::<Vm>(tx, &keys::vm(id))? else {
                return Ok(reject(RejectCode::NotFound, format!("vm {id} not found")));
            };
            // Fencing: only the node the current epoch was issued to may report.
            if *epoch != vm.epoch || vm.node != Some(*node) {
                return Ok(reject(
                    RejectCode::StaleEpoch,
                    format!(
                        "report for epoch {epoch} from node {node}; VM is at epoch {} on {:?}",
                        vm.epoch, vm.node
                    ),
                ));
            }
            if vm.state == VmState::Deleting || vm.state == *state {
                return Ok(Response::Vm {
                    vm,
                    operation: None,
                });
            }
            vm.state = *state;
            vm.updated_at = at;
            vm.version += 1;
            put(tx, &keys::vm(id), &vm)?;
            Ok(Response::Vm {
                vm,
                operation: None,
            })
        }
        Command::PurgeVm { id, epoch } => {
            let Some(vm) = get::<Vm>(tx, &keys::vm(id))? else {
                return Ok(Response::Ok);
            };
            if vm.state != VmState::Deleting || vm.epoch != *epoch {
                return Ok(reject(
                    RejectCode::StaleEpoch,
                    "the VM is not being deleted at this epoch",
                ));
            }
            tx.remove(&keys::vm(id))?;
            tx.remove(&keys::vm_name(&vm.tenant, &vm.name))?;
            tx.remove(&keys::placement(id))?;
            Ok(Response::Ok)
        }
        Command::FinishOperation { id, state, error } => {
            let Some(mut op) = get::<Operation>(tx, &keys::operation(id))? else {
                return Ok(reject(
                    RejectCode::NotFound,
                    format!("operation {id} not found"),
                ));
            };
            if matches!(op.state, OperationState::Succeeded | OperationState::Failed) {
                return Ok(Response::Operation(op));
            }
            op.state = *state;
            op.error = error.clone();
            op.updated_at = at;
            put(tx, &keys::operation(id), &op)?;
            Ok(Response::Operation(op))
        }
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
            tx.remove(&keys::user_security(id))?;
            tx.remove(&keys::user_name(&user.username))?;
            let count = get::<u64>(tx, &keys::tenant_user_count(&user.tenant))?.unwrap_or(1);
            put(
                tx,
                &keys::tenant_user_count(&user.tenant),
                &count.saturating_sub(1),
            )?;
            Ok(Response::User(user))
        }
        Command::CreateApiKey { key } => {
            if key.id.is_empty() || key.name.is_empty() || key.secret_sha256.is_empty() {
                return Ok(reject(
                    RejectCode::Invalid,
                    "API key id, name and secret hash must not be empty",
                ));
            }
            let Some(owner) = get::<User>(tx, &keys::user(&key.owner))? else {
                return Ok(reject(
                    RejectCode::NotFound,
                    format!("user {} not found", key.owner),
                ));
            };
            // The scope is re-checked here against the owner as committed, so a key can never
            // carry more than its owner had when it was created.
            if key.role < owner.role || key.tenant != owner.tenant {
                return Ok(reject(
                    RejectCode::Invalid,
                    "an API key cannot exceed its owner's role or tenant",
                ));
            }
            if tx.get(&keys::api_key(&key.id))?.is_some() {
                return Ok(reject(RejectCode::AlreadyExists, "API key id is taken"));
            }
            let mut key = key.clone();
            key.created_at = at;
            key.revoked = false;
            put(tx, &keys::api_key(&key.id), &key)?;
            Ok(Response::ApiKey(key))
        }
        Command::RevokeApiKey { id } => {
            let Some(mut key) = get::<ApiKey>(tx, &keys::api_key(id))? else {
                return Ok(reject(
                    RejectCode::NotFound,
                    format!("API key {id} not found"),
                ));
            };
            key.revoked = true;
            put(tx, &keys::api_key(id), &key)?;
            Ok(Response::ApiKey(key))
        }
        Command::RevokeToken { jti, expires_at } => {
            if jti.is_empty() {
                return Ok(reject(RejectCode::Invalid, "token id must not be empty"));
            }
            put(tx, &keys::revoked_jti(jti), expires_at)?;
            Ok(Response::Ok)
        }
        Command::EnrollTotp { user_id, secret } => {
            if tx.get(&keys::user(user_id))?.is_none() {
                return Ok(reject(
                    RejectCode::NotFound,
                    format!("user {user_id} not found"),
                ));
            }
            if secret.len() < 16 {
                return Ok(reject(RejectCode::Invalid, "TOTP secret is too short"));
            }
            let mut sec =
                get::<UserSecurity>(tx, &keys::user_security(user_id))?.unwrap_or_default();
            if sec.totp_confirmed {
                return Ok(reject(
                    RejectCode::AlreadyExists,
                    "TOTP is already enrolled and confirmed",
                ));
            }
            sec.totp_secret = Some(secret.clone());
            put(tx, &keys::user_security(user_id), &sec)?;
            Ok(Response::Ok)
        }
        Command::ConfirmTotp { user_id, step } | Command::UseTotpStep { user_id, step } => {
            let confirm = matches!(req.command, Command::ConfirmTotp { .. });
            let Some(mut sec) = get::<UserSecurity>(tx, &keys::user_security(user_id))? else {
                return Ok(reject(
                    RejectCode::NotFound,
                    format!("user {user_id} has no TOTP enrolment"),
                ));
            };
            if sec.totp_secret.is_none() || (!confirm && !sec.totp_confirmed) {
                return Ok(reject(
                    RejectCode::NotFound,
                    format!("user {user_id} has no TOTP enrolment"),
                ));
            }
            // Replay protection: a code's step is accepted once, cluster-wide.
            if *step <= sec.totp_last_step {
                return Ok(reject(
                    RejectCode::Invalid,
                    "this TOTP code was already used",
                ));
            }
            sec.totp_last_step = *step;
            sec.totp_confirmed = true;
            put(tx, &keys::user_security(user_id), &sec)?;
            Ok(Response::Ok)
        }
        Command::SetRequireTotp { user_id, require } => {
            let Some(user) = get::<User>(tx, &keys::user(user_id))? else {
                return Ok(reject(
                    RejectCode::NotFound,
                    format!("user {user_id} not found"),
                ));
            };
            let mut sec =
                get::<UserSecurity>(tx, &keys::user_security(user_id))?.unwrap_or_default();
            sec.require_totp = *require;
            put(tx, &keys::user_security(user_id), &sec)?;
            Ok(Response::User(user))
        }
        // Answered by `image::apply` above; listed so this match stays exhaustive.
        Command::CreateImage { .. } | Command::ImageStored { .. } | Command::DeleteImage { .. } => {
            Ok(reject(RejectCode::Invalid, "image command not handled"))
        }
        Command::InitSite { .. }
        | Command::CreateFederationToken { .. }
        | Command::LinkSite { .. }
        | Command::UnlinkSite { .. }
        | Command::ApplyCatalog { .. }
        | Command::SiteSyncFailed { .. } => Ok(reject(
            RejectCode::Invalid,
            "federation command not handled",
        )),
        Command::MarkVmUnknown {
            id,
            node,
            epoch,
            reason: _,
        } => {
            let Some(mut vm) = get::<Vm>(tx, &keys::vm(id))? else {
                return Ok(reject(RejectCode::NotFound, format!("vm {id} not found")));
            };
            // Like a report: only about the placement the leader saw, never a newer one.
            if *epoch != vm.epoch || vm.node != Some(*node) {
                return Ok(reject(
                    RejectCode::StaleEpoch,
                    format!("VM {id} is no longer on node {node} at epoch {epoch}"),
                ));
            }
            if vm.state != VmState::Deleting && vm.state != VmState::Unknown {
                vm.state = VmState::Unknown;
                vm.updated_at = at;
                vm.version += 1;
                put(tx, &keys::vm(id), &vm)?;
            }
            Ok(Response::Vm {
                vm,
                operation: None,
            })
        }
        Command::AdvertiseNode { id, traits } => {
            match get::<NodeRecord>(tx, &keys::node(*id))? {
                Some(n) if !n.removed => {}
                _ => {
                    return Ok(reject(
                        RejectCode::NotFound,
                        format!("node {id} is not a member"),
                    ))
                }
            }
            put::<NodeTraits>(tx, &keys::node_traits(*id), traits)?;
            Ok(Response::Ok)
        }
        Command::RequestMigration {
            migration,
            operation,
        } => crate::migration::apply_request(tx, migration, operation, at),
        Command::AdvanceMigration { id, from, to } => {
            crate::migration::apply_advance(tx, id, *from, to, at)
        }
        Command::ReportNodeCapacity { id, capacity } => {
            update_node(tx, *id, at, |n| n.capacity = Some(*capacity))
        }
        Command::PlaceBatch { placements } => {
            let mut outcomes = Vec::with_capacity(placements.len());
            for entry in placements {
                outcomes.push(place_one(tx, entry, at)?);
            }
            Ok(Response::Placements(outcomes))
        }
    }
}

/// One entry of a `PlaceBatch`: refused on its own when stale, so one VM changed meanwhile
/// (deleted, re-placed, edited) does not cost the rest of the batch.
fn place_one(
    tx: &dyn StateTx,
    entry: &PlacementEntry,
    at: u64,
) -> Result<PlacementOutcome, ApplyError> {
    let refused = |code: RejectCode, message: String| PlacementOutcome::Refused {
        vm: entry.vm.clone(),
        code,
        message,
    };
    let mut vm = match load_vm(tx, &entry.vm, Some(entry.expected_version))? {
        Ok(vm) => vm,
        Err(Response::Rejected { code, message }) => return Ok(refused(code, message)),
        Err(other) => {
            return Ok(refused(
                RejectCode::Invalid,
                format!("unexpected outcome {other:?}"),
            ))
        }
    };
    if vm.state == VmState::Deleting {
        return Ok(refused(
            RejectCode::Invalid,
            "the VM is being deleted".to_string(),
        ));
    }
    let Some(node) = entry.node else {
        put(tx, &keys::placement(&vm.id), &entry.explanation)?;
        return Ok(PlacementOutcome::NotPlaced { vm: vm.id });
    };
    match get::<NodeRecord>(tx, &keys::node(node))? {
        Some(rec) if !rec.removed => {}
        _ => {
            return Ok(refused(
                RejectCode::NotFound,
                format!("node {node} not found"),
            ))
        }
    }
    vm.node = Some(node);
    vm.epoch += 1;
    vm.state = VmState::Scheduled;
    vm.updated_at = at;
    vm.version += 1;
    put(tx, &keys::vm(&vm.id), &vm)?;
    put(tx, &keys::placement(&vm.id), &entry.explanation)?;
    Ok(PlacementOutcome::Placed {
        vm: vm.id,
        node,
        epoch: vm.epoch,
        version: vm.version,
    })
}

fn create_user(tx: &dyn StateTx, mut user: User) -> Result<Response, ApplyError> {
    if user.username.is_empty() || user.id.is_empty() {
        return Ok(reject(
            RejectCode::Invalid,
            "user id and username must not be empty",
        ));
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

fn load_vm(
    tx: &dyn StateTx,
    id: &str,
    expected_version: Option<u64>,
) -> Result<Result<Vm, Response>, ApplyError> {
    let Some(vm) = get::<Vm>(tx, &keys::vm(id))? else {
        return Ok(Err(reject(
            RejectCode::NotFound,
            format!("vm {id} not found"),
        )));
    };
    if let Some(v) = expected_version {
        if v != vm.version {
            return Ok(Err(reject(
                RejectCode::VersionMismatch,
                format!("vm is at version {}, not {v}", vm.version),
            )));
        }
    }
    Ok(Ok(vm))
}

pub(crate) fn new_operation(
    tx: &dyn StateTx,
    op: &Operation,
    at: u64,
) -> Result<Operation, ApplyError> {
    let mut op = op.clone();
    op.created_at = at;
    op.updated_at = at;
    put(tx, &keys::operation(&op.id), &op)?;
    Ok(op)
}

fn exceeds(limit: Option<u64>, used: u64, add: u64) -> bool {
    limit.is_some_and(|l| used.saturating_add(add) > l)
}

fn create_vm(tx: &dyn StateTx, vm: &Vm, op: &Operation, at: u64) -> Result<Response, ApplyError> {
    if vm.id.is_empty() || vm.name.is_empty() || vm.vcpus == 0 || vm.memory_mib == 0 {
        return Ok(reject(
            RejectCode::Invalid,
            "a VM needs an id, a name, vCPUs and memory",
        ));
    }
    let Some((mut tenant, foreign)) = crate::federation::tenant_for_usage(tx, &vm.tenant)? else {
        return Ok(reject(
            RejectCode::NotFound,
            format!("tenant {} not found", vm.tenant),
        ));
    };
    if tx.get(&keys::vm_name(&vm.tenant, &vm.name))?.is_some() {
        return Ok(reject(
            RejectCode::AlreadyExists,
            format!("a VM named {:?} already exists in this tenant", vm.name),
        ));
    }
    if tx.get(&keys::vm(&vm.id))?.is_some() {
        return Ok(reject(RejectCode::AlreadyExists, "VM id is taken"));
    }
    let q = &tenant.quota;
    let u = &tenant.usage;
    let over = [
        ("VMs", exceeds(q.max_vms, u.vms, 1)),
        ("vCPUs", exceeds(q.max_vcpus, u.vcpus, u64::from(vm.vcpus))),
        (
            "memory",
            exceeds(q.max_memory_mib, u.memory_mib, vm.memory_mib),
        ),
        ("disk", exceeds(q.max_disk_gib, u.disk_gib, vm.disk_gib)),
    ];
    if let Some((what, _)) = over.iter().find(|(_, o)| *o) {
        return Ok(reject(
            RejectCode::QuotaExceeded,
            format!("tenant {} would exceed its {what} quota", tenant.name),
        ));
    }
    tenant.usage.vms += 1;
    tenant.usage.vcpus += u64::from(vm.vcpus);
    tenant.usage.memory_mib += vm.memory_mib;
    tenant.usage.disk_gib += vm.disk_gib;
    if !foreign {
        tenant.version += 1;
        tenant.updated_at = at;
    }
    crate::federation::store_tenant_usage(tx, &tenant, foreign)?;
    let mut vm = vm.clone();
    vm.created_at = at;
    vm.updated_at = at;
    vm.version = 1;
    vm.epoch = if vm.node.is_some() { 1 } else { 0 };
    vm.state = if vm.node.is_some() {
        VmState::Scheduled
    } else {
        VmState::Pending
    };
    put(tx, &keys::vm(&vm.id), &vm)?;
    put(tx, &keys::vm_name(&vm.tenant, &vm.name), &vm.id)?;
    let op = new_operation(tx, op, at)?;
    Ok(Response::Vm {
        vm,
        operation: Some(op),
    })
}

fn release_usage(tx: &dyn StateTx, vm: &Vm) -> Result<(), ApplyError> {
    if let Some((mut tenant, foreign)) = crate::federation::tenant_for_usage(tx, &vm.tenant)? {
        tenant.usage.vms = tenant.usage.vms.saturating_sub(1);
        tenant.usage.vcpus = tenant.usage.vcpus.saturating_sub(u64::from(vm.vcpus));
        tenant.usage.memory_mib = tenant.usage.memory_mib.saturating_sub(vm.memory_mib);
        tenant.usage.disk_gib = tenant.usage.disk_gib.saturating_sub(vm.disk_gib);
        if !foreign {
            tenant.version += 1;
        }
        crate::federation::store_tenant_usage(tx, &tenant, foreign)?;
    }
    Ok(())
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
    // Agents' observations are frequent and carry no intent; they are not audited.
    // Routine traffic (agents' reports, catalog pulls) would drown the audit log.
    if matches!(
        req.command,
        Command::Noop
            | Command::ReportVm { .. }
            | Command::ApplyCatalog { .. }
            | Command::SiteSyncFailed { .. }
    ) {
        return Ok(());
    }
    let (seq, prev_hash) =
        get::<(u64, String)>(tx, keys::AUDIT_HEAD)?.unwrap_or((0, String::new()));
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
        (Command::CreateVm { vm, .. }, _) => vm.tenant.clone(),
        (Command::CreateApiKey { key }, _) => key.tenant.clone(),
        (Command::CreateImage { image }, _) => image.tenant.clone(),
        (_, Response::Image(i)) => i.tenant.clone(),
        (_, Response::ApiKey(k)) => k.tenant.clone(),
        (_, Response::User(u)) => u.tenant.clone(),
        (_, Response::Vm { vm, .. }) => vm.tenant.clone(),
        _ => crate::model::SYSTEM_TENANT.to_string(),
    }
}

fn target_of(cmd: &Command, response: &Response) -> String {
    match (cmd, response) {
        (Command::RegisterNode { member }, _) => format!("node/{}", member.name),
        (
            Command::RemoveNode { id }
            | Command::SetNodeState { id, .. }
            | Command::SetNodeSchedulable { id, .. }
            | Command::AdvertiseNode { id, .. }
            | Command::ReportNodeCapacity { id, .. },
            _,
        ) => format!("node/{id}"),
        (Command::CreateTenant { tenant }, _) => format!("tenant/{}", tenant.id),
        (Command::UpdateTenantQuota { id, .. } | Command::DeleteTenant { id, .. }, _) => {
            format!("tenant/{id}")
        }
        (Command::CreateUser { user }, _) => format!("user/{}", user.id),
        (Command::UpdateUser { id, .. } | Command::DeleteUser { id }, _) => format!("user/{id}"),
        (Command::CreateVm { vm, .. }, _) => format!("vm/{}", vm.id),
        (
            Command::SetVmDesired { id, .. }
            | Command::DeleteVm { id, .. }
            | Command::PlaceVm { id, .. }
            | Command::ReportVm { id, .. }
            | Command::PurgeVm { id, .. }
            | Command::MarkVmUnknown { id, .. },
            _,
        ) => format!("vm/{id}"),
        (Command::FinishOperation { id, .. }, _) => format!("operation/{id}"),
        (Command::CreateApiKey { key }, _) => format!("api-key/{}", key.id),
        (Command::RevokeApiKey { id }, _) => format!("api-key/{id}"),
        (Command::CreateImage { image }, _) => format!("image/{}", image.id),
        (Command::ImageStored { id, .. } | Command::DeleteImage { id }, _) => format!("image/{id}"),
        (
            Command::EnrollTotp { user_id, .. }
            | Command::ConfirmTotp { user_id, .. }
            | Command::UseTotpStep { user_id, .. }
            | Command::SetRequireTotp { user_id, .. },
            _,
        ) => format!("user/{user_id}"),
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
            run(
                &st,
                Command::CreateTenant {
                    tenant: tenant("t2", "acme")
                }
            ),
            Response::Rejected {
                code: RejectCode::AlreadyExists,
                ..
            }
        ));
        let stale = Command::UpdateTenantQuota {
            id: "t1".into(),
            quota: Quota::default(),
            expected_version: Some(9),
        };
        assert!(matches!(
            run(&st, stale),
            Response::Rejected {
                code: RejectCode::VersionMismatch,
                ..
            }
        ));
    }

    #[test]
    fn tenant_with_users_cannot_be_deleted() {
        let st = MemState::default();
        run(
            &st,
            Command::CreateTenant {
                tenant: tenant("t1", "acme"),
            },
        );
        run(
            &st,
            Command::CreateUser {
                user: user("u1", "ann", "t1"),
            },
        );
        let del = || Command::DeleteTenant {
            id: "t1".into(),
            expected_version: None,
        };
        assert!(matches!(
            run(&st, del()),
            Response::Rejected {
                code: RejectCode::NotEmpty,
                ..
            }
        ));
        run(&st, Command::DeleteUser { id: "u1".into() });
        assert!(matches!(run(&st, del()), Response::Tenant(_)));
        // The name is free again.
        assert!(matches!(
            run(
                &st,
                Command::CreateTenant {
                    tenant: tenant("t3", "acme")
                }
            ),
            Response::Tenant(_)
        ));
    }

    #[test]
    fn node_ids_are_allocated_in_order_and_reregistration_keeps_the_id() {
        let st = MemState::default();
        let m = |n: &str| crate::model::Member {
            name: n.into(),
            api_addr: "a".into(),
            peer_addr: "p".into(),
        };
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
        let mut req = Request::new(
            1,
            "u",
            Command::CreateTenant {
                tenant: tenant("t1", "acme"),
            },
        );
        req.idempotency_key = Some("k1".into());
        let first = apply(&st, &req, 1).unwrap();
        let mut retry = req.clone();
        retry.command = Command::CreateTenant {
            tenant: tenant("t9", "acme"),
        };
        let second = apply(&st, &retry, 2).unwrap();
        assert_eq!(first, second);
    }

    #[test]
    fn audit_entries_are_chained() {
        let st = MemState::default();
        run(
            &st,
            Command::CreateTenant {
                tenant: tenant("t1", "acme"),
            },
        );
        run(
            &st,
            Command::CreateTenant {
                tenant: tenant("t2", "acme"),
            },
        );
        let e1: AuditEntry = get(&st, &keys::audit(1)).unwrap().unwrap();
        let e2: AuditEntry = get(&st, &keys::audit(2)).unwrap().unwrap();
        assert_eq!(e2.prev_hash, e1.hash);
        assert_eq!(audit_hash(&e2), e2.hash);
        assert!(e2.result.starts_with("rejected:"));
        let mut forged = e1.clone();
        forged.actor = "someone-else".into();
        assert_ne!(audit_hash(&forged), e1.hash);
    }

    fn vm(id: &str, tenant: &str, node: Option<u64>) -> Vm {
        Vm {
            id: id.into(),
            name: id.into(),
            tenant: tenant.into(),
            vcpus: 2,
            memory_mib: 128,
            disk_gib: 1,
            image: None,
            labels: Default::default(),
            node,
            desired_state: DesiredState::Running,
            state: VmState::Pending,
            ha: false,
            anti_affinity_group: None,
            epoch: 0,
            created_at: 0,
            updated_at: 0,
            version: 0,
            placement: Default::default(),
        }
    }

    fn op(id: &str) -> Operation {
        Operation {
            id: id.into(),
            kind: "vm.create".into(),
            tenant: "t1".into(),
            target: String::new(),
            state: OperationState::Pending,
            error: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn quotas_are_enforced_and_released() {
        let st = MemState::default();
        let mut t = tenant("t1", "acme");
        t.quota.max_vms = Some(2);
        t.quota.max_vcpus = Some(5);
        run(&st, Command::CreateTenant { tenant: t });
        let create = |id: &str| Command::CreateVm {
            vm: vm(id, "t1", None),
            operation: op(&format!("op-{id}")),
        };
        assert!(matches!(run(&st, create("a")), Response::Vm { .. }));
        assert!(matches!(run(&st, create("b")), Response::Vm { .. }));
        assert!(matches!(
            run(&st, create("c")),
            Response::Rejected {
                code: RejectCode::QuotaExceeded,
                ..
            }
        ));
        run(
            &st,
            Command::DeleteVm {
                id: "a".into(),
                operation: op("op-del"),
                expected_version: None,
            },
        );
        // 2 vCPUs + 2 = 4 <= 5: fits again after the delete released its share.
        assert!(matches!(run(&st, create("c")), Response::Vm { .. }));
        let t: Tenant = get(&st, &keys::tenant("t1")).unwrap().unwrap();
        assert_eq!((t.usage.vms, t.usage.vcpus), (2, 4));
    }

    #[test]
    fn placement_bumps_the_epoch_and_stale_reports_are_refused() {
        let st = MemState::default();
        run(
            &st,
            Command::CreateTenant {
                tenant: tenant("t1", "acme"),
            },
        );
        let m = |n: &str| crate::model::Member {
            name: n.into(),
            api_addr: "a".into(),
            peer_addr: "p".into(),
        };
        run(&st, Command::RegisterNode { member: m("n1") });
        run(&st, Command::RegisterNode { member: m("n2") });
        run(
            &st,
            Command::CreateVm {
                vm: vm("a", "t1", Some(1)),
                operation: op("o1"),
            },
        );
        let place = run(
            &st,
            Command::PlaceVm {
                id: "a".into(),
                node: Some(2),
                expected_version: None,
            },
        );
        let Response::Vm { vm: placed, .. } = place else {
            panic!("{place:?}")
        };
        assert_eq!((placed.node, placed.epoch), (Some(2), 2));
        let old = Command::ReportVm {
            id: "a".into(),
            node: 1,
            epoch: 1,
            state: VmState::Running,
            error: None,
        };
        assert!(matches!(
            run(&st, old),
            Response::Rejected {
                code: RejectCode::StaleEpoch,
                ..
            }
        ));
        let fresh = Command::ReportVm {
            id: "a".into(),
            node: 2,
            epoch: 2,
            state: VmState::Running,
            error: None,
        };
        assert!(matches!(run(&st, fresh), Response::Vm { vm, .. } if vm.state == VmState::Running));
    }

    #[test]
    fn a_place_batch_refuses_stale_entries_one_by_one() {
        use crate::placement::{PlacementEntry, PlacementExplanation, PlacementOutcome};
        let st = MemState::default();
        run(
            &st,
            Command::CreateTenant {
                tenant: tenant("t1", "acme"),
            },
        );
        let member = crate::model::Member {
            name: "n1".into(),
            api_addr: "a".into(),
            peer_addr: "p".into(),
        };
        run(&st, Command::RegisterNode { member });
        for (id, o) in [("a", "o1"), ("b", "o2"), ("c", "o3")] {
            run(
                &st,
                Command::CreateVm {
                    vm: vm(id, "t1", None),
                    operation: op(o),
                },
            );
        }
        let entry = |vm: &str, node: Option<u64>, version: u64| PlacementEntry {
            vm: vm.into(),
            node,
            expected_version: version,
            explanation: PlacementExplanation {
                vm: vm.into(),
                chosen: node,
                ..Default::default()
            },
        };
        let batch = Command::PlaceBatch {
            placements: vec![
                entry("a", Some(1), 1),
                // Stale: "b" is at version 1.
                entry("b", Some(1), 7),
                entry("c", None, 1),
                entry("gone", Some(1), 1),
                // Node 9 does not exist.
                entry("c", Some(9), 1),
            ],
        };
        let Response::Placements(out) = run(&st, batch) else {
            panic!("not a batch outcome")
        };
        assert_eq!(
            out[0],
            PlacementOutcome::Placed {
                vm: "a".into(),
                node: 1,
                epoch: 1,
                version: 2
            }
        );
        assert!(matches!(
            &out[1],
            PlacementOutcome::Refused {
                code: RejectCode::VersionMismatch,
                ..
            }
        ));
        assert_eq!(out[2], PlacementOutcome::NotPlaced { vm: "c".into() });
        assert!(matches!(
            &out[3],
            PlacementOutcome::Refused {
                code: RejectCode::NotFound,
                ..
            }
        ));
        assert!(matches!(
            &out[4],
            PlacementOutcome::Refused {
                code: RejectCode::NotFound,
                ..
            }
        ));
        let a: Vm = get(&st, &keys::vm("a")).unwrap().unwrap();
        assert_eq!((a.node, a.epoch, a.state), (Some(1), 1, VmState::Scheduled));
        let b: Vm = get(&st, &keys::vm("b")).unwrap().unwrap();
        assert_eq!((b.node, b.version), (None, 1));
        let c: Vm = get(&st, &keys::vm("c")).unwrap().unwrap();
        assert_eq!(
            (c.node, c.version),
            (None, 1),
            "a VM that fits nowhere is left as it is"
        );
        let why: PlacementExplanation = get(&st, &keys::placement("c")).unwrap().unwrap();
        assert_eq!(why.chosen, None);
        assert!(st.get(&keys::placement("b")).unwrap().is_none());
    }

    #[test]
    fn nodes_report_their_capacity() {
        let st = MemState::default();
        let member = crate::model::Member {
            name: "n1".into(),
            api_addr: "a".into(),
            peer_addr: "p".into(),
        };
        run(&st, Command::RegisterNode { member });
        let cap = crate::placement::NodeCapacity {
            vcpus: 8,
            memory_mib: 16_384,
            disk_gib: Some(100),
        };
        assert!(matches!(
            run(&st, Command::ReportNodeCapacity { id: 1, capacity: cap }),
            Response::Node(n) if n.capacity == Some(cap)
        ));
        assert!(matches!(
            run(
                &st,
                Command::ReportNodeCapacity {
                    id: 2,
                    capacity: cap
                }
            ),
            Response::Rejected {
                code: RejectCode::NotFound,
                ..
            }
        ));
    }

    fn api_key(id: &str, owner: &str, tenant: &str, role: Role) -> ApiKey {
        ApiKey {
            id: id.into(),
            name: "ci".into(),
            owner: owner.into(),
            tenant: tenant.into(),
            role,
            secret_sha256: "ab".into(),
            created_at: 0,
            expires_at: None,
            revoked: false,
        }
    }

    #[test]
    fn api_keys_are_scoped_to_their_owner_and_revocable() {
        let st = MemState::default();
        run(
            &st,
            Command::CreateTenant {
                tenant: tenant("t1", "acme"),
            },
        );
        run(
            &st,
            Command::CreateUser {
                user: user("u1", "ann", "t1"),
            },
        );
        // A viewer cannot mint an operator key, nor a key of another tenant.
        for key in [
            api_key("k0", "u1", "t1", Role::Operator),
            api_key("k0", "u1", "t2", Role::Viewer),
        ] {
            assert!(matches!(
                run(&st, Command::CreateApiKey { key }),
                Response::Rejected {
                    code: RejectCode::Invalid,
                    ..
                }
            ));
        }
        let key = api_key("k1", "u1", "t1", Role::Viewer);
        assert!(matches!(
            run(&st, Command::CreateApiKey { key }),
            Response::ApiKey(k) if k.created_at == 5 && !k.revoked
        ));
        assert!(matches!(
            run(&st, Command::RevokeApiKey { id: "k1".into() }),
            Response::ApiKey(k) if k.revoked
        ));
        let stored: ApiKey = get(&st, &keys::api_key("k1")).unwrap().unwrap();
        assert!(stored.revoked);
    }

    #[test]
    fn totp_steps_are_accepted_once_and_confirmation_is_needed_before_use() {
        let st = MemState::default();
        run(
            &st,
            Command::CreateTenant {
                tenant: tenant("t1", "acme"),
            },
        );
        run(
            &st,
            Command::CreateUser {
                user: user("u1", "ann", "t1"),
            },
        );
        let enroll = || Command::EnrollTotp {
            user_id: "u1".into(),
            secret: vec![7; 20],
        };
        assert_eq!(run(&st, enroll()), Response::Ok);
        let use_step = |step| Command::UseTotpStep {
            user_id: "u1".into(),
            step,
        };
        assert!(matches!(
            run(&st, use_step(10)),
            Response::Rejected {
                code: RejectCode::NotFound,
                ..
            }
        ));
        assert_eq!(
            run(
                &st,
                Command::ConfirmTotp {
                    user_id: "u1".into(),
                    step: 10
                }
            ),
            Response::Ok
        );
        assert!(matches!(
            run(&st, use_step(10)),
            Response::Rejected {
                code: RejectCode::Invalid,
                ..
            }
        ));
        assert_eq!(run(&st, use_step(11)), Response::Ok);
        // Once confirmed, enrolment cannot silently replace the secret.
        assert!(matches!(
            run(&st, enroll()),
            Response::Rejected {
                code: RejectCode::AlreadyExists,
                ..
            }
        ));
        run(
            &st,
            Command::SetRequireTotp {
                user_id: "u1".into(),
                require: true,
            },
        );
        let sec: UserSecurity = get(&st, &keys::user_security("u1")).unwrap().unwrap();
        assert!(sec.require_totp && sec.totp_confirmed && sec.totp_last_step == 11);
        // Deleting the user removes its second factor too.
        run(&st, Command::DeleteUser { id: "u1".into() });
        assert!(st.get(&keys::user_security("u1")).unwrap().is_none());
    }

    #[test]
    fn a_vm_of_a_down_node_is_marked_unknown_only_at_its_current_placement() {
        let st = MemState::default();
        run(
            &st,
            Command::CreateTenant {
                tenant: tenant("t1", "acme"),
            },
        );
        let m = |n: &str| crate::model::Member {
            name: n.into(),
            api_addr: "a".into(),
            peer_addr: "p".into(),
        };
        run(&st, Command::RegisterNode { member: m("n1") });
        run(
            &st,
            Command::CreateVm {
                vm: vm("a", "t1", Some(1)),
                operation: op("o1"),
            },
        );
        let current: Vm = get(&st, &keys::vm("a")).unwrap().unwrap();
        let mark = |node, epoch| Command::MarkVmUnknown {
            id: "a".into(),
            node,
            epoch,
            reason: "node down".into(),
        };
        for (node, epoch) in [(2, current.epoch), (1, current.epoch + 1)] {
            assert!(matches!(
                run(&st, mark(node, epoch)),
                Response::Rejected {
                    code: RejectCode::StaleEpoch,
                    ..
                }
            ));
        }
        let Response::Vm { vm: marked, .. } = run(&st, mark(1, current.epoch)) else {
            panic!("not marked")
        };
        assert_eq!(marked.state, VmState::Unknown);
        assert_eq!(marked.version, current.version + 1);
        // The node's agent, back, reports what it sees and the state is known again.
        let back = run(
            &st,
            Command::ReportVm {
                id: "a".into(),
                node: 1,
                epoch: current.epoch,
                state: VmState::Running,
                error: None,
            },
        );
        assert!(matches!(back, Response::Vm { vm, .. } if vm.state == VmState::Running));
    }

    #[test]
    fn revoked_tokens_are_recorded_until_their_expiry() {
        let st = MemState::default();
        run(
            &st,
            Command::RevokeToken {
                jti: "j1".into(),
                expires_at: 99,
            },
        );
        let exp: u64 = get(&st, &keys::revoked_jti("j1")).unwrap().unwrap();
        assert_eq!(exp, 99);
    }

    #[test]
    fn only_members_advertise_their_traits() {
        let st = MemState::default();
        let traits = crate::model::NodeTraits {
            release: "0.1.0".into(),
            features: vec!["noop".into()],
            witness: true,
            federation_addr: None,
        };
        let advertise = || Command::AdvertiseNode {
            id: 1,
            traits: traits.clone(),
        };
        assert!(matches!(
            run(&st, advertise()),
            Response::Rejected {
                code: RejectCode::NotFound,
                ..
            }
        ));
        run(
            &st,
            Command::RegisterNode {
                member: crate::model::Member {
                    name: "n1".into(),
                    api_addr: "a".into(),
                    peer_addr: "p".into(),
                },
            },
        );
        assert_eq!(run(&st, advertise()), Response::Ok);
        let stored: crate::model::NodeTraits = get(&st, &keys::node_traits(1)).unwrap().unwrap();
        assert_eq!(stored, traits);
    }

    #[test]
    fn every_known_command_name_is_listed_once() {
        let known = crate::command::known_commands();
        assert!(known.contains(&Command::Noop.name()));
        assert!(known.contains(&"node.advertise"));
        let mut dedup = known.clone();
        dedup.dedup();
        assert_eq!(dedup, known);
    }
}
