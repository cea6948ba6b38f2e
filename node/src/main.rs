//! The `novacron` binary: `serve` runs a node, `dev up` a local cluster, and the other
//! subcommands are the CLI client of the REST API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use node::client::{ClientArgs, ClientCommand};

#[derive(Parser)]
#[command(
    name = "novacron",
    version,
    about = "A control plane for virtual machines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: create a cluster (--init), join one (--join), or restart from DIR.
    Serve(ServeArgs),
    /// Local clusters for trying NovaCron out.
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
    /// Scheduler throughput, alone and committed through a 3-node cluster in this process;
    /// prints JSON (what `cargo xtask bench scheduler` runs).
    #[command(hide = true)]
    BenchScheduler {
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        #[arg(long, default_value_t = 10_000)]
        vms: usize,
        #[arg(long, default_value_t = 500)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
    },
    #[command(flatten)]
    Client(ClientCommand),
}

#[derive(clap::Args)]
struct ServeArgs {
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    api_addr: Option<SocketAddr>,
    #[arg(long)]
    peer_addr: Option<SocketAddr>,
    /// Create a new cluster with this node as its only voter.
    #[arg(long, conflicts_with = "join")]
    init: bool,
    /// API URL of a node of the cluster to join.
    #[arg(long, requires = "token")]
    join: Option<String>,
    /// Join token (from DIR/join-token of the first node).
    #[arg(long, env = "NOVACRON_JOIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Raft and membership timers, as JSON (see Tuning); for tests and benchmarks.
    #[arg(long, env = "NOVACRON_TUNING", hide = true)]
    tuning: Option<String>,
    /// libvirt connection of this node's agent (stored; default qemu:///system).
    /// `test:///default` runs VMs on libvirt's in-process test driver.
    #[arg(long, env = "NOVACRON_LIBVIRT_URI")]
    libvirt_uri: Option<String>,
    /// Kernel and initrd that VMs with image `tiny` boot directly (the test guest).
    #[arg(long, env = "NOVACRON_GUEST_KERNEL")]
    guest_kernel: Option<PathBuf>,
    #[arg(long, env = "NOVACRON_GUEST_INITRD")]
    guest_initrd: Option<PathBuf>,
    /// Force the libvirt domain type (kvm or qemu) where detection cannot tell that /dev/kvm
    /// does not really work (nested or emulated KVM).
    #[arg(long, env = "NOVACRON_DOMAIN_TYPE", value_parser = ["kvm", "qemu"])]
    domain_type: Option<String>,
    /// vCPUs the scheduler may book per physical CPU while this node leads.
    #[arg(long, env = "NOVACRON_CPU_OVERCOMMIT", default_value_t = 4.0)]
    cpu_overcommit: f64,
    /// Memory the scheduler may book per MiB of RAM while this node leads.
    #[arg(long, env = "NOVACRON_MEMORY_OVERCOMMIT", default_value_t = 1.0)]
    memory_overcommit: f64,
    /// spread (emptiest node first) or pack (fullest node that fits first).
    #[arg(long, env = "NOVACRON_SCHEDULER_STRATEGY", default_value = "spread", value_parser = ["spread", "pack"])]
    strategy: String,
}

#[derive(Subcommand)]
enum DevCommand {
    /// Start a local N-node cluster on loopback; Ctrl-C stops it.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 8080)]
        base_port: u16,
        /// Where the nodes keep their data (default: a fresh temporary directory).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("NOVACRON_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,openraft=warn,sled=warn,quinn=warn"));
    let json = std::env::var("NOVACRON_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    // One TLS provider for quinn, reqwest and rustls (see ARCHITECTURE.md).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(a) => {
                init_tracing();
                let tuning = match a.tuning {
                    Some(t) => Some(serde_json::from_str(&t).map_err(|e| {
                        anyhow::anyhow!("--tuning is not valid JSON for the tuning settings: {e}")
                    })?),
                    None => None,
                };
                let opts = node::server::ServeOptions {
                    data_dir: a.data_dir,
                    name: a.name,
                    api_addr: a.api_addr,
                    peer_addr: a.peer_addr,
                    init: a.init,
                    join: a.join,
                    token: a.token,
                    tuning,
                    libvirt_uri: a.libvirt_uri,
                    guest_kernel: a.guest_kernel,
                    guest_initrd: a.guest_initrd,
                    domain_type: a.domain_type,
                    placement: Some(node::placement::PlacementConfig {
                        policy: node::scheduler::Policy {
                            cpu_overcommit: a.cpu_overcommit,
                            memory_overcommit: a.memory_overcommit,
                            strategy: if a.strategy == "pack" {
                                node::scheduler::Strategy::Pack
                            } else {
                                node::scheduler::Strategy::Spread
                            },
                            ..Default::default()
                        },
                        ..Default::default()
                    }),
                    no_placement_controller: false,
                };
                node::server::serve(opts, node::server::shutdown_signal()).await
            }
            Command::Dev {
                command:
                    DevCommand::Up {
                        nodes,
                        base_port,
                        data_dir,
                    },
            } => {
                init_tracing();
                node::dev::up(nodes, base_port, data_dir).await
            }
            Command::BenchScheduler {
                nodes,
                vms,
                batch,
                concurrency,
            } => {
                let report = node::bench::run(node::bench::BenchArgs {
                    nodes,
                    vms,
                    batch,
                    concurrency,
                })
                .await?;
                println!("{}", serde_json::to_string_pretty(&report)?);
                Ok(())
            }
            Command::Client(c) => node::client::run(ClientArgs::from_env(), c).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
