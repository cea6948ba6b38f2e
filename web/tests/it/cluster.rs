//! The pages against a real 3-node cluster of the `novacron` binary named by `NOVACRON_E2E_BIN`
//! (it must serve the dashboard at `/`). Logs in on a follower, creates a VM, sees it reach
//! running without a reload, deletes it. Skipped, with the reason printed, when the variable is
//! unset.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fantoccini::Locator;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::a11y;
use crate::browser::{free_port, tools, Browser};

const ADMIN_PASSWORD: &str = "e2e-admin-password";

struct Node {
    child: Child,
    api: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn spawn(bin: &Path, dir: &Path, name: &str, extra: &[String]) -> Result<Node> {
    let api = format!("127.0.0.1:{}", free_port()?);
    let peer = format!("127.0.0.1:{}", free_udp_port()?);
    let log = std::fs::File::create(dir.with_extension("log"))?;
    let child = Command::new(bin)
        .args(["serve", "--data-dir"])
        .arg(dir)
        .args(["--name", name, "--api-addr", &api, "--peer-addr", &peer])
        .args(extra)
        .env("NOVACRON_ADMIN_PASSWORD", ADMIN_PASSWORD)
        // Simulated guests: the dashboard is under test, not QEMU.
        .env("NOVACRON_LIBVIRT_URI", "test:///default")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Node { child, api })
}

/// The status code of a plain HTTP GET, or None when nothing answers yet.
async fn status_of(addr: &str, path: &str) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = vec![0u8; 64];
    let n = s.read(&mut buf).await.ok()?;
    String::from_utf8_lossy(&buf[..n])
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn wait_ready(node: &Node) -> Result<()> {
    let started = Instant::now();
    while status_of(&node.api, "/readyz").await != Some(200) {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("node at {} not ready after 60 s", node.api);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn wait_file(path: &Path) -> Result<String> {
    let started = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if !s.trim().is_empty() {
                return Ok(s.trim().to_string());
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("{} not written after 60 s", path.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_drives_a_real_three_node_cluster() -> Result<()> {
    let Some(bin) = std::env::var_os("NOVACRON_E2E_BIN").map(PathBuf::from) else {
        println!("skipped: set NOVACRON_E2E_BIN to a novacron binary that serves the dashboard");
        return Ok(());
    };
    let (chrome, driver) = tools().map_err(anyhow::Error::msg)?;
    let tmp = tempfile::tempdir()?;
    let d1 = tmp.path().join("n1");
    let n1 = spawn(&bin, &d1, "node-1", &["--init".into()])?;
    wait_ready(&n1).await?;
    if status_of(&n1.api, "/").await != Some(200) {
        bail!(
            "{} does not serve the dashboard at / (wire web::router())",
            bin.display()
        );
    }
    let token = wait_file(&d1.join("join-token")).await?;
    let join = |dir: &str, name: &str| {
        spawn(
            &bin,
            &tmp.path().join(dir),
            name,
            &[
                "--join".into(),
                format!("http://{}", n1.api),
                "--token".into(),
                token.clone(),
            ],
        )
    };
    let n2 = join("n2", "node-2")?;
    wait_ready(&n2).await?;
    let n3 = join("n3", "node-3")?;
    wait_ready(&n3).await?;

    let b = Browser::start(&chrome, &driver).await?;
    // The accessibility check runs on every main page when axe-core is here (CI fetches it).
    let axe = a11y::axe_script()?;
    if axe.is_none() {
        println!("no axe-core here: pages are not checked for accessibility (cargo xtask axe)");
    }
    let mut a11y_failures = Vec::new();
    let mut check = async |page: &str| -> Result<()> {
        if let Some(axe) = &axe {
            if let Err(e) = a11y::check(&b, axe, page).await {
                a11y_failures.push(format!("{e:#}"));
            }
        }
        Ok(())
    };
    // node-1 created the cluster and leads it; log in on a follower.
    let base = format!("http://{}", n2.api);
    b.client.goto(&format!("{base}/#/login")).await?;
    b.wait_text("main h1", "Log in").await?;
    b.screenshot("login").await?;
    check("login").await?;
    b.login(&base, "admin", ADMIN_PASSWORD).await?;
    b.wait_text("main table", "node-3").await?;
    b.screenshot("cluster").await?;
    check("cluster").await?;

    b.client.goto(&format!("{base}/#/vms/new")).await?;
    b.fill("#name", "e2e-vm").await?;
    b.fill("#memory", "128").await?;
    b.click("#create-vm").await?;
    b.wait_text("main h1", "e2e-vm").await?;
    b.wait_text("main .badge", "running").await?;
    b.screenshot("vm").await?;
    check("VM detail").await?;
    migrate(&b, migration_offered(&n2.api).await?).await?;

    b.client.goto(&format!("{base}/#/vms")).await?;
    b.wait_text("#vm-table", "e2e-vm").await?;
    b.screenshot("vms").await?;
    check("VMs list").await?;
    b.click("button[aria-label='Delete e2e-vm']").await?;
    b.click("#confirm-ok").await?;
    b.wait_gone("#vm-table", "e2e-vm").await?;

    // Each page once its content is in: a table row naming something the cluster holds.
    for (page, css, text) in [
        ("tenants", "main table", "Actions"),
        ("users", "main table", "admin"),
        ("nodes", "main table", "node-3"),
        ("audit", "main table", "vm."),
    ] {
        b.client.goto(&format!("{base}/#/{page}")).await?;
        b.wait_text(css, text).await?;
        b.screenshot(page).await?;
        check(page).await?;
    }
    drain_and_undrain(&b, &base).await?;
    tenant_isolation(&b, &base).await?;
    b.close().await?;
    drop((n3, n2, n1));
    if !a11y_failures.is_empty() {
        bail!("{}", a11y_failures.join("\n\n"));
    }
    Ok(())
}

/// Through the pages alone: an admin creates tenants acme and globex, a globex operator and a VM
/// in acme; the globex user then neither sees that VM in the list nor can open it by its URL.
async fn tenant_isolation(b: &Browser, base: &str) -> Result<()> {
    b.client.goto(&format!("{base}/#/tenants")).await?;
    for name in ["acme", "globex"] {
        b.fill("#t-name", name).await?;
        b.click("form[aria-labelledby=new-tenant] button[type=submit]")
            .await?;
        b.wait_text("main table", name).await?;
    }
    b.client.goto(&format!("{base}/#/users")).await?;
    b.wait_text("main table", "admin").await?;
    b.fill("#u-name", "bob").await?;
    b.fill("#u-pass", "bob-password-1").await?;
    b.client
        .find(Locator::Css("#u-tenant"))
        .await?
        .select_by_label("globex")
        .await?;
    b.client
        .find(Locator::Css("#u-role"))
        .await?
        .select_by_label("operator")
        .await?;
    b.click("form[aria-labelledby=new-user] button[type=submit]")
        .await?;
    b.wait_text("main table", "bob").await?;

    b.client.goto(&format!("{base}/#/vms/new")).await?;
    b.fill("#name", "acme-secret").await?;
    b.client
        .find(Locator::Css("#tenant"))
        .await?
        .select_by_label("acme")
        .await?;
    b.click("#create-vm").await?;
    b.wait_text("main h1", "acme-secret").await?;
    let detail = b.client.current_url().await?.to_string();

    b.click("#logout").await?;
    b.wait_text("main h1", "Log in").await?;
    b.login(base, "bob", "bob-password-1").await?;
    b.client.goto(&format!("{base}/#/vms")).await?;
    b.wait_text("main", "No VMs match").await?;
    // Nowhere on the page: not in the list, nor in the operations the admin started in this tab.
    b.wait_gone("body", "acme-secret").await?;
    // The detail URL of acme's VM answers as if it did not exist (404, not 403).
    b.client.goto(&detail).await?;
    b.wait_text("main h1", "VM not found").await?;
    b.wait_gone("body", "acme-secret").await?;
    b.screenshot("tenant-isolation").await?;
    Ok(())
}

/// Whether the binary documents live migration in its OpenAPI document (the route arrives with
/// the migration work; before it, the page must say plainly that migration is not available).
async fn migration_offered(addr: &str) -> Result<bool> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!("GET /openapi.json HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).await?;
    Ok(String::from_utf8_lossy(&body).contains("/vms/{id}/migrate"))
}

/// Migrates the VM open in the page to another node through the form and watches the node change
/// without a reload; where the cluster has no migration, checks the page says so.
async fn migrate(b: &Browser, offered: bool) -> Result<()> {
    let spec = b.wait_text_of("#vm-spec", "Node").await?;
    let Some(to) = ["node-1", "node-2", "node-3"]
        .into_iter()
        .find(|n| !spec.contains(n))
    else {
        bail!("the VM is on no node of the cluster: {spec}");
    };
    b.client
        .find(Locator::Css("#migrate-target"))
        .await?
        .select_by_label(to)
        .await?;
    b.click("#migrate").await?;
    b.click("#confirm-ok").await?;
    if offered {
        b.wait_text("#ops-list", "migrate e2e-vm").await?;
        b.wait_text("#vm-spec", to).await?;
        b.wait_text("#vm-head .badge", "running").await?;
        b.screenshot("vm-migrated").await?;
    } else {
        b.wait_text("[role=status]", "Live migration is not available")
            .await?;
        println!("this binary offers no live migration: the page says so");
    }
    Ok(())
}

/// Drain opens a preview (the scheduler's simulation, or a plain "not available" where the
/// cluster has none), drains on confirmation, and undrain makes the node schedulable again.
async fn drain_and_undrain(b: &Browser, base: &str) -> Result<()> {
    b.client.goto(&format!("{base}/#/nodes")).await?;
    b.wait_text("main table", "node-3").await?;
    // Each node's reservations are shown (the e2e VM was deleted, so they may be zero).
    b.wait_text("main table", "VMs ·").await?;
    b.click("button[aria-label='Drain node-3']").await?;
    b.wait_text("#drain-preview", "Drain node-3?").await?;
    // Either answer of the scheduler is shown before anything moves.
    let started = std::time::Instant::now();
    loop {
        let text = b.wait_text_of("#drain-preview", "").await?;
        if text.contains("What the scheduler would do") || text.contains("not available") {
            break;
        }
        if started.elapsed() > crate::browser::PAGE_TIMEOUT {
            bail!("the drain preview never answered: {text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.screenshot("drain-preview").await?;
    b.click("#drain-confirm").await?;
    b.wait_gone("main", "Drain node-3?").await?;
    b.wait_text("main table", "drained").await?;
    b.click("button[aria-label='Undrain node-3']").await?;
    b.click("#confirm-ok").await?;
    b.wait_gone("main table", "drained").await?;
    Ok(())
}
