//! `novacron serve`: creates a cluster (`--init`), joins one (`--join`), or restarts a node
//! from its data directory, then wires store, Raft, QUIC transport, controllers and the API.
//!
//! Layout of a data directory:
//! - `node.json`: the node's settings (see `config`);
//! - `tls/`: the cluster CA certificate and this node's certificate and key (0600);
//! - `db/`: the sled database (Raft log, vote, state machine, snapshot);
//! - `images/`: the image store (uploaded and fetched images, per-VM disk overlays);
//! - `admin-password`, `join-token` (first node only, 0600);
//! - `init-pending.json` (0600): the first node's initial secrets until they are committed.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use raft::model::{ClusterSecrets, Role, User, SYSTEM_TENANT};
use raft::net::{Cluster, Transport};
use raft::store::Store;
use raft::tls::{self, JoinToken, NodeIdentity, NodeKey};
use raft::{Command, Member, Raft, Request, Response};
use rand::distributions::Alphanumeric;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{write_atomic, NodeConfig, Tuning, ADMIN_PASSWORD_FILE, JOIN_TOKEN_FILE};
use crate::control::{wait_metrics, NodeControl};
use crate::metrics::RaftMetrics;

const DEFAULT_API_ADDR: &str = "127.0.0.1:8080";
const DEFAULT_PEER_ADDR: &str = "127.0.0.1:7070";
const INIT_PENDING_FILE: &str = "init-pending.json";
/// Test-only: a file listing peer addresses whose traffic this node drops both ways.
pub const PARTITION_FILE_ENV: &str = "NOVACRON_TEST_PARTITION_FILE";

#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    pub data_dir: PathBuf,
    pub name: Option<String>,
    pub api_addr: Option<SocketAddr>,
    pub peer_addr: Option<SocketAddr>,
    pub init: bool,
    pub join: Option<String>,
    pub token: Option<String>,
    pub tuning: Option<Tuning>,
    pub libvirt_uri: Option<String>,
    pub guest_kernel: Option<PathBuf>,
    pub guest_initrd: Option<PathBuf>,
    pub domain_type: Option<String>,
    /// A vote-only member: runs no agent and is never schedulable.
    pub witness: bool,
    /// Command types to leave out of this node's advertised features (upgrade tests).
    pub missing_features: Vec<String>,
    /// Scheduler settings (default: spread, CPU overcommit 4, no memory overcommit).
    pub placement: Option<crate::placement::PlacementConfig>,
    /// Leaves VMs unplaced (the scheduler benchmark drives placement passes itself).
    pub no_placement_controller: bool,
    /// TCP address of the federation endpoint (default: API host, API port + 2).
    pub federation_addr: Option<SocketAddr>,
    /// The site name of a new cluster (`--init`); default `default`.
    pub site: Option<String>,
}

/// The first node's initial secrets, kept on disk only until the cluster has committed them,
/// so that a crash during `--init` can be finished by a restart.
#[derive(Serialize, Deserialize)]
struct InitMaterial {
    cluster_id: String,
    ca_cert_pem: String,
    ca_key_pem: String,
    jwt_key_hex: String,
    join_secret_sha256: String,
    admin_password_hash: String,
    /// The site this cluster is (named at `--init`, id generated then).
    #[serde(default)]
    site: Option<raft::federation::SiteIdentity>,
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Runs a node until `shutdown` resolves, then stops it cleanly.
pub async fn serve(opts: ServeOptions, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let node = Node::start(opts).await?;
    tracing::info!(
        name = %node.config.name,
        id = node.config.node_id,
        api = %node.api_addr,
        peer = %node.config.peer_addr,
        "node serving"
    );
    serve_node(node, shutdown).await
}

/// Serves a started node until `shutdown` resolves (then stops it cleanly and returns `Ok`) or
/// until its Raft stops on its own (then stops it and returns the error).
///
/// openraft stops for good on a storage failure (a full disk, a failed fsync). A process that
/// went on serving after that would hold a replica that never catches up again and answer
/// stale reads from it, even once the disk has room again. Exiting with an error lets the
/// supervisor restart the node (systemd `Restart=on-failure`), which recovers from what the
/// disk holds and rejoins.
pub async fn serve_node(node: Node, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let raft = node.control.raft.clone();
    tokio::select! {
        () = shutdown => {
            tracing::info!("shutting down");
            node.stop().await
        }
        reason = raft_stopped(&raft) => {
            tracing::error!(%reason, "Raft stopped; exiting so that the node restarts from disk");
            if let Err(e) = node.stop().await {
                tracing::warn!(error = %e, "stopping after the Raft failure");
            }
            Err(anyhow!("Raft stopped: {reason}"))
        }
    }
}

/// Resolves, with the reason, once `raft` is no longer running.
pub async fn raft_stopped(raft: &Raft) -> String {
    let mut metrics = raft.metrics();
    let reason = match metrics.wait_for(|m| m.running_state.is_err()).await {
        Ok(m) => match &m.running_state {
            Err(fatal) => fatal.to_string(),
            Ok(()) => "stopped".to_string(),
        },
        Err(_) => "the Raft metrics channel closed".to_string(),
    };
    reason
}

/// A running node.
pub struct Node {
    pub config: NodeConfig,
    pub api_addr: SocketAddr,
    pub control: Arc<NodeControl>,
    stop_tx: watch::Sender<bool>,
    api_task: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
    store: Store,
}

fn default_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".to_string())
}

fn random_password() -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect()
}

/// Finds the address a UDP bind would get (for port 0), so it can be announced before the
/// transport exists. The tiny window between probe and bind only matters with port 0.
fn probe_udp(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let s = std::net::UdpSocket::bind(addr).with_context(|| format!("cannot bind UDP {addr}"))?;
    Ok(s.local_addr()?)
}

fn raft_config(cluster_id: &str, t: &Tuning) -> anyhow::Result<openraft::Config> {
    let config = openraft::Config {
        cluster_name: cluster_id.to_string(),
        heartbeat_interval: t.heartbeat_ms,
        election_timeout_min: t.election_min_ms,
        election_timeout_max: t.election_max_ms,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(t.snapshot_every),
        max_in_snapshot_log_to_keep: t.keep_after_snapshot,
        install_snapshot_timeout: 5_000,
        ..Default::default()
    };
    config
        .validate()
        .map_err(|e| anyhow!("invalid Raft settings: {e}"))
}

impl Node {
    pub async fn start(opts: ServeOptions) -> anyhow::Result<Node> {
        let dir = opts.data_dir.clone();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create data dir {}", dir.display()))?;
        let tls_dir = dir.join("tls");

        let (mut config, identity, listener) = if NodeConfig::exists(&dir) {
            if opts.init || opts.join.is_some() {
                tracing::warn!("{} already holds a node; restarting it", dir.display());
            }
            let mut config = NodeConfig::load(&dir)?;
            if let Some(t) = opts.tuning.clone() {
                config.tuning = t;
            }
            apply_agent_options(&mut config, &opts);
            if opts.witness && !config.witness {
                bail!(
                    "{} holds a data node; a witness is created with --witness --join",
                    dir.display()
                );
            }
            config.save(&dir)?;
            let identity = NodeIdentity::load(&tls_dir)?;
            let listener = tokio::net::TcpListener::bind(&config.api_addr)
                .await
                .with_context(|| format!("cannot bind API {}", config.api_addr))?;
            (config, identity, listener)
        } else if opts.init {
            init_new(&opts, &dir, &tls_dir).await?
        } else if let Some(url) = &opts.join {
            join_existing(&opts, url, &dir, &tls_dir).await?
        } else {
            bail!(
                "{} holds no node: pass --init to create a cluster or --join URL --token T",
                dir.display()
            );
        };

        config.tuning.validate()?;
        let federation_listener = {
            let listener = match (&config.federation_addr, opts.federation_addr) {
                (Some(stored), _) => {
                    crate::federation::bind(
                        stored
                            .parse()
                            .with_context(|| format!("bad federation address {stored}"))?,
                    )
                    .await?
                }
                (None, Some(given)) => crate::federation::bind(given).await?,
                (None, None) => {
                    crate::federation::bind_default(
                        config
                            .api_addr
                            .parse()
                            .with_context(|| format!("bad API address {}", config.api_addr))?,
                    )
                    .await?
                }
            };
            let actual = listener.local_addr()?.to_string();
            if config.federation_addr.as_deref() != Some(actual.as_str()) {
                config.federation_addr = Some(actual);
                config.save(&dir)?;
            }
            listener
        };
        let federation_addr = federation_listener.local_addr()?;
        let store = Store::open(&dir.join("db"))?;
        let peer_addr: SocketAddr = config
            .peer_addr
            .parse()
            .with_context(|| format!("bad peer address {}", config.peer_addr))?;
        let transport = Transport::bind_with(
            peer_addr,
            &identity,
            raft::net::TransportConfig {
                // Test-only fault injection; never stored in the node's settings.
                partition_file: std::env::var_os(PARTITION_FILE_ENV).map(PathBuf::from),
                ..Default::default()
            },
        )?;
        let actual_peer = transport.local_addr()?;
        if config.peer_addr != actual_peer.to_string() {
            config.peer_addr = actual_peer.to_string();
            config.save(&dir)?;
        }
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config(&config.cluster_id, &config.tuning)?),
            transport.network_factory(config.node_id),
            store.log_store(),
            store.state_machine(),
        )
        .await
        .map_err(|e| anyhow!("cannot start Raft: {e}"))?;
        let reader = store.reader();
        let cluster = Cluster::new(
            raft.clone(),
            transport.clone(),
            reader.applied_watch(),
            raft::net::ClusterConfig::default(),
        );
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let images = Arc::new(crate::images::NodeImages {
            me: config.node_id,
            store: hypervisor::ImageStore::open(dir.join("images"))
                .await
                .context("cannot open the image store")?,
            transport: transport.clone(),
            reader: reader.clone(),
        });
        let site_move_images = images.clone();
        let hv: crate::console::SharedHypervisor = Arc::default();
        let stats = crate::stats::VmStatsStore::new(
            config.node_id,
            Duration::from_millis(config.tuning.stats_interval_ms.max(100)),
            crate::stats::DEFAULT_CAPACITY,
        );
        let liveness = Arc::new(crate::liveness::Liveness::new(
            config.node_id,
            raft.clone(),
            crate::liveness::Timers::from_tuning(&config.tuning),
        ));
        let migration = Arc::new(crate::migration::MigrationEnv {
            me: config.node_id,
            cluster_id: config.cluster_id.clone(),
            data_dir: dir.clone(),
            reader: reader.clone(),
            transport: transport.clone(),
            cluster: cluster.clone(),
            hv: hv.clone(),
            agent: agent_config(&config),
            live: !config.libvirt_uri.starts_with("test:"),
            libvirt_socket: crate::migration::libvirt_socket_of(&config.libvirt_uri),
            metrics: Default::default(),
        });
        tasks.push(tokio::spawn(crate::migration::tunnel::serve_local(
            migration.clone(),
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(crate::migration::controller::run(
            migration.clone(),
            raft.clone(),
            stop_rx.clone(),
        )));
        let placement = opts.placement.unwrap_or_default();

        {
            let transport = transport.clone();
            let raft = raft.clone();
            let mut stop = stop_rx.clone();
            let ext = Arc::new(crate::console::NodeExtensions {
                me: config.node_id,
                reader: reader.clone(),
                hv: hv.clone(),
                stats: stats.clone(),
                images: images.clone(),
                liveness: liveness.clone(),
                migration: Some(migration.clone()),
                policy: placement.policy,
            });
            tasks.push(tokio::spawn(async move {
                transport
                    .serve(raft, ext, async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await;
            }));
        }

        let control = Arc::new(NodeControl {
            id: config.node_id,
            name: config.name.clone(),
            raft: raft.clone(),
            cluster,
            reader,
            transport,
            tuning: config.tuning.clone(),
            metrics: RaftMetrics::new(),
            started: Instant::now(),
            hv: hv.clone(),
            stats: stats.clone(),
            images: images.clone(),
            liveness,
            placement,
            federation: Arc::new(crate::federation::NodeFederation::new(
                identity.clone(),
                crate::federation::advertised_addr(federation_addr, &config.peer_addr),
            )),
        });
        control.metrics.register(Box::new(store.append_histogram()));
        for c in migration.metrics.collectors() {
            control.metrics.register(c);
        }

        if config.init_pending {
            finish_init(&control, &dir, &config).await?;
            config.init_pending = false;
            config.save(&dir)?;
            let _ = std::fs::remove_file(dir.join(INIT_PENDING_FILE));
        }

        tasks.push(tokio::spawn(crate::images::run_gc(
            images.clone(),
            Duration::from_secs(2),
            stop_rx.clone(),
        )));
        // A witness only votes: no agent, no VMs, and it keeps itself unschedulable.
        if !config.witness {
            tasks.push(tokio::spawn(run_agent(
                control.clone(),
                config.clone(),
                images,
                migration,
                dir.clone(),
                stop_rx.clone(),
            )));
        }
        // Cross-site moves: the target site is reached over its link (gRPC, mutual TLS).
        tasks.push(tokio::spawn(crate::site_move::run(
            crate::site_move::Runner {
                me: config.node_id,
                raft: raft.clone(),
                log: Arc::new(crate::site_move::RaftSiteLog {
                    me: config.node_id,
                    cluster: control.cluster.clone(),
                    reader: control.reader.clone(),
                }),
                disks: Arc::new(crate::site_move::NodeDisks {
                    me: config.node_id,
                    images: site_move_images,
                }),
                targets: crate::site_move::link_targets(
                    control.reader.clone(),
                    control.federation.peers.clone(),
                ),
                settings: crate::site_move::settings(&config.tuning),
                tick: Duration::from_millis(500),
            },
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(crate::stats::run_sampler(
            stats,
            hv,
            control.reader.clone(),
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(crate::features::advertise(
            control.clone(),
            crate::features::own_traits(
                config.witness,
                &opts.missing_features,
                Some(
                    crate::federation::advertised_addr(federation_addr, &config.peer_addr)
                        .to_string(),
                ),
            ),
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(crate::membership::run(
            control.clone(),
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(crate::liveness::run_heartbeats(
            control.clone(),
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(crate::liveness::run_quorum_probe(
            control.clone(),
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(crate::liveness::run_controller(
            control.clone(),
            stop_rx.clone(),
        )));
        if !opts.no_placement_controller {
            tasks.push(tokio::spawn(crate::placement::run(
                control.clone(),
                placement,
                stop_rx.clone(),
            )));
        }
        {
            let control = control.clone();
            let mut stop = stop_rx.clone();
            tasks.push(tokio::spawn(async move {
                let mut rx = control.raft.metrics();
                let mut leader = None;
                loop {
                    {
                        let m = rx.borrow_and_update().clone();
                        control.metrics.observe(&m, &mut leader);
                    }
                    tokio::select! {
                        r = rx.changed() => if r.is_err() { return },
                        _ = stop.changed() => return,
                    }
                }
            }));
        }

        let api_addr = listener.local_addr()?;
        // The dashboard is static and talks to the API of the same origin.
        let api_config = api::ApiConfig {
            site_stale_after: Duration::from_millis(config.tuning.site_stale_after_ms),
            ..api::ApiConfig::default()
        };
        let app = api::router(api::AppState::new(control.clone(), api_config)).merge(web::router());
        tasks.extend(crate::federation::spawn(
            control.clone(),
            federation_listener,
            app.clone(),
            &config.tuning,
            stop_rx.clone(),
        ));
        let mut stop = stop_rx.clone();
        let api_task = tokio::spawn(async move {
            let graceful = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(graceful)
                .await
            {
                tracing::error!(error = %e, "API server failed");
            }
        });

        Ok(Node {
            config,
            api_addr,
            control,
            stop_tx,
            api_task,
            tasks,
            store,
        })
    }

    /// Stops accepting requests, lets in-flight ones finish, stops Raft and flushes the store.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop_tx.send(true);
        if tokio::time::timeout(Duration::from_secs(10), self.api_task)
            .await
            .is_err()
        {
            tracing::warn!("in-flight requests did not finish within 10 s");
        }
        if let Err(e) = self.control.raft.shutdown().await {
            tracing::warn!(error = %e, "Raft did not shut down cleanly");
        }
        for t in self.tasks {
            t.abort();
        }
        self.store.flush().await?;
        Ok(())
    }
}

fn apply_agent_options(config: &mut NodeConfig, opts: &ServeOptions) {
    if let Some(uri) = &opts.libvirt_uri {
        config.libvirt_uri = uri.clone();
    }
    if opts.guest_kernel.is_some() {
        config.guest_kernel = opts.guest_kernel.clone();
    }
    if opts.guest_initrd.is_some() {
        config.guest_initrd = opts.guest_initrd.clone();
    }
    if opts.domain_type.is_some() {
        config.domain_type = opts.domain_type.clone();
    }
}

/// What the agent needs of the node's configuration (also the migration target's domain specs).
fn agent_config(config: &NodeConfig) -> crate::agent::AgentConfig {
    crate::agent::AgentConfig {
        guest_kernel: config.guest_kernel.clone(),
        guest_initrd: config.guest_initrd.clone(),
        ..Default::default()
    }
}

/// Connects to libvirt (retrying while it is down) and runs the agent until shutdown.
async fn run_agent(
    ctl: Arc<NodeControl>,
    config: NodeConfig,
    images: Arc<crate::images::NodeImages>,
    migration: crate::migration::SharedEnv,
    data_dir: PathBuf,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(200);
    let hv = loop {
        let mut lv = hypervisor::LibvirtConfig::new(config.libvirt_uri.clone());
        lv.force_domain_type = match config.domain_type.as_deref() {
            Some("kvm") => Some(hypervisor::DomainType::Kvm),
            Some("qemu") => Some(hypervisor::DomainType::Qemu),
            _ => None,
        };
        match hypervisor::LibvirtHypervisor::connect_with(lv).await {
            Ok(hv) => break hv,
            Err(e) => {
                tracing::warn!(uri = %config.libvirt_uri, error = %e, "libvirt unavailable; VMs on this node wait");
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    };
    tracing::info!(uri = %config.libvirt_uri, "agent connected to libvirt");
    let hv: Arc<dyn hypervisor::Hypervisor> = Arc::new(hv);
    let _ = ctl.hv.set(hv.clone());
    // The capacity reporter ends with the node (it watches `stop`).
    tokio::spawn(crate::capacity::run(
        ctl.clone(),
        hv.clone(),
        data_dir,
        stop.clone(),
    ));
    let mut agent_config = agent_config(&config);
    agent_config.images = Some(images);
    let agent = crate::agent::Agent::new(
        ctl.id,
        format!("{}/{}", config.cluster_id, ctl.id),
        hv,
        ctl.reader.clone(),
        ctl.cluster.clone(),
        agent_config,
        ctl.liveness.clone(),
    )
    .with_migration(migration);
    agent.run(stop).await;
}

async fn bind_api(opts: &ServeOptions) -> anyhow::Result<tokio::net::TcpListener> {
    let addr = match opts.api_addr {
        Some(a) => a,
        None => DEFAULT_API_ADDR.parse()?,
    };
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind API {addr}"))
}

fn peer_addr_of(opts: &ServeOptions) -> anyhow::Result<SocketAddr> {
    let addr = match opts.peer_addr {
        Some(a) => a,
        None => DEFAULT_PEER_ADDR.parse()?,
    };
    probe_udp(addr)
}

async fn init_new(
    opts: &ServeOptions,
    dir: &Path,
    tls_dir: &Path,
) -> anyhow::Result<(NodeConfig, NodeIdentity, tokio::net::TcpListener)> {
    let name = opts.name.clone().unwrap_or_else(default_name);
    let site_name = opts
        .site
        .clone()
        .unwrap_or_else(|| raft::federation::DEFAULT_SITE.to_string());
    if !raft::federation::SiteIdentity::valid_name(&site_name) {
        bail!("site name {site_name:?} is invalid: use 1-32 of a-z, 0-9 and -");
    }
    let listener = bind_api(opts).await?;
    let peer = peer_addr_of(opts)?;
    let cluster_id = uuid::Uuid::new_v4().to_string();
    let ca = tls::generate_ca(&cluster_id)?;
    let key = NodeKey::generate(&name)?;
    let cert_pem = tls::sign_node_csr(&ca, &key.csr_pem, &name)?;
    let identity = NodeIdentity {
        ca_cert_pem: ca.cert_pem.clone(),
        cert_pem,
        key_pem: key.key_pem.clone(),
    };
    identity.save(tls_dir)?;

    let token = JoinToken::generate(&tls::ca_fingerprint(&ca.cert_pem)?);
    let password = match std::env::var("NOVACRON_ADMIN_PASSWORD") {
        Ok(p) if !p.is_empty() => p,
        _ => random_password(),
    };
    write_atomic(&dir.join(ADMIN_PASSWORD_FILE), password.as_bytes(), 0o600)?;
    write_atomic(
        &dir.join(JOIN_TOKEN_FILE),
        token.to_string().as_bytes(),
        0o600,
    )?;
    let admin_password_hash =
        tokio::task::spawn_blocking(move || api::auth::hash_password(&password))
            .await?
            .map_err(|e| anyhow!("{e}"))?;
    let jwt_key: [u8; 32] = rand::random();
    let material = InitMaterial {
        cluster_id: cluster_id.clone(),
        ca_cert_pem: ca.cert_pem.clone(),
        ca_key_pem: ca.key_pem.clone(),
        jwt_key_hex: hex::encode(jwt_key),
        join_secret_sha256: token.secret_sha256(),
        admin_password_hash,
        site: Some(raft::federation::SiteIdentity {
            id: crate::federation::new_site_id(),
            name: site_name,
        }),
    };
    write_atomic(
        &dir.join(INIT_PENDING_FILE),
        &serde_json::to_vec(&material)?,
        0o600,
    )?;
    let config = NodeConfig {
        version: 1,
        name,
        node_id: 1,
        cluster_id,
        api_addr: listener.local_addr()?.to_string(),
        peer_addr: peer.to_string(),
        init_pending: true,
        tuning: opts.tuning.clone().unwrap_or_default(),
        libvirt_uri: crate::config::default_libvirt_uri(),
        guest_kernel: None,
        guest_initrd: None,
        domain_type: None,
        witness: opts.witness,
        federation_addr: None,
    };
    let mut config = config;
    apply_agent_options(&mut config, opts);
    config.save(dir)?;
    Ok((config, identity, listener))
}

/// Makes this node the single voter and commits the cluster's identity, admin and itself.
async fn finish_init(ctl: &NodeControl, dir: &Path, config: &NodeConfig) -> anyhow::Result<()> {
    let text = std::fs::read(dir.join(INIT_PENDING_FILE)).context(
        "the cluster's initial secrets are missing; remove the data dir and --init again",
    )?;
    let m: InitMaterial = serde_json::from_slice(&text)?;
    let member = Member {
        name: config.name.clone(),
        api_addr: config.api_addr.clone(),
        peer_addr: config.peer_addr.clone(),
    };
    if !ctl.raft.is_initialized().await? {
        let mut nodes = std::collections::BTreeMap::new();
        nodes.insert(config.node_id, member.clone());
        ctl.raft
            .initialize(nodes)
            .await
            .map_err(|e| anyhow!("cannot initialise the cluster: {e}"))?;
    }
    let me = config.node_id;
    wait_metrics(
        &ctl.raft,
        Duration::from_secs(30),
        "this node to lead",
        |x| x.current_leader == Some(me),
    )
    .await?;
    let now = api::now_ms();
    let secrets = ClusterSecrets {
        cluster_id: m.cluster_id,
        ca_cert_pem: m.ca_cert_pem,
        ca_key_pem: m.ca_key_pem,
        jwt_keys: vec![hex::decode(&m.jwt_key_hex)?],
        join_secret_sha256: m.join_secret_sha256,
        created_at: now,
    };
    // Ids carry the home site (`<site id>-<uuid>`), the admin's too: it is known by that id
    // at linked sites.
    let admin_id = match &m.site {
        Some(site) => format!("{}-{}", site.id, uuid::Uuid::new_v4()),
        None => uuid::Uuid::new_v4().to_string(),
    };
    let admin = User {
        id: admin_id,
        username: "admin".into(),
        password_hash: m.admin_password_hash,
        tenant: SYSTEM_TENANT.into(),
        role: Role::Admin,
        created_at: now,
        updated_at: now,
        version: 0,
    };
    let (_, r) = ctl
        .cluster
        .write(Request::new(
            now,
            "init",
            Command::InitCluster { secrets, admin },
        ))
        .await?;
    match r {
        Response::Rejected {
            code: raft::RejectCode::AlreadyInitialized,
            ..
        }
        | Response::User(_) => {}
        other => bail!("cluster initialisation was refused: {other:?}"),
    }
    let (_, r) = ctl
        .cluster
        .write(Request::new(now, "init", Command::RegisterNode { member }))
        .await?;
    match r {
        Response::Node(n) if n.id == me => {}
        other => bail!("registering the first node failed: {other:?}"),
    }
    if let Some(site) = m.site {
        crate::federation::init_site(ctl, site).await?;
    }
    Ok(())
}

async fn join_existing(
    opts: &ServeOptions,
    url: &str,
    dir: &Path,
    tls_dir: &Path,
) -> anyhow::Result<(NodeConfig, NodeIdentity, tokio::net::TcpListener)> {
    let token_text = opts
        .token
        .clone()
        .ok_or_else(|| anyhow!("--join needs --token"))?;
    let token: JoinToken = token_text
        .parse()
        .map_err(|e| anyhow!("the join token is malformed: {e}"))?;
    let name = opts.name.clone().unwrap_or_else(default_name);
    let listener = bind_api(opts).await?;
    let peer = peer_addr_of(opts)?;
    let key = NodeKey::generate(&name)?;
    let member = Member {
        name: name.clone(),
        api_addr: listener.local_addr()?.to_string(),
        peer_addr: peer.to_string(),
    };
    let req = api::JoinRequest {
        token: token_text,
        csr_pem: key.csr_pem.clone(),
        member,
    };
    let resp = post_join(url, &req).await?;
    if tls::ca_fingerprint(&resp.ca_cert_pem)? != token.ca_fingerprint {
        bail!("the cluster at {url} presented a CA that does not match the join token; refusing to join");
    }
    let identity = NodeIdentity {
        ca_cert_pem: resp.ca_cert_pem,
        cert_pem: resp.cert_pem,
        key_pem: key.key_pem,
    };
    identity.save(tls_dir)?;
    let config = NodeConfig {
        version: 1,
        name,
        node_id: resp.node_id,
        cluster_id: resp.cluster_id,
        api_addr: req.member.api_addr.clone(),
        peer_addr: req.member.peer_addr.clone(),
        init_pending: false,
        tuning: opts.tuning.clone().unwrap_or_default(),
        libvirt_uri: crate::config::default_libvirt_uri(),
        guest_kernel: None,
        guest_initrd: None,
        domain_type: None,
        witness: opts.witness,
        federation_addr: None,
    };
    let mut config = config;
    apply_agent_options(&mut config, opts);
    config.save(dir)?;
    Ok((config, identity, listener))
}

/// Posts the join request, following the leader hint and retrying while there is no leader.
async fn post_join(url: &str, req: &api::JoinRequest) -> anyhow::Result<api::JoinResponse> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut target = url.trim_end_matches('/').to_string();
    let mut backoff = Duration::from_millis(100);
    loop {
        let result = http
            .post(format!("{target}/api/v1/cluster/join"))
            .json(req)
            .send()
            .await;
        match result {
            Ok(resp) if resp.status().is_success() => return Ok(resp.json().await?),
            Ok(resp) => {
                let status = resp.status();
                let leader = resp
                    .headers()
                    .get("x-novacron-leader")
                    .and_then(|v| v.to_str().ok())
                    .map(|s| format!("http://{s}"));
                let body: serde_json::Value = resp.json().await.unwrap_or_default();
                let detail = body["detail"].as_str().unwrap_or("join failed").to_string();
                match (status.as_u16(), leader) {
                    (421, Some(l)) => {
                        target = l;
                        continue;
                    }
                    (421 | 503 | 504, _) if Instant::now() < deadline => {}
                    _ => bail!(
                        "join refused by {target}: {detail} (HTTP {})",
                        status.as_u16()
                    ),
                }
            }
            Err(e) if Instant::now() < deadline => {
                tracing::info!(error = %e, "cluster not reachable yet; retrying");
            }
            Err(e) => bail!("cannot reach {target}: {e}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
