//! The recent history of applied changes that `GET /api/v1/events` replays on resume.
//!
//! The cluster publishes every applied request on a broadcast channel
//! ([`crate::ControlPlane::subscribe`]); a broadcast keeps nothing for late subscribers, so this
//! buffer keeps the last [`EventBuffer::CAPACITY`] changes. A client resuming from an index the
//! buffer still covers gets exactly the changes it missed; an older index (or a gap after the
//! buffer lagged) is answered with a `reset` event telling the client to re-list.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use raft::store::Applied;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio::sync::OnceCell;

use crate::control::{ClusterError, ControlPlane};

struct History {
    events: VecDeque<Applied>,
    /// Every applied change with an index above `floor` is either in `events` or was evicted,
    /// in which case `floor` moved up past it.
    floor: u64,
    /// Set after the feed lagged: the next event received defines the new floor.
    lost: bool,
    /// The feed, drained by whoever holds the lock.
    rx: Option<broadcast::Receiver<Applied>>,
}

impl History {
    fn drain(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        loop {
            match rx.try_recv() {
                Ok(applied) => {
                    if self.lost {
                        self.lost = false;
                        self.floor = applied.index.saturating_sub(1);
                    }
                    if self.events.len() == EventBuffer::CAPACITY {
                        if let Some(old) = self.events.pop_front() {
                            self.floor = old.index;
                        }
                    }
                    self.events.push_back(applied);
                }
                Err(TryRecvError::Lagged(_)) => {
                    self.events.clear();
                    self.lost = true;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Closed) => return,
            }
        }
        self.rx = Some(rx);
    }
}

pub struct EventBuffer {
    cp: Arc<dyn ControlPlane>,
    history: Arc<Mutex<History>>,
    started: OnceCell<()>,
}

/// What a resuming client gets.
pub enum Resume {
    /// The changes after the asked index, in order.
    Replay(Vec<Applied>),
    /// The asked index is older than what is kept: the client must re-list.
    Reset,
}

impl EventBuffer {
    pub const CAPACITY: usize = 4096;

    pub fn new(cp: Arc<dyn ControlPlane>) -> Self {
        Self {
            cp,
            history: Arc::new(Mutex::new(History {
                events: VecDeque::new(),
                floor: u64::MAX,
                lost: false,
                rx: None,
            })),
            started: OnceCell::new(),
        }
    }

    /// Starts recording on first use (a task needs a runtime, which the constructor may lack).
    pub async fn start(&self) -> Result<(), ClusterError> {
        self.started
            .get_or_try_init(|| async {
                // Subscribe before reading the applied index, so nothing falls in between.
                let rx = self.cp.subscribe();
                let mut wake = self.cp.subscribe();
                let applied = self.cp.status().await?.last_applied;
                if let Ok(mut h) = self.history.lock() {
                    h.floor = applied;
                    h.rx = Some(rx);
                }
                // The task only moves changes into the history as they come; readers also
                // drain before reading, so a change published just before a resume is never
                // missing from it.
                let history = self.history.clone();
                tokio::spawn(async move {
                    loop {
                        if let Err(RecvError::Closed) = wake.recv().await {
                            return;
                        }
                        let Ok(mut h) = history.lock() else { return };
                        h.drain();
                    }
                });
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// The changes after `index`, or `Reset` when some of them are no longer kept.
    pub fn since(&self, index: u64) -> Resume {
        let Ok(mut h) = self.history.lock() else {
            return Resume::Reset;
        };
        h.drain();
        if h.lost || index < h.floor {
            return Resume::Reset;
        }
        Resume::Replay(
            h.events
                .iter()
                .filter(|a| a.index > index)
                .cloned()
                .collect(),
        )
    }
}
