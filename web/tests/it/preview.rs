//! The pages in a real browser against the mock API: login, cluster view, VM list, create with
//! validation and a quota error, operations reaching their end, delete with confirmation, and
//! a phone-sized layout. Runs wherever Chromium and chromedriver are installed.

use anyhow::Result;
use fantoccini::Locator;

use crate::browser::{tools, Browser};
use crate::mock;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_work_in_headless_chromium_against_the_mock_api() -> Result<()> {
    let (chrome, driver) = match tools() {
        Ok(t) => t,
        Err(reason) => {
            println!("skipped: {reason}");
            return Ok(());
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, mock::app()).await });
    let b = Browser::start(&chrome, &driver).await?;

    // A wrong password is refused with the API's message, and the form stays.
    b.client.goto(&format!("{base}/")).await?;
    b.fill("#login-user", "admin").await?;
    b.fill("#login-pass", "wrong").await?;
    b.click("form button[type=submit]").await?;
    b.wait_text("[role=alert]", "bad_credentials").await?;
    b.screenshot("preview-login").await?;

    b.login(&base, "admin", "admin").await?;
    b.wait_text("main table", "node-3").await?;
    b.wait_text("main .stat", "node-1").await?;
    b.screenshot("preview-cluster").await?;

    b.client.goto(&format!("{base}/#/vms")).await?;
    b.wait_text("#vm-table", "db-primary").await?;
    b.screenshot("preview-vms").await?;

    // Filters go to the API: only the stopped VM is left.
    b.client
        .goto(&format!("{base}/#/vms?state=stopped"))
        .await?;
    b.wait_text("#vm-table", "ci-runner").await?;
    b.wait_gone("#vm-table", "db-primary").await?;

    // The name search goes to the API too, in any case.
    b.client.goto(&format!("{base}/#/vms?q=DB-")).await?;
    b.wait_text("#vm-table", "db-primary").await?;
    b.wait_gone("#vm-table", "ci-runner").await?;

    // Client-side validation names the field and does not send the request.
    b.client.goto(&format!("{base}/#/vms/new")).await?;
    b.fill("#name", "bad name!").await?;
    b.fill("#memory", "32").await?;
    b.click("#create-vm").await?;
    b.wait_text("#name-err", "Enter a name").await?;
    b.wait_text("#memory-err", "64 to 1048576").await?;
    b.screenshot("preview-create-invalid").await?;

    // A valid VM is created; its operation is shown and the VM reaches running without a reload.
    b.fill("#name", "e2e-vm").await?;
    b.fill("#memory", "256").await?;
    b.fill("#labels", "env=test").await?;
    b.click("#create-vm").await?;
    b.wait_text("main h1", "e2e-vm").await?;
    b.wait_text("#ops-list", "create e2e-vm").await?;
    b.wait_text("main .badge", "running").await?;
    b.wait_text("#ops-list", "succeeded").await?;
    // Charts from the metrics API, with the latest value in words.
    b.wait_text("#charts-title", "CPU, memory and network")
        .await?;
    b.wait_text(".charts", "Network in").await?;
    b.wait_text(".charts", "MiB").await?;
    b.screenshot("preview-vm-detail").await?;
    b.client
        .execute(
            "document.getElementById('charts-title').scrollIntoView()",
            vec![],
        )
        .await?;
    b.screenshot("preview-vm-charts").await?;

    // Migrate: the scheduler's explanation, then a chosen target; the node changes in the page.
    b.click("#explain").await?;
    b.wait_text("#placement", "not enough free memory").await?;
    let from = b.wait_text_of("#vm-spec", "Node").await?;
    let to = if from.contains("node-2") {
        "node-1"
    } else {
        "node-2"
    };
    b.client
        .find(Locator::Css("#migrate-target"))
        .await?
        .select_by_label(to)
        .await?;
    b.click("#migrate").await?;
    b.wait_text("#confirm-text", &format!("to {to}?")).await?;
    b.click("#confirm-ok").await?;
    b.wait_text("#ops-list", "migrate e2e-vm").await?;
    // The move shows while it runs, then the VM runs on the target: no reload.
    b.wait_text("#vm-spec", to).await?;
    b.wait_text("#vm-head .badge", "running").await?;
    b.wait_text("#vm-spec", to).await?;
    b.screenshot("preview-vm-migrated").await?;

    // Stop asks for confirmation; cancelling does nothing, confirming stops it.
    b.click("button[aria-label='Stop e2e-vm']").await?;
    b.wait_text("#confirm-text", "Stop VM e2e-vm?").await?;
    b.click("#confirm button[value=cancel]").await?;
    b.click("button[aria-label='Stop e2e-vm']").await?;
    b.click("#confirm-ok").await?;
    b.wait_text("main .badge", "stopped").await?;

    // A quota refusal from the API is shown as such.
    b.client.goto(&format!("{base}/#/vms/new")).await?;
    b.fill("#name", "small-1").await?;
    let tenant = b.client.find(Locator::Css("#tenant")).await?;
    tenant.select_by_value("t-small").await?;
    b.click("#create-vm").await?;
    b.wait_text("main h1", "small-1").await?;
    b.client.goto(&format!("{base}/#/vms/new")).await?;
    b.fill("#name", "small-2").await?;
    b.client
        .find(Locator::Css("#tenant"))
        .await?
        .select_by_value("t-small")
        .await?;
    b.click("#create-vm").await?;
    b.wait_text("[role=alert]", "Quota exceeded").await?;
    b.screenshot("preview-quota").await?;

    // Delete with confirmation; the VM disappears from the list.
    b.client.goto(&format!("{base}/#/vms")).await?;
    b.wait_text("#vm-table", "e2e-vm").await?;
    b.click("button[aria-label='Delete e2e-vm']").await?;
    b.wait_text("#confirm-text", "Delete VM e2e-vm?").await?;
    b.click("#confirm-ok").await?;
    b.wait_gone("#vm-table", "e2e-vm").await?;

    b.client.goto(&format!("{base}/#/tenants")).await?;
    b.wait_text("main table", "acme").await?;
    b.screenshot("preview-tenants").await?;
    b.client.goto(&format!("{base}/#/users")).await?;
    b.wait_text("main table", "alice").await?;
    b.client.goto(&format!("{base}/#/nodes")).await?;
    b.wait_text("main [role=status]", "not available").await?;

    // On a phone the menu collapses behind a button and tables become cards.
    b.client.set_window_size(390, 844).await?;
    b.client.goto(&format!("{base}/#/vms")).await?;
    b.wait_text("#vm-table", "db-primary").await?;
    b.screenshot("preview-vms-phone").await?;
    b.click("#menu-toggle").await?;
    b.wait_text("#nav", "Tenants").await?;

    // Logging out returns to the login page and forgets the token.
    b.client.set_window_size(1280, 900).await?;
    b.click("#logout").await?;
    b.wait_text("main h1", "Log in").await?;
    let token = b
        .client
        .execute("return sessionStorage.getItem('novacron.session')", vec![])
        .await?;
    assert!(token.is_null(), "token kept after logout: {token}");

    b.close().await?;
    server.abort();
    Ok(())
}
