//! The layout of the state key space: one ordered map, with a short prefix per kind of object.
//!
//! Numeric parts are zero-padded decimals so that byte order equals numeric order in scans.

pub const SECRETS: &[u8] = b"c/secrets";
pub const NEXT_NODE_ID: &[u8] = b"c/next_node_id";
pub const AUDIT_HEAD: &[u8] = b"c/audit_head";

pub const TENANT_PREFIX: &[u8] = b"t/";
pub const USER_PREFIX: &[u8] = b"u/";
pub const NODE_PREFIX: &[u8] = b"n/";
pub const AUDIT_PREFIX: &[u8] = b"a/";
pub const VM_PREFIX: &[u8] = b"v/";
pub const OPERATION_PREFIX: &[u8] = b"o/";

fn join(prefix: &str, rest: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + rest.len());
    k.extend_from_slice(prefix.as_bytes());
    k.extend_from_slice(rest.as_bytes());
    k
}

pub fn tenant(id: &str) -> Vec<u8> {
    join("t/", id)
}
pub fn tenant_name(name: &str) -> Vec<u8> {
    join("tn/", name)
}
pub fn tenant_user_count(id: &str) -> Vec<u8> {
    join("tu/", id)
}
pub fn user(id: &str) -> Vec<u8> {
    join("u/", id)
}
pub fn user_name(name: &str) -> Vec<u8> {
    join("un/", name)
}
pub fn node(id: u64) -> Vec<u8> {
    join("n/", &format!("{id:020}"))
}
pub fn node_name(name: &str) -> Vec<u8> {
    join("nn/", name)
}
pub fn vm(id: &str) -> Vec<u8> {
    join("v/", id)
}
/// VM names are unique within a tenant.
pub fn vm_name(tenant: &str, name: &str) -> Vec<u8> {
    join("vn/", &format!("{}/{tenant}/{name}", tenant.len()))
}
pub fn operation(id: &str) -> Vec<u8> {
    join("o/", id)
}
pub fn audit(seq: u64) -> Vec<u8> {
    join("a/", &format!("{seq:020}"))
}
/// Idempotency keys are scoped by actor so one client cannot replay another's outcome.
pub fn idempotency(actor: &str, key: &str) -> Vec<u8> {
    join("i/", &format!("{}/{key}", actor.len()))
        .into_iter()
        .chain(actor.bytes())
        .collect()
}

pub const API_KEY_PREFIX: &[u8] = b"k/";

pub fn api_key(id: &str) -> Vec<u8> {
    join("k/", id)
}
/// A revoked JWT id; the value is the token's expiry (seconds since the epoch).
pub fn revoked_jti(jti: &str) -> Vec<u8> {
    join("jr/", jti)
}
pub fn user_security(id: &str) -> Vec<u8> {
    join("us/", id)
}

pub const NODE_TRAITS_PREFIX: &[u8] = b"nf/";

/// What node `id` advertised about itself (release, features, witness).
pub fn node_traits(id: u64) -> Vec<u8> {
    join("nf/", &format!("{id:020}"))
}

/// Migrations (`g/` is the migration controller's): every migration by id (its operation id).
pub const MIGRATION_PREFIX: &[u8] = b"g/m/";

pub fn migration(id: &str) -> Vec<u8> {
    join("g/m/", id)
}
/// The migration in progress of a VM, if any (value: the migration id).
pub fn active_migration(vm_id: &str) -> Vec<u8> {
    join("g/v/", vm_id)
}

/// The scheduler's explanation of a VM's last placement decision.
pub const PLACEMENT_PREFIX: &[u8] = b"p/";

pub fn placement(vm_id: &str) -> Vec<u8> {
    join("p/", vm_id)
}
