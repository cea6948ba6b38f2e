//! Image bytes across the cluster. Metadata is replicated (`raft::image`); bytes are not: an
//! upload lands in the image store of its upload node (chunks reaching another node's API are
//! forwarded there over the `image-bytes` extension RPC), and a node that must run a VM from an
//! image it lacks fetches the file from a node holding it over a QUIC tunnel
//! (`image <id> <offset>\n`), resuming a partial copy, and verifies the checksum before use.
//!
//! Only nodes with a certificate of the cluster CA reach these endpoints; tenancy is checked by
//! the API node before it forwards anything.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use api::control::ImageBytesError;
use api::ClusterError;
use futures::StreamExt;
use hypervisor::{ImageError, ImageStore};
use raft::image::{image_key, Image, ImageState};
use raft::keys;
use raft::model::{NodeId, NodeRecord};
use raft::net::{ExtensionError, Transport};
use raft::store::StateReader;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

/// Extension RPC carrying upload calls to the upload node.
pub const IMAGE_BYTES: &str = "image-bytes";

/// Chunk size of a fetch over a tunnel, and of the reads that serve it.
const FETCH_CHUNK: usize = 1 << 20;

/// What can go wrong while making an image available on this node.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("image {0} is not in the replica")]
    Unknown(String),
    #[error("image {0} is still uploading")]
    NotReady(String),
    #[error("no node holding image {id} could serve it: {last}")]
    NoSource { id: String, last: String },
    #[error(transparent)]
    Store(#[from] ImageError),
    #[error(transparent)]
    Replica(#[from] raft::store::StoreError),
}

/// An upload call, as sent to the upload node (JSON, then the chunk's bytes for `Write`).
#[derive(Debug, Serialize, Deserialize)]
enum UploadCall {
    Offset { id: String },
    Write { id: String, offset: u64 },
    Finish { id: String, sha256: String },
}

/// The typed outcome of an upload call, so the API node can answer as if it held the upload.
#[derive(Debug, Serialize, Deserialize)]
enum UploadReply {
    Offset(u64),
    OffsetMismatch { expected: u64, got: u64 },
    ChecksumMismatch { expected: String, actual: String },
    Invalid(String),
    Failed(String),
}

impl UploadReply {
    fn into_result(self) -> Result<u64, ImageBytesError> {
        match self {
            UploadReply::Offset(o) => Ok(o),
            UploadReply::OffsetMismatch { expected, got } => {
                Err(ImageBytesError::OffsetMismatch { expected, got })
            }
            UploadReply::ChecksumMismatch { expected, actual } => {
                Err(ImageBytesError::ChecksumMismatch { expected, actual })
            }
            UploadReply::Invalid(m) => Err(ImageBytesError::Invalid(m)),
            UploadReply::Failed(m) => Err(ClusterError::Unavailable(m).into()),
        }
    }
}

fn reply_of(r: Result<u64, ImageError>) -> UploadReply {
    match r {
        Ok(o) => UploadReply::Offset(o),
        Err(ImageError::OffsetMismatch { expected, got, .. }) => {
            UploadReply::OffsetMismatch { expected, got }
        }
        Err(ImageError::ChecksumMismatch {
            expected, actual, ..
        }) => UploadReply::ChecksumMismatch { expected, actual },
        Err(e @ (ImageError::InvalidName(_) | ImageError::AlreadyExists(_))) => {
            UploadReply::Invalid(e.to_string())
        }
        Err(e) => UploadReply::Failed(e.to_string()),
    }
}

/// This node's image store and the means to reach other nodes' stores.
pub struct NodeImages {
    pub me: NodeId,
    pub store: ImageStore,
    pub transport: Transport,
    pub reader: StateReader,
}

impl std::fmt::Debug for NodeImages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeImages")
            .field("me", &self.me)
            .field("root", &self.store.root())
            .finish()
    }
}

impl NodeImages {
    async fn peer(&self, node: NodeId) -> Result<SocketAddr, String> {
        let record: NodeRecord = self
            .reader
            .get(&keys::node(node))
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("node {node} is unknown"))?;
        Transport::resolve(&record.member.peer_addr)
            .await
            .map_err(|e| e.to_string())
    }

    async fn local(&self, call: UploadCall, data: &[u8]) -> UploadReply {
        match call {
            UploadCall::Offset { id } => reply_of(self.store.upload_offset(&id).await),
            UploadCall::Write { id, offset } => {
                reply_of(self.store.write_chunk(&id, offset, data).await)
            }
            UploadCall::Finish { id, sha256 } => {
                // A finish retried after it succeeded (the reply was lost) finds the image
                // installed: that is success when the installed bytes are the announced ones.
                if let Ok(Some(info)) = self.installed(&id).await {
                    if info.sha256.as_deref() == Some(sha256.as_str()) {
                        return UploadReply::Offset(info.size_bytes);
                    }
                }
                reply_of(
                    self.store
                        .finish_import(&id, &sha256)
                        .await
                        .map(|i| i.size_bytes),
                )
            }
        }
    }

    async fn installed(&self, id: &str) -> Result<Option<hypervisor::ImageInfo>, ImageError> {
        Ok(self.store.list().await?.into_iter().find(|i| i.name == id))
    }

    /// Runs an upload call on the image's upload node, here or over QUIC.
    async fn call(
        &self,
        image: &Image,
        call: UploadCall,
        data: Vec<u8>,
    ) -> Result<u64, ImageBytesError> {
        if image.upload_node == self.me {
            return self.local(call, &data).await.into_result();
        }
        let node = image.upload_node;
        let unavailable = |e: String| {
            ImageBytesError::from(ClusterError::Unavailable(format!("node {node}: {e}")))
        };
        let mut body =
            serde_json::to_vec(&call).map_err(|e| ImageBytesError::Invalid(e.to_string()))?;
        body.push(b'\n');
        body.extend_from_slice(&data);
        let addr = self.peer(node).await.map_err(unavailable)?;
        let reply = self
            .transport
            .call_extension(addr, IMAGE_BYTES, body)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let reply: UploadReply =
            serde_json::from_slice(&reply).map_err(|e| unavailable(e.to_string()))?;
        reply.into_result()
    }

    pub async fn upload_offset(&self, image: &Image) -> Result<u64, ImageBytesError> {
        self.call(
            image,
            UploadCall::Offset {
                id: image.id.clone(),
            },
            Vec::new(),
        )
        .await
    }

    pub async fn write_chunk(
        &self,
        image: &Image,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<u64, ImageBytesError> {
        let call = UploadCall::Write {
            id: image.id.clone(),
            offset,
        };
        self.call(image, call, data).await
    }

    pub async fn finish_upload(&self, image: &Image) -> Result<(), ImageBytesError> {
        let call = UploadCall::Finish {
            id: image.id.clone(),
            sha256: image.sha256.clone(),
        };
        self.call(image, call, Vec::new()).await.map(|_| ())
    }

    /// Serves an `image-bytes` extension call from another node.
    pub async fn handle_rpc(&self, body: Vec<u8>) -> Result<Vec<u8>, ExtensionError> {
        let split = body
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| ExtensionError::Refused("missing call header".into()))?;
        let call: UploadCall = serde_json::from_slice(&body[..split])
            .map_err(|e| ExtensionError::Refused(format!("bad call: {e}")))?;
        let reply = self.local(call, &body[split + 1..]).await;
        serde_json::to_vec(&reply).map_err(|e| ExtensionError::Refused(e.to_string()))
    }

    /// Streams the installed image named in a tunnel request `image <id> <offset>` to a peer.
    pub async fn serve_fetch(&self, request: &str, mut send: quinn::SendStream) {
        let mut parts = request.split(' ');
        let (Some(id), Some(Ok(offset))) = (parts.next(), parts.next().map(str::parse::<u64>))
        else {
            tracing::warn!(request, "malformed image fetch");
            return;
        };
        // Only verified, installed images are served; an upload in progress is not.
        let path = match self.installed(id).await {
            Ok(Some(info)) => info.path,
            _ => return,
        };
        let Ok(mut file) = tokio::fs::File::open(&path).await else {
            return;
        };
        if tokio::io::AsyncSeekExt::seek(&mut file, std::io::SeekFrom::Start(offset))
            .await
            .is_err()
        {
            return;
        }
        let mut buf = vec![0u8; FETCH_CHUNK];
        loop {
            match file.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    if send.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(image = id, error = %e, "reading image to serve failed");
                    return;
                }
            }
        }
        let _ = send.finish();
    }

    /// Fetches `image` from `node`, resuming what an earlier attempt stored, and installs it
    /// once its checksum matches.
    async fn fetch_from(&self, image: &Image, node: NodeId) -> Result<PathBuf, String> {
        let addr = self.peer(node).await?;
        let offset = self
            .store
            .upload_offset(&image.id)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, recv) = self
            .transport
            .open_tunnel(addr)
            .await
            .map_err(|e| e.to_string())?;
        send.write_all(format!("image {} {offset}\n", image.id).as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let chunks = futures::stream::unfold(recv, |mut recv| async move {
            let mut buf = vec![0u8; FETCH_CHUNK];
            match recv.read(&mut buf).await {
                Ok(Some(n)) => {
                    buf.truncate(n);
                    Some((Ok(bytes::Bytes::from(buf)), recv))
                }
                Ok(None) => None,
                Err(e) => Some((Err(std::io::Error::other(e)), recv)),
            }
        })
        .boxed();
        let info = self
            .store
            .import_stream(&image.id, &image.sha256, offset, chunks)
            .await
            .map_err(|e| e.to_string())?;
        Ok(info.path)
    }

    /// Makes `image_id` available in this node's store, fetching it if needed. Returns the
    /// image and whether it was fetched now (the caller then announces the new copy).
    pub async fn ensure_local(&self, image_id: &str) -> Result<(Image, bool), FetchError> {
        let image: Image = self
            .reader
            .get(&image_key(image_id))?
            .ok_or_else(|| FetchError::Unknown(image_id.to_string()))?;
        if image.state != ImageState::Ready {
            return Err(FetchError::NotReady(image_id.to_string()));
        }
        if matches!(self.installed(image_id).await, Ok(Some(i)) if i.sha256.as_deref() == Some(image.sha256.as_str()))
        {
            return Ok((image, false));
        }
        let mut last = "no node holds it".to_string();
        for node in image.locations.iter().copied().filter(|n| *n != self.me) {
            match self.fetch_from(&image, node).await {
                Ok(_) => return Ok((image, true)),
                Err(e) => {
                    tracing::warn!(image = image_id, node, error = %e, "image fetch failed");
                    last = e;
                }
            }
        }
        Err(FetchError::NoSource {
            id: image_id.to_string(),
            last,
        })
    }

    /// Removes the bytes of images the replica no longer has (deleted): installed images and
    /// unfinished uploads or fetches. Only names that are image ids are touched, so files an
    /// operator put in the store by hand stay. Returns how many were removed.
    pub async fn collect_garbage(&self) -> Result<usize, FetchError> {
        let gone = |name: &str| -> Result<bool, FetchError> {
            Ok(is_image_id(name) && self.reader.get::<Image>(&image_key(name))?.is_none())
        };
        let mut removed = 0;
        for info in self.store.list().await? {
            if gone(&info.name)? {
                self.store.delete(&info.name).await?;
                removed += 1;
            }
        }
        let uploads = self.store.root().join("uploads");
        let mut entries = match tokio::fs::read_dir(&uploads).await {
            Ok(e) => e,
            Err(_) => return Ok(removed),
        };
        while let Ok(Some(entry)) = entries.next_entry().await {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".part") {
                if gone(id)? {
                    self.store.abort_import(id).await?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

/// Runs [`NodeImages::collect_garbage`] every `every` until `stop` fires.
pub async fn run_gc(
    images: Arc<NodeImages>,
    every: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match images.collect_garbage().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "removed the bytes of deleted images"),
            Err(e) => tracing::warn!(error = %e, "image garbage collection failed"),
        }
    }
}

/// Whether a file name is an image id: a UUID, with the home-site prefix ids made since
/// federation carry (`<site id>-<uuid>`).
fn is_image_id(name: &str) -> bool {
    uuid::Uuid::parse_str(raft::federation::uuid_part(name)).is_ok()
}

#[cfg(test)]
mod id_tests {
    #[test]
    fn image_ids_with_and_without_a_site_prefix_are_recognised() {
        let plain = "0b3e5f1c-1111-2222-3333-444444444444";
        assert!(super::is_image_id(plain));
        assert!(super::is_image_id(&format!("ab12cd-{plain}")));
        assert!(!super::is_image_id("my-notes.txt"));
        assert!(!super::is_image_id("ab12cd-notes"));
    }
}
