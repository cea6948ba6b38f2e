//! Calling a peer site: one gRPC channel per linked site, to whichever of its nodes answers.
//!
//! A call tries the channel it has; on a transport failure (the node is down, partitioned, or
//! has not applied our link yet) it moves to the site's next address, and after each full round
//! of addresses waits with exponential backoff, until the attempt budget is spent. Errors the
//! peer reports on purpose (refused, invalid) are returned at once.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use raft::federation::{SiteIdentity, SiteLink};
use raft::tls::NodeIdentity;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::backoff::Backoff;
use crate::proto::federation_client::FederationClient;
use crate::proto::{ChangesReply, ChangesRequest, ForwardReply, ForwardRequest, LinkRequest, Site};
use crate::token::Token;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No address of the site answered within the attempt budget.
    #[error("site {site} is unreachable ({last})")]
    Unreachable { site: String, last: String },
    /// The peer answered and refused.
    #[error("site {site} refused: {message}")]
    Refused {
        site: String,
        code: Code,
        message: String,
    },
    /// The call was sent and its outcome is unknown (the connection broke or timed out); it
    /// was not retried because it might not be idempotent.
    #[error("site {site} did not answer a sent call ({last}); it may or may not have run")]
    Indeterminate { site: String, last: String },
    #[error("TLS setup failed: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("the peer answered something unexpected: {0}")]
    Protocol(String),
}

/// Whether a status means "try another node" rather than "the site said no".
fn is_transport(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}

/// A channel over our own TLS (tonic's TLS cannot pin a CA per site or skip host names).
async fn connect(addr: &str, config: Arc<rustls::ClientConfig>) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    let addr = addr.to_string();
    let connector = tower::service_fn(move |_: tonic::codegen::http::Uri| {
        let (addr, config) = (addr.clone(), config.clone());
        async move {
            let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&addr))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                })??;
            let _ = tcp.set_nodelay(true);
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(crate::tls::server_name(), tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| error_chain(&e))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

struct SiteChannel {
    /// The link this channel was made for; a changed link (addresses, CA) drops it.
    link: SiteLink,
    next_addr: usize,
    channel: Option<Channel>,
}

/// The `Federation` service's client on a channel.
fn federation_client(channel: Channel) -> FederationClient<Channel> {
    FederationClient::new(channel)
        .max_decoding_message_size(crate::MAX_FORWARD_BODY + 64 * 1024)
        .max_encoding_message_size(crate::MAX_FORWARD_BODY + 64 * 1024)
}

/// Clients of every linked site, shared by the sync loop and forwarded calls.
pub struct Peers {
    identity: NodeIdentity,
    sites: Mutex<HashMap<String, Arc<tokio::sync::Mutex<SiteChannel>>>>,
    /// Full rounds over a site's addresses before a call gives up.
    pub rounds: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers").finish_non_exhaustive()
    }
}

impl Peers {
    pub fn new(identity: NodeIdentity) -> Self {
        Peers {
            identity,
            sites: Mutex::new(HashMap::new()),
            rounds: 3,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
        }
    }

    fn slot(&self, link: &SiteLink) -> Arc<tokio::sync::Mutex<SiteChannel>> {
        let mut sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        sites
            .entry(link.site.id.clone())
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(SiteChannel {
                    link: link.clone(),
                    next_addr: 0,
                    channel: None,
                }))
            })
            .clone()
    }

    /// Runs `f` against some node of `link`'s site, failing over between its addresses, for
    /// [`Peers::rounds`] rounds.
    pub async fn call<T, F, Fut>(&self, link: &SiteLink, f: F) -> Result<T, CallError>
    where
        F: FnMut(FederationClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_inner(link, self.rounds, true, federation_client, f)
            .await
    }

    /// Like [`Peers::call`], for any service on the site's federation endpoint: `wrap` makes
    /// that service's client from the channel. Only idempotent calls go through here.
    pub async fn call_with<C, T, F, Fut>(
        &self,
        link: &SiteLink,
        wrap: impl Fn(Channel) -> C,
        f: F,
    ) -> Result<T, CallError>
    where
        F: FnMut(C) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_inner(link, self.rounds, true, wrap, f).await
    }

    /// Like [`Peers::call`], with an explicit number of rounds over the addresses.
    pub async fn call_rounds<T, F, Fut>(
        &self,
        link: &SiteLink,
        rounds: u32,
        f: F,
    ) -> Result<T, CallError>
    where
        F: FnMut(FederationClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_inner(link, rounds, true, federation_client, f)
            .await
    }

    /// `retry_sent`: whether a call that was sent but got no answer may be sent again
    /// (idempotent calls); otherwise only failures to connect move on to the next address.
    async fn call_inner<C, T, F, Fut>(
        &self,
        link: &SiteLink,
        rounds: u32,
        retry_sent: bool,
        wrap: impl Fn(Channel) -> C,
        mut f: F,
    ) -> Result<T, CallError>
    where
        F: FnMut(C) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let site = link.site.id.clone();
        if link.addrs.is_empty() {
            return Err(CallError::Unreachable {
                site,
                last: "the link has no address".into(),
            });
        }
        let config = Arc::new(crate::tls::client_config(
            &self.identity,
            &link.ca_cert_pem,
        )?);
        let slot = self.slot(link);
        let mut backoff = Backoff::new(self.backoff_base, self.backoff_max);
        let attempts = link.addrs.len() * rounds.max(1) as usize;
        let mut last = String::new();
        for attempt in 0..attempts {
            if attempt > 0 && attempt.is_multiple_of(link.addrs.len()) {
                tokio::time::sleep(backoff.next_delay()).await;
            }
            let channel = {
                let mut s = slot.lock().await;
                if s.link.addrs != link.addrs || s.link.ca_cert_pem != link.ca_cert_pem {
                    *s = SiteChannel {
                        link: link.clone(),
                        next_addr: 0,
                        channel: None,
                    };
                }
                match &s.channel {
                    Some(c) => c.clone(),
                    None => {
                        let addr = link.addrs[s.next_addr % link.addrs.len()].clone();
                        match connect(&addr, config.clone()).await {
                            Ok(c) => {
                                s.channel = Some(c.clone());
                                c
                            }
                            Err(e) => {
                                last = format!("{addr}: {e}");
                                s.next_addr = s.next_addr.wrapping_add(1);
                                continue;
                            }
                        }
                    }
                }
            };
            match f(wrap(channel)).await {
                Ok(reply) => return Ok(reply.into_inner()),
                Err(status) if is_transport(&status) => {
                    let mut s = slot.lock().await;
                    last = format!(
                        "{}: {}",
                        link.addrs[s.next_addr % link.addrs.len()],
                        status.message()
                    );
                    s.channel = None;
                    s.next_addr = s.next_addr.wrapping_add(1);
                    if !retry_sent {
                        return Err(CallError::Indeterminate { site, last });
                    }
                }
                Err(status) => {
                    return Err(CallError::Refused {
                        site,
                        code: status.code(),
                        message: status.message().to_string(),
                    })
                }
            }
        }
        Err(CallError::Unreachable { site, last })
    }

    /// One page of `link`'s changes after `since`, with the round trip it took. One round over
    /// the site's addresses: the pull loop itself retries every interval, and a long retry here
    /// would only delay recording that the site is unreachable.
    pub async fn changes(
        &self,
        link: &SiteLink,
        since: u64,
        limit: u32,
    ) -> Result<(ChangesReply, Duration), CallError> {
        let started = Instant::now();
        let reply = self
            .call_rounds(link, 1, |mut c| async move {
                let started = Instant::now();
                let r = c.changes(ChangesRequest { since, limit }).await;
                tracing::trace!(elapsed = ?started.elapsed(), "changes call");
                r
            })
            .await?;
        Ok((reply, started.elapsed()))
    }

    /// Runs a REST call at `link`'s site for a user.
    pub async fn forward(
        &self,
        link: &SiteLink,
        call: api::control::ForwardedCall,
    ) -> Result<api::control::ForwardedReply, CallError> {
        let req = ForwardRequest {
            method: call.method,
            path_and_query: call.path_and_query,
            body: call.body,
            user_id: call.user_id,
            idempotency_key: call.idempotency_key,
            if_match: call.if_match,
        };
        // A read, or a write the home site deduplicates by its key, may be sent again after a
        // broken connection; any other write is sent once.
        let idempotent = matches!(req.method.as_str(), "GET" | "HEAD" | "OPTIONS")
            || req.idempotency_key.is_some();
        let reply: ForwardReply = self
            .call_inner(link, self.rounds, idempotent, federation_client, |mut c| {
                let req = req.clone();
                async move { c.forward(req).await }
            })
            .await?;
        Ok(api::control::ForwardedReply {
            status: u16::try_from(reply.status)
                .map_err(|_| CallError::Protocol("bad HTTP status".into()))?,
            content_type: reply.content_type,
            etag: reply.etag,
            body: reply.body,
        })
    }
}

/// What a successful `Link` call returns: the issuing site as it describes itself, checked
/// against the token.
#[derive(Debug, Clone)]
pub struct LinkedPeer {
    pub site: SiteIdentity,
    pub ca_cert_pem: String,
    pub addrs: Vec<String>,
}

/// Calls `Link` at the site that issued `token`, trying `addrs` in turn with backoff until
/// `within` has passed. `own` describes this site (identity, CA, federation addresses).
pub async fn link(
    token: &Token,
    addrs: &[String],
    own: (&SiteIdentity, &str, &[String]),
    within: Duration,
) -> Result<LinkedPeer, CallError> {
    let site = token.site_id.clone();
    if addrs.is_empty() {
        return Err(CallError::Unreachable {
            site,
            last: "no address given".into(),
        });
    }
    let config = Arc::new(crate::tls::link_client_config(&token.ca_fingerprint)?);
    let deadline = Instant::now() + within;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let req = LinkRequest {
        token_id: token.token_id.clone(),
        secret: token.secret.clone(),
        site: Some(Site {
            id: own.0.id.clone(),
            name: own.0.name.clone(),
        }),
        ca_cert_pem: own.1.to_string(),
        addrs: own.2.to_vec(),
    };
    let mut i = 0usize;
    loop {
        let addr = &addrs[i % addrs.len()];
        i += 1;
        let last = match connect(addr, config.clone()).await {
            Ok(channel) => match FederationClient::new(channel).link(req.clone()).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    let peer = reply
                        .site
                        .ok_or_else(|| CallError::Protocol("no site in the reply".into()))?;
                    // The TLS handshake already pinned the CA; the reply must name the same.
                    let fp = raft::tls::ca_fingerprint(&reply.ca_cert_pem)
                        .map_err(|e| CallError::Protocol(e.to_string()))?;
                    if fp != token.ca_fingerprint || peer.id != token.site_id {
                        return Err(CallError::Protocol(
                            "the site does not match the token".into(),
                        ));
                    }
                    return Ok(LinkedPeer {
                        site: SiteIdentity {
                            id: peer.id,
                            name: peer.name,
                        },
                        ca_cert_pem: reply.ca_cert_pem,
                        addrs: if reply.addrs.is_empty() {
                            addrs.to_vec()
                        } else {
                            reply.addrs
                        },
                    });
                }
                Err(status) if is_transport(&status) => format!("{addr}: {}", status.message()),
                Err(status) => {
                    return Err(CallError::Refused {
                        site,
                        code: status.code(),
                        message: status.message().to_string(),
                    })
                }
            },
            Err(e) => format!("{addr}: {e}"),
        };
        if Instant::now() >= deadline {
            return Err(CallError::Unreachable { site, last });
        }
        if i.is_multiple_of(addrs.len()) {
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}
