//! Starting chromedriver and headless Chromium, waiting for page conditions, and screenshots.

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;

/// How long a page condition may take before the test fails.
pub const PAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Paths of the browser and its driver, or the reason they are not usable here.
pub fn tools() -> std::result::Result<(PathBuf, PathBuf), String> {
    let driver = PathBuf::from(
        std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into()),
    );
    let chrome =
        PathBuf::from(std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    if !driver.exists() {
        return Err(format!(
            "{} not found (apt-get install chromium-driver)",
            driver.display()
        ));
    }
    if !chrome.exists() {
        return Err(format!(
            "{} not found (apt-get install chromium)",
            chrome.display()
        ));
    }
    Ok((chrome, driver))
}

/// A free TCP port on loopback (the driver takes a port number, not a bound socket).
pub fn free_port() -> Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A chromedriver process and a WebDriver session on it; both end when this is dropped.
pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub async fn start(chrome: &std::path::Path, driver: &std::path::Path) -> Result<Browser> {
        Self::start_with(chrome, driver, &[]).await
    }

    /// Like [`Browser::start`] with extra Chromium flags (e.g. `--force-dark-mode`).
    pub async fn start_with(
        chrome: &std::path::Path,
        driver: &std::path::Path,
        extra_args: &[&str],
    ) -> Result<Browser> {
        let port = free_port()?;
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver")?;
        let profile = tempfile::tempdir()?;
        let mut args: Vec<String> = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,900",
        ]
        .iter()
        .chain(extra_args)
        .map(|a| a.to_string())
        .collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let mut caps = serde_json::Map::new();
        // Flags measured on these machines: without the background-networking ones Chromium
        // keeps trying hosts that a closed network refuses.
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chrome.to_string_lossy(),
                "args": args,
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        let client = loop {
            match ClientBuilder::new(HttpConnector::new())
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                Err(e) if started.elapsed() < PAGE_TIMEOUT => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => bail!("no WebDriver session on {url}: {e}"),
            }
        };
        Ok(Browser {
            client,
            driver: child,
            _profile: profile,
        })
    }

    /// Waits until `css` matches an element whose text contains `text`.
    pub async fn wait_text(&self, css: &str, text: &str) -> Result<Element> {
        let started = Instant::now();
        loop {
            if let Ok(els) = self.client.find_all(Locator::Css(css)).await {
                for el in els {
                    if el.text().await.map(|t| t.contains(text)).unwrap_or(false) {
                        return Ok(el);
                    }
                }
            }
            if started.elapsed() > PAGE_TIMEOUT {
                let body = self
                    .client
                    .find(Locator::Css("body"))
                    .await?
                    .text()
                    .await
                    .unwrap_or_default();
                bail!(
                    "no {css:?} containing {text:?} after {PAGE_TIMEOUT:?}; the page says:\n{body}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Like [`Browser::wait_text`], returning the matched element's text as it was read: a
    /// second read could meet a stale element, since live pages redraw on every update.
    pub async fn wait_text_of(&self, css: &str, text: &str) -> Result<String> {
        let started = Instant::now();
        loop {
            if let Ok(els) = self.client.find_all(Locator::Css(css)).await {
                for el in els {
                    if let Ok(t) = el.text().await {
                        if t.contains(text) {
                            return Ok(t);
                        }
                    }
                }
            }
            if started.elapsed() > PAGE_TIMEOUT {
                bail!("no {css:?} containing {text:?} after {PAGE_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until no element matching `css` contains `text`.
    pub async fn wait_gone(&self, css: &str, text: &str) -> Result<()> {
        let started = Instant::now();
        loop {
            let mut present = false;
            if let Ok(els) = self.client.find_all(Locator::Css(css)).await {
                for el in els {
                    present |= el.text().await.map(|t| t.contains(text)).unwrap_or(false);
                }
            }
            if !present {
                return Ok(());
            }
            if started.elapsed() > PAGE_TIMEOUT {
                bail!("{css:?} still contains {text:?} after {PAGE_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn fill(&self, css: &str, value: &str) -> Result<()> {
        self.retry_stale(css, |el| async move {
            el.clear().await?;
            el.send_keys(value).await
        })
        .await
    }

    pub async fn click(&self, css: &str) -> Result<()> {
        self.retry_stale(css, |el| async move { el.click().await })
            .await
    }

    /// Finds `css` and acts on it, finding it again when the page re-rendered in between (live
    /// pages redraw on every update, which turns a found element stale).
    async fn retry_stale<F, Fut>(&self, css: &str, act: F) -> Result<()>
    where
        F: Fn(Element) -> Fut,
        Fut: std::future::Future<Output = Result<(), fantoccini::error::CmdError>>,
    {
        let deadline = Instant::now() + PAGE_TIMEOUT;
        loop {
            let el = self
                .client
                .wait()
                .at_most(PAGE_TIMEOUT)
                .for_element(Locator::Css(css))
                .await?;
            match act(el).await {
                Ok(()) => return Ok(()),
                Err(e) if e.to_string().contains("stale element") && Instant::now() < deadline => {
                    continue
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Logs in through the form and waits for the cluster view.
    pub async fn login(&self, base: &str, user: &str, password: &str) -> Result<()> {
        self.client.goto(&format!("{base}/#/login")).await?;
        self.fill("#login-user", user).await?;
        self.fill("#login-pass", password).await?;
        self.click("form button[type=submit]").await?;
        self.wait_text("main h1", "Cluster").await?;
        Ok(())
    }

    /// Writes a PNG of the current page to `target/e2e/<name>.png` and returns its path.
    pub async fn screenshot(&self, name: &str) -> Result<PathBuf> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/e2e");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, self.client.screenshot().await?)?;
        Ok(path)
    }

    pub async fn close(mut self) -> Result<()> {
        let r = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        r.context("closing the WebDriver session")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
    }
}
