//! Disk transfer between sites: the bytes of a VM's disk, streamed in chunks from the source
//! node to a node of the target site, resumable, checksummed and bandwidth-limited.
//!
//! The protocol has three calls (`proto/transfer.proto` is their wire form):
//! - `offer(spec)`: begin or resume; the receiver answers the offset it holds. The sender
//!   always continues from there, so a cut link costs only what was in flight.
//! - `push(chunks)`: a stream of chunks; each names its offset, and the receiver refuses one
//!   that does not start exactly where its staged copy ends (a stale stream from before a cut
//!   cannot interleave with the resumed one).
//! - `commit(spec)`: the receiver checks size and sha256 over the whole staged file, then
//!   renames it into place; a mismatch discards the staged copy (resuming cannot repair it).
//!
//! [`DiskSink`] is the receiver as the sender sees it: [`Receiver`] itself in process, or a
//! gRPC client over a site link. The sender ([`send`]) retries a failing link until its
//! deadline and says so when it gives up, so the move's saga can roll back.

mod limiter;
mod receiver;
mod sender;

pub use limiter::RateLimiter;
pub use receiver::{DestFn, Receiver};
pub use sender::{send, sha256_file, RetryPolicy, SendOptions, SendReport};

use async_trait::async_trait;
use futures::stream::BoxStream;

/// What is transferred: one file, known by size and checksum before the first byte moves.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransferSpec {
    /// The transfer's id (the move's id): `[A-Za-z0-9._-]`, 1 to 128 characters.
    pub id: String,
    pub size: u64,
    /// Hex sha256 of the whole file.
    pub sha256: String,
}

impl TransferSpec {
    pub fn validate(&self) -> Result<(), TransferError> {
        let id_ok = !self.id.is_empty()
            && self.id.len() <= 128
            && !self.id.starts_with('.')
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        let sha_ok = self.sha256.len() == 64 && self.sha256.bytes().all(|b| b.is_ascii_hexdigit());
        if !id_ok {
            return Err(TransferError::Invalid(format!(
                "transfer id {:?} is not valid",
                self.id
            )));
        }
        if !sha_ok {
            return Err(TransferError::Invalid(
                "sha256 must be 64 hex digits".into(),
            ));
        }
        Ok(())
    }
}

/// One piece of the file, at `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub id: String,
    pub offset: u64,
    pub data: bytes::Bytes,
}

/// The chunks of one push, in order; an error ends it (the link broke, the file failed).
pub type ChunkStream = BoxStream<'static, Result<Chunk, TransferError>>;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The chunk does not start where the staged copy ends; resume at `expected`.
    #[error("the receiver holds {expected} bytes; the chunk starts at byte {got}")]
    OffsetMismatch { expected: u64, got: u64 },
    #[error(
        "the received file has sha256 {actual}, expected {expected}; the staged copy was discarded"
    )]
    ChecksumMismatch { expected: String, actual: String },
    #[error("the received file has {actual} bytes, expected {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("no transfer {0} is staged here")]
    Unknown(String),
    /// The link to the other side failed; retrying may succeed.
    #[error("link: {0}")]
    Link(String),
    /// The link stayed down longer than the sender was willing to wait.
    #[error("the link stayed down for {waited_ms} ms (last error: {last})")]
    LinkTimeout { waited_ms: u64, last: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl TransferError {
    /// Whether trying again (after `offer`) can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            TransferError::Link(_) | TransferError::OffsetMismatch { .. }
        )
    }

    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TransferError + '_ {
        move |source| TransferError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// The receiving end of a transfer, as the sender reaches it.
#[async_trait]
pub trait DiskSink: Send + Sync {
    /// Begins the transfer, or resumes it: how many bytes of it the receiver holds.
    async fn offer(&self, spec: &TransferSpec) -> Result<u64, TransferError>;
    /// Appends the chunks in order; the offset reached once the stream ended.
    async fn push(&self, chunks: ChunkStream) -> Result<u64, TransferError>;
    /// Verifies the whole staged file and moves it into place.
    async fn commit(&self, spec: &TransferSpec) -> Result<(), TransferError>;
}

#[cfg(test)]
mod tests;
