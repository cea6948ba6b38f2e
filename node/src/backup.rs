//! `novacron backup create` (a checksummed copy of the replicated state, from any node's API)
//! and `novacron backup restore` (a NEW cluster from a backup, offline, on an empty data dir).
//!
//! What a restore keeps and what it renews:
//! - kept: every object (tenants, users with their password hashes, API keys, VMs, operations,
//!   the audit chain, idempotency records);
//! - renewed: the cluster id, the CA (so nodes of the old cluster cannot talk to the new one),
//!   the JWT signing key (tokens of the old cluster stop working), the join secret;
//! - the old nodes are marked removed (their names may be reused); the restoring node is the
//!   new cluster's first and only voter, others join it with the new `DIR/join-token`.
//!
//! The same re-keying serves quorum-loss recovery (`recover`), which keeps the cluster id.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use raft::model::{ClusterSecrets, NodeRecord, NodeState, Vm};
use raft::store::{RawRows, Store};
use raft::tls::{self, JoinToken, NodeIdentity, NodeKey};
use raft::{codec, keys, Member, NodeId};

use crate::config::{write_atomic, NodeConfig, Tuning, JOIN_TOKEN_FILE};

/// Downloads a backup from `url` with `token` and writes it to `out`, after checking that the
/// file's checksum matches both its content and the one the server announced.
pub async fn create(url: &str, token: &str, out: &Path) -> anyhow::Result<(u64, String)> {
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(300))
        .build()?;
    let resp = http
        .get(format!("{}/api/v1/backup", url.trim_end_matches('/')))
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        let v: serde_json::Value = resp.json().await.unwrap_or_default();
        bail!(
            "{} ({}, HTTP {})",
            v["detail"].as_str().unwrap_or("backup failed"),
            v["code"].as_str().unwrap_or("error"),
            status.as_u16()
        );
    }
    let announced = resp
        .headers()
        .get("x-novacron-backup-sha256")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = resp
        .bytes()
        .await
        .context("the backup download broke off")?;
    let body = raft::backup::decode(&bytes)?;
    let sum = raft::backup::recorded_checksum(&bytes)?;
    if let Some(a) = announced {
        if a != sum {
            bail!("the server announced checksum {a} but sent a file with {sum}");
        }
    }
    write_atomic(out, &bytes, 0o600).with_context(|| format!("cannot write {}", out.display()))?;
    Ok((body.last_applied_index, sum))
}

/// Settings of the node a restore creates.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub file: PathBuf,
    pub data_dir: PathBuf,
    pub name: String,
    pub api_addr: SocketAddr,
    pub peer_addr: SocketAddr,
}

/// Binds `addr` (TCP or UDP) once to turn port 0 into a concrete port to store.
fn concrete(addr: SocketAddr, udp: bool) -> anyhow::Result<SocketAddr> {
    Ok(if udp {
        std::net::UdpSocket::bind(addr)?.local_addr()?
    } else {
        std::net::TcpListener::bind(addr)?.local_addr()?
    })
}

/// New CA and node identity for `cluster_id`, saved under `tls_dir`; returns the new secrets
/// (derived from `old`, with a new CA and join secret) and the join token to hand out.
pub(crate) fn rekey(
    old: &ClusterSecrets,
    cluster_id: &str,
    name: &str,
    tls_dir: &Path,
    new_jwt_key: bool,
    now: u64,
) -> anyhow::Result<(ClusterSecrets, JoinToken)> {
    let ca = tls::generate_ca(cluster_id)?;
    let key = NodeKey::generate(name)?;
    let cert_pem = tls::sign_node_csr(&ca, &key.csr_pem, name)?;
    let identity = NodeIdentity {
        ca_cert_pem: ca.cert_pem.clone(),
        cert_pem,
        key_pem: key.key_pem.clone(),
    };
    // Replace the old identity wholesale: its CA must not be trusted any more.
    if tls_dir.exists() {
        std::fs::remove_dir_all(tls_dir)?;
    }
    identity.save(tls_dir)?;
    let token = JoinToken::generate(&tls::ca_fingerprint(&ca.cert_pem)?);
    let jwt_keys = if new_jwt_key {
        vec![rand::random::<[u8; 32]>().to_vec()]
    } else {
        old.jwt_keys.clone()
    };
    let secrets = ClusterSecrets {
        cluster_id: cluster_id.to_string(),
        ca_cert_pem: ca.cert_pem,
        ca_key_pem: ca.key_pem,
        jwt_keys,
        join_secret_sha256: token.secret_sha256(),
        created_at: if new_jwt_key { now } else { old.created_at },
    };
    Ok((secrets, token))
}

/// Rewrites the state's rows for a new configuration in which node `me` (`member`) is the only
/// live node: secrets replaced, every other node removed (names freed), `me` recorded, and,
/// when `bump_epochs`, every VM's epoch raised so that work issued before cannot run.
/// Returns the new rows and `me`'s id (a fresh one when `me` is None).
pub(crate) fn rewrite_rows(
    rows: RawRows,
    secrets: &ClusterSecrets,
    me: Option<NodeId>,
    member: &Member,
    bump_epochs: bool,
    now: u64,
) -> anyhow::Result<(RawRows, NodeId)> {
    let mut map: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = rows.into_iter().collect();
    let next: u64 = match map.get(keys::NEXT_NODE_ID) {
        Some(v) => codec::decode(v)?,
        None => 1,
    };
    let id = match me {
        Some(id) => id,
        None => {
            map.insert(keys::NEXT_NODE_ID.to_vec(), codec::encode(&(next + 1))?);
            next
        }
    };
    map.insert(keys::SECRETS.to_vec(), codec::encode(secrets)?);
    let node_keys: Vec<Vec<u8>> = map
        .keys()
        .filter(|k| k.starts_with(keys::NODE_PREFIX))
        .cloned()
        .collect();
    for k in node_keys {
        let mut n: NodeRecord = codec::decode(&map[&k])?;
        if n.id == id {
            continue;
        }
        n.removed = true;
        n.state = NodeState::Down;
        n.updated_at = now;
        map.remove(&keys::node_name(&n.member.name));
        map.remove(&keys::node_traits(n.id));
        map.insert(k, codec::encode(&n)?);
    }
    let mine = match map.get(&keys::node(id)) {
        Some(v) => {
            let mut n: NodeRecord = codec::decode(v)?;
            n.member = member.clone();
            n.state = NodeState::Up;
            n.removed = false;
            n.updated_at = now;
            n
        }
        None => NodeRecord {
            id,
            member: member.clone(),
            state: NodeState::Up,
            schedulable: true,
            labels: Default::default(),
            joined_at: now,
            updated_at: now,
            removed: false,
            capacity: None,
        },
    };
    map.insert(keys::node(id), codec::encode(&mine)?);
    map.insert(keys::node_name(&member.name), codec::encode(&id)?);
    if bump_epochs {
        let vm_keys: Vec<Vec<u8>> = map
            .keys()
            .filter(|k| k.starts_with(keys::VM_PREFIX))
            .cloned()
            .collect();
        for k in vm_keys {
            let mut vm: Vm = codec::decode(&map[&k])?;
            vm.epoch += 1;
            map.insert(k, codec::encode(&vm)?);
        }
    }
    Ok((map.into_iter().collect(), id))
}

/// Creates, in an empty data dir, the first node of a new cluster holding the backup's objects.
/// Prints what the operator needs next (start it, join the others with the new token).
pub fn restore(opts: &RestoreOptions) -> anyhow::Result<NodeConfig> {
    let dir = &opts.data_dir;
    if NodeConfig::exists(dir) || dir.join("db").exists() {
        bail!(
            "{} already holds a node; restore into an empty directory",
            dir.display()
        );
    }
    let bytes = std::fs::read(&opts.file)
        .with_context(|| format!("cannot read {}", opts.file.display()))?;
    let backup = raft::backup::decode(&bytes)?;
    let old: ClusterSecrets = backup
        .pairs
        .iter()
        .find(|(k, _)| k.as_slice() == keys::SECRETS)
        .map(|(_, v)| codec::decode(v))
        .transpose()?
        .ok_or_else(|| anyhow!("the backup holds no initialised cluster"))?;
    std::fs::create_dir_all(dir)?;
    let now = api::now_ms();
    let cluster_id = uuid::Uuid::new_v4().to_string();
    let (secrets, token) = rekey(&old, &cluster_id, &opts.name, &dir.join("tls"), true, now)?;
    let api_addr = concrete(opts.api_addr, false)?;
    let peer_addr = concrete(opts.peer_addr, true)?;
    let member = Member {
        name: opts.name.clone(),
        api_addr: api_addr.to_string(),
        peer_addr: peer_addr.to_string(),
    };
    let (rows, id) = rewrite_rows(backup.pairs, &secrets, None, &member, false, now)?;
    let store = Store::open(&dir.join("db"))?;
    store.seed(
        rows,
        1,
        backup.last_applied_index.max(1),
        id,
        member.clone(),
    )?;
    drop(store);
    write_atomic(
        &dir.join(JOIN_TOKEN_FILE),
        token.to_string().as_bytes(),
        0o600,
    )?;
    let config = NodeConfig {
        version: 1,
        name: opts.name.clone(),
        node_id: id,
        cluster_id,
        api_addr: member.api_addr,
        peer_addr: member.peer_addr,
        init_pending: false,
        tuning: Tuning::default(),
        libvirt_uri: crate::config::default_libvirt_uri(),
        guest_kernel: None,
        guest_initrd: None,
        domain_type: None,
        witness: false,
        federation_addr: None,
    };
    config.save(dir)?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::model::{DesiredState, VmState};

    fn secrets(id: &str) -> ClusterSecrets {
        ClusterSecrets {
            cluster_id: id.into(),
            ca_cert_pem: "ca".into(),
            ca_key_pem: "key".into(),
            jwt_keys: vec![vec![1; 32]],
            join_secret_sha256: "h".into(),
            created_at: 1,
        }
    }

    fn member(name: &str) -> Member {
        Member {
            name: name.into(),
            api_addr: format!("{name}:8080"),
            peer_addr: format!("{name}:7070"),
        }
    }

    fn node(id: NodeId, name: &str) -> NodeRecord {
        NodeRecord {
            id,
            member: member(name),
            state: NodeState::Up,
            schedulable: true,
            labels: Default::default(),
            joined_at: 1,
            updated_at: 1,
            removed: false,
            capacity: None,
        }
    }

    fn rows() -> RawRows {
        let vm = Vm {
            id: "v1".into(),
            name: "v".into(),
            tenant: "t".into(),
            vcpus: 1,
            memory_mib: 64,
            disk_gib: 0,
            image: None,
            labels: Default::default(),
            node: Some(2),
            desired_state: DesiredState::Running,
            state: VmState::Running,
            ha: false,
            anti_affinity_group: None,
            placement: Default::default(),
            epoch: 5,
            created_at: 1,
            updated_at: 1,
            version: 1,
        };
        let mut m = std::collections::BTreeMap::new();
        m.insert(
            keys::SECRETS.to_vec(),
            codec::encode(&secrets("old")).unwrap(),
        );
        m.insert(keys::NEXT_NODE_ID.to_vec(), codec::encode(&4u64).unwrap());
        for (id, name) in [(1, "a"), (2, "b"), (3, "c")] {
            m.insert(keys::node(id), codec::encode(&node(id, name)).unwrap());
            m.insert(keys::node_name(name), codec::encode(&id).unwrap());
        }
        m.insert(keys::vm("v1"), codec::encode(&vm).unwrap());
        m.into_iter().collect()
    }

    fn raw<'a>(rows: &'a RawRows, key: &[u8]) -> Option<&'a [u8]> {
        rows.iter()
            .find(|(k, _)| k.as_slice() == key)
            .map(|(_, v)| v.as_slice())
    }

    macro_rules! get {
        ($t:ty, $rows:expr, $key:expr) => {
            raw($rows, $key).map(|v| codec::decode::<$t>(v).unwrap())
        };
    }

    #[test]
    fn restore_gives_a_fresh_id_and_removes_the_old_nodes() {
        let (rows, id) =
            rewrite_rows(rows(), &secrets("new"), None, &member("a"), false, 9).unwrap();
        assert_eq!(id, 4);
        assert_eq!(get!(u64, &rows, keys::NEXT_NODE_ID), Some(5));
        assert_eq!(
            get!(ClusterSecrets, &rows, keys::SECRETS)
                .unwrap()
                .cluster_id,
            "new"
        );
        for old in 1..=3 {
            assert!(get!(NodeRecord, &rows, &keys::node(old)).unwrap().removed);
        }
        // The old name now points at the new node; the others' names are free again.
        assert_eq!(get!(u64, &rows, &keys::node_name("a")), Some(4));
        assert_eq!(get!(u64, &rows, &keys::node_name("b")), None);
        assert_eq!(get!(Vm, &rows, &keys::vm("v1")).unwrap().epoch, 5);
    }

    #[test]
    fn recovery_keeps_its_id_and_fences_every_vm() {
        let (rows, id) =
            rewrite_rows(rows(), &secrets("old"), Some(3), &member("c"), true, 9).unwrap();
        assert_eq!(id, 3);
        assert_eq!(get!(u64, &rows, keys::NEXT_NODE_ID), Some(4));
        let me = get!(NodeRecord, &rows, &keys::node(3)).unwrap();
        assert!(!me.removed && me.state == NodeState::Up);
        assert!(get!(NodeRecord, &rows, &keys::node(1)).unwrap().removed);
        assert_eq!(get!(Vm, &rows, &keys::vm("v1")).unwrap().epoch, 6);
    }
}
