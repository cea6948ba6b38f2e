//! The federation endpoint every node serves: `Link` (open to a token holder), `Changes` and
//! `Forward` (only to linked sites, identified by their client certificate).
//!
//! TLS is terminated here (tokio-rustls with [`crate::tls::server_config`]) and each accepted
//! connection carries the calling site into tonic's request extensions ([`PeerInfo`]), so every
//! RPC knows who calls without trusting anything the caller says about itself.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use api::{Consistency, ControlPlane};
use axum::body::Body;
use http_body_util::BodyExt;
use raft::federation::{self as fed, SiteIdentity, SiteLink};
use raft::store::StateReader;
use raft::tls::NodeIdentity;
use raft::{Command, RejectCode, Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;
use tonic::Status;
use tower::ServiceExt;

use crate::proto::federation_server::{Federation, FederationServer};
use crate::proto::{
    ChangesReply, ChangesRequest, ForwardReply, ForwardRequest, LinkReply, LinkRequest, Site,
};
use crate::tls::{SiteResolver, TlsError};

/// The largest page of changes served at once.
pub const MAX_PAGE: u32 = 1_000;
/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a forwarded REST call may run (an event stream would never end).
/// Below the client's call timeout, so the caller gets this answer rather than a cut call.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(25);

/// Who is at the other end of a connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The linked site whose CA signed the client certificate; `None` without one.
    pub site: Option<String>,
    pub addr: Option<SocketAddr>,
}

/// An accepted, handshaken connection.
pub struct PeerConn {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for PeerConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What the endpoint needs from its node.
pub struct ServerContext {
    pub reader: StateReader,
    pub cp: Arc<dyn ControlPlane>,
    /// The node's own REST router: forwarded calls run through it exactly like local ones.
    pub router: axum::Router,
    pub identity: NodeIdentity,
    /// The target side of cross-site moves on this node, served next to `Federation`.
    pub moves: Option<crate::move_rpc::MoveService>,
}

/// The linked sites in this replica.
pub fn links_of(reader: &StateReader) -> Vec<SiteLink> {
    match reader.scan::<SiteLink>(fed::LINK_PREFIX, None, usize::MAX) {
        Ok(rows) => rows.into_iter().map(|(_, l)| l).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the site links");
            Vec::new()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("gRPC server failed")]
    Grpc(#[from] tonic::transport::Error),
}

/// Serves the federation endpoint on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<ServerContext>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let reader = ctx.reader.clone();
    let resolver = Arc::new(SiteResolver::new(Arc::new(move || links_of(&reader))));
    let config = Arc::new(crate::tls::server_config(&ctx.identity, resolver.clone())?);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<PeerConn, std::io::Error>>(64);
    let accept_loop = tokio::spawn(async move {
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "federation accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (acceptor, resolver, tx) = (acceptor.clone(), resolver.clone(), tx.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%addr, error = %e, "federation handshake refused");
                        return;
                    }
                    Err(_) => return,
                };
                let site = {
                    let (_, conn) = tls.get_ref();
                    conn.peer_certificates().and_then(|certs| {
                        let (ee, rest) = certs.split_first()?;
                        resolver.site_of(ee, rest, rustls::pki_types::UnixTime::now())
                    })
                };
                let info = PeerInfo {
                    site,
                    addr: Some(addr),
                };
                let _ = tx.send(Ok(PeerConn { inner: tls, info })).await;
            });
        }
    });
    let incoming = tokio_stream::wrappers::ReceiverStream::new(rx);
    let moves = ctx.moves.clone().map(crate::move_rpc::server);
    let service = FederationServer::new(Endpoint { ctx })
        .max_decoding_message_size(crate::MAX_FORWARD_BODY + 64 * 1024)
        .max_encoding_message_size(crate::MAX_FORWARD_BODY + 64 * 1024);
    let result = tonic::transport::Server::builder()
        .add_service(service)
        .add_optional_service(moves)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    accept_loop.abort();
    Ok(result?)
}

struct Endpoint {
    ctx: Arc<ServerContext>,
}

impl Endpoint {
    fn stored_token(&self, id: &str) -> Result<Option<fed::FederationToken>, Status> {
        self.ctx
            .reader
            .get::<fed::FederationToken>(&fed::token_key(id))
            .map_err(|e| Status::internal(e.to_string()))
    }

    /// The linked site that made this call, or the reason it may not.
    fn caller<T>(&self, request: &tonic::Request<T>) -> Result<String, Status> {
        let site = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.site.clone())
            .ok_or_else(|| {
                Status::unauthenticated("a client certificate of a linked site is required")
            })?;
        // The link may have been removed since the handshake.
        match self.ctx.reader.get_raw(&fed::link_key(&site)) {
            Ok(Some(_)) => Ok(site),
            Ok(None) => Err(Status::permission_denied(format!(
                "site {site} is not linked"
            ))),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }
}

fn cluster_status(e: api::ClusterError) -> Status {
    match e {
        api::ClusterError::Invalid(m) => Status::invalid_argument(m),
        other => Status::unavailable(other.to_string()),
    }
}

#[tonic::async_trait]
impl Federation for Endpoint {
    async fn link(
        &self,
        request: tonic::Request<LinkRequest>,
    ) -> Result<tonic::Response<LinkReply>, Status> {
        let req = request.into_inner();
        let site = req
            .site
            .ok_or_else(|| Status::invalid_argument("the calling site is missing"))?;
        let site = SiteIdentity {
            id: site.id,
            name: site.name,
        };
        if !SiteIdentity::valid_id(&site.id) || !SiteIdentity::valid_name(&site.name) {
            return Err(Status::invalid_argument("invalid site id or name"));
        }
        if raft::tls::ca_fingerprint(&req.ca_cert_pem).is_err() {
            return Err(Status::invalid_argument(
                "the CA certificate is not valid PEM",
            ));
        }
        if req.addrs.is_empty() {
            return Err(Status::invalid_argument("no federation address given"));
        }
        // Refuse unknown or wrong tokens from the replica, so that guessing costs no log entry.
        // The token may have been created an instant ago through another node: a token not
        // found is looked up again after a linearizable barrier before refusing.
        let secret_sha256 = crate::token::secret_sha256(&req.secret);
        let mut stored = self.stored_token(&req.token_id)?;
        if stored.is_none() {
            self.ctx
                .cp
                .read_barrier(Consistency::Linearizable)
                .await
                .map_err(cluster_status)?;
            stored = self.stored_token(&req.token_id)?;
        }
        match stored {
            Some(t) if t.secret_sha256 == secret_sha256 && t.expires_at > crate::now_ms() => {}
            _ => {
                return Err(Status::permission_denied(
                    "unknown, used, expired or wrong federation token",
                ))
            }
        }
        let link = SiteLink {
            site: site.clone(),
            ca_cert_pem: req.ca_cert_pem,
            addrs: req.addrs,
            created_at: 0,
            updated_at: 0,
        };
        // The token is checked and consumed inside apply, in the same entry as the link.
        let command = Command::LinkSite {
            link,
            token: Some((req.token_id, secret_sha256)),
        };
        let (_, response) = self
            .ctx
            .cp
            .write(Request::new(
                crate::now_ms(),
                format!("site:{}", site.id),
                command,
            ))
            .await
            .map_err(cluster_status)?;
        match response {
            Response::Ok => {}
            Response::Rejected { code, message } => {
                return Err(match code {
                    RejectCode::AlreadyExists => Status::already_exists(message),
                    RejectCode::Invalid if message.contains("token") => {
                        Status::permission_denied(message)
                    }
                    RejectCode::Invalid => Status::invalid_argument(message),
                    _ => Status::permission_denied(message),
                })
            }
            other => return Err(Status::internal(format!("unexpected outcome {other:?}"))),
        }
        let own = self
            .ctx
            .reader
            .site()
            .map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(site = %site.id, name = %site.name, "site linked by token");
        Ok(tonic::Response::new(LinkReply {
            site: Some(Site {
                id: own.id,
                name: own.name,
            }),
            ca_cert_pem: self.ctx.identity.ca_cert_pem.clone(),
            addrs: self.ctx.cp.federation_addrs(),
        }))
    }

    async fn changes(
        &self,
        request: tonic::Request<ChangesRequest>,
    ) -> Result<tonic::Response<ChangesReply>, Status> {
        self.caller(&request)?;
        let req = request.into_inner();
        // A linearizable barrier first: then this replica holds every index any node of this
        // site ever served, and a `since` beyond our head really means this site lost state
        // (restored or rebuilt), not that this node lags.
        self.ctx
            .cp
            .read_barrier(Consistency::Linearizable)
            .await
            .map_err(cluster_status)?;
        let head = self.ctx.reader.last_applied_index();
        let limit = req.limit.clamp(1, MAX_PAGE) as usize;
        if req.since > head {
            return Ok(tonic::Response::new(ChangesReply {
                to: req.since,
                more: false,
                head,
                changes: Vec::new(),
                addrs: self.ctx.cp.federation_addrs(),
            }));
        }
        let page = self
            .ctx
            .reader
            .federation_changes(req.since, limit)
            .map_err(|e| Status::internal(e.to_string()))?;
        let changes = page
            .changes
            .iter()
            .map(serde_json::to_vec)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(tonic::Response::new(ChangesReply {
            to: page.to,
            more: page.more,
            head: head.max(page.to),
            changes,
            addrs: self.ctx.cp.federation_addrs(),
        }))
    }

    async fn forward(
        &self,
        request: tonic::Request<ForwardRequest>,
    ) -> Result<tonic::Response<ForwardReply>, Status> {
        let site = self.caller(&request)?;
        let req = request.into_inner();
        if !req.path_and_query.starts_with("/api/v1/") || req.path_and_query.contains("..") {
            return Err(Status::invalid_argument(
                "only calls under /api/v1/ are forwarded",
            ));
        }
        if req.body.len() > crate::MAX_FORWARD_BODY {
            return Err(Status::resource_exhausted("the request body is too large"));
        }
        // A login carries its own credentials (a user of this site logging in at a linked
        // site, which asks home to check them); every other call acts as a given user.
        let login = req.method == "POST" && req.path_and_query == "/api/v1/auth/login";
        if req.user_id.is_empty() && !login {
            return Err(Status::invalid_argument("no user given"));
        }
        let method = axum::http::Method::from_bytes(req.method.as_bytes())
            .map_err(|_| Status::invalid_argument("bad method"))?;
        let mut builder = axum::http::Request::builder()
            .method(method)
            .uri(&req.path_and_query);
        if !req.body.is_empty() {
            builder = builder.header(axum::http::header::CONTENT_TYPE, "application/json");
        }
        if let Some(key) = &req.idempotency_key {
            builder = builder.header("idempotency-key", key);
        }
        if let Some(tag) = &req.if_match {
            builder = builder.header(axum::http::header::IF_MATCH, tag);
        }
        let mut http = builder
            .body(Body::from(req.body))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // The only way a forwarded principal enters the API: set here, after mutual TLS named
        // the calling site, never from a header.
        http.extensions_mut().insert(api::auth::ForwardedPrincipal {
            site,
            user_id: req.user_id,
        });
        let call = async {
            let response = self
                .ctx
                .router
                .clone()
                .oneshot(http)
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            let (parts, body) = response.into_parts();
            let limited = http_body_util::Limited::new(body, crate::MAX_FORWARD_BODY);
            let bytes = limited
                .collect()
                .await
                .map_err(|_| Status::resource_exhausted("the reply body is too large"))?
                .to_bytes();
            let header = |name: axum::http::HeaderName| {
                parts
                    .headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            Ok::<_, Status>(ForwardReply {
                status: u32::from(parts.status.as_u16()),
                content_type: header(axum::http::header::CONTENT_TYPE),
                etag: header(axum::http::header::ETAG),
                body: bytes.to_vec(),
            })
        };
        match tokio::time::timeout(FORWARD_TIMEOUT, call).await {
            Ok(reply) => Ok(tonic::Response::new(reply?)),
            Err(_) => Err(Status::deadline_exceeded(
                "the forwarded call took too long",
            )),
        }
    }
}
