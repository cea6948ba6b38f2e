//! The node's side of federation: binding the federation endpoint, naming the site at
//! `--init`, linking to another site with a token, forwarding calls to a linked site, listing
//! this site's federation endpoints, and running the leader-only catalog pull
//! (`federation::sync`). The protocol, TLS and pull logic live in the `federation` crate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use api::control::{ForwardedCall, ForwardedReply};
use api::ClusterError;
use federation::client::{CallError, Peers};
use federation::sync::{SyncConfig, SyncMetrics, Syncer};
use raft::federation::{self as fed, SiteIdentity, SiteLink};
use raft::keys;
use raft::model::{NodeRecord, NodeTraits};
use raft::store::StateReader;
use raft::tls::NodeIdentity;
use raft::{Command, Request, Response};
use rand::Rng;
use tokio::sync::watch;

use crate::config::Tuning;
use crate::control::NodeControl;

/// How long linking keeps trying the other site's addresses.
const LINK_WITHIN: Duration = Duration::from_secs(20);

/// A fresh random site id: [`fed::SITE_ID_LEN`] characters of `[a-z0-9]`.
pub fn new_site_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..fed::SITE_ID_LEN)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// The federation endpoint's address when none was given: the API's host, API port + 2
/// (port 0 stays 0: tests bind any free port and read the bound one back).
pub fn default_addr(api: SocketAddr) -> SocketAddr {
    let port = match api.port() {
        0 => 0,
        p => p.saturating_add(2),
    };
    SocketAddr::new(api.ip(), port)
}

/// The address other sites should call: the bound one, except that an unspecified IP
/// (`0.0.0.0`, `::`) is replaced by the IP of the node's peer address when that one is specific.
pub fn advertised_addr(bound: SocketAddr, peer_addr: &str) -> SocketAddr {
    if !bound.ip().is_unspecified() {
        return bound;
    }
    match peer_addr.parse::<SocketAddr>() {
        Ok(peer) if !peer.ip().is_unspecified() => SocketAddr::new(peer.ip(), bound.port()),
        _ => bound,
    }
}

/// What a node keeps for federation besides its replica.
pub struct NodeFederation {
    pub identity: NodeIdentity,
    pub peers: Arc<Peers>,
    pub metrics: Arc<SyncMetrics>,
    /// This node's federation endpoint, as advertised to other sites.
    pub addr: SocketAddr,
}

impl NodeFederation {
    pub fn new(identity: NodeIdentity, addr: SocketAddr) -> Self {
        NodeFederation {
            peers: Arc::new(Peers::new(identity.clone())),
            identity,
            metrics: Arc::default(),
            addr,
        }
    }
}

fn refused(e: CallError) -> ClusterError {
    match e {
        CallError::Refused { message, .. } => ClusterError::JoinRefused(message),
        CallError::Unreachable { .. } => ClusterError::Unavailable(e.to_string()),
        other => ClusterError::Internal(other.to_string()),
    }
}

/// The federation endpoints of this site's nodes (not removed), as advertised in their traits.
pub fn federation_addrs(reader: &StateReader) -> Vec<String> {
    let mut addrs: Vec<String> = reader
        .nodes()
        .unwrap_or_default()
        .into_iter()
        .filter(|n: &NodeRecord| !n.removed)
        .filter_map(|n| {
            reader
                .get::<NodeTraits>(&keys::node_traits(n.id))
                .ok()
                .flatten()
                .and_then(|t| t.federation_addr)
        })
        .collect();
    addrs.sort();
    addrs.dedup();
    addrs
}

/// Links this site to the site that issued `token`: calls its `Link` (which checks and
/// consumes the token there), then commits the peer's link here.
pub async fn link_site(
    ctl: &NodeControl,
    token: &str,
    addrs: Vec<String>,
) -> Result<SiteLink, ClusterError> {
    use api::ControlPlane;
    let token =
        federation::token::parse(token).map_err(|e| ClusterError::Invalid(e.to_string()))?;
    let own = ctl
        .reader
        .site()
        .map_err(|e| ClusterError::Internal(e.to_string()))?;
    if own.id == token.site_id {
        return Err(ClusterError::Invalid("a site cannot link to itself".into()));
    }
    // Refuse before the peer consumes the token: our side must be able to commit its half.
    let probe = Command::LinkSite {
        link: SiteLink {
            site: own.clone(),
            ca_cert_pem: String::new(),
            addrs: Vec::new(),
            created_at: 0,
            updated_at: 0,
        },
        token: None,
    };
    // A node that joined a moment ago advertises its features within a heartbeat or two:
    // give it that long before refusing.
    let deadline = std::time::Instant::now() + GATE_PATIENCE;
    while let Err(blockers) = crate::features::gate(ctl, &probe) {
        if std::time::Instant::now() >= deadline {
            return Err(ClusterError::FeatureUnavailable {
                command: probe.name().to_string(),
                blockers,
            });
        }
        let _ = ctl.read_barrier(api::Consistency::Linearizable).await;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let mut own_addrs = federation_addrs(&ctl.reader);
    if own_addrs.is_empty() {
        own_addrs.push(ctl.federation.addr.to_string());
    }
    let peer = federation::client::link(
        &token,
        &addrs,
        (&own, &ctl.federation.identity.ca_cert_pem, &own_addrs),
        LINK_WITHIN,
    )
    .await
    .map_err(refused)?;
    let link = SiteLink {
        site: peer.site,
        ca_cert_pem: peer.ca_cert_pem,
        addrs: peer.addrs,
        created_at: 0,
        updated_at: 0,
    };
    let (_, response) = ctl
        .write(Request::new(
            api::now_ms(),
            format!("node:{}", ctl.id),
            Command::LinkSite {
                link: link.clone(),
                token: None,
            },
        ))
        .await?;
    match response {
        Response::Ok => {}
        Response::Rejected { message, .. } => return Err(ClusterError::Invalid(message)),
        other => return Err(ClusterError::Internal(format!("unexpected {other:?}"))),
    }
    tracing::info!(site = %link.site.id, name = %link.site.name, "linked to site");
    Ok(ctl
        .reader
        .get::<SiteLink>(&fed::link_key(&link.site.id))
        .ok()
        .flatten()
        .unwrap_or(link))
}

/// The link of the site named or identified by `site`.
fn find_link(reader: &StateReader, site: &str) -> Option<SiteLink> {
    federation::server::links_of(reader)
        .into_iter()
        .find(|l| l.site.id == site || l.site.name == site)
}

/// Runs a REST call at a linked site on behalf of a user.
pub async fn forward_to_site(
    ctl: &NodeControl,
    site: &str,
    call: ForwardedCall,
) -> Result<ForwardedReply, ClusterError> {
    let link = find_link(&ctl.reader, site)
        .ok_or_else(|| ClusterError::Invalid(format!("site {site} is not linked")))?;
    // A user waits on this call: a site that no node of answers within the deadline is
    // reported unreachable rather than retried until the client gives up.
    match tokio::time::timeout(FORWARD_DEADLINE, ctl.federation.peers.forward(&link, call)).await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(CallError::Refused { message, .. })) => Err(ClusterError::Unavailable(message)),
        // The client may retry with an Idempotency-Key, as after any timeout.
        Ok(Err(CallError::Indeterminate { .. })) => Err(ClusterError::Timeout),
        Ok(Err(other)) => Err(ClusterError::Unavailable(other.to_string())),
        // Nothing answered in time: a request may have arrived all the same, so the outcome
        // is unknown (as after any timeout; retry with an Idempotency-Key).
        Err(_) => Err(ClusterError::Timeout),
    }
}

/// How long linking waits for just-joined members to advertise that they understand it.
const GATE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a forwarded call may take, retries included.
const FORWARD_DEADLINE: std::time::Duration = std::time::Duration::from_secs(6);

/// Binds the federation endpoint's TCP listener.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context;
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind the federation endpoint {addr}"))
}

/// Binds the default federation endpoint of a node whose API is at `api`: API port + 2, or any
/// free port of the same host when that one is taken (the bound address is stored and
/// advertised, so peers learn it either way).
pub async fn bind_default(api: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let addr = default_addr(api);
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            tracing::warn!(%addr, "the default federation port is taken; binding any free port");
            bind(SocketAddr::new(api.ip(), 0)).await
        }
        Err(e) => {
            Err(anyhow::Error::new(e)
                .context(format!("cannot bind the federation endpoint {addr}")))
        }
    }
}

/// Serves the endpoint on `listener` and runs the catalog pull while this node leads, both
/// until `stop` turns true.
pub fn spawn(
    ctl: Arc<NodeControl>,
    listener: tokio::net::TcpListener,
    router: axum::Router,
    tuning: &Tuning,
    stop: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let ctx = Arc::new(federation::server::ServerContext {
        reader: ctl.reader.clone(),
        cp: ctl.clone(),
        router,
        identity: ctl.federation.identity.clone(),
        moves: Some(crate::site_move::move_service(&ctl)),
    });
    let mut tasks = Vec::new();
    {
        let mut stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = federation::server::serve(listener, ctx, shutdown).await {
                tracing::error!(error = %e, "federation endpoint failed");
            }
        }));
    }
    let syncer = Arc::new(Syncer::new(
        ctl.clone(),
        ctl.federation.peers.clone(),
        SyncConfig {
            interval: Duration::from_millis(tuning.federation_sync_ms),
            heartbeat: Duration::from_millis(tuning.federation_heartbeat_ms),
            ..SyncConfig::default()
        },
        ctl.federation.metrics.clone(),
        format!("node:{}", ctl.id),
    ));
    let leader = ctl.clone();
    tasks.push(tokio::spawn(federation::sync::run(
        syncer,
        move || leader.raft.metrics().borrow().current_leader == Some(leader.id),
        stop,
    )));
    tasks
}

/// Names the site, once, right after the cluster was created (`--init`).
pub async fn init_site(ctl: &NodeControl, site: SiteIdentity) -> anyhow::Result<()> {
    let (_, r) = ctl
        .cluster
        .write(Request::new(
            api::now_ms(),
            "init",
            Command::InitSite { site },
        ))
        .await?;
    match r {
        Response::Ok
        | Response::Rejected {
            code: raft::RejectCode::AlreadyInitialized,
            ..
        } => Ok(()),
        other => anyhow::bail!("naming the site was refused: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_ids_are_valid_and_the_default_port_follows_the_api() {
        for _ in 0..100 {
            let id = new_site_id();
            assert!(SiteIdentity::valid_id(&id), "{id}");
        }
        let api: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        assert_eq!(default_addr(api).to_string(), "10.0.0.1:8082");
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert_eq!(default_addr(any).port(), 0);
        let wild: SocketAddr = "0.0.0.0:8082".parse().unwrap();
        assert_eq!(
            advertised_addr(wild, "10.1.2.3:7070").to_string(),
            "10.1.2.3:8082"
        );
        assert_eq!(advertised_addr(wild, "0.0.0.0:7070"), wild);
        assert_eq!(advertised_addr(api, "10.1.2.3:7070"), api);
    }

    #[test]
    fn ids_with_a_site_prefix_give_their_uuid_to_libvirt() {
        let uuid = "0b3e5f1c-1111-2222-3333-444444444444";
        let with_site = format!("{}-{uuid}", new_site_id());
        assert_eq!(
            crate::agent::domain_uuid(&with_site)
                .map(|u| u.to_string())
                .ok(),
            Some(uuid.to_string())
        );
        assert_eq!(
            crate::agent::domain_uuid(uuid).map(|u| u.to_string()).ok(),
            Some(uuid.to_string())
        );
        assert!(crate::agent::domain_uuid("abcdef-nope").is_err());
    }
}
