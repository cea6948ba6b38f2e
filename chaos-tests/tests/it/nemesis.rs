//! The nemesis on real processes: kill, restart, pause and resume, and a seeded schedule.

use std::time::{Duration, Instant};

use chaos_tests::history::Clock;
use chaos_tests::nemesis::{self, Action, FaultKind, FaultLog, Managed, Schedule, ScheduleConfig};

/// The scheduler state letter of a process (`T` stopped, `S` sleeping, `Z` zombie).
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces; the state follows it.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Waits until `condition` holds, failing after a generous deadline.
fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn sleeper(name: &str) -> Managed {
    Managed::new(name, "sleep", ["600"])
}

#[test]
fn pauses_resumes_kills_and_restarts_a_process() {
    let clock = Clock::start();
    let log = FaultLog::new(clock);
    let mut target = sleeper("n1");
    let pid = target.start().unwrap();

    nemesis::apply(Action::Pause, &mut target, &log).unwrap();
    wait_for("the process to stop", || proc_state(pid) == Some('T'));
    nemesis::apply(Action::Resume, &mut target, &log).unwrap();
    wait_for("the process to continue", || proc_state(pid) != Some('T'));

    nemesis::apply(Action::Kill, &mut target, &log).unwrap();
    assert_eq!(target.pid(), None);
    wait_for("the pid to disappear", || proc_state(pid).is_none());
    // A killed process cannot be paused; the failure is logged.
    assert!(nemesis::apply(Action::Pause, &mut target, &log).is_err());

    nemesis::apply(Action::Restart, &mut target, &log).unwrap();
    let new_pid = target.pid().unwrap();
    assert_ne!(new_pid, pid);
    assert!(proc_state(new_pid).is_some());

    let events = log.events();
    let actions: Vec<Action> = events.iter().map(|e| e.action).collect();
    assert_eq!(
        actions,
        [
            Action::Pause,
            Action::Resume,
            Action::Kill,
            Action::Pause,
            Action::Restart
        ]
    );
    assert!(events[3].error.is_some());
    assert!(events.windows(2).all(|w| w[0].time_ns <= w[1].time_ns));
}

#[test]
fn a_kill_reports_the_signal() {
    use std::os::unix::process::ExitStatusExt;
    let mut target = sleeper("n1");
    target.start().unwrap();
    let status = target.kill().unwrap();
    assert_eq!(status.signal(), Some(9));
}

fn config() -> ScheduleConfig {
    ScheduleConfig {
        targets: 3,
        kinds: vec![FaultKind::Kill, FaultKind::Pause],
        run_for: Duration::from_millis(300),
        gap: (Duration::from_millis(10), Duration::from_millis(40)),
        duration: (Duration::from_millis(10), Duration::from_millis(30)),
    }
}

#[test]
fn a_schedule_is_a_function_of_its_seed() {
    let a = Schedule::generate(5, &config());
    assert_eq!(a, Schedule::generate(5, &config()));
    assert_ne!(a, Schedule::generate(6, &config()));
    assert!(!a.faults.is_empty());
    // Faults never overlap, so a majority of three stays up.
    for pair in a.faults.windows(2) {
        assert!(pair[0].at_ns + pair[0].duration_ns < pair[1].at_ns);
    }
}

#[test]
fn runs_a_schedule_on_real_processes() {
    let seed = 3;
    println!("schedule seed {seed}");
    let schedule = Schedule::generate(seed, &config());
    let mut targets: Vec<Managed> = ["n1", "n2", "n3"].iter().map(|n| sleeper(n)).collect();
    for t in &mut targets {
        t.start().unwrap();
    }
    let clock = Clock::start();
    let log = FaultLog::new(clock);
    nemesis::run(&schedule, &mut targets, clock, &log);

    let events = log.events();
    assert_eq!(events.len(), schedule.faults.len() * 2);
    assert!(events.iter().all(|e| e.error.is_none()), "{events:#?}");
    // Every action happened no earlier than scheduled, on the shared clock.
    for ((at, action, _), event) in schedule.actions().iter().zip(&events) {
        assert_eq!(*action, event.action);
        assert!(event.time_ns >= *at);
    }
    // Everything is healed: every target runs and none is stopped.
    for t in &targets {
        let pid = t.pid().unwrap();
        wait_for(
            "a healed target to run",
            || matches!(proc_state(pid), Some(s) if s != 'T' && s != 'Z'),
        );
    }
}
