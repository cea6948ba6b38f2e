//! A cluster of real `novacron` processes on loopback for integration tests.
//!
//! Every node binds port 0 for its API and QUIC endpoint and the harness reads the bound
//! addresses back from `DIR/node.json`. Waits are on conditions with deadlines, never fixed sleeps.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

pub mod sites;

pub const BIN: &str = env!("CARGO_BIN_EXE_novacron");

/// Short timers so failover and replacement happen within a test's patience.
pub fn fast_tuning(voter_down_after_ms: u64, snapshot_every: u64, keep: u64) -> String {
    json!({
        "heartbeat_ms": 100,
        "election_min_ms": 400,
        "election_max_ms": 800,
        "snapshot_every": snapshot_every,
        "keep_after_snapshot": keep,
        "voter_down_after_ms": voter_down_after_ms,
        "suspect_after_ms": 1000
    })
    .to_string()
}

pub struct TestNode {
    pub name: String,
    pub dir: PathBuf,
    pub api: String,
    child: Option<Child>,
}

impl TestNode {
    pub fn url(&self) -> String {
        format!("http://{}", self.api)
    }
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

pub struct TestCluster {
    pub root: tempfile::TempDir,
    pub nodes: Vec<TestNode>,
    pub tuning: String,
    /// Extra environment for every node process (for example a real libvirt URI).
    pub env: Vec<(String, String)>,
    pub http: reqwest::Client,
    pub token: Option<String>,
    /// Separate libvirt hosts, node i on host i (see `node::hosts`); dropped after the nodes.
    pub hosts: Option<node::hosts::HostSet>,
    /// The site namespace every node of this cluster runs in and binds (see `sites`).
    pub site: Option<node::sitenet::SiteNs>,
}

/// Starts `cmd` (the binary, possibly wrapped to enter namespaces) as a node.
fn spawn(
    dir: &Path,
    args: &[String],
    tuning: &str,
    env: &[(String, String)],
    mut cmd: Command,
) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.with_extension("log"))?;
    cmd.args(args)
        .env("NOVACRON_TUNING", tuning)
        .env("NOVACRON_LOG", "info,openraft=warn")
        // Each process gets libvirt's private in-process test driver unless a test says otherwise.
        .env("NOVACRON_LIBVIRT_URI", "test:///default")
        // The transport's test-only partition hook; the file is absent (no fault) until a
        // test partitions this node.
        .env("NOVACRON_TEST_PARTITION_FILE", partition_file(dir))
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .context("cannot start novacron")
}

fn partition_file(dir: &Path) -> PathBuf {
    dir.with_extension("partition")
}

/// Polls `f` every 50 ms until it returns `Some`, failing after `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut f: F) -> Result<T>
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
            bail!("timed out after {within:?} waiting for {what}");
        }
    }
}

impl TestCluster {
    /// Starts node 1 with `--init`, then `n - 1` nodes with `--join`.
    pub async fn start(n: usize, tuning: String) -> Result<TestCluster> {
        Self::start_with(n, tuning, Vec::new()).await
    }

    pub async fn start_with(
        n: usize,
        tuning: String,
        env: Vec<(String, String)>,
    ) -> Result<TestCluster> {
        let root = tempfile::tempdir()?;
        // reqwest is built without a TLS provider of its own; ours is ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        let mut c = TestCluster {
            root,
            nodes: Vec::new(),
            tuning,
            env,
            http,
            token: None,
            hosts: None,
            site: None,
        };
        c.add_node(true).await?;
        let password = std::fs::read_to_string(c.nodes[0].dir.join("admin-password"))?;
        c.token = Some(c.login(0, "admin", password.trim()).await?);
        for _ in 1..n {
            c.add_node(false).await?;
        }
        Ok(c)
    }

    /// `n` nodes, each inside its own libvirt host (network, mount and UTS namespaces with its
    /// own libvirtd), talking over a bridge. `env` is given to every node.
    pub async fn start_on_hosts(
        n: usize,
        tuning: String,
        env: Vec<(String, String)>,
    ) -> Result<TestCluster> {
        let root = tempfile::tempdir()?;
        let hosts = node::hosts::HostSet::start(&root.path().join("hosts"), n)?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        let mut c = TestCluster {
            root,
            nodes: Vec::new(),
            tuning,
            env,
            http,
            token: None,
            hosts: Some(hosts),
            site: None,
        };
        c.add_node(true).await?;
        let password = std::fs::read_to_string(c.nodes[0].dir.join("admin-password"))?;
        c.token = Some(c.login(0, "admin", password.trim()).await?);
        for _ in 1..n {
            c.add_node(false).await?;
        }
        Ok(c)
    }

    /// The libvirt host of node `i`, when the cluster runs on separate hosts.
    pub fn host(&self, i: usize) -> Option<&node::hosts::Host> {
        self.hosts.as_ref().and_then(|h| h.hosts.get(i))
    }

    /// The command that starts node `i`: inside its libvirt host's namespaces, inside the
    /// cluster's site namespace, or plainly on this machine.
    fn node_command(&self, i: usize) -> Command {
        match (self.host(i), &self.site) {
            (Some(h), _) => h.command(BIN),
            (None, Some(s)) => s.command(BIN),
            (None, None) => Command::new(BIN),
        }
    }

    /// The address node `i` binds its API and QUIC endpoint on (port 0 is added).
    fn bind_ip(&self, i: usize) -> String {
        match (self.host(i), &self.site) {
            (Some(h), _) => h.addr.to_string(),
            (None, Some(s)) => s.addr.to_string(),
            (None, None) => "127.0.0.1".into(),
        }
    }

    pub fn join_token(&self) -> Result<String> {
        Ok(
            std::fs::read_to_string(self.nodes[0].dir.join("join-token"))?
                .trim()
                .to_string(),
        )
    }

    /// Starts one more node (the first with `--init`) and waits until it is ready.
    pub async fn add_node(&mut self, init: bool) -> Result<usize> {
        self.add_node_with(init, &[], &[]).await
    }

    /// Like [`TestCluster::add_node`], with extra `serve` arguments and environment for this
    /// node only.
    pub async fn add_node_with(
        &mut self,
        init: bool,
        extra_args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> Result<usize> {
        let i = self.nodes.len();
        let name = format!("n{}", i + 1);
        let dir = self.root.path().join(&name);
        let ip = self.bind_ip(i);
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--name".into(),
            name.clone(),
            "--api-addr".into(),
            format!("{ip}:0"),
            "--peer-addr".into(),
            format!("{ip}:0"),
        ];
        if init {
            args.push("--init".into());
        } else {
            let url = self.any_running_url()?;
            args.extend(["--join".into(), url, "--token".into(), self.join_token()?]);
        }
        args.extend(extra_args.iter().map(|a| a.to_string()));
        let mut env = self.env.clone();
        env.extend(
            extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        std::fs::create_dir_all(self.root.path())?;
        let child = spawn(&dir, &args, &self.tuning, &env, self.node_command(i))?;
        let api = match self.wait_config(&dir).await {
            Ok(api) => api,
            Err(e) => {
                let log = std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default();
                eprintln!("==== {name} did not start; its log ====\n{log}");
                return Err(e);
            }
        };
        self.nodes.push(TestNode {
            name,
            dir,
            api,
            child: Some(child),
        });
        self.wait_ready(i).await?;
        Ok(i)
    }

    fn any_running_url(&self) -> Result<String> {
        self.nodes
            .iter()
            .find(|n| n.is_running())
            .map(|n| n.url())
            .ok_or_else(|| anyhow!("no running node to join"))
    }

    async fn wait_config(&self, dir: &Path) -> Result<String> {
        let path = dir.join("node.json");
        eventually("node.json to be written", Duration::from_secs(60), || {
            let path = path.clone();
            async move {
                let text = std::fs::read_to_string(&path).ok()?;
                let v: Value = serde_json::from_str(&text).ok()?;
                v["api_addr"].as_str().map(str::to_string)
            }
        })
        .await
    }

    /// Waits until node 0 reports `n` voters (joiners are promoted once caught up).
    pub async fn wait_voters(&self, n: usize) -> Result<()> {
        eventually(&format!("{n} voters"), Duration::from_secs(30), || async {
            let v = self.status(0).await.ok()?;
            let voters = v["members"]
                .as_array()?
                .iter()
                .filter(|m| m["role"] == "voter")
                .count();
            (voters == n).then_some(())
        })
        .await
    }

    pub async fn wait_ready(&self, i: usize) -> Result<()> {
        let url = format!("{}/readyz", self.nodes[i].url());
        let http = self.http.clone();
        eventually(
            &format!("{} to be ready", self.nodes[i].name),
            Duration::from_secs(60),
            || {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    let r = http.get(&url).send().await.ok()?;
                    r.status().is_success().then_some(())
                }
            },
        )
        .await
    }

    pub async fn login(&self, i: usize, user: &str, password: &str) -> Result<String> {
        let r = self
            .http
            .post(format!("{}/api/v1/auth/login", self.nodes[i].url()))
            .json(&json!({"username": user, "password": password}))
            .send()
            .await?;
        let status = r.status();
        let v: Value = r.json().await?;
        if !status.is_success() {
            bail!("login failed: {status} {v}");
        }
        Ok(v["token"]
            .as_str()
            .ok_or_else(|| anyhow!("no token in {v}"))?
            .to_string())
    }

    pub async fn request(
        &self,
        i: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{}", self.nodes[i].url(), path));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, v))
    }

    pub async fn create_tenant(&self, i: usize, name: &str) -> Result<Value> {
        let (s, v) = self
            .request(
                i,
                reqwest::Method::POST,
                "/api/v1/tenants",
                Some(json!({"name": name})),
            )
            .await?;
        if s != 201 {
            bail!("create tenant {name} on node {i}: HTTP {s} {v}");
        }
        Ok(v)
    }

    /// Retries a create on `i` through leader elections, until it succeeds.
    pub async fn create_tenant_eventually(&self, i: usize, name: &str) -> Result<Value> {
        eventually(
            &format!("tenant {name} to be created"),
            Duration::from_secs(30),
            || async { self.create_tenant(i, name).await.ok() },
        )
        .await
    }

    pub async fn status(&self, i: usize) -> Result<Value> {
        let (s, v) = self
            .request(i, reqwest::Method::GET, "/api/v1/cluster", None)
            .await?;
        if s != 200 {
            bail!("cluster status: HTTP {s} {v}");
        }
        Ok(v)
    }

    /// The index of the node that currently leads, as seen by node `via`.
    pub async fn leader(&self, via: usize) -> Result<usize> {
        let v = self.status(via).await?;
        let name = v["leader_name"]
            .as_str()
            .ok_or_else(|| anyhow!("no leader in {v}"))?;
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .ok_or_else(|| anyhow!("unknown leader {name}"))
    }

    pub async fn wait_leader(&self, via: usize, not: Option<usize>) -> Result<usize> {
        eventually("a leader", Duration::from_secs(30), || async {
            let l = self.leader(via).await.ok()?;
            (Some(l) != not).then_some(l)
        })
        .await
    }

    /// Tenant names visible on node `i` with a stale (local) read.
    pub async fn tenant_names(&self, i: usize, consistency: &str) -> Result<Vec<String>> {
        let mut names = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/api/v1/tenants?limit=500&consistency={consistency}");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let (s, v) = self.request(i, reqwest::Method::GET, &path, None).await?;
            if s != 200 {
                bail!("list tenants on node {i}: HTTP {s} {v}");
            }
            for t in v["items"].as_array().into_iter().flatten() {
                names.push(t["name"].as_str().unwrap_or_default().to_string());
            }
            match v["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
        }
        names.sort();
        Ok(names)
    }

    pub async fn wait_has_tenants(&self, i: usize, want: &[String]) -> Result<()> {
        eventually(
            &format!("{} to hold {} tenants", self.nodes[i].name, want.len()),
            Duration::from_secs(60),
            || async {
                let have = self.tenant_names(i, "stale").await.ok()?;
                want.iter().all(|w| have.contains(w)).then_some(())
            },
        )
        .await
    }

    pub fn kill(&mut self, i: usize) -> Result<()> {
        if let Some(mut c) = self.nodes[i].child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self, i: usize) -> Result<()> {
        if let Some(mut c) = self.nodes[i].child.take() {
            let pid = c.id().to_string();
            Command::new("kill").args(["-TERM", &pid]).status()?;
            let status = c.wait()?;
            if !status.success() {
                bail!("{} exited with {status} after SIGTERM", self.nodes[i].name);
            }
        }
        Ok(())
    }

    /// Restarts a stopped node from its data directory.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        let dir = self.nodes[i].dir.clone();
        let args = vec![
            "serve".into(),
            "--data-dir".into(),
            dir.display().to_string(),
        ];
        self.nodes[i].child = Some(spawn(
            &dir,
            &args,
            &self.tuning,
            &self.env,
            self.node_command(i),
        )?);
        Ok(())
    }

    /// The QUIC address node `i` bound, from its `node.json`.
    pub fn peer_addr(&self, i: usize) -> Result<String> {
        let text = std::fs::read_to_string(self.nodes[i].dir.join("node.json"))?;
        let v: Value = serde_json::from_str(&text)?;
        v["peer_addr"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no peer_addr in node.json of {}", self.nodes[i].name))
    }

    /// Cuts node `i` off from every other node, both ways, at the QUIC transport (its API
    /// stays reachable from the test). Every node's partition file is written, so each side
    /// sees its calls fail at once rather than wait for replies that never come.
    pub fn partition(&self, i: usize) -> Result<()> {
        let mut peers = String::new();
        for j in (0..self.nodes.len()).filter(|j| *j != i) {
            peers.push_str(&self.peer_addr(j)?);
            peers.push('\n');
            std::fs::write(
                partition_file(&self.nodes[j].dir),
                format!("{}\n", self.peer_addr(i)?),
            )?;
        }
        std::fs::write(partition_file(&self.nodes[i].dir), peers)?;
        Ok(())
    }

    /// Removes every partition.
    pub fn heal(&self) -> Result<()> {
        for n in &self.nodes {
            match std::fs::remove_file(partition_file(&n.dir)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The raw Prometheus text of node `i`.
    pub async fn metrics_text(&self, i: usize) -> Result<String> {
        Ok(self
            .http
            .get(format!("{}/metrics", self.nodes[i].url()))
            .send()
            .await?
            .text()
            .await?)
    }

    /// Starts a node from a data dir prepared outside the harness (a restored backup), as
    /// node `name`, and waits until it is ready.
    pub async fn adopt(&mut self, name: &str, dir: PathBuf) -> Result<usize> {
        let i = self.nodes.len();
        let args = vec![
            "serve".into(),
            "--data-dir".into(),
            dir.display().to_string(),
        ];
        // A restored node runs where the cluster's site puts it (never on a libvirt host).
        let cmd = match &self.site {
            Some(s) => s.command(BIN),
            None => Command::new(BIN),
        };
        let child = spawn(&dir, &args, &self.tuning, &self.env, cmd)?;
        let api = self.wait_config(&dir).await?;
        self.nodes.push(TestNode {
            name: name.to_string(),
            dir,
            api,
            child: Some(child),
        });
        self.wait_ready(i).await?;
        Ok(i)
    }

    /// A client of a cluster started outside the harness (`novacron dev up`), from each
    /// node's name, API `host:port` and data directory; it starts and stops nothing.
    pub fn attach(nodes: Vec<(String, String, PathBuf)>) -> Result<TestCluster> {
        let mut c = TestCluster::empty(String::new())?;
        c.nodes = nodes
            .into_iter()
            .map(|(name, api, dir)| TestNode {
                name,
                dir,
                api,
                child: None,
            })
            .collect();
        Ok(c)
    }

    /// An empty cluster (no node yet) whose nodes live under a fresh temporary directory.
    pub fn empty(tuning: String) -> Result<TestCluster> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(TestCluster {
            root: tempfile::tempdir()?,
            nodes: Vec::new(),
            tuning,
            env: Vec::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            token: None,
            hosts: None,
            site: None,
        })
    }

    pub async fn metric(&self, i: usize, name: &str) -> Result<f64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.nodes[i].url()))
            .send()
            .await?
            .text()
            .await?;
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| anyhow!("metric {name} not found"))
    }

    /// The node's log, printed when a test fails so the cause is visible.
    pub fn dump_logs(&self) {
        for n in &self.nodes {
            let log = std::fs::read_to_string(n.dir.with_extension("log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("==== {} (last 40 lines) ====", n.name);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
