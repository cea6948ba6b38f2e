//! The sled-backed Raft storage of one node: the log, the vote, and the state machine.
//!
//! One sled database holds three trees:
//! - `log`: the Raft log, keyed by the entry index as a big-endian `u64` so byte order is index
//!   order; values are [`encoding::StoredEntry`] in our versioned codec.
//! - `meta`: the vote, the committed log id, the last purged log id and the current snapshot.
//! - `state`: the replicated key space of `crate::keys`, plus two internal keys (last applied
//!   log id, last membership) that start with a `0x00` byte, which no replicated key does. They
//!   are written in the same sled transaction as the effects of the entry, so the applied state
//!   and the recorded last applied log id can never disagree.
//!
//! [`Store`] hands out the three views openraft and the rest of the node need:
//! [`LogStore`] (`RaftLogStorage`), [`StateMachine`] (`RaftStateMachine`) and [`StateReader`]
//! (local reads for the API and the controllers). `seed` adds whole-state export and offline
//! re-seeding (backup, restore, recovery). This module does not decide when to snapshot
//! or purge; openraft does, from its config.

mod encoding;
mod log;
mod reader;
mod seed;
mod state_machine;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::{AnyError, ErrorSubject, ErrorVerb, StorageError, StorageIOError};
use tokio::sync::{broadcast, watch, Mutex};

use crate::apply::ApplyError;
use crate::codec::CodecError;
use crate::NodeId;

pub use self::log::LogStore;
pub use self::reader::{digest_of, Applied, RawRows, StateReader};
pub use self::seed::StateExport;
pub use self::state_machine::{SnapshotBuilder, StateMachine};

/// How many applied entries the event channel buffers for slow subscribers before they lag.
pub const EVENT_CAPACITY: usize = 4096;

/// sled's page cache size. The state of a cluster of this size fits; more only costs memory.
const CACHE_CAPACITY: u64 = 64 * 1024 * 1024;

/// How long [`Store::open`] waits for an earlier handle in this process to let go of the
/// database directory (see `open_db`).
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Keys of the `meta` tree.
pub(crate) mod meta_keys {
    pub const VOTE: &[u8] = b"vote";
    pub const COMMITTED: &[u8] = b"committed";
    pub const LAST_PURGED: &[u8] = b"last_purged";
    pub const SNAPSHOT_META: &[u8] = b"snapshot_meta";
    pub const SNAPSHOT_DATA: &[u8] = b"snapshot_data";
}

/// Internal keys of the `state` tree. The leading `0x00` keeps them apart from the replicated
/// key space (whose keys all start with a printable prefix) and out of digests and snapshots.
pub(crate) mod state_keys {
    pub const INTERNAL_PREFIX: u8 = 0x00;
    pub const LAST_APPLIED: &[u8] = b"\x00last_applied";
    pub const MEMBERSHIP: &[u8] = b"\x00membership";

    pub fn is_internal(key: &[u8]) -> bool {
        key.first() == Some(&INTERNAL_PREFIX)
    }
}

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled failed")]
    Sled(#[from] sled::Error),
    #[error("stored value could not be decoded or encoded")]
    Codec(#[from] CodecError),
    #[error("applying a committed entry failed")]
    Apply(#[from] ApplyError),
    #[error("raft metadata (membership or log id) is not valid JSON")]
    Json(#[from] serde_json::Error),
    #[error("snapshot file claims last log id {in_file}, its metadata says {in_meta}")]
    SnapshotMismatch { in_file: String, in_meta: String },
    #[error("a blocking storage task did not complete")]
    Task(#[from] tokio::task::JoinError),
    #[error("index {index} was not applied in time; the replica is at {reached}")]
    WaitTimeout { index: u64, reached: u64 },
    #[error("the state changed during each of {attempts} digest scans")]
    DigestUnstable { attempts: usize },
    #[error("the store was closed while waiting")]
    Closed,
    #[error("making the database file durable failed")]
    Sync(#[source] std::io::Error),
}

/// Wraps a store failure in the error openraft expects; openraft treats it as fatal.
pub(crate) fn storage_error(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    err: impl Into<StoreError>,
) -> StorageError<NodeId> {
    let err: StoreError = err.into();
    StorageIOError::new(subject, verb, AnyError::new(&err)).into()
}

/// State shared by every view of one store.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) db: sled::Db,
    pub(crate) log: sled::Tree,
    pub(crate) meta: sled::Tree,
    pub(crate) state: sled::Tree,
    /// Held while entries are applied, a snapshot is scanned or one is installed, so that a
    /// snapshot (built on its own task by openraft) is a consistent cut of the state.
    pub(crate) state_lock: Arc<Mutex<()>>,
    pub(crate) applied: watch::Sender<u64>,
    pub(crate) events: broadcast::Sender<Applied>,
    /// Time from handing entries to the log to their flush on disk.
    pub(crate) append_seconds: prometheus::Histogram,
    /// sled's data file, opened again only to `fdatasync` it (see [`Inner::flush`]).
    pub(crate) data_file: Arc<std::fs::File>,
}

impl Inner {
    /// Makes everything written so far durable.
    ///
    /// sled's flush writes all trees of the database to its file, but on Linux sled 0.34 waits
    /// for that write with `sync_file_range`, which neither flushes the drive's write cache nor
    /// the file's metadata, and it only logs a failed `fsync` of its own background flusher. So
    /// after sled's flush, this node `fdatasync`s the file itself (any descriptor of the file
    /// syncs its data) and reports a failure: an append is acknowledged only once it would
    /// survive a power cut, and a disk that cannot sync stops the node instead of lying.
    pub(crate) async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        let file = self.data_file.clone();
        tokio::task::spawn_blocking(move || file.sync_data())
            .await?
            .map_err(StoreError::Sync)
    }

    /// Tells waiters that the state reached `index`. The value never goes backwards, whatever
    /// the order in which apply and snapshot installation report.
    pub(crate) fn publish_applied(&self, index: u64) {
        self.applied.send_if_modified(|current| {
            let advanced = index > *current;
            if advanced {
                *current = index;
            }
            advanced
        });
    }
}

/// The file in which sled 0.34 keeps the pages of every tree.
const SLED_DATA_FILE: &str = "db";

/// Opens the sled database, waiting a bounded time for the directory's lock.
///
/// sled finishes some writes and file truncations on its own background threads, which keep the
/// database (and its exclusive file lock) alive for a moment after the last handle is dropped.
/// Reopening in the same process (a restarted node in a test harness) would then fail
/// spuriously. sled offers nothing to wait on, so this retries with a short backoff; a lock held
/// by another process still fails after [`LOCK_WAIT`].
fn open_db(path: &Path) -> Result<sled::Db, StoreError> {
    let config = sled::Config::new()
        .path(path)
        .cache_capacity(CACHE_CAPACITY)
        .mode(sled::Mode::HighThroughput);
    let deadline = Instant::now() + LOCK_WAIT;
    let mut pause = Duration::from_millis(2);
    loop {
        match config.open() {
            Err(sled::Error::Io(e)) if is_lock_contention(&e) && Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            other => return Ok(other?),
        }
    }
}

/// sled reports a held lock only as text inside an `io::Error` of kind `Other`.
fn is_lock_contention(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::Other && e.to_string().contains("could not acquire lock")
}

/// A node's storage. Cheap to clone: all clones share one database.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl Store {
    /// Opens (or creates) the store in the directory `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = open_db(path)?;
        // sled keeps its pages in one file named `db` in its directory.
        let data_file = std::fs::File::open(path.join(SLED_DATA_FILE)).map_err(StoreError::Sync)?;
        let log = db.open_tree("log")?;
        let meta = db.open_tree("meta")?;
        let state = db.open_tree("state")?;
        let last_applied = state_machine::read_last_applied(&state)?
            .map(|id| id.index)
            .unwrap_or(0);
        let (applied, _) = watch::channel(last_applied);
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                log,
                meta,
                state,
                state_lock: Arc::new(Mutex::new(())),
                applied,
                events,
                append_seconds: prometheus::Histogram::with_opts(
                    prometheus::HistogramOpts::new(
                        "novacron_raft_append_seconds",
                        "Latency of durable log appends (write and flush)",
                    )
                    .buckets(
                        prometheus::exponential_buckets(0.0001, 2.0, 18)
                            .expect("static bucket definition"),
                    ),
                )
                .expect("static metric definition"),
                data_file: Arc::new(data_file),
            }),
        })
    }

    /// The Raft log and vote, for `openraft::Raft::new`.
    pub fn log_store(&self) -> LogStore {
        LogStore::new(self.inner.clone())
    }

    /// The state machine, for `openraft::Raft::new`.
    pub fn state_machine(&self) -> StateMachine {
        StateMachine::new(self.inner.clone())
    }

    /// Local reads of the replicated state.
    pub fn reader(&self) -> StateReader {
        StateReader::new(self.inner.clone())
    }

    /// The histogram of durable append latencies, for the node's metrics registry.
    pub fn append_histogram(&self) -> prometheus::Histogram {
        self.inner.append_seconds.clone()
    }

    /// Writes everything buffered to disk (used at shutdown; appends flush on their own).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }
}
