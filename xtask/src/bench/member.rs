//! One server process of a benchmarked cluster: how to start it, restart it and kill it.
//!
//! A `Member` owns its child process and kills it when dropped, so every exit path of the
//! benchmark (including errors) leaves no server behind.

use std::fs::File;
use std::net::{TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A server process and the command line that (re)starts it.
pub(crate) struct Member {
    pub(crate) name: String,
    /// Base URL of its client API, e.g. `http://127.0.0.1:40123`.
    pub(crate) url: String,
    program: PathBuf,
    /// Arguments of the first start.
    first_args: Vec<String>,
    /// Arguments of every later start (NovaCron restarts from its data dir alone).
    restart_args: Vec<String>,
    envs: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Member {
    pub(crate) fn new(
        name: String,
        url: String,
        program: PathBuf,
        first_args: Vec<String>,
        restart_args: Vec<String>,
        log: PathBuf,
    ) -> Self {
        Self {
            name,
            url,
            program,
            first_args,
            restart_args,
            envs: Vec::new(),
            log,
            child: None,
            starts: 0,
        }
    }

    /// Adds an argument to the first start only (`--init`, `--join URL`).
    pub(crate) fn push_first_arg(&mut self, arg: &str) {
        self.first_args.push(arg.to_owned());
    }

    pub(crate) fn env(&mut self, key: &str, value: &str) {
        self.envs.push((key.to_owned(), value.to_owned()));
    }

    /// Starts the process (first start or restart), its output appended to its log file.
    pub(crate) fn start(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("{} is already running", self.name);
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let log_err = log.try_clone().context("duplicating the log file handle")?;
        let args = if self.starts == 0 {
            &self.first_args
        } else {
            &self.restart_args
        };
        let child = Command::new(&self.program)
            .args(args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("starting {} ({})", self.name, self.program.display()))?;
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }

    /// SIGKILL (std's `kill` on Unix), then reap the process so it does not linger as a zombie.
    pub(crate) fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child
                .kill()
                .with_context(|| format!("killing {}", self.name))?;
            child
                .wait()
                .with_context(|| format!("reaping {}", self.name))?;
        }
        Ok(())
    }

    /// Fails if the process has exited on its own (a crash at start-up, a bad flag).
    pub(crate) fn check_alive(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("{} is not running", self.name);
        };
        if let Some(status) = child.try_wait().context("polling the process")? {
            self.child = None;
            // The log goes to the terminal, not into the error: the error ends up in the report.
            eprintln!(
                "{} exited with {status}; last lines of {}:\n{}",
                self.name,
                self.log.display(),
                self.log_tail(20)
            );
            bail!(
                "{} exited with {status} (its log was printed above)",
                self.name
            );
        }
        Ok(())
    }

    /// The last `lines` lines of the member's log, for error messages.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Finds `n` free TCP ports on loopback by binding port 0; all listeners are held until every
/// port is chosen so the same port is never handed out twice.
pub(crate) fn free_tcp_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("binding loopback port 0")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// Like [`free_tcp_ports`] for UDP (QUIC peer ports).
pub(crate) fn free_udp_ports(n: usize) -> Result<Vec<u16>> {
    let sockets = (0..n)
        .map(|_| UdpSocket::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("binding loopback UDP port 0")?;
    sockets.iter().map(|s| Ok(s.local_addr()?.port())).collect()
}

/// Polls the async `condition` every 50 ms until it holds or `timeout` passes, checking between
/// polls that the members are still alive so a crashed server fails fast with its log.
pub(crate) async fn wait_until<F, Fut>(
    what: &str,
    timeout: Duration,
    members: &mut [Member],
    mut condition: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return Ok(());
        }
        // A member that was killed on purpose has no child and is not checked.
        for m in members.iter_mut().filter(|m| m.child.is_some()) {
            m.check_alive()?;
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
