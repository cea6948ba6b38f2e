//! Mutual TLS between sites, hostname-free like the QUIC transport inside a site: node
//! certificates name nodes (and the shared name `raft::tls::CLUSTER_SERVER_NAME`), never
//! addresses, so a peer is checked only against the CA it is expected to chain to.
//!
//! - Server: presents this node's certificate followed by its cluster CA (so a linking site
//!   can pin the CA by fingerprint), offers client authentication without requiring it, and
//!   accepts a client certificate only if it chains to the CA of a site linked right now (read
//!   from the replica at each handshake). [`SiteResolver::site_of`] then names the calling site.
//!   A connection without a client certificate may only call `Link`.
//! - Client towards a linked site: presents this node's certificate and verifies the server
//!   against that site's pinned CA ([`client_config`]).
//! - Client calling `Link`: presents nothing and verifies the server against the CA carried in
//!   its own chain whose sha256 equals the token's fingerprint ([`link_client_config`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use raft::federation::SiteLink;
use raft::tls::{NodeIdentity, CLUSTER_SERVER_NAME};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};

/// gRPC runs over HTTP/2.
const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate in PEM")]
    NoCertificate,
    #[error("no private key in PEM")]
    NoPrivateKey,
    #[error("TLS configuration rejected")]
    Rustls(#[from] rustls::Error),
    #[error("CA certificate rejected")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
}

fn provider() -> Arc<CryptoProvider> {
    raft::tls::ring_provider()
}

fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TlsError::NoCertificate)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    Ok(certs)
}

/// This node's certificate followed by its CA, and its key.
fn chain_and_key(
    id: &NodeIdentity,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let mut chain = certs(&id.cert_pem)?;
    chain.extend(certs(&id.ca_cert_pem)?);
    let key =
        PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).map_err(|_| TlsError::NoPrivateKey)?;
    Ok((chain, key))
}

fn roots_of(ca_pem: &str) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(ca_pem)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// The SNI every client sends: node certificates carry it, whatever their address.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(CLUSTER_SERVER_NAME).expect("the cluster server name is a valid DNS name")
}

/// The linked sites, as the replica holds them now.
pub type LinkSource = Arc<dyn Fn() -> Vec<SiteLink> + Send + Sync>;

/// Finds which linked site a client certificate belongs to. Verifiers are cached per CA.
pub struct SiteResolver {
    links: LinkSource,
    verifiers: Mutex<HashMap<String, Arc<dyn ClientCertVerifier>>>,
}

impl std::fmt::Debug for SiteResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteResolver").finish_non_exhaustive()
    }
}

impl SiteResolver {
    pub fn new(links: LinkSource) -> Self {
        SiteResolver {
            links,
            verifiers: Mutex::new(HashMap::new()),
        }
    }

    fn verifier(&self, ca_pem: &str) -> Option<Arc<dyn ClientCertVerifier>> {
        let mut cache = self.verifiers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = cache.get(ca_pem) {
            return Some(v.clone());
        }
        let roots = roots_of(ca_pem).ok()?;
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .ok()?;
        cache.insert(ca_pem.to_string(), v.clone());
        Some(v)
    }

    /// The id of the linked site whose CA signed `end_entity`, if any.
    pub fn site_of(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Option<String> {
        (self.links)().into_iter().find_map(|link| {
            let v = self.verifier(&link.ca_cert_pem)?;
            v.verify_client_cert(end_entity, intermediates, now)
                .ok()
                .map(|_| link.site.id)
        })
    }
}

/// Accepts no client certificate (only `Link` is then allowed) or one of a linked site.
#[derive(Debug)]
struct LinkedClientVerifier {
    resolver: Arc<SiteResolver>,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for LinkedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.resolver.site_of(end_entity, intermediates, now) {
            Some(_) => Ok(ClientCertVerified::assertion()),
            None => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            )),
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The federation server's TLS configuration (see the module comment).
pub fn server_config(
    id: &NodeIdentity,
    resolver: Arc<SiteResolver>,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = LinkedClientVerifier {
        resolver,
        provider: provider.clone(),
    };
    let (chain, key) = chain_and_key(id)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// A client towards a linked site: presents our certificate, trusts only `peer_ca_pem`.
pub fn client_config(
    id: &NodeIdentity,
    peer_ca_pem: &str,
) -> Result<rustls::ClientConfig, TlsError> {
    let (chain, key) = chain_and_key(id)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots_of(peer_ca_pem)?)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// A client for `Link`: no client certificate; the server must chain to a CA it presents whose
/// sha256 fingerprint is `ca_fingerprint` (from the token).
pub fn link_client_config(ca_fingerprint: &str) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = FingerprintVerifier {
        fingerprint: ca_fingerprint.to_ascii_lowercase(),
        provider: provider.clone(),
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// Verifies a server against the CA of its chain that has the pinned fingerprint. The CA is
/// then a trust root chosen by the token, not by the server: a server presenting any other CA
/// (or none) fails.
#[derive(Debug)]
struct FingerprintVerifier {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for FingerprintVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| hex::encode(Sha256::digest(c.as_ref())) == self.fingerprint)
        else {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::federation::SiteIdentity;
    use raft::tls::{ca_fingerprint, generate_ca};

    fn site(id: &str) -> (NodeIdentity, SiteLink) {
        let ca = generate_ca(id).unwrap();
        let node = NodeIdentity::issue(&ca, &format!("{id}-n1")).unwrap();
        let link = SiteLink {
            site: SiteIdentity {
                id: id.into(),
                name: id.into(),
            },
            ca_cert_pem: ca.cert_pem,
            addrs: vec![],
            created_at: 0,
            updated_at: 0,
        };
        (node, link)
    }

    /// Runs one handshake; returns the site the server resolved for the client, or the error.
    async fn handshake(
        server: &NodeIdentity,
        linked: Vec<SiteLink>,
        client: rustls::ClientConfig,
    ) -> Result<Option<String>, String> {
        let resolver = Arc::new(SiteResolver::new(Arc::new(move || linked.clone())));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
            server_config(server, resolver.clone()).unwrap(),
        ));
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (s, c) = tokio::join!(acceptor.accept(a), connector.connect(server_name(), b));
        let (s, c) = (s.map_err(|e| e.to_string())?, c.map_err(|e| e.to_string())?);
        drop(c);
        let (_, conn) = s.get_ref();
        Ok(conn.peer_certificates().and_then(|certs| {
            let (ee, rest) = certs.split_first()?;
            resolver.site_of(ee, rest, UnixTime::now())
        }))
    }

    #[tokio::test]
    async fn only_linked_sites_certificates_are_accepted_and_named() {
        let (a, _) = site("aaaaaa");
        let (b, b_link) = site("bbbbbb");
        let (c, c_link) = site("cccccc");
        let a_ca = a.ca_cert_pem.clone();
        // b is linked at a: accepted and named.
        let got = handshake(&a, vec![b_link.clone()], client_config(&b, &a_ca).unwrap()).await;
        assert_eq!(got, Ok(Some("bbbbbb".into())));
        // c is not linked at a: refused at the handshake.
        let got = handshake(&a, vec![b_link.clone()], client_config(&c, &a_ca).unwrap()).await;
        assert!(got.is_err(), "unlinked CA accepted: {got:?}");
        // With c linked too, c is told apart from b.
        let got = handshake(&a, vec![b_link, c_link], client_config(&c, &a_ca).unwrap()).await;
        assert_eq!(got, Ok(Some("cccccc".into())));
    }

    #[tokio::test]
    async fn the_client_pins_the_peer_ca_and_link_pins_the_token_fingerprint() {
        let (a, _) = site("aaaaaa");
        let (b, _) = site("bbbbbb");
        // b expects another CA than a's: refused by the client.
        let got = handshake(&a, vec![], client_config(&b, &b.ca_cert_pem).unwrap()).await;
        assert!(got.is_err(), "wrong server CA accepted: {got:?}");
        // Link: no client certificate (allowed, names no site), server pinned by fingerprint.
        let fp = ca_fingerprint(&a.ca_cert_pem).unwrap();
        let got = handshake(&a, vec![], link_client_config(&fp).unwrap()).await;
        assert_eq!(got, Ok(None));
        let wrong = ca_fingerprint(&b.ca_cert_pem).unwrap();
        let got = handshake(&a, vec![], link_client_config(&wrong).unwrap()).await;
        assert!(got.is_err(), "wrong fingerprint accepted: {got:?}");
    }
}
