//! `novacron cluster recover --force`: quorum-loss recovery, offline, on a surviving node's
//! data dir (the node must be stopped).
//!
//! Steps, each a guard against making things worse:
//! 1. probe the other voters of the last configuration; if, with this node, a majority of them
//!    answer, the quorum is not lost and the command refuses;
//! 2. apply every entry of the local log (entries the old majority may have committed);
//! 3. rewrite the state for a new configuration with this node as its only voter: the other
//!    nodes are removed, every VM's epoch is raised (so agents of returning nodes cannot act on
//!    older work), and the cluster gets a NEW CA: nodes of the old incarnation fail the mutual
//!    TLS handshake and cannot rejoin; new nodes join with the new `DIR/join-token`;
//! 4. seed the store so the node elects itself at its next start, in a higher term.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use raft::model::ClusterSecrets;
use raft::store::Store;
use raft::{codec, keys, Member, NodeId};

use crate::config::{write_atomic, NodeConfig, JOIN_TOKEN_FILE};

/// What a recovery did, for the operator.
#[derive(Debug, serde::Serialize)]
pub struct Recovered {
    pub node_id: NodeId,
    pub last_applied_index: u64,
    pub term: u64,
    pub removed_voters: Vec<String>,
    pub vms_fenced: usize,
}

/// Whether the API of `member` answers `/healthz` within the probe timeout.
async fn answers(http: &reqwest::Client, member: &Member) -> bool {
    let url = format!("http://{}/healthz", member.api_addr);
    matches!(http.get(url).send().await, Ok(r) if r.status().is_success())
}

pub async fn run(dir: &Path, force: bool) -> anyhow::Result<Recovered> {
    if !force {
        bail!("recovery rewrites the cluster's membership; pass --force to confirm");
    }
    let config = NodeConfig::load(dir)?;
    let store = Store::open(&dir.join("db"))
        .with_context(|| format!("cannot open {} (is the node still running?)", dir.display()))?;
    let voters = store.voters()?;
    if !voters.iter().any(|(id, _)| *id == config.node_id) {
        bail!(
            "node {} is not a voter of its last configuration; recover on a voter",
            config.node_id
        );
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let others: Vec<&(NodeId, Member)> = voters
        .iter()
        .filter(|(id, _)| *id != config.node_id)
        .collect();
    let probes = others.iter().map(|(_, m)| answers(&http, m));
    let answered: Vec<bool> = futures::future::join_all(probes).await;
    let reachable: Vec<String> = others
        .iter()
        .zip(&answered)
        .filter(|(_, ok)| **ok)
        .map(|((_, m), _)| m.name.clone())
        .collect();
    let majority = voters.len() / 2 + 1;
    if reachable.len() + 1 >= majority {
        bail!(
            "a quorum of the configuration answers ({} of {} voters: this node and {}); \
             recovery is not needed and would split the cluster",
            reachable.len() + 1,
            voters.len(),
            reachable.join(", ")
        );
    }

    let last = store.apply_log_tail()?;
    let term = store.last_term()? + 1;
    let export = store.reader().export().await?;
    let old: ClusterSecrets = export
        .pairs
        .iter()
        .find(|(k, _)| k.as_slice() == keys::SECRETS)
        .map(|(_, v)| codec::decode(v))
        .transpose()?
        .ok_or_else(|| anyhow!("this node's state holds no initialised cluster"))?;
    let now = api::now_ms();
    let (secrets, token) = crate::backup::rekey(
        &old,
        &old.cluster_id,
        &config.name,
        &dir.join("tls"),
        false,
        now,
    )?;
    let member = Member {
        name: config.name.clone(),
        api_addr: config.api_addr.clone(),
        peer_addr: config.peer_addr.clone(),
    };
    let vms = export
        .pairs
        .iter()
        .filter(|(k, _)| k.starts_with(keys::VM_PREFIX))
        .count();
    let (rows, id) = crate::backup::rewrite_rows(
        export.pairs,
        &secrets,
        Some(config.node_id),
        &member,
        true,
        now,
    )?;
    store.seed(rows, term, last.max(1), id, member)?;
    drop(store);
    write_atomic(
        &dir.join(JOIN_TOKEN_FILE),
        token.to_string().as_bytes(),
        0o600,
    )?;
    Ok(Recovered {
        node_id: id,
        last_applied_index: last,
        term,
        removed_voters: others.iter().map(|(_, m)| m.name.clone()).collect(),
        vms_fenced: vms,
    })
}
