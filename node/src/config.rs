//! The node's stored settings (`DIR/node.json`) and the tunables of the Raft engine.
//!
//! A node is configured once, by `--init` or `--join`; a restart with only `--data-dir` reads
//! everything back from here. Secrets are never in this file: the TLS key sits in `DIR/tls/`
//! (mode 0600) and cluster secrets live in the replicated state.
//!
//! It also owns [`ServeArgs`], the settings of `novacron serve`: each flag can be given as an
//! environment variable, which is how a packaged node is configured (`/etc/default/novacron`,
//! read by the systemd unit). [`example_env_file`] renders that file, commented, from these
//! types; `deploy/novacron.env` is its committed output and a test keeps it current.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `novacron serve`: the flags, each also read from the environment variable it names.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Where the node keeps its state (created if missing).
    #[arg(long, env = "NOVACRON_DATA_DIR")]
    pub data_dir: PathBuf,
    /// The node's name (default: the host name). Used only when the node is created.
    #[arg(long, env = "NOVACRON_NAME")]
    pub name: Option<String>,
    /// Address of the REST API and dashboard (default 127.0.0.1:8080; stored at creation).
    #[arg(long, env = "NOVACRON_API_ADDR")]
    pub api_addr: Option<SocketAddr>,
    /// UDP address of the QUIC endpoint between nodes (default 127.0.0.1:7070; stored).
    #[arg(long, env = "NOVACRON_PEER_ADDR")]
    pub peer_addr: Option<SocketAddr>,
    /// TCP address of the federation endpoint (gRPC over mutual TLS) that linked sites call
    /// (default: the API's host, API port + 2; stored at creation).
    #[arg(long, env = "NOVACRON_FEDERATION_ADDR")]
    pub federation_addr: Option<SocketAddr>,
    /// The site name given to a new cluster at --init (default `default`); every object id made
    /// here starts with the site's generated id.
    #[arg(long, env = "NOVACRON_SITE")]
    pub site: Option<String>,
    /// Create a new cluster with this node as its only voter (ignored once the node exists).
    #[arg(long, env = "NOVACRON_INIT", conflicts_with = "join")]
    pub init: bool,
    /// API URL of a node of the cluster to join (ignored once the node exists).
    #[arg(long, env = "NOVACRON_JOIN", requires = "token")]
    pub join: Option<String>,
    /// Join token (from DIR/join-token of the first node).
    #[arg(long, env = "NOVACRON_JOIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Join as a witness: a voter that runs no VMs and no agent (2-node sites).
    #[arg(long, env = "NOVACRON_WITNESS")]
    pub witness: bool,
    /// Raft and membership timers, as JSON (see Tuning); for tests and benchmarks.
    #[arg(long, env = "NOVACRON_TUNING", hide = true)]
    pub tuning: Option<String>,
    /// libvirt connection of this node's agent (stored; default qemu:///system).
    /// `test:///default` runs VMs on libvirt's in-process test driver.
    #[arg(long, env = "NOVACRON_LIBVIRT_URI")]
    pub libvirt_uri: Option<String>,
    /// Kernel that VMs with image `tiny` boot directly (the test guest).
    #[arg(long, env = "NOVACRON_GUEST_KERNEL")]
    pub guest_kernel: Option<PathBuf>,
    /// Initrd that VMs with image `tiny` boot with.
    #[arg(long, env = "NOVACRON_GUEST_INITRD")]
    pub guest_initrd: Option<PathBuf>,
    /// Force the libvirt domain type (kvm or qemu) where detection cannot tell that /dev/kvm
    /// does not really work (nested or emulated KVM).
    #[arg(long, env = "NOVACRON_DOMAIN_TYPE", value_parser = ["kvm", "qemu"])]
    pub domain_type: Option<String>,
    /// vCPUs the scheduler may book per physical CPU while this node leads.
    #[arg(long, env = "NOVACRON_CPU_OVERCOMMIT", default_value_t = 4.0)]
    pub cpu_overcommit: f64,
    /// Memory the scheduler may book per MiB of RAM while this node leads.
    #[arg(long, env = "NOVACRON_MEMORY_OVERCOMMIT", default_value_t = 1.0)]
    pub memory_overcommit: f64,
    /// spread (emptiest node first) or pack (fullest node that fits first).
    #[arg(long, env = "NOVACRON_SCHEDULER_STRATEGY", default_value = "spread", value_parser = ["spread", "pack"])]
    pub strategy: String,
    /// Command types this node pretends not to understand, comma-separated: simulates a node
    /// of an older release for upgrade tests.
    #[arg(
        long,
        env = "NOVACRON_SIMULATE_MISSING_FEATURES",
        value_delimiter = ',',
        hide = true
    )]
    pub simulate_missing_features: Vec<String>,
}

/// The commented environment file of a packaged node (`/etc/default/novacron`), rendered from
/// [`ServeArgs`] and the defaults of [`Tuning`], so it cannot drift from what the binary reads.
pub fn example_env_file() -> String {
    use clap::Args;
    use std::fmt::Write;
    let cmd = ServeArgs::augment_args(clap::Command::new("serve"));
    let mut out = String::new();
    out.push_str(
        "# Settings of `novacron serve` for the systemd unit (EnvironmentFile=).\n\
         # Generated from the node's configuration types; regenerate with\n\
         # `UPDATE_EXAMPLES=1 cargo test -p node config::tests`.\n\
         #\n\
         # A node is created once (NOVACRON_INIT=true on the first node, NOVACRON_JOIN and\n\
         # NOVACRON_JOIN_TOKEN on the others) and then restarts from its data directory, so\n\
         # the creation settings may stay set. The unit passes --data-dir itself.\n",
    );
    for arg in cmd.get_arguments() {
        let Some(env) = arg.get_env() else { continue };
        let env = env.to_string_lossy();
        if arg.is_hide_set() || env == "NOVACRON_DATA_DIR" {
            continue;
        }
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        out.push('\n');
        for line in help.lines() {
            let _ = writeln!(out, "# {line}");
        }
        let flag = arg
            .get_long()
            .map(str::to_string)
            .unwrap_or_else(|| arg.get_id().to_string());
        let _ = writeln!(out, "# (flag --{flag})");
        let _ = writeln!(out, "#{env}=");
    }
    let tuning = serde_json::to_string(&Tuning::default()).unwrap_or_default();
    let _ = write!(
        out,
        "\n# Raft and membership timers in milliseconds (defaults shown); change with care.\n\
         #NOVACRON_TUNING={tuning}\n"
    );
    let _ = write!(
        out,
        "\n# Logging: a tracing filter, and `json` for structured logs.\n\
         #NOVACRON_LOG=info,openraft=warn,sled=warn,quinn=warn\n\
         #NOVACRON_LOG_FORMAT=json\n"
    );
    out
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid tuning: {0}")]
    Invalid(String),
    #[error("{path} is not a valid node configuration: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// What a node remembers about itself across restarts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeConfig {
    /// Format of this file, for upgrades.
    pub version: u32,
    pub name: String,
    pub node_id: u64,
    pub cluster_id: String,
    /// Addresses actually bound (a port 0 given on the command line is replaced by the real one).
    pub api_addr: String,
    pub peer_addr: String,
    /// True until the first node has written the cluster's initial state; a crash in between
    /// makes the restart finish the job.
    pub init_pending: bool,
    #[serde(default)]
    pub tuning: Tuning,
    /// The agent's libvirt connection.
    #[serde(default = "default_libvirt_uri")]
    pub libvirt_uri: String,
    #[serde(default)]
    pub guest_kernel: Option<PathBuf>,
    #[serde(default)]
    pub guest_initrd: Option<PathBuf>,
    /// `kvm` or `qemu` to override detection; `None` detects.
    #[serde(default)]
    pub domain_type: Option<String>,
    /// A witness votes and runs nothing else (no agent, never schedulable).
    #[serde(default)]
    pub witness: bool,
    /// The federation endpoint actually bound (`None` in a node made before federation: then
    /// it is derived from the API address at start).
    #[serde(default)]
    pub federation_addr: Option<String>,
}

pub fn default_libvirt_uri() -> String {
    "qemu:///system".to_string()
}

/// Timers and thresholds; defaults suit a LAN. Tests shorten them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tuning {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Take a snapshot after this many applied entries since the last one.
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot (for followers slightly behind).
    pub keep_after_snapshot: u64,
    /// A voter unreachable from the leader this long is replaced by a healthy learner.
    pub voter_down_after_ms: u64,
    /// A node whose heartbeats stopped this long is marked suspect.
    pub suspect_after_ms: u64,
    /// Every node sends the leader a heartbeat (capacity, load) this often, over QUIC, not
    /// through Raft; the reply renews its fencing lease.
    #[serde(default = "default_node_heartbeat_ms")]
    pub node_heartbeat_ms: u64,
    /// A node whose heartbeats stopped this long is marked down (through Raft).
    #[serde(default = "default_node_down_after_ms")]
    pub node_down_after_ms: u64,
    /// How long a granted lease lasts, from the moment the node SENT the heartbeat, on its own
    /// clock. A node without a valid lease destroys its HA VMs and starts nothing.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// Extra wait after `lease_ms` before the leader restarts a down node's HA VMs elsewhere:
    /// covers clock-rate drift and a predecessor leader's last grants. The leader grants
    /// leases only while its leadership was confirmed by a quorum within half of this.
    #[serde(default = "default_lease_margin_ms")]
    pub lease_margin_ms: u64,
    /// How often the statistics of local VMs are sampled.
    #[serde(default = "default_stats_interval_ms")]
    pub stats_interval_ms: u64,
    /// How often the leader pulls each linked site's catalog changes.
    #[serde(default = "default_federation_sync_ms")]
    pub federation_sync_ms: u64,
    /// The leader commits a pull of each linked site at least this often, even when nothing
    /// changed there, so the site's last sync time and latency stay fresh.
    #[serde(default = "default_federation_heartbeat_ms")]
    pub federation_heartbeat_ms: u64,
    /// How long the link to the target site may stay down during a cross-site move's disk
    /// copy before the move rolls back (the copy resumes when it returns sooner).
    #[serde(default = "default_site_move_link_timeout_ms")]
    pub site_move_link_timeout_ms: u64,
    /// Caps the bytes per second of a cross-site move's disk copy; `None`: no cap.
    #[serde(default)]
    pub site_move_bytes_per_sec: Option<u64>,
    /// A linked site whose catalog was not refreshed for this long is shown as stale.
    #[serde(default = "default_site_stale_after_ms")]
    pub site_stale_after_ms: u64,
}

fn default_site_move_link_timeout_ms() -> u64 {
    60_000
}

fn default_site_stale_after_ms() -> u64 {
    15_000
}

fn default_federation_sync_ms() -> u64 {
    1_000
}
fn default_federation_heartbeat_ms() -> u64 {
    5_000
}

fn default_stats_interval_ms() -> u64 {
    5_000
}

fn default_node_heartbeat_ms() -> u64 {
    500
}
fn default_node_down_after_ms() -> u64 {
    5_000
}
fn default_lease_ms() -> u64 {
    5_000
}
fn default_lease_margin_ms() -> u64 {
    2_000
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            election_min_ms: 500,
            election_max_ms: 1000,
            snapshot_every: 10_000,
            keep_after_snapshot: 1_000,
            voter_down_after_ms: 30_000,
            suspect_after_ms: 2_000,
            stats_interval_ms: default_stats_interval_ms(),
            node_heartbeat_ms: default_node_heartbeat_ms(),
            node_down_after_ms: default_node_down_after_ms(),
            lease_ms: default_lease_ms(),
            lease_margin_ms: default_lease_margin_ms(),
            federation_sync_ms: default_federation_sync_ms(),
            federation_heartbeat_ms: default_federation_heartbeat_ms(),
            site_move_link_timeout_ms: default_site_move_link_timeout_ms(),
            site_move_bytes_per_sec: None,
            site_stale_after_ms: default_site_stale_after_ms(),
        }
    }
}

impl Tuning {
    pub fn voter_down_after(&self) -> Duration {
        Duration::from_millis(self.voter_down_after_ms)
    }
    pub fn suspect_after(&self) -> Duration {
        Duration::from_millis(self.suspect_after_ms)
    }

    /// Refuses timer combinations under which leases could not be renewed in time or the
    /// leader could restart a VM before its old node has fenced it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |why: String| Err(ConfigError::Invalid(why));
        if self.node_heartbeat_ms == 0 {
            return invalid("node_heartbeat_ms must be positive".into());
        }
        if self.lease_ms < 3 * self.node_heartbeat_ms {
            return invalid(format!(
                "lease_ms ({}) must be at least 3 heartbeats ({} ms each)",
                self.lease_ms, self.node_heartbeat_ms
            ));
        }
        // The leader grants only with a quorum confirmation younger than margin/2, and it
        // probes once per heartbeat: the margin must hold a few probes.
        if self.lease_margin_ms < 4 * self.node_heartbeat_ms {
            return invalid(format!(
                "lease_margin_ms ({}) must be at least 4 heartbeats ({} ms each)",
                self.lease_margin_ms, self.node_heartbeat_ms
            ));
        }
        if self.federation_sync_ms == 0 || self.federation_heartbeat_ms == 0 {
            return invalid(
                "federation_sync_ms and federation_heartbeat_ms must be positive".into(),
            );
        }
        if self.node_down_after_ms < self.suspect_after_ms {
            return invalid("node_down_after_ms must not be below suspect_after_ms".into());
        }
        Ok(())
    }
}

pub const CONFIG_FILE: &str = "node.json";
pub const ADMIN_PASSWORD_FILE: &str = "admin-password";
pub const JOIN_TOKEN_FILE: &str = "join-token";

impl NodeConfig {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(CONFIG_FILE)
    }

    pub fn exists(dir: &Path) -> bool {
        Self::path(dir).exists()
    }

    pub fn load(dir: &Path) -> Result<Self, ConfigError> {
        let path = Self::path(dir);
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::Parse { path, source })
    }

    /// Writes atomically (temp file, fsync, rename) so a crash never leaves half a config.
    pub fn save(&self, dir: &Path) -> Result<(), ConfigError> {
        let path = Self::path(dir);
        let text = serde_json::to_vec_pretty(self).map_err(|source| ConfigError::Parse {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &text, 0o644).map_err(|source| ConfigError::Write { path, source })
    }
}

/// Writes a file via a temporary sibling, fsyncs it and renames it into place.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_and_secret_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = NodeConfig {
            version: 1,
            name: "n1".into(),
            node_id: 1,
            cluster_id: "c".into(),
            api_addr: "127.0.0.1:8080".into(),
            peer_addr: "127.0.0.1:7070".into(),
            init_pending: false,
            tuning: Tuning::default(),
            libvirt_uri: default_libvirt_uri(),
            guest_kernel: None,
            guest_initrd: None,
            domain_type: None,
            witness: false,
            federation_addr: None,
        };
        cfg.save(dir.path()).unwrap();
        assert_eq!(NodeConfig::load(dir.path()).unwrap(), cfg);
        assert!(cfg.tuning.validate().is_ok());

        use std::os::unix::fs::PermissionsExt;
        let p = dir.path().join(ADMIN_PASSWORD_FILE);
        write_atomic(&p, b"pw", 0o600).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn tuning_without_liveness_fields_takes_their_defaults_and_bad_timers_are_refused() {
        let t: Tuning = serde_json::from_str(
            r#"{"heartbeat_ms":100,"election_min_ms":400,"election_max_ms":800,
                "snapshot_every":10,"keep_after_snapshot":5,"voter_down_after_ms":1000,
                "suspect_after_ms":1000}"#,
        )
        .unwrap();
        assert_eq!(t.lease_ms, default_lease_ms());
        assert_eq!(t.node_heartbeat_ms, default_node_heartbeat_ms());
        assert!(t.validate().is_ok());
        let short_lease = Tuning {
            lease_ms: 2 * t.node_heartbeat_ms,
            ..t.clone()
        };
        assert!(short_lease.validate().is_err());
        let short_margin = Tuning {
            lease_margin_ms: t.node_heartbeat_ms,
            ..t
        };
        assert!(short_margin.validate().is_err());
    }

    /// The committed example config is what the binary would generate today.
    #[test]
    fn example_env_file_is_current() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/novacron.env");
        let want = example_env_file();
        if std::env::var_os("UPDATE_EXAMPLES").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "deploy/novacron.env is stale; run UPDATE_EXAMPLES=1 cargo test -p node config::tests"
        );
        // Every documented variable is one the binary reads.
        for line in want.lines().filter(|l| l.starts_with("#NOVACRON_")) {
            assert!(line.contains('='), "{line}");
        }
        assert!(want.contains("#NOVACRON_INIT="));
        assert!(want.contains("#NOVACRON_WITNESS="));
    }
}
