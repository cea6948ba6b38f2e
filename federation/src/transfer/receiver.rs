//! The receiving end of disk transfers: chunks are appended to a staging file only at the
//! offset it ends at, and the file is renamed into place once its size and sha256 match.
//!
//! Staging layout: `<staging>/<id>.part` (the bytes so far) and `<staging>/<id>.spec` (the
//! spec they belong to, JSON). The offset a resumed transfer continues from is the length of
//! the `.part` file, so it survives a restart of the receiving node.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use super::{ChunkStream, DiskSink, TransferError, TransferSpec};

/// Where a committed transfer goes (decided by the receiving node, never by the sender).
pub type DestFn = Arc<dyn Fn(&TransferSpec) -> Result<PathBuf, TransferError> + Send + Sync>;

/// The staged state of one transfer, held under its lock while a chunk is written.
struct Staged {
    spec: TransferSpec,
    len: u64,
}

pub struct Receiver {
    staging: PathBuf,
    dest: DestFn,
    /// One lock per transfer: each chunk's offset check and write happen under it, so two
    /// streams of the same transfer (a stale one and its resumption) cannot interleave.
    staged: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Staged>>>>>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("staging", &self.staging)
            .finish()
    }
}

impl Receiver {
    pub fn new(staging: impl Into<PathBuf>, dest: DestFn) -> Receiver {
        Receiver {
            staging: staging.into(),
            dest,
            staged: Default::default(),
        }
    }

    fn part_path(&self, id: &str) -> PathBuf {
        self.staging.join(format!("{id}.part"))
    }

    fn spec_path(&self, id: &str) -> PathBuf {
        self.staging.join(format!("{id}.spec"))
    }

    fn slot(&self, id: &str) -> Arc<tokio::sync::Mutex<Option<Staged>>> {
        let mut map = self.staged.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(id.to_string()).or_default().clone()
    }

    /// The staged state of `id` as found on disk (after a restart, the memory is empty).
    async fn load(&self, id: &str) -> Result<Option<Staged>, TransferError> {
        let spec_path = self.spec_path(id);
        let spec = match tokio::fs::read(&spec_path).await {
            Ok(bytes) => serde_json::from_slice::<TransferSpec>(&bytes)
                .map_err(|e| TransferError::Invalid(format!("{}: {e}", spec_path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(TransferError::io(&spec_path)(e)),
        };
        let part = self.part_path(id);
        let len = match tokio::fs::metadata(&part).await {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(TransferError::io(&part)(e)),
        };
        Ok(Some(Staged { spec, len }))
    }

    async fn discard(&self, id: &str) -> Result<(), TransferError> {
        for path in [self.part_path(id), self.spec_path(id)] {
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(TransferError::io(&path)(e)),
            }
        }
        Ok(())
    }

    /// Drops the staged copy of a transfer that will not be committed (the move rolled back).
    pub async fn abort(&self, id: &str) -> Result<(), TransferError> {
        let slot = self.slot(id);
        let mut staged = slot.lock().await;
        *staged = None;
        self.discard(id).await
    }

    /// Appends one chunk, under the transfer's lock.
    async fn write_chunk(&self, chunk: super::Chunk) -> Result<u64, TransferError> {
        let slot = self.slot(&chunk.id);
        let mut guard = slot.lock().await;
        if guard.is_none() {
            *guard = self.load(&chunk.id).await?;
        }
        let Some(staged) = guard.as_mut() else {
            return Err(TransferError::Unknown(chunk.id));
        };
        if chunk.offset != staged.len {
            return Err(TransferError::OffsetMismatch {
                expected: staged.len,
                got: chunk.offset,
            });
        }
        let end = staged.len + chunk.data.len() as u64;
        if end > staged.spec.size {
            return Err(TransferError::SizeMismatch {
                expected: staged.spec.size,
                actual: end,
            });
        }
        let path = self.part_path(&chunk.id);
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .await
            .map_err(TransferError::io(&path))?;
        file.seek(std::io::SeekFrom::Start(chunk.offset))
            .await
            .map_err(TransferError::io(&path))?;
        file.write_all(&chunk.data)
            .await
            .map_err(TransferError::io(&path))?;
        file.flush().await.map_err(TransferError::io(&path))?;
        staged.len = end;
        Ok(end)
    }

    async fn sync_part(&self, id: &str) -> Result<(), TransferError> {
        let path = self.part_path(id);
        match tokio::fs::File::open(&path).await {
            Ok(f) => f.sync_data().await.map_err(TransferError::io(&path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(TransferError::io(&path)(e)),
        }
    }
}

/// sha256 (hex) and length of a file, read on the blocking pool.
pub(crate) async fn digest(path: &Path) -> Result<(u64, String), TransferError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path).map_err(TransferError::io(&path))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut len = 0u64;
        loop {
            let n = std::io::Read::read(&mut file, &mut buf).map_err(TransferError::io(&path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            len += n as u64;
        }
        Ok((len, hex::encode(hasher.finalize())))
    })
    .await
    .map_err(|e| TransferError::Invalid(format!("checksum task failed: {e}")))?
}

fn fsync_dir(dir: &Path) -> Result<(), TransferError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(TransferError::io(dir))
}

#[async_trait]
impl DiskSink for Receiver {
    async fn offer(&self, spec: &TransferSpec) -> Result<u64, TransferError> {
        spec.validate()?;
        let slot = self.slot(&spec.id);
        let mut guard = slot.lock().await;
        if guard.is_none() {
            *guard = self.load(&spec.id).await?;
        }
        match guard.as_ref() {
            // Resuming: the bytes staged so far stay.
            Some(staged) if staged.spec == *spec && staged.len <= spec.size => {
                return Ok(staged.len)
            }
            _ => {}
        }
        // New, or offered again with other contents: start over.
        self.discard(&spec.id).await?;
        tokio::fs::create_dir_all(&self.staging)
            .await
            .map_err(TransferError::io(&self.staging))?;
        let spec_path = self.spec_path(&spec.id);
        let json = serde_json::to_vec(spec).map_err(|e| TransferError::Invalid(e.to_string()))?;
        tokio::fs::write(&spec_path, json)
            .await
            .map_err(TransferError::io(&spec_path))?;
        *guard = Some(Staged {
            spec: spec.clone(),
            len: 0,
        });
        Ok(0)
    }

    async fn push(&self, mut chunks: ChunkStream) -> Result<u64, TransferError> {
        let mut reached = None;
        let mut id = None;
        let outcome = loop {
            match chunks.next().await {
                None => break Ok(()),
                Some(Err(e)) => break Err(e),
                Some(Ok(chunk)) => {
                    id.get_or_insert_with(|| chunk.id.clone());
                    match self.write_chunk(chunk).await {
                        Ok(end) => reached = Some(end),
                        Err(e) => break Err(e),
                    }
                }
            }
        };
        // What was written is made durable even when the stream broke: the resumed transfer
        // is told it holds these bytes.
        if let Some(id) = &id {
            self.sync_part(id).await?;
        }
        outcome?;
        reached.ok_or_else(|| TransferError::Invalid("an empty push".into()))
    }

    async fn commit(&self, spec: &TransferSpec) -> Result<(), TransferError> {
        spec.validate()?;
        let dest = (self.dest)(spec)?;
        let slot = self.slot(&spec.id);
        let mut guard = slot.lock().await;
        if guard.is_none() {
            *guard = self.load(&spec.id).await?;
        }
        let Some(staged) = guard.as_ref() else {
            // A retried commit whose answer was lost: the file is in place already.
            if tokio::fs::try_exists(&dest).await.unwrap_or(false) {
                let (len, sha) = digest(&dest).await?;
                if len == spec.size && sha == spec.sha256 {
                    return Ok(());
                }
            }
            return Err(TransferError::Unknown(spec.id.clone()));
        };
        if staged.spec != *spec {
            return Err(TransferError::Invalid(format!(
                "transfer {} was offered with another size or checksum",
                spec.id
            )));
        }
        let part = self.part_path(&spec.id);
        if staged.len == 0 && !tokio::fs::try_exists(&part).await.unwrap_or(false) {
            // An empty file is never pushed: create it.
            tokio::fs::write(&part, b"")
                .await
                .map_err(TransferError::io(&part))?;
        }
        let (len, sha) = digest(&part).await?;
        if len != spec.size {
            return Err(TransferError::SizeMismatch {
                expected: spec.size,
                actual: len,
            });
        }
        if sha != spec.sha256 {
            *guard = None;
            self.discard(&spec.id).await?;
            return Err(TransferError::ChecksumMismatch {
                expected: spec.sha256.clone(),
                actual: sha,
            });
        }
        self.sync_part(&spec.id).await?;
        let spec_path = self.spec_path(&spec.id);
        tokio::task::spawn_blocking(move || {
            let parent = dest
                .parent()
                .ok_or_else(|| TransferError::Invalid(format!("{} has no parent", dest.display())))?
                .to_path_buf();
            std::fs::create_dir_all(&parent).map_err(TransferError::io(&parent))?;
            std::fs::rename(&part, &dest).map_err(TransferError::io(&dest))?;
            fsync_dir(&parent)?;
            match std::fs::remove_file(&spec_path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(TransferError::io(&spec_path)(e)),
            }
        })
        .await
        .map_err(|e| TransferError::Invalid(format!("rename task failed: {e}")))??;
        *guard = None;
        Ok(())
    }
}
