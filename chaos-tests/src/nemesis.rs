//! Faults on real processes, a seeded fault schedule, and the fault log.
//!
//! Owns: signals sent with the system `kill` command (SIGKILL, SIGSTOP, SIGCONT, SIGTERM), a
//! restartable [`Managed`] process, a [`Schedule`] drawn from a seed, and a [`FaultLog`] on the
//! same [`Clock`] as the client history, so faults and operations share one timeline.
//! Network faults (partition, packet loss) are scheduled here too but applied by
//! [`crate::netfault`]; [`run`] only handles the process faults.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::history::Clock;

/// Errors injecting a fault.
#[derive(Debug, thiserror::Error)]
pub enum NemesisError {
    #[error("cannot run the kill command")]
    KillCommand(#[source] std::io::Error),
    #[error("kill -s {signal} {pid} exited with {status}")]
    SignalRefused {
        signal: &'static str,
        pid: u32,
        status: ExitStatus,
    },
    #[error("cannot start {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot wait for process {pid}")]
    Wait {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("process {0} is not running")]
    NotRunning(String),
    #[error("no target with index {0}")]
    NoTarget(usize),
    #[error("{0:?} is a network fault; a process cannot apply it")]
    NotAProcessFault(Action),
}

/// A signal the nemesis sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Signal {
    Kill,
    Stop,
    Cont,
    Term,
}

impl Signal {
    /// The name `kill -s` takes.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Kill => "KILL",
            Signal::Stop => "STOP",
            Signal::Cont => "CONT",
            Signal::Term => "TERM",
        }
    }
}

/// Sends `signal` to `pid` with the system `kill` command (the crate forbids `unsafe`, so no
/// direct `kill(2)`).
pub fn send_signal(pid: u32, signal: Signal) -> Result<(), NemesisError> {
    let status = Command::new("kill")
        .arg("-s")
        .arg(signal.name())
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(NemesisError::KillCommand)?;
    if status.success() {
        Ok(())
    } else {
        Err(NemesisError::SignalRefused {
            signal: signal.name(),
            pid,
            status,
        })
    }
}

/// A process the nemesis can kill, pause, resume and restart with the same command line.
pub struct Managed {
    pub name: String,
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    /// Where stdout and stderr go (appended), so a node's log survives its restarts.
    log: Option<PathBuf>,
    child: Option<Child>,
}

impl Managed {
    /// Describes a process without starting it.
    pub fn new(
        name: impl Into<String>,
        program: impl Into<PathBuf>,
        args: impl IntoIterator<Item = impl Into<OsString>>,
    ) -> Self {
        Self {
            name: name.into(),
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            log: None,
            child: None,
        }
    }

    /// Adds an environment variable for every start.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Appends the process's output to `path` instead of inheriting ours.
    pub fn log_to(mut self, path: impl Into<PathBuf>) -> Self {
        self.log = Some(path.into());
        self
    }

    /// Replaces the command line used by later starts (a node started with `--init` restarts
    /// without it).
    pub fn set_args(&mut self, args: impl IntoIterator<Item = impl Into<OsString>>) {
        self.args = args.into_iter().map(Into::into).collect();
    }

    /// Starts the process (a no-op if it is running).
    pub fn start(&mut self) -> Result<u32, NemesisError> {
        if let Some(child) = &self.child {
            return Ok(child.id());
        }
        let spawn_error = |source| NemesisError::Spawn {
            program: self.program.clone(),
            source,
        };
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        if let Some(path) = &self.log {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(spawn_error)?;
            command.stdout(Stdio::from(file.try_clone().map_err(spawn_error)?));
            command.stderr(Stdio::from(file));
        }
        let child = command.spawn().map_err(spawn_error)?;
        let pid = child.id();
        self.child = Some(child);
        Ok(pid)
    }

    /// Whether the process exited on its own (it is then reaped and can be started again).
    pub fn has_exited(&mut self) -> bool {
        let exited = match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(Some(_))),
            None => false,
        };
        if exited {
            self.child = None;
        }
        exited
    }

    /// The pid of the running process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn running_pid(&self) -> Result<u32, NemesisError> {
        self.pid()
            .ok_or_else(|| NemesisError::NotRunning(self.name.clone()))
    }

    /// SIGKILL, then reap the process so its pid is not reused under us.
    pub fn kill(&mut self) -> Result<ExitStatus, NemesisError> {
        let pid = self.running_pid()?;
        send_signal(pid, Signal::Kill)?;
        let mut child = self
            .child
            .take()
            .ok_or_else(|| NemesisError::NotRunning(self.name.clone()))?;
        child
            .wait()
            .map_err(|source| NemesisError::Wait { pid, source })
    }

    /// SIGSTOP: the process holds its sockets and state but answers nothing.
    pub fn pause(&self) -> Result<(), NemesisError> {
        send_signal(self.running_pid()?, Signal::Stop)
    }

    /// SIGCONT after a pause.
    pub fn resume(&self) -> Result<(), NemesisError> {
        send_signal(self.running_pid()?, Signal::Cont)
    }

    /// SIGTERM, then waits up to `grace` for a clean exit before SIGKILL.
    pub fn terminate(&mut self, grace: Duration) -> Result<(), NemesisError> {
        let pid = self.running_pid()?;
        send_signal(pid, Signal::Term)?;
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            let exited = match self.child.as_mut() {
                Some(child) => child
                    .try_wait()
                    .map_err(|source| NemesisError::Wait { pid, source })?
                    .is_some(),
                None => true,
            };
            if exited {
                self.child = None;
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill().map(|_| ())
    }

    /// Kills (if running) and starts again with the same command line; returns the new pid.
    pub fn restart(&mut self) -> Result<u32, NemesisError> {
        if self.child.is_some() {
            self.kill()?;
        }
        self.start()
    }
}

impl Drop for Managed {
    /// A test that fails midway must not leave its processes behind.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL ends a stopped process too; errors are irrelevant while tearing down.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A class of process fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// SIGKILL, restarted after the fault's duration.
    Kill,
    /// SIGSTOP, SIGCONT after the fault's duration.
    Pause,
    /// The target's peer (QUIC) traffic is dropped both ways; healed after the duration.
    Partition,
    /// A share of all peer traffic is dropped at random; stopped after the duration.
    Loss,
    /// The target can no longer send peer traffic, but still receives it.
    OneWay,
    /// The target and the next node are cut off from the others (a minority of two when the
    /// cluster has five nodes, the majority staying on the other side).
    Minority,
    /// Every node hears only its two neighbours in node order.
    Ring,
    /// The target's data directory (a small tmpfs) is filled up; freed after the duration.
    DiskFull,
    /// Every node in turn is stopped with SIGTERM and started again once the previous one is
    /// ready.
    RollingRestart,
    /// fsync and fdatasync fail with an I/O error on the target (nodes run under `fiu-run -x`,
    /// switched with `fiu-ctrl`); they succeed again after the duration.
    FsyncFail,
}

/// One scheduled fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// When it starts, on the run's clock.
    pub at_ns: u64,
    pub kind: FaultKind,
    /// Index of the target process.
    pub target: usize,
    /// How long until it heals.
    pub duration_ns: u64,
}

/// A fault schedule drawn from a seed: the same seed gives the same schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub seed: u64,
    pub faults: Vec<Fault>,
}

/// The parameters of a random schedule.
#[derive(Debug, Clone)]
pub struct ScheduleConfig {
    pub targets: usize,
    pub kinds: Vec<FaultKind>,
    /// No fault starts after this.
    pub run_for: Duration,
    /// Quiet time between the heal of one fault and the start of the next, drawn uniformly.
    pub gap: (Duration, Duration),
    /// How long each fault lasts, drawn uniformly.
    pub duration: (Duration, Duration),
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn draw(rng: &mut StdRng, (low, high): (Duration, Duration)) -> u64 {
    let (low, high) = (nanos(low), nanos(high));
    if high <= low {
        low
    } else {
        rng.gen_range(low..=high)
    }
}

impl Schedule {
    /// Faults one after another (never two at once, so a majority stays up with 3 nodes).
    pub fn generate(seed: u64, config: &ScheduleConfig) -> Schedule {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut faults = Vec::new();
        let end = nanos(config.run_for);
        let mut at = draw(&mut rng, config.gap);
        while at < end && config.targets > 0 && !config.kinds.is_empty() {
            let kind = config.kinds[rng.gen_range(0..config.kinds.len())];
            let target = rng.gen_range(0..config.targets);
            let duration_ns = draw(&mut rng, config.duration);
            faults.push(Fault {
                at_ns: at,
                kind,
                target,
                duration_ns,
            });
            at = at
                .saturating_add(duration_ns)
                .saturating_add(draw(&mut rng, config.gap));
        }
        Schedule { seed, faults }
    }

    /// The start and heal actions of every fault, in time order.
    pub fn actions(&self) -> Vec<(u64, Action, usize)> {
        let mut actions = Vec::new();
        for f in &self.faults {
            let (start, heal) = match f.kind {
                FaultKind::Kill => (Action::Kill, Action::Restart),
                FaultKind::Pause => (Action::Pause, Action::Resume),
                FaultKind::Partition => (Action::Isolate, Action::Heal),
                FaultKind::Loss => (Action::StartLoss, Action::StopLoss),
                FaultKind::OneWay => (Action::CutOneWay, Action::Heal),
                FaultKind::Minority => (Action::CutMinority, Action::Heal),
                FaultKind::Ring => (Action::CutRing, Action::Heal),
                FaultKind::DiskFull => (Action::FillDisk, Action::FreeDisk),
                // Done within its start action; SIGCONT is harmless to running processes.
                FaultKind::RollingRestart => (Action::RollingRestart, Action::Resume),
                FaultKind::FsyncFail => (Action::FailFsync, Action::FixFsync),
            };
            actions.push((f.at_ns, start, f.target));
            actions.push((f.at_ns.saturating_add(f.duration_ns), heal, f.target));
        }
        actions.sort_by_key(|(t, _, _)| *t);
        actions
    }
}

/// What the nemesis did to a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Kill,
    Restart,
    Pause,
    Resume,
    /// Cut the target off from the other nodes' peer traffic.
    Isolate,
    /// Remove every partition rule.
    Heal,
    /// Start dropping a share of all peer traffic.
    StartLoss,
    /// Stop dropping.
    StopLoss,
    /// Drop everything the target sends to other nodes.
    CutOneWay,
    /// Cut the target and the next node off from the rest.
    CutMinority,
    /// Leave each node connected to its two neighbours only.
    CutRing,
    /// Fill the target's data directory.
    FillDisk,
    /// Remove what filled it.
    FreeDisk,
    /// Restart every node in turn, gracefully.
    RollingRestart,
    /// Make the target's fsync calls fail.
    FailFsync,
    /// Let them succeed again.
    FixFsync,
}

impl Action {
    /// Whether the action is a network fault (applied by [`crate::netfault`]).
    pub fn is_network(self) -> bool {
        matches!(
            self,
            Action::Isolate
                | Action::Heal
                | Action::StartLoss
                | Action::StopLoss
                | Action::CutOneWay
                | Action::CutMinority
                | Action::CutRing
        )
    }
}

/// One entry of the fault log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultEvent {
    /// When the action was taken, on the run's clock.
    pub time_ns: u64,
    pub action: Action,
    pub target: String,
    /// Why the action failed, if it did.
    pub error: Option<String>,
}

impl FaultEvent {
    pub fn describe(&self) -> String {
        format!(
            "{:>10.3}s {:?} {}{}",
            self.time_ns as f64 / 1e9,
            self.action,
            self.target,
            self.error
                .as_deref()
                .map(|e| format!(" (failed: {e})"))
                .unwrap_or_default()
        )
    }
}

/// The log of faults, timed on the same clock as the history.
pub struct FaultLog {
    clock: Clock,
    events: Mutex<Vec<FaultEvent>>,
}

impl FaultLog {
    pub fn new(clock: Clock) -> Self {
        Self {
            clock,
            events: Mutex::new(Vec::new()),
        }
    }

    /// Records an action taken now.
    pub fn record(&self, action: Action, target: &str, error: Option<String>) {
        let event = FaultEvent {
            time_ns: self.clock.now_ns(),
            action,
            target: target.to_string(),
            error,
        };
        // A poisoned lock only means another recorder panicked; the log itself is still whole.
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.push(event);
    }

    /// Every event recorded so far.
    pub fn events(&self) -> Vec<FaultEvent> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Takes one action on a target and logs it (failed actions are logged too, then returned).
pub fn apply(action: Action, target: &mut Managed, log: &FaultLog) -> Result<(), NemesisError> {
    let result = match action {
        Action::Kill => target.kill().map(|_| ()),
        Action::Restart => target.start().map(|_| ()),
        Action::Pause => target.pause(),
        Action::Resume => target.resume(),
        Action::Isolate
        | Action::Heal
        | Action::StartLoss
        | Action::StopLoss
        | Action::CutOneWay
        | Action::CutMinority
        | Action::CutRing
        | Action::FillDisk
        | Action::FreeDisk
        | Action::RollingRestart
        | Action::FailFsync
        | Action::FixFsync => Err(NemesisError::NotAProcessFault(action)),
    };
    log.record(
        action,
        &target.name,
        result.as_ref().err().map(|e| e.to_string()),
    );
    result
}

/// Runs a schedule against `targets`, blocking this thread until its last heal.
///
/// Each action waits for its time on the clock; the run's workload goes on in other threads.
/// A failed action is logged and the schedule continues, so one refused signal does not leave
/// a process paused for the rest of the run.
pub fn run(schedule: &Schedule, targets: &mut [Managed], clock: Clock, log: &FaultLog) {
    for (at, action, index) in schedule.actions() {
        let now = clock.now_ns();
        if at > now {
            std::thread::sleep(Duration::from_nanos(at - now));
        }
        match targets.get_mut(index) {
            Some(target) => {
                let _ = apply(action, target, log);
            }
            None => log.record(
                action,
                &format!("#{index}"),
                Some(NemesisError::NoTarget(index).to_string()),
            ),
        }
    }
}
