//! The `novacron` binary: `serve` runs a node, `dev up` a local cluster, and the other
//! subcommands are the CLI client of the REST API.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use node::client::{ClientArgs, ClientCommand};
use node::config::ServeArgs;

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

#[derive(Subcommand)]
enum DevCommand {
    /// Start a local N-node cluster (on per-node libvirt hosts as root with libvirt and QEMU,
    /// else on loopback with libvirt's test driver); Ctrl-C or SIGTERM stops it.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Node i serves its API on BASE+i and QUIC on BASE+100+i; 0 picks free ports.
        #[arg(long, default_value_t = 8080)]
        base_port: u16,
        /// Where the nodes keep their data (default: a fresh temporary directory).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Use libvirt's test driver even where each node could get its own libvirt host.
        #[arg(long)]
        test_driver: bool,
        /// The site name of the new cluster (default `default`).
        #[arg(long)]
        site: Option<String>,
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

fn tunnel_command(peer: u64, socket: std::path::PathBuf) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("novacron tunnel: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Whatever goes to stderr shows up in libvirt's error for the migration.
    match runtime.block_on(node::migration::tunnel::run_command(peer, socket)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("novacron tunnel to node {peer}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    // One TLS provider for quinn, reqwest and rustls (see ARCHITECTURE.md).
    let _ = rustls::crypto::ring::default_provider().install_default();
    // libvirt runs us as its migration transport through a symlink naming the target node; it
    // passes no arguments, so argv[0] is all there is.
    if let Some((peer, socket)) = std::env::args()
        .next()
        .and_then(|a| node::migration::tunnel::tunnel_invocation(&a))
    {
        return tunnel_command(peer, socket);
    }
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
                    witness: a.witness,
                    missing_features: a.simulate_missing_features,
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
                    federation_addr: a.federation_addr,
                    site: a.site,
                };
                node::server::serve(opts, node::server::shutdown_signal()).await
            }
            Command::Dev {
                command:
                    DevCommand::Up {
                        nodes,
                        base_port,
                        data_dir,
                        test_driver,
                        site,
                    },
            } => {
                init_tracing();
                node::dev::up(nodes, base_port, data_dir, test_driver, site).await
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
