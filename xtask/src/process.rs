//! Small helpers for running commands and waiting for conditions with a deadline.
//!
//! Nothing here sleeps for a fixed time to "let things settle": every wait polls a condition and
//! gives up at a deadline, so a slow machine costs time, not correctness.

use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How often synchronous waits re-check their condition.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Runs `cmd` with its output discarded and returns whether it exited with success before
/// `timeout`; a command still running at the deadline is killed and counts as a failure.
pub(crate) fn succeeds_within(cmd: &mut Command, timeout: Duration) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let Ok(mut child) = cmd.spawn() else {
        return false;
    };
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL_INTERVAL),
            _ => {
                // Past the deadline (or unable to poll): do not leave the command behind.
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Runs `cmd` with inherited stdio and fails unless it exits with success.
pub(crate) fn run_inherit(cmd: &mut Command) -> Result<()> {
    let status: ExitStatus = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs `cmd` and returns its trimmed standard output, failing unless it exits with success.
pub(crate) fn output_of(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Polls `condition` until it holds or `timeout` passes; `what` names the condition in the error.
pub(crate) fn wait_for(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Whether we run as root (`id -u` prints 0); std has no getuid and unsafe code is forbidden.
pub(crate) fn is_root() -> bool {
    output_of(Command::new("id").arg("-u")).is_ok_and(|uid| uid == "0")
}
