//! Accessibility of the main pages: axe-core (from npm, pinned and fetched by `cargo xtask axe`)
//! is injected into each page over WebDriver and run there; any violation axe rates serious or
//! critical fails the test, listed with the rule, its help text and the elements it found.
//!
//! The script comes from `NOVACRON_AXE_JS` (set by `cargo xtask ci`; then it must exist), else
//! from `target/axe-core/<version>/package/axe.min.js` when `cargo xtask axe` has been run here.
//! Without either the test says so and is skipped, like the other browser tests without Chromium.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::browser::{tools, Browser};
use crate::mock;

/// axe impacts that fail the check (the others are reported by axe but tolerated).
const FAILING_IMPACTS: &[&str] = &["serious", "critical"];

/// The axe-core script to inject, `Ok(None)` when none is available here (and none is required).
pub fn axe_script() -> Result<Option<String>> {
    if let Some(path) = std::env::var_os("NOVACRON_AXE_JS").map(PathBuf::from) {
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "NOVACRON_AXE_JS names {} (run `cargo xtask axe`)",
                path.display()
            )
        })?;
        return Ok(Some(text));
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/axe-core");
    let Ok(versions) = std::fs::read_dir(&root) else {
        return Ok(None);
    };
    let mut found: Vec<PathBuf> = versions
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("package/axe.min.js"))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    match found.pop() {
        Some(p) => Ok(Some(std::fs::read_to_string(&p)?)),
        None => Ok(None),
    }
}

/// Runs axe on the page as it is now and fails with a readable list of its serious and critical
/// violations. `page` names the page in the message.
pub async fn check(b: &Browser, axe: &str, page: &str) -> Result<()> {
    // The page's CSP forbids injected <script> elements; WebDriver's script evaluation is not
    // subject to it, so the library is evaluated directly. It defines `window.axe`.
    let loaded = b
        .client
        .execute(&format!("{axe}\n;return typeof window.axe;"), Vec::new())
        .await
        .context("injecting axe-core")?;
    if loaded.as_str() != Some("object") {
        bail!("axe-core did not load into the page: typeof axe = {loaded}");
    }
    let result = b
        .client
        .execute_async(
            r#"const done = arguments[arguments.length - 1];
               axe.run(document, { resultTypes: ['violations'] })
                 .then((r) => done({ ok: r.violations.map((v) => ({
                   id: v.id, impact: v.impact, help: v.help,
                   targets: v.nodes.slice(0, 5).map((n) => n.target.join(' ') + ' :: ' + (n.failureSummary || '').replace(/\s+/g, ' ')),
                 })) }))
                 .catch((e) => done({ err: String(e) }));"#,
            Vec::new(),
        )
        .await
        .context("running axe-core")?;
    if let Some(err) = result.get("err") {
        bail!("axe-core failed on {page}: {err}");
    }
    let violations = result
        .get("ok")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let failing: Vec<&Value> = violations
        .iter()
        .filter(|v| {
            v["impact"]
                .as_str()
                .is_some_and(|i| FAILING_IMPACTS.contains(&i))
        })
        .collect();
    for v in &violations {
        println!(
            "axe on {page}: {} ({}): {}",
            v["id"].as_str().unwrap_or("?"),
            v["impact"].as_str().unwrap_or("?"),
            v["help"].as_str().unwrap_or("")
        );
    }
    if failing.is_empty() {
        println!("axe on {page}: no serious or critical violation");
        return Ok(());
    }
    let mut msg = format!(
        "{} serious or critical axe violations on {page}:",
        failing.len()
    );
    for v in failing {
        msg.push_str(&format!(
            "\n- {} ({}): {}",
            v["id"].as_str().unwrap_or("?"),
            v["impact"].as_str().unwrap_or("?"),
            v["help"].as_str().unwrap_or("")
        ));
        for t in v["targets"].as_array().into_iter().flatten() {
            msg.push_str(&format!("\n    {}", t.as_str().unwrap_or("")));
        }
    }
    bail!(msg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn main_pages_have_no_serious_accessibility_violation() -> Result<()> {
    let (chrome, driver) = match tools() {
        Ok(t) => t,
        Err(reason) => {
            println!("skipped: {reason}");
            return Ok(());
        }
    };
    let Some(axe) = axe_script()? else {
        println!("skipped: no axe-core here (run `cargo xtask axe`, or set NOVACRON_AXE_JS)");
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, mock::app()).await });
    let mut failures = Vec::new();
    // The style sheet has a light and a dark palette (it follows the system): check both.
    for (scheme, flags) in [("light", &[][..]), ("dark", &["--force-dark-mode"][..])] {
        let b = Browser::start_with(&chrome, &driver, flags).await?;
        b.client.goto(&format!("{base}/#/login")).await?;
        let dark = b
            .client
            .execute(
                "return matchMedia('(prefers-color-scheme: dark)').matches",
                Vec::new(),
            )
            .await?;
        if dark.as_bool() != Some(scheme == "dark") {
            bail!("the browser did not take the {scheme} colour scheme");
        }
        failures.extend(check_pages(&b, &axe, &base, scheme).await?);
        b.close().await?;
    }
    server.abort();
    if !failures.is_empty() {
        bail!("{}", failures.join("\n\n"));
    }
    Ok(())
}

/// Walks every main page (and the login error, the confirmation dialog and a phone-sized list)
/// and returns the failures of the check, so one run lists everything to fix.
async fn check_pages(b: &Browser, axe: &str, base: &str, scheme: &str) -> Result<Vec<String>> {
    let mut failures = Vec::new();
    let mut check = async |page: &str| {
        if let Err(e) = check(b, axe, &format!("{page} ({scheme})")).await {
            failures.push(format!("{e:#}"));
        }
    };
    b.client.goto(&format!("{base}/#/login")).await?;
    b.wait_text("main h1", "Log in").await?;
    check("login").await;
    // The login page with an error shown: the alert is part of the page a user meets.
    b.fill("#login-user", "admin").await?;
    b.fill("#login-pass", "wrong").await?;
    b.click("form button[type=submit]").await?;
    b.wait_text("[role=alert]", "bad_credentials").await?;
    check("login with an error").await;

    b.login(base, "admin", "admin").await?;
    let pages: &[(&str, &str, &str, &str)] = &[
        ("cluster", "#/cluster", "main table", "node-3"),
        ("VMs list", "#/vms", "#vm-table", "db-primary"),
        ("new VM form", "#/vms/new", "main h1", "New VM"),
        ("nodes", "#/nodes", "main table", "node-1"),
        ("sites", "#/sites", "#site-table", "edge-1"),
        ("tenants", "#/tenants", "main table", "acme"),
        ("users", "#/users", "main table", "alice"),
        ("audit", "#/audit", "main h1", "Audit"),
    ];
    for (name, route, css, text) in pages {
        b.client.goto(&format!("{base}/{route}")).await?;
        b.wait_text(css, text).await?;
        check(name).await;
    }
    // VM detail, with its charts and the migration form: open the first VM of the list.
    b.client.goto(&format!("{base}/#/vms")).await?;
    b.wait_text("#vm-table", "db-primary").await?;
    b.click("#vm-table tbody a").await?;
    b.wait_text("main dl", "Epoch").await?;
    b.wait_text(".charts", "CPU").await?;
    b.click("#explain").await?;
    b.wait_text("#placement", "reason").await?;
    check("VM detail").await;
    // The confirmation dialog, open over the VM detail page.
    b.click("#vm-head .actions button.danger").await?;
    b.wait_text("#confirm-text", "Delete VM").await?;
    check("delete confirmation").await;
    b.click("#confirm button[value=cancel]").await?;

    // A phone-sized window: the collapsed menu and card tables.
    b.client.set_window_size(390, 844).await?;
    b.client.goto(&format!("{base}/#/vms")).await?;
    b.wait_text("#vm-table", "db-primary").await?;
    check("VMs list on a phone").await;
    b.client.set_window_size(1280, 900).await?;
    Ok(failures)
}
