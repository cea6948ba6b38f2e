//! Cross-site moves over the site link: the `SiteMoves` gRPC service a target site serves
//! (`proto/transfer.proto`), and the client a source site uses to reach it
//! ([`GrpcTarget`], the saga's [`TargetSite`] over a link).
//!
//! Only the linked site that began an import may act on it (the caller is known from its
//! client certificate, as for the `Federation` service). The disk calls are served only by the
//! node the import chose; any other node answers UNAVAILABLE, so the caller's failover between
//! the site's addresses finds the right one.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::StreamExt;
use raft::federation::{self as fed, SiteLink};
use raft::model::NodeId;
use raft::site_move::{ImportPhase, ImportSettle, SiteImport};
use raft::store::StateReader;
use raft::RejectCode;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::client::{CallError, Peers};
use crate::server::PeerInfo;
use crate::site_move::{LocalTarget, SagaError, TargetSite};
use crate::transfer::{self, Chunk, ChunkStream, DiskSink, TransferError, TransferSpec};
use crate::transfer_proto as pb;
use crate::transfer_proto::site_moves_client::SiteMovesClient;
use crate::transfer_proto::site_moves_server::SiteMoves;

/// The largest chunk a push may carry (the sender's chunk size must stay below it).
pub const MAX_CHUNK: usize = 4 * 1024 * 1024;

pub use crate::transfer_proto::site_moves_server::SiteMovesServer;

/// The target side of moves on one node.
#[derive(Clone)]
pub struct MoveService {
    pub me: NodeId,
    pub reader: StateReader,
    pub target: Arc<LocalTarget>,
    /// This node's disk receiver.
    pub receiver: Arc<transfer::Receiver>,
}

impl std::fmt::Debug for MoveService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoveService")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

/// The service, ready to add to the federation endpoint.
pub fn server(service: MoveService) -> SiteMovesServer<MoveService> {
    SiteMovesServer::new(service)
        .max_decoding_message_size(MAX_CHUNK + 64 * 1024)
        .max_encoding_message_size(MAX_CHUNK + 64 * 1024)
}

fn saga_status(e: SagaError) -> Status {
    match e {
        SagaError::Refused { code, message } => match code {
            RejectCode::NotFound => Status::not_found(message),
            RejectCode::AlreadyExists | RejectCode::NotEmpty | RejectCode::AlreadyInitialized => {
                Status::already_exists(message)
            }
            RejectCode::QuotaExceeded => Status::resource_exhausted(message),
            RejectCode::VersionMismatch | RejectCode::StaleEpoch => {
                Status::failed_precondition(message)
            }
            RejectCode::Invalid => Status::invalid_argument(message),
        },
        SagaError::Log(m) | SagaError::Link(m) => Status::unavailable(m),
        SagaError::Transfer(e) => transfer_status(e),
        SagaError::NotFound(m) => Status::not_found(m),
        SagaError::Disk(m) => Status::internal(m),
    }
}

fn transfer_status(e: TransferError) -> Status {
    match e {
        TransferError::OffsetMismatch { expected, got } => {
            Status::failed_precondition(format!("offset {expected} {got}"))
        }
        TransferError::ChecksumMismatch { actual, .. } => Status::data_loss(actual),
        TransferError::Link(m) => Status::unavailable(m),
        TransferError::LinkTimeout { last, .. } => Status::unavailable(last),
        TransferError::Unknown(id) => Status::unavailable(format!("no transfer {id} here yet")),
        e @ (TransferError::SizeMismatch { .. } | TransferError::Invalid(_)) => {
            Status::invalid_argument(e.to_string())
        }
        e @ TransferError::Io { .. } => Status::internal(e.to_string()),
    }
}

impl MoveService {
    /// The linked site that made this call.
    fn caller<T>(&self, request: &tonic::Request<T>) -> Result<String, Status> {
        let site = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.site.clone())
            .ok_or_else(|| {
                Status::unauthenticated("a client certificate of a linked site is required")
            })?;
        match self.reader.get_raw(&fed::link_key(&site)) {
            Ok(Some(_)) => Ok(site),
            Ok(None) => Err(Status::permission_denied(format!(
                "site {site} is not linked"
            ))),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }

    fn import_of(&self, id: &str) -> Result<Option<SiteImport>, Status> {
        self.reader
            .get::<SiteImport>(&raft::site_move::import_key(id))
            .map_err(|e| Status::internal(e.to_string()))
    }

    /// The import `id` begun by `caller`, held on this node (for the disk calls).
    fn local_import(&self, caller: &str, id: &str) -> Result<SiteImport, Status> {
        let imp = self.import_of(id)?.ok_or_else(|| {
            // Begun through another node and not applied here yet, or unknown.
            Status::unavailable(format!("no import {id} on this node yet"))
        })?;
        if imp.source_site != caller {
            return Err(Status::permission_denied("another site's import"));
        }
        if imp.node != self.me {
            return Err(Status::unavailable(format!(
                "import {id} is received by node {}",
                imp.node
            )));
        }
        Ok(imp)
    }
}

fn spec_of(s: pb::TransferSpec) -> TransferSpec {
    TransferSpec {
        id: s.id,
        size: s.size,
        sha256: s.sha256,
    }
}

#[tonic::async_trait]
impl SiteMoves for MoveService {
    async fn begin_import(
        &self,
        request: tonic::Request<pb::BeginImportRequest>,
    ) -> Result<tonic::Response<pb::BeginImportReply>, Status> {
        let caller = self.caller(&request)?;
        let import: SiteImport = serde_json::from_slice(&request.into_inner().import)
            .map_err(|e| Status::invalid_argument(format!("import: {e}")))?;
        if import.source_site != caller {
            return Err(Status::permission_denied("a site imports only its own VMs"));
        }
        let node = self
            .target
            .begin_import(import)
            .await
            .map_err(saga_status)?;
        Ok(tonic::Response::new(pb::BeginImportReply { node }))
    }

    async fn import_phase(
        &self,
        request: tonic::Request<pb::ImportPhaseRequest>,
    ) -> Result<tonic::Response<pb::ImportPhaseReply>, Status> {
        let caller = self.caller(&request)?;
        let id = request.into_inner().id;
        let phase = match self.import_of(&id)? {
            Some(imp) if imp.vm.is_some() && imp.source_site != caller => {
                return Err(Status::permission_denied("another site's import"))
            }
            Some(imp) => Some(
                match imp.phase {
                    ImportPhase::Importing => "importing",
                    ImportPhase::Imported => "imported",
                    ImportPhase::Aborted => "aborted",
                }
                .to_string(),
            ),
            None => None,
        };
        Ok(tonic::Response::new(pb::ImportPhaseReply { phase }))
    }

    async fn settle(
        &self,
        request: tonic::Request<pb::SettleRequest>,
    ) -> Result<tonic::Response<pb::SettleReply>, Status> {
        let caller = self.caller(&request)?;
        let req = request.into_inner();
        if let Some(imp) = self.import_of(&req.id)? {
            if imp.vm.is_some() && imp.source_site != caller {
                return Err(Status::permission_denied("another site's import"));
            }
        }
        let to = if req.imported {
            ImportSettle::Imported
        } else {
            ImportSettle::Aborted { reason: req.reason }
        };
        self.target
            .settle(&req.id, &req.vm_id, to)
            .await
            .map_err(saga_status)?;
        Ok(tonic::Response::new(pb::SettleReply {}))
    }

    async fn offer(
        &self,
        request: tonic::Request<pb::TransferSpec>,
    ) -> Result<tonic::Response<pb::OfferReply>, Status> {
        let caller = self.caller(&request)?;
        let spec = spec_of(request.into_inner());
        self.local_import(&caller, &spec.id)?;
        let offset = self.receiver.offer(&spec).await.map_err(transfer_status)?;
        Ok(tonic::Response::new(pb::OfferReply { offset }))
    }

    async fn push(
        &self,
        request: tonic::Request<tonic::Streaming<pb::Chunk>>,
    ) -> Result<tonic::Response<pb::PushReply>, Status> {
        let caller = self.caller(&request)?;
        let mut stream = request.into_inner();
        let Some(first) = stream.message().await? else {
            return Err(Status::invalid_argument("an empty push"));
        };
        self.local_import(&caller, &first.id)?;
        let id = first.id.clone();
        // Every chunk of one push belongs to the transfer its first chunk named.
        let chunks: ChunkStream = Box::pin(
            futures::stream::once(async move { Ok(first) })
                .chain(stream)
                .map(move |c| match c {
                    Ok(c) if c.id == id => Ok(Chunk {
                        id: c.id,
                        offset: c.offset,
                        data: c.data.into(),
                    }),
                    Ok(_) => Err(TransferError::Invalid("a push carries one transfer".into())),
                    Err(status) => Err(TransferError::Link(status.message().to_string())),
                }),
        );
        let offset = self.receiver.push(chunks).await.map_err(transfer_status)?;
        Ok(tonic::Response::new(pb::PushReply { offset }))
    }

    async fn commit(
        &self,
        request: tonic::Request<pb::TransferSpec>,
    ) -> Result<tonic::Response<pb::CommitReply>, Status> {
        let caller = self.caller(&request)?;
        let spec = spec_of(request.into_inner());
        self.local_import(&caller, &spec.id)?;
        self.receiver.commit(&spec).await.map_err(transfer_status)?;
        Ok(tonic::Response::new(pb::CommitReply {}))
    }
}

/// The target site of a move, reached over its link.
pub struct GrpcTarget {
    pub peers: Arc<Peers>,
    pub link: SiteLink,
}

impl std::fmt::Debug for GrpcTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcTarget")
            .field("site", &self.link.site.id)
            .finish_non_exhaustive()
    }
}

fn client(channel: Channel) -> SiteMovesClient<Channel> {
    SiteMovesClient::new(channel)
        .max_decoding_message_size(MAX_CHUNK + 64 * 1024)
        .max_encoding_message_size(MAX_CHUNK + 64 * 1024)
}

fn reject_of(code: Code) -> RejectCode {
    match code {
        Code::NotFound => RejectCode::NotFound,
        Code::AlreadyExists => RejectCode::AlreadyExists,
        Code::ResourceExhausted => RejectCode::QuotaExceeded,
        Code::FailedPrecondition => RejectCode::VersionMismatch,
        _ => RejectCode::Invalid,
    }
}

fn saga_error(e: CallError) -> SagaError {
    match e {
        CallError::Refused { code, message, .. } => SagaError::Refused {
            code: reject_of(code),
            message,
        },
        other => SagaError::Link(other.to_string()),
    }
}

fn transfer_error(e: CallError, spec: &TransferSpec) -> TransferError {
    match e {
        CallError::Refused { code, message, .. } => match code {
            Code::FailedPrecondition => {
                let mut parts = message
                    .strip_prefix("offset ")
                    .unwrap_or("")
                    .split(' ')
                    .map(str::parse::<u64>);
                match (parts.next(), parts.next()) {
                    (Some(Ok(expected)), Some(Ok(got))) => {
                        TransferError::OffsetMismatch { expected, got }
                    }
                    _ => TransferError::Invalid(message),
                }
            }
            Code::DataLoss => TransferError::ChecksumMismatch {
                expected: spec.sha256.clone(),
                actual: message,
            },
            // The stream was used up by an attempt that failed: try again from an offer.
            Code::Aborted | Code::PermissionDenied | Code::Unauthenticated => {
                TransferError::Link(message)
            }
            _ => TransferError::Invalid(message),
        },
        other => TransferError::Link(other.to_string()),
    }
}

fn pb_spec(spec: &TransferSpec) -> pb::TransferSpec {
    pb::TransferSpec {
        id: spec.id.clone(),
        size: spec.size,
        sha256: spec.sha256.clone(),
    }
}

#[async_trait]
impl TargetSite for GrpcTarget {
    async fn begin_import(&self, import: SiteImport) -> Result<NodeId, SagaError> {
        let body = serde_json::to_vec(&import).map_err(|e| SagaError::Disk(e.to_string()))?;
        let reply = self
            .peers
            .call_with(&self.link, client, |mut c| {
                let import = body.clone();
                async move { c.begin_import(pb::BeginImportRequest { import }).await }
            })
            .await
            .map_err(saga_error)?;
        Ok(reply.node)
    }

    async fn import_phase(&self, id: &str) -> Result<Option<ImportPhase>, SagaError> {
        let reply = self
            .peers
            .call_with(&self.link, client, |mut c| {
                let id = id.to_string();
                async move { c.import_phase(pb::ImportPhaseRequest { id }).await }
            })
            .await
            .map_err(saga_error)?;
        Ok(match reply.phase.as_deref() {
            Some("importing") => Some(ImportPhase::Importing),
            Some("imported") => Some(ImportPhase::Imported),
            Some("aborted") => Some(ImportPhase::Aborted),
            _ => None,
        })
    }

    async fn settle(&self, id: &str, vm_id: &str, to: ImportSettle) -> Result<(), SagaError> {
        let (imported, reason) = match to {
            ImportSettle::Imported => (true, String::new()),
            ImportSettle::Aborted { reason } => (false, reason),
        };
        let req = pb::SettleRequest {
            id: id.to_string(),
            vm_id: vm_id.to_string(),
            imported,
            reason,
        };
        self.peers
            .call_with(&self.link, client, |mut c| {
                let req = req.clone();
                async move { c.settle(req).await }
            })
            .await
            .map_err(saga_error)?;
        Ok(())
    }

    fn disk_sink(&self, _id: &str, _node: NodeId) -> Arc<dyn DiskSink> {
        Arc::new(GrpcSink {
            peers: self.peers.clone(),
            link: self.link.clone(),
        })
    }
}

type WireChunks = tokio_stream::wrappers::ReceiverStream<pb::Chunk>;

/// The chunks as sent on the wire, through a channel fed by a task (a concrete stream type
/// keeps the gRPC future `Send`); a local read error ends the stream and is kept in `failed`.
fn to_wire(mut chunks: ChunkStream, failed: Arc<Mutex<Option<TransferError>>>) -> WireChunks {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        while let Some(c) = chunks.next().await {
            match c {
                Ok(c) => {
                    let chunk = pb::Chunk {
                        id: c.id,
                        offset: c.offset,
                        data: c.data.to_vec(),
                    };
                    if tx.send(chunk).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    return;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// One push attempt; the stream is gone after a failed one.
fn push_once(
    c: &mut SiteMovesClient<Channel>,
    stream: Option<WireChunks>,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<tonic::Response<pb::PushReply>, Status>> + Send>,
> {
    let mut c = c.clone();
    Box::pin(async move {
        match stream {
            Some(s) => c.push(s).await,
            None => Err(Status::aborted(
                "the chunk stream was used by a failed attempt",
            )),
        }
    })
}

/// The disk receiver of the target's chosen node, over the link.
struct GrpcSink {
    peers: Arc<Peers>,
    link: SiteLink,
}

#[async_trait]
impl DiskSink for GrpcSink {
    async fn offer(&self, spec: &TransferSpec) -> Result<u64, TransferError> {
        let req = pb_spec(spec);
        let reply = self
            .peers
            .call_with(&self.link, client, |mut c| {
                let req = req.clone();
                async move { c.offer(req).await }
            })
            .await
            .map_err(|e| transfer_error(e, spec))?;
        Ok(reply.offset)
    }

    async fn push(&self, chunks: ChunkStream) -> Result<u64, TransferError> {
        // The stream can be sent once: a failed attempt ends the push, and the sender
        // resumes with a new offer.
        let source_error: Arc<Mutex<Option<TransferError>>> = Default::default();
        // A local read error ends the stream; it is reported instead of the short push.
        let stream = to_wire(chunks, source_error.clone());
        let slot = Arc::new(Mutex::new(Some(stream)));
        let spec = TransferSpec {
            id: String::new(),
            size: 0,
            sha256: String::new(),
        };
        let (peers, link) = (self.peers.clone(), self.link.clone());
        let attempt = move |mut c: SiteMovesClient<Channel>| {
            let stream = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            push_once(&mut c, stream)
        };
        let reply = tokio::spawn(async move { peers.call_with(&link, client, attempt).await })
            .await
            .map_err(|e| TransferError::Link(format!("push task failed: {e}")))?
            .map_err(|e| transfer_error(e, &spec))?;
        if let Some(e) = source_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Err(e);
        }
        Ok(reply.offset)
    }

    async fn commit(&self, spec: &TransferSpec) -> Result<(), TransferError> {
        let req = pb_spec(spec);
        self.peers
            .call_with(&self.link, client, |mut c| {
                let req = req.clone();
                async move { c.commit(req).await }
            })
            .await
            .map_err(|e| transfer_error(e, spec))?;
        Ok(())
    }
}
