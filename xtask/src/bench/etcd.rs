//! The anchor: a 3-member etcd cluster (Debian's `/usr/bin/etcd`) on loopback, written to through
//! its v3 JSON gateway (`POST /v3/kv/put`) on the client URLs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use reqwest::Client;
use serde_json::{json, Value};

use super::load::WriteTarget;
use super::member::{free_tcp_ports, wait_until, Member};
use super::BenchCluster;

pub(crate) const ETCD: &str = "/usr/bin/etcd";
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) struct Etcd {
    members: Vec<Member>,
    client: Client,
}

/// `etcd --version`'s first line, e.g. `etcd Version: 3.4.23`.
pub(crate) fn version() -> String {
    crate::process::output_of(Command::new(ETCD).arg("--version"))
        .ok()
        .and_then(|out| out.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "etcd (version unknown)".to_owned())
}

impl Etcd {
    /// Starts three members with data under `dir` and waits until they agree on a leader.
    pub(crate) async fn start(dir: &Path) -> Result<Self> {
        if !Path::new(ETCD).exists() {
            bail!("{ETCD} is missing: apt-get install -y etcd-server");
        }
        let ports = free_tcp_ports(6)?;
        let (client_ports, peer_ports) = ports.split_at(3);
        let initial_cluster = (0..3)
            .map(|i| format!("e{i}=http://127.0.0.1:{}", peer_ports[i]))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for i in 0..3 {
            let name = format!("e{i}");
            let client_url = format!("http://127.0.0.1:{}", client_ports[i]);
            let peer_url = format!("http://127.0.0.1:{}", peer_ports[i]);
            let data_dir = dir.join(&name);
            // etcd ignores the --initial-* flags once its data dir holds a member, so a restart
            // can use the same command line.
            let args: Vec<String> = [
                "--name",
                &name,
                "--data-dir",
                &data_dir.to_string_lossy(),
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &initial_cluster,
                "--initial-cluster-token",
                "novacron-bench",
                "--initial-cluster-state",
                "new",
                "--logger",
                "zap",
                "--log-level",
                "warn",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let log = dir.join(format!("{name}.log"));
            members.push(Member::new(
                name,
                client_url,
                PathBuf::from(ETCD),
                args.clone(),
                args,
                log,
            ));
        }
        for m in &mut members {
            m.start()?;
        }
        let mut etcd = Self {
            members,
            client: super::load::http_client(4)?,
        };
        etcd.wait_healthy(START_TIMEOUT).await?;
        Ok(etcd)
    }
}

/// `(member_id, leader)` from one member's `POST /v3/maintenance/status`; the gateway renders
/// uint64 ids as JSON strings, so they are compared as JSON values.
async fn status(client: &Client, url: &str) -> Option<(Value, Value)> {
    let resp = client
        .post(format!("{url}/v3/maintenance/status"))
        .timeout(Duration::from_secs(2))
        .json(&json!({}))
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let body: Value = resp.json().await.ok()?;
    let member_id = body.pointer("/header/member_id")?.clone();
    let leader = body.get("leader")?.clone();
    Some((member_id, leader))
}

/// Whether a leader id is set: etcd reports 0 (as "0" or absent) while there is none.
fn is_set(id: &Value) -> bool {
    !(id.is_null() || id == &json!("0") || id == &json!(0))
}

impl BenchCluster for Etcd {
    fn name(&self) -> &'static str {
        "etcd"
    }

    fn members(&mut self) -> &mut [Member] {
        &mut self.members
    }

    fn target(&self) -> WriteTarget {
        WriteTarget {
            urls: self.members.iter().map(|m| m.url.clone()).collect(),
            make: Arc::new(|client, url, key| {
                client
                    .post(format!("{url}/v3/kv/put"))
                    .json(&json!({ "key": B64.encode(key), "value": B64.encode("v") }))
            }),
        }
    }

    async fn leader(&mut self) -> Result<usize> {
        for (i, m) in self.members.iter().enumerate() {
            if let Some((member_id, leader)) = status(&self.client, &m.url).await {
                if is_set(&leader) && member_id == leader {
                    return Ok(i);
                }
            }
        }
        bail!("no etcd member says it is the leader")
    }

    async fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let client = self.client.clone();
        let urls: Vec<String> = self.members.iter().map(|m| m.url.clone()).collect();
        wait_until(
            "all etcd members to agree on a leader",
            timeout,
            &mut self.members,
            || {
                let (client, urls) = (client.clone(), urls.clone());
                async move {
                    let mut leaders = Vec::new();
                    for url in &urls {
                        match status(&client, url).await {
                            Some((_, leader)) if is_set(&leader) => leaders.push(leader),
                            _ => return false,
                        }
                    }
                    leaders.windows(2).all(|w| w[0] == w[1])
                }
            },
        )
        .await
        .context("etcd cluster not healthy")
    }
}
