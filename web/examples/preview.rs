//! `cargo run -p web --example preview [ADDR]`: the dashboard with a tiny in-process mock of the
//! API calls it makes, for looking at the pages (and screenshotting them) without a cluster.
//!
//! Log in as `admin` / `admin`. The mock keeps VMs, tenants and users in memory, completes each
//! operation on its second poll, and does not offer `/api/v1/events`, `/nodes` or `/audit`, so
//! the pages show their polling and "not available" paths. Set `PREVIEW_NODE_DOWN=1` to see the
//! banner for a node that is down. Not a test double of the real API: only the shapes the pages
//! read are produced.

#[path = "../tests/it/mock.rs"]
mod mock;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8099".to_string());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!(
        "dashboard preview on http://{} (log in as admin / admin); {} bytes of page, script and style",
        listener.local_addr()?,
        web::page_weight()
    );
    axum::serve(listener, mock::app()).await
}
