//! The dashboard's integration tests: real headless Chromium driven over WebDriver.
//!
//! `preview` runs the pages against the in-process mock API and runs wherever Debian's
//! `chromium` and `chromium-driver` are installed (it prints why it is skipped otherwise).
//! `cluster` runs them against a real 3-node cluster of the `novacron` binary named by
//! `NOVACRON_E2E_BIN`, which must serve the dashboard. Screenshots go to `target/e2e/`.

mod a11y;
mod browser;
mod cluster;
mod mock;
mod preview;
