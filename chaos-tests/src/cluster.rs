//! A cluster of real `novacron` processes on loopback, and a small REST client for it.
//!
//! Node 1 starts with `--init`, the others `--join` it with the join token; every node binds
//! port 0 and the harness reads the bound API and peer addresses back from `DIR/node.json`.
//! Once started, a node's command line becomes `serve --data-dir DIR`, so the nemesis restarts it
//! as an operator would. Every wait polls a condition against a deadline.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::nemesis::{Managed, NemesisError};

/// Errors starting or talking to the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("the novacron binary {0} does not exist (build it with `cargo build -p node`)")]
    NoBinary(PathBuf),
    #[error("cannot prepare {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error(transparent)]
    Process(#[from] NemesisError),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("{what}: HTTP {status} {body}")]
    Status {
        what: String,
        status: u16,
        body: Value,
    },
    #[error("{what}: no field {field} in {body}")]
    Shape {
        what: String,
        field: &'static str,
        body: Value,
    },
}

/// One node of the cluster.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    /// `host:port` of the REST API.
    pub api: String,
    /// The UDP port of the node's QUIC endpoint.
    pub peer_port: u16,
    pub process: Managed,
}

impl Node {
    pub fn url(&self) -> String {
        format!("http://{}", self.api)
    }
}

/// The result of one REST call: the status and the body (JSON, or the text as a JSON string).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

/// An authenticated REST client; cheap to clone.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    token: Option<String>,
}

impl Client {
    /// A client whose every request gives up after `timeout` (the caller records `info`).
    pub fn new(timeout: Duration) -> Result<Client, ClusterError> {
        // reqwest is built without a TLS provider of its own; ours is ring. Installing twice is
        // refused harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(ClusterError::Client)?;
        Ok(Client { http, token: None })
    }

    /// The same client carrying a bearer token.
    pub fn with_token(&self, token: String) -> Client {
        Client {
            http: self.http.clone(),
            token: Some(token),
        }
    }

    /// This client's timeouts with `other`'s credentials.
    pub fn with_token_of(&self, other: &Client) -> Client {
        Client {
            http: self.http.clone(),
            token: other.token.clone(),
        }
    }

    /// Sends a request; `Err` only when no response arrived (timeout, refused, reset).
    pub async fn call(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<&Value>,
        if_match: Option<u64>,
    ) -> Result<Reply, reqwest::Error> {
        let mut req = self.http.request(method, url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(v) = if_match {
            req = req.header(reqwest::header::IF_MATCH, format!("\"{v}\""));
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Reply { status, body })
    }
}

/// The running cluster.
pub struct Cluster {
    /// Holds the data directories unless the caller asked to keep them.
    _root: Option<tempfile::TempDir>,
    pub root: PathBuf,
    pub nodes: Vec<Node>,
    pub client: Client,
}

/// Polls `f` every 50 ms until it returns `Some`, failing after `within`.
pub async fn eventually<T, F, Fut>(
    what: &str,
    within: Duration,
    mut f: F,
) -> Result<T, ClusterError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    let mut interval = tokio::time::interval(Duration::from_millis(50));
    loop {
        interval.tick().await;
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(ClusterError::Timeout(within, what.to_string()));
        }
    }
}

fn read_text(path: &Path) -> Result<String, ClusterError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| ClusterError::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// What `DIR/node.json` says once the node has bound its sockets.
fn bound_addresses(dir: &Path) -> Option<(String, u16)> {
    let text = std::fs::read_to_string(dir.join("node.json")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    let api = v["api_addr"].as_str()?;
    let peer = v["peer_addr"].as_str()?;
    let port = peer.rsplit(':').next()?.parse().ok()?;
    // Until the sockets are bound the file may still hold the requested port 0.
    (!api.ends_with(":0") && port != 0).then(|| (api.to_string(), port))
}

impl Cluster {
    /// Starts `n` nodes with `tuning` (the `NOVACRON_TUNING` JSON) and waits until each is ready
    /// and the admin is logged in. With `keep_dir`, data and logs go there and stay.
    pub async fn start(
        bin: &Path,
        n: usize,
        tuning: &str,
        keep_dir: Option<&Path>,
    ) -> Result<Cluster, ClusterError> {
        Self::start_wrapped(bin, n, tuning, keep_dir, &[]).await
    }

    /// As [`Cluster::start`], with every node started through `wrapper` (a command that runs the
    /// rest of its command line, such as `fiu-run -x` for fault injection in system calls).
    pub async fn start_wrapped(
        bin: &Path,
        n: usize,
        tuning: &str,
        keep_dir: Option<&Path>,
        wrapper: &[String],
    ) -> Result<Cluster, ClusterError> {
        if !bin.is_file() {
            return Err(ClusterError::NoBinary(bin.to_path_buf()));
        }
        let (holder, root) = match keep_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|source| ClusterError::Io {
                    path: dir.to_path_buf(),
                    source,
                })?;
                (None, dir.to_path_buf())
            }
            None => {
                let tmp = tempfile::tempdir().map_err(|source| ClusterError::Io {
                    path: std::env::temp_dir(),
                    source,
                })?;
                let path = tmp.path().to_path_buf();
                (Some(tmp), path)
            }
        };
        let mut cluster = Cluster {
            _root: holder,
            root,
            nodes: Vec::new(),
            client: Client::new(Duration::from_secs(10))?,
        };
        for i in 0..n {
            cluster.add_node(bin, i, tuning, wrapper).await?;
            if i == 0 {
                let password = read_text(&cluster.nodes[0].dir.join("admin-password"))?;
                let token = cluster.login(0, &password).await?;
                cluster.client = cluster.client.with_token(token);
            }
        }
        cluster.wait_members(n).await?;
        Ok(cluster)
    }

    async fn add_node(
        &mut self,
        bin: &Path,
        i: usize,
        tuning: &str,
        wrapper: &[String],
    ) -> Result<(), ClusterError> {
        let name = format!("n{}", i + 1);
        let dir = self.root.join(&name);
        let dir_s = dir.display().to_string();
        let mut args: Vec<String> = [
            "serve",
            "--data-dir",
            &dir_s,
            "--name",
            &name,
            "--api-addr",
            "127.0.0.1:0",
            "--peer-addr",
            "127.0.0.1:0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if i == 0 {
            args.push("--init".into());
        } else {
            let token = read_text(&self.nodes[0].dir.join("join-token"))?;
            args.extend([
                "--join".into(),
                self.nodes[0].url(),
                "--token".into(),
                token,
            ]);
        }
        // With a wrapper, the wrapper is the program and the node's command line its arguments.
        let (program, prefix): (PathBuf, Vec<String>) = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut prefix = rest.to_vec();
                prefix.push(bin.display().to_string());
                (PathBuf::from(first), prefix)
            }
            None => (bin.to_path_buf(), Vec::new()),
        };
        let with_prefix = |args: &[String]| -> Vec<String> {
            prefix.iter().cloned().chain(args.iter().cloned()).collect()
        };
        let mut process = Managed::new(&name, &program, with_prefix(&args))
            .env("NOVACRON_TUNING", tuning)
            .env("NOVACRON_LOG", "info,openraft=warn")
            // The control plane is under test here, not guests: libvirt's in-process test
            // driver keeps VM creation cheap and private to each node.
            .env("NOVACRON_LIBVIRT_URI", "test:///default")
            .log_to(self.root.join(format!("{name}.log")));
        process.start()?;
        // Later starts are restarts of an existing member.
        process.set_args(with_prefix(&[
            "serve".to_string(),
            "--data-dir".to_string(),
            dir_s.clone(),
        ]));
        let (api, peer_port) = eventually(
            &format!("{name} to write node.json"),
            Duration::from_secs(60),
            || {
                let dir = dir.clone();
                async move { bound_addresses(&dir) }
            },
        )
        .await?;
        self.nodes.push(Node {
            name,
            dir,
            api,
            peer_port,
            process,
        });
        self.wait_ready(i, Duration::from_secs(60)).await
    }

    /// Waits until node `i` answers `/readyz` with success.
    pub async fn wait_ready(&self, i: usize, within: Duration) -> Result<(), ClusterError> {
        let url = format!("{}/readyz", self.nodes[i].url());
        let client = self.client.clone();
        eventually(
            &format!("{} to be ready", self.nodes[i].name),
            within,
            || {
                let (client, url) = (client.clone(), url.clone());
                async move {
                    let r = client
                        .call(reqwest::Method::GET, &url, None, None)
                        .await
                        .ok()?;
                    (r.status == 200).then_some(())
                }
            },
        )
        .await
    }

    /// Waits until node 1 reports a leader and `n` members.
    async fn wait_members(&self, n: usize) -> Result<(), ClusterError> {
        let url = format!("{}/api/v1/cluster", self.nodes[0].url());
        let client = self.client.clone();
        eventually(
            &format!("a leader and {n} members"),
            Duration::from_secs(60),
            || {
                let (client, url) = (client.clone(), url.clone());
                async move {
                    let r = client
                        .call(reqwest::Method::GET, &url, None, None)
                        .await
                        .ok()?;
                    let members = r.body["members"].as_array()?.len();
                    (r.status == 200 && r.body["leader_name"].is_string() && members >= n)
                        .then_some(())
                }
            },
        )
        .await
    }

    async fn login(&self, i: usize, password: &str) -> Result<String, ClusterError> {
        let what = format!("login on {}", self.nodes[i].name);
        let url = format!("{}/api/v1/auth/login", self.nodes[i].url());
        let body = json!({"username": "admin", "password": password});
        let client = self.client.clone();
        let reply = eventually(&what, Duration::from_secs(30), || {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            async move {
                client
                    .call(reqwest::Method::POST, &url, Some(&body), None)
                    .await
                    .ok()
            }
        })
        .await?;
        if reply.status != 200 {
            return Err(ClusterError::Status {
                what,
                status: reply.status,
                body: reply.body,
            });
        }
        reply.body["token"]
            .as_str()
            .map(str::to_string)
            .ok_or(ClusterError::Shape {
                what,
                field: "token",
                body: reply.body,
            })
    }

    /// The API URLs of all nodes, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    /// The peer ports of all nodes, in node order.
    pub fn peer_ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.peer_port).collect()
    }
}
