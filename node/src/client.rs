//! The CLI client: each subcommand is one or two REST calls, printed as a table for people or
//! as JSON with `-o json`. Failures exit non-zero with a one-line error.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub enum Output {
    #[default]
    Table,
    Json,
}

/// Where the API is and who we are; flags win over the environment, which wins over the
/// credentials stored by `novacron login`.
#[derive(Debug, Clone, Args, Default)]
pub struct Conn {
    #[arg(long, global = true, env = "NOVACRON_URL")]
    pub url: Option<String>,
    #[arg(
        long = "token",
        global = true,
        env = "NOVACRON_TOKEN",
        hide_env_values = true
    )]
    pub api_token: Option<String>,
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Log in and store the token for later commands.
    Login {
        #[arg(long, default_value = "admin")]
        user: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Cluster membership and Raft state.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
        #[command(flatten)]
        conn: Conn,
    },
    /// Virtual machines.
    Vm {
        #[command(subcommand)]
        command: VmCommand,
        #[command(flatten)]
        conn: Conn,
    },
    /// Cluster nodes: capacity, usage, drain.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
        #[command(flatten)]
        conn: Conn,
    },
    /// Users and their roles.
    User {
        #[command(subcommand)]
        command: UserCommand,
        #[command(flatten)]
        conn: Conn,
    },
    /// Tenants and quotas.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
        #[command(flatten)]
        conn: Conn,
    },
    /// Disk images: resumable, checksummed upload.
    Image {
        #[command(subcommand)]
        command: crate::image_client::ImageCommand,
        #[command(flatten)]
        conn: Conn,
    },
    /// Backups of the control plane: create from a live cluster, restore into a new one.
    Backup {
        #[command(subcommand)]
        command: BackupCommand,
        #[command(flatten)]
        conn: Conn,
    },
    /// Federation: this site, linked sites, link tokens.
    Site {
        #[command(subcommand)]
        command: SiteCommand,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Subcommand)]
pub enum SiteCommand {
    /// Issue a one-time token that lets another site link to this one; prints it with the
    /// federation addresses to give along.
    Token,
    /// Link this site to the site that issued TOKEN (`nft1.…`), reachable at ADDR
    /// (comma-separated). The token is positional: `--token` is the API credential.
    Link {
        token: String,
        #[arg(long, value_delimiter = ',', required = true)]
        addr: Vec<String>,
    },
    /// This site and every linked site, with health, latency, last sync and lag.
    List,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Leader, term, and each member's role and health.
    Status,
    /// What each member advertises and what would block an upgrade; exits non-zero when
    /// something blocks.
    UpgradeCheck,
    /// Quorum-loss recovery, offline on a stopped surviving node: makes it the only voter of
    /// a new configuration (refused while a quorum of the old one answers).
    Recover {
        /// The stopped node's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Confirms the rewrite of the membership.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Download a consistent, checksummed backup of the cluster state (admins; any node).
    Create {
        #[arg(long)]
        out: PathBuf,
    },
    /// Create, in an empty data dir, the first node of a NEW cluster holding the backup's
    /// objects (new cluster id, CA, JWT key and join token; users and passwords kept).
    Restore {
        #[arg(long)]
        file: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, default_value = "node1")]
        name: String,
        #[arg(long, default_value = "127.0.0.1:8080")]
        api_addr: std::net::SocketAddr,
        #[arg(long, default_value = "127.0.0.1:7070")]
        peer_addr: std::net::SocketAddr,
    },
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    Create {
        name: String,
        #[arg(long)]
        max_vms: Option<u64>,
        #[arg(long)]
        max_vcpus: Option<u64>,
        #[arg(long)]
        max_memory: Option<u64>,
        #[arg(long)]
        max_disk: Option<u64>,
    },
    List,
    Show {
        id: String,
    },
    Delete {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    Create {
        name: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Memory in MiB.
        #[arg(long, default_value_t = 128)]
        memory: u64,
        #[arg(long)]
        disk: Option<u64>,
        #[arg(long)]
        image: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        /// `key=value`, repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
        #[arg(long)]
        anti_affinity: Option<String>,
        /// Place on this node (name or id).
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        ha: bool,
        /// Create without starting.
        #[arg(long)]
        stopped: bool,
    },
    List {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        label: Option<String>,
    },
    Show {
        id: String,
    },
    /// Why the VM is on its node (or on none): each node's verdict.
    Explain {
        id: String,
    },
    Start {
        id: String,
    },
    Stop {
        id: String,
    },
    Reboot {
        id: String,
    },
    Delete {
        id: String,
    },
    /// Move a running VM to another node, live; waits and prints the outcome.
    Migrate {
        id: String,
        /// Target node (name or id); omitted: the cluster chooses.
        #[arg(long)]
        to: Option<String>,
        /// Cap the transfer's bandwidth, MiB/s.
        #[arg(long)]
        bandwidth: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    List,
    Drain {
        node: String,
    },
    Undrain {
        node: String,
    },
    /// Remove a (drained, empty) node from the cluster for good.
    Remove {
        node: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    Create {
        name: String,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        role: String,
        /// The new user's password (else NOVACRON_USER_PASSWORD, else read from stdin).
        #[arg(long, env = "NOVACRON_USER_PASSWORD", hide_env_values = true)]
        password: Option<String>,
    },
    List,
    Delete {
        id: String,
    },
}

/// Placeholder for settings shared by every client command (reserved for config files).
#[derive(Debug, Default)]
pub struct ClientArgs;

impl ClientArgs {
    pub fn from_env() -> Self {
        ClientArgs
    }
}

fn credentials_path() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".novacron").join("credentials.json"))
}

fn stored_credentials() -> Option<(String, String)> {
    let text = std::fs::read_to_string(credentials_path()?).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    Some((
        v["url"].as_str()?.to_string(),
        v["token"].as_str()?.to_string(),
    ))
}

struct Api {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
}

impl Api {
    fn new(conn: &Conn, need_token: bool) -> anyhow::Result<Self> {
        let stored = stored_credentials();
        let url = conn
            .url
            .clone()
            .or_else(|| stored.as_ref().map(|s| s.0.clone()))
            .ok_or_else(|| anyhow!("no API URL: pass --url or set NOVACRON_URL"))?;
        let token = conn.api_token.clone().or_else(|| stored.map(|s| s.1));
        if need_token && token.is_none() {
            bail!("not logged in: run `novacron login` or set NOVACRON_TOKEN");
        }
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self {
            http,
            url: url.trim_end_matches('/').to_string(),
            token,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self.http.request(method, format!("{}{}", self.url, path));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.url))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let value: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            let detail = value["detail"].as_str().unwrap_or("request failed");
            let code = value["code"].as_str().unwrap_or("error");
            bail!("{detail} ({code}, HTTP {})", status.as_u16());
        }
        Ok(value)
    }
}

fn read_password() -> anyhow::Result<String> {
    if let Ok(p) = std::env::var("NOVACRON_PASSWORD") {
        return Ok(p);
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("Password: ");
        let _ = std::io::stderr().flush();
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .context("cannot read the password")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(headers.iter().map(|h| h.to_string()).collect()));
    for row in rows {
        println!("{}", line(row));
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A placement explanation for people: the decision, the counts, then one row per node.
fn print_explanation(v: &Value) {
    match v["chosen"].as_u64() {
        Some(id) => println!(
            "placed on {} (node {id}), strategy {}",
            s(&v["chosen_name"]),
            s(&v["strategy"])
        ),
        None => println!("does not fit on any node (strategy {})", s(&v["strategy"])),
    }
    let filtered: Vec<String> = v["filtered"]
        .as_object()
        .map(|m| m.iter().map(|(k, c)| format!("{k}: {c}")).collect())
        .unwrap_or_default();
    println!(
        "{} nodes considered, {} eligible{}{}",
        s(&v["nodes_considered"]),
        s(&v["eligible"]),
        if filtered.is_empty() {
            ""
        } else {
            "; filtered by "
        },
        filtered.join(", ")
    );
    let rows: Vec<Vec<String>> = v["verdicts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|x| {
            let why = match x["verdict"].as_str() {
                Some("scored") => format!("score {}", s(&x["score"])),
                _ => format!("{}: {}", s(&x["filter"]), s(&x["detail"])),
            };
            vec![s(&x["node"]), s(&x["node_name"]), s(&x["verdict"]), why]
        })
        .collect();
    print_table(&["NODE", "NAME", "VERDICT", "WHY"], rows);
    if v["truncated"].as_u64().unwrap_or(0) > 0 {
        println!("({} more nodes not listed)", s(&v["truncated"]));
    }
}

fn emit(output: Output, value: &Value, table: impl FnOnce(&Value)) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Table => table(value),
    }
    Ok(())
}

pub async fn run(_args: ClientArgs, cmd: ClientCommand) -> anyhow::Result<()> {
    match cmd {
        ClientCommand::Login { user, conn } => {
            let api = Api::new(&conn, false)?;
            let password = read_password()?;
            let v = api
                .call(
                    reqwest::Method::POST,
                    "/api/v1/auth/login",
                    Some(json!({"username": user, "password": password})),
                )
                .await?;
            let token = v["token"]
                .as_str()
                .ok_or_else(|| anyhow!("login returned no token"))?;
            if let Some(path) = credentials_path() {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).ok();
                }
                let body = serde_json::to_vec(&json!({"url": api.url, "token": token}))?;
                crate::config::write_atomic(&path, &body, 0o600)
                    .with_context(|| format!("cannot store credentials in {}", path.display()))?;
            }
            emit(conn.output, &v, |_| println!("{token}"))
        }
        ClientCommand::Cluster {
            command: ClusterCommand::UpgradeCheck,
            conn,
        } => {
            let api = Api::new(&conn, true)?;
            let v = api
                .call(reqwest::Method::GET, "/api/v1/cluster/upgrade-check", None)
                .await?;
            emit(conn.output, &v, |v| {
                let rows = v["members"]
                    .as_array()
                    .map(|ms| {
                        ms.iter()
                            .map(|m| {
                                let missing: Vec<String> = m["missing"]
                                    .as_array()
                                    .map(|a| a.iter().map(s).collect())
                                    .unwrap_or_default();
                                vec![
                                    s(&m["name"]),
                                    s(&m["role"]),
                                    s(&m["state"]),
                                    s(&m["release"]),
                                    missing.join(","),
                                ]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                print_table(&["NAME", "ROLE", "STATE", "RELEASE", "MISSING"], rows);
                for b in v["blockers"].as_array().into_iter().flatten() {
                    println!("blocker: {}", s(b));
                }
            })?;
            if v["ok"].as_bool() == Some(true) {
                Ok(())
            } else {
                bail!("the upgrade is blocked (see the blockers above)")
            }
        }
        ClientCommand::Cluster {
            command: ClusterCommand::Recover { data_dir, force },
            conn,
        } => {
            let r = crate::recover::run(&data_dir, force).await?;
            let v = serde_json::to_value(&r)?;
            emit(conn.output, &v, |_| {
                println!(
                    "recovered: node {} is the only voter at index {} (term {}); removed {}; {} VMs fenced (epochs raised)",
                    r.node_id,
                    r.last_applied_index,
                    r.term,
                    r.removed_voters.join(", "),
                    r.vms_fenced
                );
                println!(
                    "start it with `novacron serve --data-dir {}`; new nodes join with its new join-token; wipe the old nodes' data dirs",
                    data_dir.display()
                );
            })
        }
        ClientCommand::Backup {
            command: BackupCommand::Create { out },
            conn,
        } => {
            let api = Api::new(&conn, true)?;
            let token = api.token.clone().unwrap_or_default();
            let (index, sum) = crate::backup::create(&api.url, &token, &out).await?;
            let v = json!({"file": out.display().to_string(), "last_applied_index": index, "sha256": sum});
            emit(conn.output, &v, |_| {
                println!(
                    "backup of index {index} written to {} (sha256 {sum})",
                    out.display()
                )
            })
        }
        ClientCommand::Backup {
            command:
                BackupCommand::Restore {
                    file,
                    data_dir,
                    name,
                    api_addr,
                    peer_addr,
                },
            conn,
        } => {
            let cfg = crate::backup::restore(&crate::backup::RestoreOptions {
                file,
                data_dir: data_dir.clone(),
                name,
                api_addr,
                peer_addr,
            })?;
            let v = json!({"cluster_id": cfg.cluster_id, "node_id": cfg.node_id, "api_addr": cfg.api_addr, "peer_addr": cfg.peer_addr});
            emit(conn.output, &v, |_| {
                println!(
                    "new cluster {} restored into {}: start it with `novacron serve --data-dir {}`; other nodes join with {}/join-token",
                    cfg.cluster_id,
                    data_dir.display(),
                    data_dir.display(),
                    data_dir.display()
                )
            })
        }
        ClientCommand::Cluster {
            command: ClusterCommand::Status,
            conn,
        } => {
            let api = Api::new(&conn, true)?;
            let v = api
                .call(reqwest::Method::GET, "/api/v1/cluster", None)
                .await?;
            emit(conn.output, &v, |v| {
                println!(
                    "cluster {}  leader {}  term {}  commit {}",
                    s(&v["cluster_id"]),
                    s(&v["leader_name"]),
                    s(&v["term"]),
                    s(&v["commit_index"])
                );
                let rows = v["members"]
                    .as_array()
                    .map(|ms| {
                        ms.iter()
                            .map(|m| {
                                let leader = m["id"] == v["leader"];
                                vec![
                                    s(&m["id"]),
                                    s(&m["name"]),
                                    format!("{}{}", s(&m["role"]), if leader { "*" } else { "" }),
                                    s(&m["state"]),
                                    s(&m["api_addr"]),
                                    s(&m["matched_index"]),
                                ]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                print_table(&["ID", "NAME", "ROLE", "STATE", "API", "MATCHED"], rows);
            })
        }
        ClientCommand::Vm { command, conn } => vm(command, conn).await,
        ClientCommand::Node { command, conn } => node(command, conn).await,
        ClientCommand::User { command, conn } => user(command, conn).await,
        ClientCommand::Image { command, conn } => {
            let api = Api::new(&conn, true)?;
            let target = crate::image_client::Target {
                http: &api.http,
                url: &api.url,
                token: api.token.as_deref(),
            };
            let v = crate::image_client::run(&target, command).await?;
            emit(conn.output, &v, |v| {
                let items = match v["items"].as_array() {
                    Some(items) => items.clone(),
                    None => vec![v.clone()],
                };
                print_table(
                    &["ID", "NAME", "STATE", "SIZE", "SHA256"],
                    items
                        .iter()
                        .map(|i| {
                            vec![
                                s(&i["id"]),
                                s(&i["name"]),
                                s(&i["state"]),
                                s(&i["size_bytes"]),
                                s(&i["sha256"]),
                            ]
                        })
                        .collect(),
                )
            })
        }
        ClientCommand::Site { command, conn } => {
            let api = Api::new(&conn, true)?;
            match command {
                SiteCommand::Token => {
                    let v = api
                        .call(reqwest::Method::POST, "/api/v1/federation/tokens", None)
                        .await?;
                    emit(conn.output, &v, |v| {
                        println!("token: {}", s(&v["token"]));
                        let addrs: Vec<String> = v["addrs"]
                            .as_array()
                            .map(|a| a.iter().map(s).collect())
                            .unwrap_or_default();
                        println!("addrs: {}", addrs.join(","));
                    })
                }
                SiteCommand::Link { token, addr } => {
                    let body = json!({"token": token, "addrs": addr});
                    let v = api
                        .call(reqwest::Method::POST, "/api/v1/sites", Some(body))
                        .await?;
                    emit(conn.output, &v, |v| {
                        println!("linked to site {} ({})", s(&v["name"]), s(&v["id"]))
                    })
                }
                SiteCommand::List => {
                    let v = api
                        .call(reqwest::Method::GET, "/api/v1/sites", None)
                        .await?;
                    emit(conn.output, &v, |v| {
                        let rows = v["sites"]
                            .as_array()
                            .map(|sites| {
                                sites
                                    .iter()
                                    .map(|x| {
                                        vec![
                                            s(&x["id"]),
                                            s(&x["name"]),
                                            if x["local"] == true {
                                                "yes".into()
                                            } else {
                                                String::new()
                                            },
                                            s(&x["health"]),
                                            s(&x["latency_ms"]),
                                            s(&x["age_ms"]),
                                            s(&x["lag_entries"]),
                                            s(&x["error"]),
                                        ]
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        print_table(
                            &[
                                "ID",
                                "NAME",
                                "LOCAL",
                                "HEALTH",
                                "LATENCY_MS",
                                "AGE_MS",
                                "LAG",
                                "ERROR",
                            ],
                            rows,
                        );
                    })
                }
            }
        }
        ClientCommand::Tenant { command, conn } => {
            let api = Api::new(&conn, true)?;
            match command {
                TenantCommand::Create {
                    name,
                    max_vms,
                    max_vcpus,
                    max_memory,
                    max_disk,
                } => {
                    let body = json!({"name": name, "quota": {
                        "max_vms": max_vms, "max_vcpus": max_vcpus,
                        "max_memory_mib": max_memory, "max_disk_gib": max_disk}});
                    let v = api
                        .call(reqwest::Method::POST, "/api/v1/tenants", Some(body))
                        .await?;
                    emit(conn.output, &v, |v| println!("{}", s(&v["id"])))
                }
                TenantCommand::List => {
                    let v = api
                        .call(reqwest::Method::GET, "/api/v1/tenants", None)
                        .await?;
                    emit(conn.output, &v, |v| {
                        let rows = v["items"]
                            .as_array()
                            .map(|ts| {
                                ts.iter()
                                    .map(|t| {
                                        vec![
                                            s(&t["id"]),
                                            s(&t["name"]),
                                            s(&t["usage"]["vms"]),
                                            s(&t["quota"]["max_vms"]),
                                        ]
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        print_table(&["ID", "NAME", "VMS", "MAX_VMS"], rows);
                    })
                }
                TenantCommand::Show { id } => {
                    let v = api
                        .call(reqwest::Method::GET, &format!("/api/v1/tenants/{id}"), None)
                        .await?;
                    emit(conn.output, &v, |v| {
                        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default())
                    })
                }
                TenantCommand::Delete { id } => {
                    api.call(
                        reqwest::Method::DELETE,
                        &format!("/api/v1/tenants/{id}"),
                        None,
                    )
                    .await?;
                    Ok(())
                }
            }
        }
    }
}

fn vm_rows(items: &[Value]) -> Vec<Vec<String>> {
    items
        .iter()
        .map(|v| {
            vec![
                s(&v["id"]),
                s(&v["name"]),
                s(&v["state"]),
                s(&v["desired_state"]),
                s(&v["node"]),
                s(&v["vcpus"]),
                s(&v["memory_mib"]),
                s(&v["epoch"]),
            ]
        })
        .collect()
}

const VM_HEADERS: &[&str] = &[
    "ID", "NAME", "STATE", "DESIRED", "NODE", "VCPUS", "MEMORY", "EPOCH",
];

async fn vm(command: VmCommand, conn: Conn) -> anyhow::Result<()> {
    let api = Api::new(&conn, true)?;
    let action = |id: &str, what: &str| format!("/api/v1/vms/{id}/{what}");
    match command {
        VmCommand::Create {
            name,
            vcpus,
            memory,
            disk,
            image,
            tenant,
            labels,
            anti_affinity,
            node,
            ha,
            stopped,
        } => {
            let mut label_map = serde_json::Map::new();
            for l in labels {
                let (k, v) = l
                    .split_once('=')
                    .ok_or_else(|| anyhow!("--label must be key=value, got {l:?}"))?;
                label_map.insert(k.to_string(), Value::String(v.to_string()));
            }
            let body = json!({
                "name": name, "vcpus": vcpus, "memory_mib": memory, "disk_gib": disk,
                "image": image, "tenant": tenant, "labels": label_map, "ha": ha,
                "start": !stopped,
                "placement": {"node": node, "anti_affinity_group": anti_affinity},
            });
            let v = api
                .call(reqwest::Method::POST, "/api/v1/vms", Some(body))
                .await?;
            emit(conn.output, &v, |v| {
                println!(
                    "{}  (operation {})",
                    s(&v["vm"]["id"]),
                    s(&v["operation"]["id"])
                )
            })
        }
        VmCommand::List { state, node, label } => {
            let mut q = vec!["limit=500".to_string()];
            for (k, v) in [("state", state), ("node", node), ("label", label)] {
                if let Some(v) = v {
                    q.push(format!("{k}={v}"));
                }
            }
            let v = api
                .call(
                    reqwest::Method::GET,
                    &format!("/api/v1/vms?{}", q.join("&")),
                    None,
                )
                .await?;
            emit(conn.output, &v, |v| {
                let items = v["items"].as_array().cloned().unwrap_or_default();
                print_table(VM_HEADERS, vm_rows(&items));
            })
        }
        VmCommand::Show { id } => {
            let v = api
                .call(reqwest::Method::GET, &format!("/api/v1/vms/{id}"), None)
                .await?;
            emit(conn.output, &v, |v| {
                println!("{}", serde_json::to_string_pretty(v).unwrap_or_default())
            })
        }
        VmCommand::Explain { id } => {
            let v = api
                .call(
                    reqwest::Method::GET,
                    &format!("/api/v1/vms/{id}/placement"),
                    None,
                )
                .await?;
            emit(conn.output, &v, print_explanation)
        }
        VmCommand::Start { id } => op(&api, &conn, &action(&id, "start")).await,
        VmCommand::Stop { id } => op(&api, &conn, &action(&id, "stop")).await,
        VmCommand::Reboot { id } => op(&api, &conn, &action(&id, "reboot")).await,
        VmCommand::Migrate { id, to, bandwidth } => {
            let mut body = serde_json::Map::new();
            if let Some(t) = to {
                body.insert("target_node".into(), Value::String(t));
            }
            if let Some(b) = bandwidth {
                body.insert("bandwidth_mib_s".into(), Value::from(b));
            }
            let v = api
                .call(
                    reqwest::Method::POST,
                    &action(&id, "migrate"),
                    Some(Value::Object(body)),
                )
                .await?;
            let op_id = s(&v["operation"]["id"]);
            if conn.output != Output::Json {
                println!("operation {op_id}: migrating");
            }
            let done = wait_operation(&api, &op_id, std::time::Duration::from_secs(600)).await?;
            emit(conn.output, &done, |o| {
                let r = &o["result"];
                println!(
                    "{}: {} -> node {} ({}), total {} ms, downtime {} ms, {} bytes{}",
                    s(&o["state"]),
                    s(&r["source"]),
                    s(&r["target"]),
                    s(&r["mode"]),
                    s(&r["total_ms"]),
                    s(&r["downtime_ms"]),
                    s(&r["bytes"]),
                    o["error"]
                        .as_str()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                )
            })?;
            if done["state"] != "succeeded" {
                anyhow::bail!("migration failed: {}", s(&done["error"]));
            }
            Ok(())
        }
        VmCommand::Delete { id } => {
            let v = api
                .call(reqwest::Method::DELETE, &format!("/api/v1/vms/{id}"), None)
                .await?;
            emit(conn.output, &v, |v| {
                println!("operation {}", s(&v["operation"]["id"]))
            })
        }
    }
}

/// Polls an operation until it succeeded or failed.
async fn wait_operation(api: &Api, id: &str, within: std::time::Duration) -> anyhow::Result<Value> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let o = api
            .call(
                reqwest::Method::GET,
                &format!("/api/v1/operations/{id}"),
                None,
            )
            .await?;
        if o["state"] == "succeeded" || o["state"] == "failed" {
            return Ok(o);
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("operation {id} did not finish within {within:?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Waits until no running VM is left on node `id`, printing each change of the count.
async fn wait_drained(
    api: &Api,
    conn: &Conn,
    id: u64,
    within: std::time::Duration,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + within;
    let mut last = None;
    loop {
        let mut left = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = "/api/v1/vms?limit=500".to_string();
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let page = api.call(reqwest::Method::GET, &path, None).await?;
            for vm in page["items"].as_array().into_iter().flatten() {
                if vm["node"].as_u64() == Some(id)
                    && matches!(vm["state"].as_str(), Some("running" | "migrating"))
                {
                    left.push(s(&vm["name"]));
                }
            }
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
        }
        if last != Some(left.len()) && conn.output != Output::Json {
            println!(
                "node {id}: {} running VM(s) left {}",
                left.len(),
                left.join(" ")
            );
        }
        last = Some(left.len());
        if left.is_empty() {
            if conn.output == Output::Json {
                println!("{}", serde_json::json!({"node": id, "drained": true}));
            }
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("node {id} still runs {} VM(s) after {within:?}", left.len());
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

async fn op(api: &Api, conn: &Conn, path: &str) -> anyhow::Result<()> {
    let v = api.call(reqwest::Method::POST, path, None).await?;
    emit(conn.output, &v, |v| {
        println!("operation {}", s(&v["operation"]["id"]))
    })
}

async fn node(command: NodeCommand, conn: Conn) -> anyhow::Result<()> {
    let api = Api::new(&conn, true)?;
    match command {
        NodeCommand::List => {
            let v = api
                .call(reqwest::Method::GET, "/api/v1/nodes", None)
                .await?;
            emit(conn.output, &v, |v| {
                let rows = v
                    .as_array()
                    .map(|ns| {
                        ns.iter()
                            .map(|n| {
                                vec![
                                    s(&n["id"]),
                                    s(&n["member"]["name"]),
                                    s(&n["state"]),
                                    if n["schedulable"] == true {
                                        "yes".into()
                                    } else {
                                        "drained".into()
                                    },
                                    s(&n["vms"]),
                                    s(&n["vcpus_used"]),
                                    s(&n["memory_mib_used"]),
                                ]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                print_table(
                    &[
                        "ID",
                        "NAME",
                        "STATE",
                        "SCHEDULABLE",
                        "VMS",
                        "VCPUS",
                        "MEMORY",
                    ],
                    rows,
                );
            })
        }
        NodeCommand::Drain { node } => {
            let rec = api
                .call(
                    reqwest::Method::POST,
                    &format!("/api/v1/nodes/{node}/drain"),
                    None,
                )
                .await?;
            let id = rec["id"].as_u64().unwrap_or_default();
            wait_drained(&api, &conn, id, std::time::Duration::from_secs(1800)).await
        }
        NodeCommand::Undrain { node } => {
            api.call(
                reqwest::Method::POST,
                &format!("/api/v1/nodes/{node}/undrain"),
                None,
            )
            .await?;
            Ok(())
        }
        NodeCommand::Remove { node } => {
            api.call(
                reqwest::Method::DELETE,
                &format!("/api/v1/nodes/{node}"),
                None,
            )
            .await?;
            Ok(())
        }
    }
}

async fn user(command: UserCommand, conn: Conn) -> anyhow::Result<()> {
    let api = Api::new(&conn, true)?;
    match command {
        UserCommand::Create {
            name,
            tenant,
            role,
            password,
        } => {
            let password = match password {
                Some(p) => p,
                None => read_password()?,
            };
            let body =
                json!({"username": name, "password": password, "tenant": tenant, "role": role});
            let v = api
                .call(reqwest::Method::POST, "/api/v1/users", Some(body))
                .await?;
            emit(conn.output, &v, |v| println!("{}", s(&v["id"])))
        }
        UserCommand::List => {
            let v = api
                .call(reqwest::Method::GET, "/api/v1/users?limit=500", None)
                .await?;
            emit(conn.output, &v, |v| {
                let rows = v["items"]
                    .as_array()
                    .map(|us| {
                        us.iter()
                            .map(|u| {
                                vec![
                                    s(&u["id"]),
                                    s(&u["username"]),
                                    s(&u["tenant"]),
                                    s(&u["role"]),
                                ]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                print_table(&["ID", "USERNAME", "TENANT", "ROLE"], rows);
            })
        }
        UserCommand::Delete { id } => {
            api.call(
                reqwest::Method::DELETE,
                &format!("/api/v1/users/{id}"),
                None,
            )
            .await?;
            Ok(())
        }
    }
}
