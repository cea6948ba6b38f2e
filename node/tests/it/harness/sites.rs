//! Several independent clusters ("sites"), each inside its own network namespace, for the
//! federation tests: the machinery of `node::sitenet` (namespaces on a bridge, cuts with
//! nftables) with a [`TestCluster`] per site.
//!
//! ```text
//! let tuning = fast_tuning(60_000, 10_000, 1_000);
//! let sites = TestSites::start(&[("a", 3), ("b", 3), ("edge", 1)], tuning).await?;
//! sites.site("edge").create_tenant(0, "t").await?; // the test process reaches every API
//! sites.node_url("a", 1);                           // "http://10.251.X.1:PORT"
//! let b = (sites.node_url("b", 0), sites.site("b").token.clone());
//! // The CLI inside a: Some(output), or None when nothing answered within 5 s.
//! sites.cli_in("a", &b.0, b.1.as_deref(), &["cluster", "status"], secs(5)).await?;
//! sites.http_from("a", "GET", &url, None, None, secs(3)).await?; // curl inside a
//! sites.cut("edge")?;  // edge <-> other sites, edge -> root: dropped; tests -> edge API: kept
//! sites.heal("edge")?;
//! sites.cut_link("a", "b")?; // a <-> b only; both still reach edge and the tests reach both
//! sites.heal_link("a", "b")?;
//! sites.set_link_loss("a", "edge", 20)?; // 20% of packets lost each way; 0 restores
//! ```
//!
//! - [`TestSites::start`] / [`TestSites::start_with`]: one namespace per site and one cluster per
//!   site, each with its own `--init` (its own CA, admin and Raft), started concurrently. Every
//!   node of a site runs inside the site's namespace and binds the site's address with port 0;
//!   the real ports come from each node's `node.json`, as in [`TestCluster`]. `start_with` takes
//!   extra environment for every node and extra `serve` arguments per node (`node_args(site,
//!   i)`, node 0 being the one with `--init`; for example `--site NAME` once sites have names).
//! - [`TestSites::start_with_libvirt`]: the same, with a libvirtd per site (own network, mount
//!   and UTS namespaces), which the site's nodes use as `qemu:///system`; for real VMs at
//!   several sites. `TestSites::ns(site).libvirt` has its URI from outside.
//! - [`TestSites::site`] / [`TestSites::site_mut`]: the site's [`TestCluster`] (its `token` is
//!   the site's admin token; `request`, `create_tenant`, `leader`, `status`, `kill`, ... work as
//!   on any cluster, from the test process through the bridge).
//! - [`TestSites::cut`] / [`TestSites::heal`]: see `node::sitenet::SiteNet::cut`;
//!   [`TestSites::cut_link`] / [`TestSites::heal_link`] one link between two sites;
//!   [`TestSites::set_link_loss`] a lossy link (`net.lost_packets(site)` counts). A cut drops
//!   packets (no refusals), so calls across it time out.
//! - [`TestSites::command_in`]: any program inside a site's namespace; [`TestSites::cli_in`] the
//!   `novacron` CLI, [`TestSites::http_from`] one HTTP request by curl, [`TestSites::reachable`]
//!   whether one site's nodes answer from inside another site.
//!
//! Needs root, `ip`, `nft` and `nsenter` ([`TestSites::available`]); tests print SKIP without
//! them. Everything is torn down on drop, nodes first, and leftovers of crashed runs are removed
//! by the next start.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use super::{TestCluster, BIN};
use node::sitenet::{SiteNet, SiteNs};

pub struct TestSites {
    // Dropped first (see Drop): the nodes die before their namespaces are deleted.
    clusters: Vec<(String, TestCluster)>,
    pub net: SiteNet,
    /// The sites' libvirt directories, removed after the daemons stopped (dropped after `net`).
    _libvirt_root: Option<tempfile::TempDir>,
}

impl TestSites {
    /// Whether this machine can run sites in namespaces; tests print SKIP with the reason if not.
    pub fn available() -> Result<(), node::sitenet::SiteNetError> {
        node::sitenet::available()
    }

    /// Starts one cluster of `n` nodes per `(name, n)`, each in its own namespace.
    pub async fn start(sites: &[(&str, usize)], tuning: String) -> Result<TestSites> {
        Self::start_with(sites, tuning, Vec::new(), |_, _| Vec::new()).await
    }

    /// Like [`TestSites::start`], with `env` for every node and `node_args(site, i)` added to
    /// the `serve` arguments of node `i` of each site (node 0 starts with `--init`, the others
    /// join it).
    pub async fn start_with(
        sites: &[(&str, usize)],
        tuning: String,
        env: Vec<(String, String)>,
        node_args: impl Fn(&str, usize) -> Vec<String>,
    ) -> Result<TestSites> {
        Self::start_inner(sites, tuning, env, node_args, false).await
    }

    /// Like [`TestSites::start_with`], and each site has its own libvirtd (see
    /// `node::sitenet::SiteNet::start_with_libvirt`); its nodes use it as `qemu:///system`
    /// unless `env` sets `NOVACRON_LIBVIRT_URI`.
    pub async fn start_with_libvirt(
        sites: &[(&str, usize)],
        tuning: String,
        env: Vec<(String, String)>,
        node_args: impl Fn(&str, usize) -> Vec<String>,
    ) -> Result<TestSites> {
        Self::start_inner(sites, tuning, env, node_args, true).await
    }

    async fn start_inner(
        sites: &[(&str, usize)],
        tuning: String,
        mut env: Vec<(String, String)>,
        node_args: impl Fn(&str, usize) -> Vec<String>,
        libvirt: bool,
    ) -> Result<TestSites> {
        let names: Vec<&str> = sites.iter().map(|(n, _)| *n).collect();
        let libvirt_root = if libvirt {
            Some(tempfile::tempdir()?)
        } else {
            None
        };
        let net = match &libvirt_root {
            Some(root) => {
                // First, so the caller's own value (later in the list) wins.
                env.insert(0, ("NOVACRON_LIBVIRT_URI".into(), "qemu:///system".into()));
                SiteNet::start_with_libvirt(&names, root.path())?
            }
            None => SiteNet::start(&names)?,
        };
        let mut starts = Vec::new();
        for (name, n) in sites {
            let ns = net.site(name)?.clone();
            if *n == 0 {
                bail!("site {name} has no node");
            }
            starts.push(start_cluster(
                ns,
                tuning.clone(),
                env.clone(),
                (0..*n).map(|i| node_args(name, i)).collect(),
            ));
        }
        // Sites are independent clusters: starting them together saves a third of the wait.
        // On failure the clusters already started drop (their nodes killed) before `net`.
        let clusters = futures::future::try_join_all(starts).await?;
        Ok(TestSites {
            clusters: names.iter().map(|n| n.to_string()).zip(clusters).collect(),
            net,
            _libvirt_root: libvirt_root,
        })
    }

    /// The names of the sites, in the order given.
    pub fn names(&self) -> Vec<&str> {
        self.clusters.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Site `name`'s cluster. Panics on an unknown name (a mistake in the test).
    pub fn site(&self, name: &str) -> &TestCluster {
        self.clusters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c)
            .unwrap_or_else(|| panic!("no site {name}"))
    }

    pub fn site_mut(&mut self, name: &str) -> &mut TestCluster {
        self.clusters
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c)
            .unwrap_or_else(|| panic!("no site {name}"))
    }

    /// Site `name`'s namespace and address.
    pub fn ns(&self, name: &str) -> &SiteNs {
        self.net
            .site(name)
            .unwrap_or_else(|e| panic!("site {name}: {e}"))
    }

    /// The API URL of node `i` of site `site`.
    pub fn node_url(&self, site: &str, i: usize) -> String {
        self.site(site).nodes[i].url()
    }

    /// Isolates `site` from the other sites and from the root namespace (except the test's own
    /// connections to its API).
    pub fn cut(&self, site: &str) -> Result<()> {
        Ok(self.net.cut(site)?)
    }

    pub fn heal(&self, site: &str) -> Result<()> {
        Ok(self.net.heal(site)?)
    }

    /// Cuts only the link between sites `a` and `b` (both ways); their other links stay.
    pub fn cut_link(&self, a: &str, b: &str) -> Result<()> {
        Ok(self.net.cut_link(a, b)?)
    }

    pub fn heal_link(&self, a: &str, b: &str) -> Result<()> {
        Ok(self.net.heal_link(a, b)?)
    }

    /// Makes the link between `a` and `b` lose `percent` of its packets each way (0 restores).
    pub fn set_link_loss(&self, a: &str, b: &str, percent: u8) -> Result<()> {
        Ok(self.net.set_link_loss(a, b, percent)?)
    }

    /// `program` inside `site`'s namespace; the child is killed if the handle is dropped.
    pub fn command_in(
        &self,
        site: &str,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> tokio::process::Command {
        let mut c = self.ns(site).tokio_command(program);
        c.kill_on_drop(true).stdin(std::process::Stdio::null());
        c
    }

    /// Runs the `novacron` CLI inside `from`'s namespace against `url` with `token`. `None` when
    /// it did not finish within `within` (nothing answered: a cut drops packets).
    pub async fn cli_in(
        &self,
        from: &str,
        url: &str,
        token: Option<&str>,
        args: &[&str],
        within: Duration,
    ) -> Result<Option<std::process::Output>> {
        let home = tempfile::tempdir()?;
        let mut cmd = self.command_in(from, BIN);
        cmd.args(args)
            .env("HOME", home.path())
            .env("NOVACRON_URL", url)
            .env_remove("NOVACRON_TOKEN");
        if let Some(t) = token {
            cmd.env("NOVACRON_TOKEN", t);
        }
        let child = cmd.output();
        match tokio::time::timeout(within, child).await {
            Ok(out) => Ok(Some(out.context("cannot run the CLI in a site namespace")?)),
            // Dropping the future kills the CLI (kill_on_drop).
            Err(_) => Ok(None),
        }
    }

    /// One HTTP request by curl from inside `from`'s namespace: `Ok(Ok((status, body)))` when
    /// something answered, `Ok(Err(reason))` when nothing did within `within` or the connection
    /// failed. Needs curl.
    pub async fn http_from(
        &self,
        from: &str,
        method: &str,
        url: &str,
        token: Option<&str>,
        body: Option<&Value>,
        within: Duration,
    ) -> Result<std::result::Result<(u16, Value), String>> {
        let mut cmd = self.command_in(from, "curl");
        cmd.args(["-sS", "-X", method, "-w", "\n%{http_code}"])
            .arg("--max-time")
            .arg(format!("{:.3}", within.as_secs_f64()));
        if let Some(t) = token {
            cmd.arg("-H").arg(format!("authorization: Bearer {t}"));
        }
        if let Some(b) = body {
            cmd.args(["-H", "content-type: application/json", "--data-binary"])
                .arg(b.to_string());
        }
        cmd.arg(url);
        // curl's own --max-time ends it; the outer deadline only guards against a stuck nsenter.
        let out = tokio::time::timeout(within + Duration::from_secs(5), cmd.output())
            .await
            .map_err(|_| anyhow!("curl in {from} did not end"))?
            .context("cannot run curl in a site namespace (is curl installed?)")?;
        if !out.status.success() {
            return Ok(Err(format!(
                "curl exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text
            .rsplit_once('\n')
            .ok_or_else(|| anyhow!("curl printed no status: {text}"))?;
        let status: u16 = code.trim().parse().context("curl's status code")?;
        let v = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_string()));
        Ok(Ok((status, v)))
    }

    /// Whether `/readyz` of every running node of site `to` answers from inside site `from`
    /// within `within` (`false` as soon as one does not).
    pub async fn reachable(&self, from: &str, to: &str, within: Duration) -> Result<bool> {
        for n in self.site(to).nodes.iter().filter(|n| n.is_running()) {
            let url = format!("{}/readyz", n.url());
            match self
                .http_from(from, "GET", &url, None, None, within)
                .await?
            {
                Ok((s, _)) if (200..300).contains(&s) => {}
                Ok((s, v)) => bail!("{url} from {from}: HTTP {s} {v}"),
                Err(_) => return Ok(false),
            }
        }
        Ok(true)
    }
}

impl Drop for TestSites {
    fn drop(&mut self) {
        // Each cluster prints its nodes' logs when a test fails; name the site first, since
        // every site has its own n1.
        for (name, cluster) in self.clusters.drain(..) {
            if std::thread::panicking() {
                eprintln!("==== site {name} ====");
            }
            drop(cluster);
        }
    }
}

/// One site's cluster: like `TestCluster::start_with`, with every node in the site namespace.
async fn start_cluster(
    site: SiteNs,
    tuning: String,
    env: Vec<(String, String)>,
    node_args: Vec<Vec<String>>,
) -> Result<TestCluster> {
    let mut c = TestCluster::empty(tuning)?;
    c.env = env;
    c.site = Some(site);
    for (i, args) in node_args.iter().enumerate() {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        c.add_node_with(i == 0, &args, &[]).await?;
        if i == 0 {
            let password = std::fs::read_to_string(c.nodes[0].dir.join("admin-password"))?;
            c.token = Some(c.login(0, "admin", password.trim()).await?);
        }
    }
    Ok(c)
}
