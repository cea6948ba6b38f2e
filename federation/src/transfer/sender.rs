//! The sending end of a disk transfer: offers the file, streams it from the offset the
//! receiver holds through the rate limiter, commits, and retries a failing link until a
//! deadline.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{Chunk, DiskSink, RateLimiter, TransferError, TransferSpec};

/// How a file is sent.
#[derive(Debug, Clone)]
pub struct SendOptions {
    pub chunk_size: usize,
    /// Bytes per second; `None` for no limit.
    pub rate: Option<u64>,
    /// Bytes the limiter lets out at once.
    pub burst: u64,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            chunk_size: 256 * 1024,
            rate: None,
            burst: 256 * 1024,
        }
    }
}

/// How long a failing link is retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Give up once the link has failed continuously for this long.
    pub link_timeout: Duration,
    /// Pause between attempts (doubling up to `max_backoff`).
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// How many times a transfer whose checksum did not match starts over.
    pub checksum_retries: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            link_timeout: Duration::from_secs(60),
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            checksum_retries: 1,
        }
    }
}

/// What a completed transfer did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendReport {
    /// Bytes pushed, counting any sent again after a cut.
    pub bytes_sent: u64,
    /// Attempts made (1 when nothing failed).
    pub attempts: u32,
    /// The offsets attempts after the first resumed from, as the receiver reported them.
    pub resumed_at: Vec<u64>,
}

/// sha256 (hex) and size of a file.
pub async fn sha256_file(path: &Path) -> Result<(u64, String), TransferError> {
    super::receiver::digest(path).await
}

/// Sends `path` as `spec` to `sink`: resumes from what the receiver holds after each failure,
/// until the link has failed for longer than `retry.link_timeout` (then `LinkTimeout`).
pub async fn send(
    path: &Path,
    spec: &TransferSpec,
    sink: &dyn DiskSink,
    options: &SendOptions,
    retry: &RetryPolicy,
) -> Result<SendReport, TransferError> {
    spec.validate()?;
    let limiter = Arc::new(Mutex::new(RateLimiter::new(options.rate, options.burst)));
    let mut report = SendReport::default();
    let mut failing_since: Option<Instant> = None;
    let mut backoff = retry.backoff;
    let mut checksum_retries = retry.checksum_retries;
    loop {
        report.attempts += 1;
        match attempt(path, spec, sink, options, &limiter, &mut report).await {
            Ok(()) => return Ok(report),
            Err(e @ TransferError::ChecksumMismatch { .. }) => {
                // The receiver discarded its copy: the next attempt starts from zero.
                if checksum_retries == 0 {
                    return Err(e);
                }
                checksum_retries -= 1;
                tracing::warn!(transfer = %spec.id, error = %e, "transfer corrupted; starting over");
            }
            Err(e) if e.is_retryable() => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                let waited = since.elapsed();
                if waited >= retry.link_timeout {
                    return Err(TransferError::LinkTimeout {
                        waited_ms: waited.as_millis() as u64,
                        last: e.to_string(),
                    });
                }
                tracing::debug!(transfer = %spec.id, error = %e, "transfer interrupted; will resume");
                tokio::time::sleep(backoff.min(retry.link_timeout.saturating_sub(waited))).await;
                backoff = (backoff * 2).min(retry.max_backoff);
                continue;
            }
            Err(e) => return Err(e),
        }
        failing_since = None;
        backoff = retry.backoff;
    }
}

async fn attempt(
    path: &Path,
    spec: &TransferSpec,
    sink: &dyn DiskSink,
    options: &SendOptions,
    limiter: &Arc<Mutex<RateLimiter>>,
    report: &mut SendReport,
) -> Result<(), TransferError> {
    let offset = sink.offer(spec).await?;
    if report.attempts > 1 {
        report.resumed_at.push(offset);
    }
    if offset > spec.size {
        return Err(TransferError::Invalid(format!(
            "the receiver claims {offset} bytes of {}",
            spec.size
        )));
    }
    if offset < spec.size {
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let chunks = chunk_stream(
            path.to_path_buf(),
            spec.clone(),
            offset,
            options.chunk_size.max(1),
            limiter.clone(),
            sent.clone(),
        );
        let pushed = sink.push(chunks).await;
        report.bytes_sent += sent.load(std::sync::atomic::Ordering::Relaxed);
        let reached = pushed?;
        if reached != spec.size {
            return Err(TransferError::Link(format!(
                "the push ended at byte {reached} of {}",
                spec.size
            )));
        }
    }
    sink.commit(spec).await
}

/// The file from `offset` on, in chunks, each waiting for the limiter before it goes.
fn chunk_stream(
    path: PathBuf,
    spec: TransferSpec,
    offset: u64,
    chunk_size: usize,
    limiter: Arc<Mutex<RateLimiter>>,
    sent: Arc<std::sync::atomic::AtomicU64>,
) -> super::ChunkStream {
    struct State {
        file: Option<tokio::fs::File>,
        path: PathBuf,
        spec: TransferSpec,
        offset: u64,
    }
    let state = State {
        file: None,
        path,
        spec,
        offset,
    };
    Box::pin(futures::stream::try_unfold(state, move |mut st| {
        let limiter = limiter.clone();
        let sent = sent.clone();
        async move {
            if st.offset >= st.spec.size {
                return Ok(None);
            }
            if st.file.is_none() {
                let mut f = tokio::fs::File::open(&st.path)
                    .await
                    .map_err(TransferError::io(&st.path))?;
                f.seek(std::io::SeekFrom::Start(st.offset))
                    .await
                    .map_err(TransferError::io(&st.path))?;
                st.file = Some(f);
            }
            let want = (st.spec.size - st.offset).min(chunk_size as u64) as usize;
            let mut buf = vec![0u8; want];
            if let Some(f) = st.file.as_mut() {
                f.read_exact(&mut buf)
                    .await
                    .map_err(TransferError::io(&st.path))?;
            }
            limiter.lock().await.acquire(want as u64).await;
            let chunk = Chunk {
                id: st.spec.id.clone(),
                offset: st.offset,
                data: bytes::Bytes::from(buf),
            };
            st.offset += want as u64;
            sent.fetch_add(want as u64, std::sync::atomic::Ordering::Relaxed);
            Ok(Some((chunk, st)))
        }
    }))
}
