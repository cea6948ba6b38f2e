//! The system under test: three `novacron serve` processes on loopback, written to through
//! `POST /api/v1/tenants` (a durable, replicated write) on every member's API.
//!
//! Written against the outside contract: the first node `--init`s the cluster and leaves
//! `admin-password` and `join-token` in its data dir, the others `--join` it, and a killed node
//! comes back with `novacron serve --data-dir DIR` alone.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

use super::load::WriteTarget;
use super::member::{free_tcp_ports, free_udp_ports, wait_until, Member};
use super::BenchCluster;

/// A release build on a busy 2-core machine can start slowly (key generation, sled recovery):
/// the deadlines are generous because a slow start is not what is measured.
const START_TIMEOUT: Duration = Duration::from_secs(180);

pub(crate) struct Novacron {
    members: Vec<Member>,
    client: Client,
    token: String,
}

/// Builds `novacron` in release and returns the path of the binary.
pub(crate) fn build() -> Result<PathBuf> {
    crate::process::run_inherit(crate::cargo().args(["build", "--release", "-p", "node"]))
        .context("building novacron (cargo build --release -p node)")?;
    let binary = crate::target_dir().join("release").join("novacron");
    if !binary.exists() {
        bail!("{} was not produced by the build", binary.display());
    }
    Ok(binary)
}

/// `novacron --version`, or the commit being measured when the binary has no such flag.
pub(crate) fn version(binary: &Path) -> String {
    let from_binary =
        crate::process::output_of(std::process::Command::new(binary).arg("--version"));
    let commit = crate::process::output_of(
        std::process::Command::new("git")
            .current_dir(crate::workspace_root())
            .args(["rev-parse", "--short", "HEAD"]),
    );
    match (from_binary, commit) {
        (Ok(v), Ok(c)) => format!("{v} (commit {c})"),
        (Ok(v), Err(_)) => v,
        (Err(_), Ok(c)) => format!("novacron at commit {c}"),
        (Err(_), Err(_)) => "novacron (version unknown)".to_owned(),
    }
}

impl Novacron {
    /// Starts a 3-node cluster with data under `dir`: init, log in, join two nodes, wait for
    /// a leader that all three agree on.
    pub(crate) async fn start(binary: &Path, dir: &Path) -> Result<Self> {
        Self::start_with_env(binary, dir, &[]).await
    }

    /// As [`Novacron::start`], with extra environment for every member (the libvirt URI and
    /// guest of the VM benchmark).
    pub(crate) async fn start_with_env(
        binary: &Path,
        dir: &Path,
        env: &[(String, String)],
    ) -> Result<Self> {
        let api_ports = free_tcp_ports(3)?;
        let peer_ports = free_udp_ports(3)?;
        let client = super::load::http_client(4)?;
        let mut members = Vec::new();
        for i in 0..3 {
            let name = format!("n{i}");
            let data_dir = dir.join(&name);
            std::fs::create_dir_all(&data_dir)
                .with_context(|| format!("creating {}", data_dir.display()))?;
            let data = data_dir.to_string_lossy().into_owned();
            let api_addr = format!("127.0.0.1:{}", api_ports[i]);
            let first = vec![
                "serve".to_owned(),
                "--data-dir".to_owned(),
                data.clone(),
                "--name".to_owned(),
                name.clone(),
                "--api-addr".to_owned(),
                api_addr.clone(),
                "--peer-addr".to_owned(),
                format!("127.0.0.1:{}", peer_ports[i]),
            ];
            let restart = vec!["serve".to_owned(), "--data-dir".to_owned(), data];
            let log = dir.join(format!("{name}.log"));
            let mut member = Member::new(
                name,
                format!("http://{api_addr}"),
                binary.to_path_buf(),
                first,
                restart,
                log,
            );
            // Per-request info logs would cost the server time that etcd (at warn) does not pay.
            member.env("RUST_LOG", "warn");
            for (k, v) in env {
                member.env(k, v);
            }
            members.push(member);
        }
        let mut cluster = Self {
            members,
            client,
            token: String::new(),
        };

        // The first node creates the cluster. The admin password is chosen here (the contract
        // lets NOVACRON_ADMIN_PASSWORD set it); the admin-password file is tried too, below.
        let chosen_password = format!("bench-{}", super::run_id());
        cluster.members[0].env("NOVACRON_ADMIN_PASSWORD", &chosen_password);
        cluster.members[0].push_first_arg("--init");
        cluster.members[0].start()?;
        let first_dir = dir.join("n0");
        let (password_file, token_file) = (
            first_dir.join("admin-password"),
            first_dir.join("join-token"),
        );
        let url0 = cluster.members[0].url.clone();
        {
            let (client, url0) = (cluster.client.clone(), url0.clone());
            let tf = token_file.clone();
            wait_until(
                "the first node to be ready and write its join token",
                START_TIMEOUT,
                &mut cluster.members[..1],
                move || {
                    let (client, url0, tf) = (client.clone(), url0.clone(), tf.clone());
                    async move { tf.exists() && ready(&client, &url0).await }
                },
            )
            .await?;
        }
        let join_token = read_secret(&token_file)?;
        cluster.token = match login(&cluster.client, &url0, &chosen_password).await {
            Ok(token) => token,
            Err(first) => {
                let from_file = read_secret(&password_file)
                    .with_context(|| format!("login with the chosen password failed: {first:#}"))?;
                login(&cluster.client, &url0, &from_file).await?
            }
        };

        // Join one at a time: each membership change is committed before the next begins.
        for i in 1..3 {
            cluster.members[i].push_first_arg("--join");
            cluster.members[i].push_first_arg(&url0);
            cluster.members[i].push_first_arg("--token");
            cluster.members[i].push_first_arg(&join_token);
            cluster.members[i].start()?;
            let (client, url) = (cluster.client.clone(), cluster.members[i].url.clone());
            wait_until(
                &format!("n{i} to join and be ready"),
                START_TIMEOUT,
                &mut cluster.members,
                move || {
                    let (client, url) = (client.clone(), url.clone());
                    async move { ready(&client, &url).await }
                },
            )
            .await?;
        }
        cluster.wait_healthy(START_TIMEOUT).await?;
        Ok(cluster)
    }

    /// The admin token of the running cluster.
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// The API base URLs of the members, in start order.
    pub(crate) fn urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.url.clone()).collect()
    }

    /// The leader's name as one member reports it, if that member knows a leader.
    async fn leader_name(&self, url: &str) -> Option<String> {
        let resp = self
            .client
            .get(format!("{url}/api/v1/cluster"))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let body: Value = resp.json().await.ok()?;
        leader_name_of(&body)
    }
}

/// Finds the leader's member entry in a `GET /api/v1/cluster` body and returns its name.
fn leader_name_of(body: &Value) -> Option<String> {
    let leader = body.get("leader").filter(|l| !l.is_null())?;
    let members = body.get("members")?.as_array()?;
    members
        .iter()
        .find(|m| m.get("id") == Some(leader) || m.get("name") == Some(leader))
        .and_then(|m| m.get("name")?.as_str().map(str::to_owned))
}

fn read_secret(path: &Path) -> Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.trim().to_owned())
}

/// `GET /readyz` answers 200.
async fn ready(client: &Client, url: &str) -> bool {
    client
        .get(format!("{url}/readyz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .is_ok_and(|r| r.status() == StatusCode::OK)
}

async fn login(client: &Client, url: &str, password: &str) -> Result<String> {
    let resp = client
        .post(format!("{url}/api/v1/auth/login"))
        .json(&json!({ "username": "admin", "password": password }))
        .send()
        .await
        .context("logging in")?;
    let status = resp.status();
    let body: Value = resp.json().await.context("reading the login answer")?;
    if !status.is_success() {
        bail!("login failed: {status}: {body}");
    }
    body.get("token")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .context("the login answer has no token")
}

impl BenchCluster for Novacron {
    fn name(&self) -> &'static str {
        "NovaCron"
    }

    fn members(&mut self) -> &mut [Member] {
        &mut self.members
    }

    fn target(&self) -> WriteTarget {
        let token = self.token.clone();
        WriteTarget {
            urls: self.members.iter().map(|m| m.url.clone()).collect(),
            make: Arc::new(move |client, url, key| {
                // An Idempotency-Key, as a careful client sends, lets the node resend a write
                // whose leader died mid-flight instead of reporting its outcome as unknown.
                client
                    .post(format!("{url}/api/v1/tenants"))
                    .bearer_auth(&token)
                    .header("idempotency-key", key)
                    .json(&json!({ "name": key }))
            }),
        }
    }

    async fn leader(&mut self) -> Result<usize> {
        for m in &self.members {
            if let Some(name) = self.leader_name(&m.url).await {
                if let Some(i) = self.members.iter().position(|m| m.name == name) {
                    return Ok(i);
                }
            }
        }
        bail!("no NovaCron member names a leader in GET /api/v1/cluster")
    }

    async fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let urls: Vec<String> = self.members.iter().map(|m| m.url.clone()).collect();
        let (client, token) = (self.client.clone(), self.token.clone());
        wait_until(
            "all NovaCron nodes to be ready and agree on a leader",
            timeout,
            &mut self.members,
            || {
                let (client, token, urls) = (client.clone(), token.clone(), urls.clone());
                async move {
                    let mut leaders = Vec::new();
                    for url in &urls {
                        if !ready(&client, url).await {
                            return false;
                        }
                        let body = client
                            .get(format!("{url}/api/v1/cluster"))
                            .bearer_auth(&token)
                            .timeout(Duration::from_secs(2))
                            .send()
                            .await;
                        let Ok(resp) = body else { return false };
                        let Ok(body) = resp.json::<Value>().await else {
                            return false;
                        };
                        match leader_name_of(&body) {
                            Some(name) => leaders.push(name),
                            None => return false,
                        }
                    }
                    leaders.windows(2).all(|w| w[0] == w[1])
                }
            },
        )
        .await
        .context("NovaCron cluster not healthy")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_is_found_by_id_or_name() {
        let body = json!({
            "leader": 2, "term": 3,
            "members": [
                {"id": 1, "name": "n0", "role": "voter"},
                {"id": 2, "name": "n1", "role": "voter"}
            ]
        });
        assert_eq!(leader_name_of(&body).as_deref(), Some("n1"));
        let by_name = json!({"leader": "n0", "members": [{"id": "x", "name": "n0"}]});
        assert_eq!(leader_name_of(&by_name).as_deref(), Some("n0"));
        let none = json!({"leader": null, "members": [{"id": 1, "name": "n0"}]});
        assert_eq!(leader_name_of(&none), None);
    }
}
