//! The cluster CA, node certificates, join tokens and the rustls configurations built from them.
//!
//! Every node holds a [`NodeIdentity`]: the cluster CA certificate (the only trust root), its own
//! certificate signed by that CA and its private key. A node's certificate carries two DNS names,
//! the node name and the shared name [`CLUSTER_SERVER_NAME`], so that a client can verify any
//! peer with one fixed SNI while the node name stays available for auditing.
//!
//! A [`JoinToken`] binds a joining node to one CA (by fingerprint, as kubeadm does) and proves
//! the holder was given the token by an operator (by the secret, whose hash the cluster stores).
//! This module does not decide who may join; it only provides the primitives.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// The DNS name every node certificate carries and every client verifies (the SNI).
pub const CLUSTER_SERVER_NAME: &str = "novacron";
/// The ALPN protocol of node-to-node QUIC connections.
pub const ALPN: &[u8] = b"novacron/1";
/// The prefix of the current join token format.
const JOIN_TOKEN_PREFIX: &str = "nct1";

const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
const NODE_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start to be valid a little in the past, so that a peer whose clock is slightly
/// behind does not reject a fresh certificate.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);

const CA_FILE: &str = "ca.pem";
const CERT_FILE: &str = "node.pem";
const KEY_FILE: &str = "node.key";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation failed")]
    Generate(#[source] rcgen::Error),
    #[error("certificate signing request is invalid")]
    InvalidCsr(#[source] rcgen::Error),
    #[error("CA certificate or key is invalid")]
    InvalidCa(#[source] rcgen::Error),
    #[error("no certificate found in PEM")]
    NoCertificate,
    #[error("no private key found in PEM")]
    NoPrivateKey,
    #[error("system clock is outside the range of a certificate date")]
    Clock,
    #[error("cannot access {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("join token is malformed: {0}")]
    MalformedToken(&'static str),
    #[error("TLS configuration rejected")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier rejected the CA")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The cluster certificate authority. Only the nodes that sign certificates need the key.
#[derive(Clone)]
pub struct CaBundle {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaBundle")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

fn unix_now() -> Result<i64, TlsError> {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| TlsError::Clock)?
        .as_secs();
    i64::try_from(secs).map_err(|_| TlsError::Clock)
}

/// Sets `not_before`/`not_after` around the current time.
fn set_validity(params: &mut CertificateParams, validity: Duration) -> Result<(), TlsError> {
    let now = unix_now()?;
    let skew = i64::try_from(CLOCK_SKEW.as_secs()).map_err(|_| TlsError::Clock)?;
    let span = i64::try_from(validity.as_secs()).map_err(|_| TlsError::Clock)?;
    params.not_before =
        time::OffsetDateTime::from_unix_timestamp(now - skew).map_err(|_| TlsError::Clock)?;
    params.not_after =
        time::OffsetDateTime::from_unix_timestamp(now + span).map_err(|_| TlsError::Clock)?;
    Ok(())
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    // A positive DER integer: clear the top bit.
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

/// Creates a new self-signed cluster CA for the cluster `cluster_id`.
pub fn generate_ca(cluster_id: &str) -> Result<CaBundle, TlsError> {
    let key = KeyPair::generate().map_err(TlsError::Generate)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("novacron cluster CA {cluster_id}"),
    );
    dn.push(DnType::OrganizationName, "novacron");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    set_validity(&mut params, CA_VALIDITY)?;
    let cert = params.self_signed(&key).map_err(TlsError::Generate)?;
    Ok(CaBundle {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn first_cert_der(pem: &str) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|_| TlsError::NoCertificate)
}

/// The hex SHA-256 of the CA certificate's DER: what a join token pins.
pub fn ca_fingerprint(ca_cert_pem: &str) -> Result<String, TlsError> {
    let der = first_cert_der(ca_cert_pem)?;
    Ok(hex::encode(Sha256::digest(der.as_ref())))
}

/// A node's private key and the certificate signing request that goes to the CA.
/// The key never leaves the node.
#[derive(Clone)]
pub struct NodeKey {
    pub key_pem: String,
    pub csr_pem: String,
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeKey")
            .field("key_pem", &"<redacted>")
            .field("csr_pem", &self.csr_pem)
            .finish()
    }
}

impl NodeKey {
    /// Generates a key pair and a CSR naming `node_name`.
    pub fn generate(node_name: &str) -> Result<NodeKey, TlsError> {
        let key = KeyPair::generate().map_err(TlsError::Generate)?;
        let mut params =
            CertificateParams::new(vec![node_name.to_string()]).map_err(TlsError::Generate)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node_name);
        params.distinguished_name = dn;
        let csr = params.serialize_request(&key).map_err(TlsError::Generate)?;
        Ok(NodeKey {
            key_pem: key.serialize_pem(),
            csr_pem: csr.pem().map_err(TlsError::Generate)?,
        })
    }
}

/// Signs a node certificate for the public key in `csr_pem`.
///
/// Only the CSR's key is used (after its signature is checked): names, usages and validity are
/// chosen here, so a joining node cannot ask for a CA certificate or a foreign name.
pub fn sign_node_csr(ca: &CaBundle, csr_pem: &str, node_name: &str) -> Result<String, TlsError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(TlsError::InvalidCsr)?;
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(TlsError::InvalidCa)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(TlsError::InvalidCa)?;

    let mut params =
        CertificateParams::new(vec![node_name.to_string(), CLUSTER_SERVER_NAME.to_string()])
            .map_err(TlsError::Generate)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.serial_number = Some(random_serial());
    set_validity(&mut params, NODE_VALIDITY)?;
    let cert = params
        .signed_by(&csr.public_key, &issuer)
        .map_err(TlsError::Generate)?;
    Ok(cert.pem())
}

/// What a node needs to speak mTLS with its peers.
#[derive(Clone)]
pub struct NodeIdentity {
    pub ca_cert_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("ca_cert_pem", &self.ca_cert_pem)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

fn io_err(path: &Path, source: std::io::Error) -> TlsError {
    TlsError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl NodeIdentity {
    /// Issues a fresh identity for `node_name` from a CA held locally (the first node, tests).
    pub fn issue(ca: &CaBundle, node_name: &str) -> Result<NodeIdentity, TlsError> {
        let key = NodeKey::generate(node_name)?;
        let cert_pem = sign_node_csr(ca, &key.csr_pem, node_name)?;
        Ok(NodeIdentity {
            ca_cert_pem: ca.cert_pem.clone(),
            cert_pem,
            key_pem: key.key_pem,
        })
    }

    /// Writes `ca.pem`, `node.pem` and `node.key` (mode 0600) into `dir`, creating it.
    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        write_file(&dir.join(CA_FILE), &self.ca_cert_pem, 0o644)?;
        write_file(&dir.join(CERT_FILE), &self.cert_pem, 0o644)?;
        write_file(&dir.join(KEY_FILE), &self.key_pem, 0o600)?;
        Ok(())
    }

    /// Reads what [`NodeIdentity::save`] wrote.
    pub fn load(dir: &Path) -> Result<NodeIdentity, TlsError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| io_err(&path, e))
        };
        Ok(NodeIdentity {
            ca_cert_pem: read(CA_FILE)?,
            cert_pem: read(CERT_FILE)?,
            key_pem: read(KEY_FILE)?,
        })
    }

    fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(first_cert_der(&self.ca_cert_pem)?)?;
        Ok(roots)
    }

    fn chain_and_key(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| TlsError::NoCertificate)?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate);
        }
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|_| TlsError::NoPrivateKey)?;
        Ok((chain, key))
    }

    /// The server side: presents this node's certificate and requires a client certificate that
    /// chains to the cluster CA (the only trust root).
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let provider = ring_provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots()?),
            provider.clone(),
        )
        .build()?;
        let (chain, key) = self.chain_and_key()?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// The client side: verifies the server against the cluster CA and presents this node's
    /// certificate.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let (chain, key) = self.chain_and_key()?;
        let mut config = rustls::ClientConfig::builder_with_provider(ring_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(chain, key)?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }
}

/// Installs ring as the process-wide rustls provider (once; later calls are no-ops) and returns
/// it. Our configurations name the provider explicitly; the global one matters for other TLS
/// users in the process, which would otherwise pick aws-lc-rs and clash at run time.
pub fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    // The error only says a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Arc::new(rustls::crypto::ring::default_provider())
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    // `mode` only applies to a new file; an existing key file must be tightened too.
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_err(path, e))?;
    file.write_all(contents.as_bytes())
        .map_err(|e| io_err(path, e))?;
    file.sync_all().map_err(|e| io_err(path, e))
}

/// A join token: `nct1.<CA fingerprint hex>.<secret hex>`.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Hex SHA-256 of the CA certificate the joining node must see.
    pub ca_fingerprint: String,
    /// 32 random bytes.
    pub secret: [u8; 32],
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("ca_fingerprint", &self.ca_fingerprint)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl JoinToken {
    /// A new token for the CA with fingerprint `ca_fingerprint`, with a fresh random secret.
    pub fn generate(ca_fingerprint: &str) -> JoinToken {
        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        JoinToken {
            ca_fingerprint: ca_fingerprint.to_ascii_lowercase(),
            secret,
        }
    }

    /// The hex SHA-256 of the secret: what the cluster stores instead of the secret.
    pub fn secret_sha256(&self) -> String {
        hex::encode(Sha256::digest(self.secret))
    }

    /// Whether this token's secret hashes to `expected_sha256_hex`, compared in constant time
    /// so that response timing does not reveal how many bytes matched.
    pub fn verify_secret(&self, expected_sha256_hex: &str) -> bool {
        let Ok(expected) = hex::decode(expected_sha256_hex) else {
            return false;
        };
        let actual = Sha256::digest(self.secret);
        if expected.len() != actual.len() {
            return false;
        }
        let diff = actual
            .iter()
            .zip(expected.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{JOIN_TOKEN_PREFIX}.{}.{}",
            self.ca_fingerprint,
            hex::encode(self.secret)
        )
    }
}

impl FromStr for JoinToken {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.trim().split('.');
        let (Some(prefix), Some(fp), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TlsError::MalformedToken(
                "expected three dot-separated parts",
            ));
        };
        if prefix != JOIN_TOKEN_PREFIX {
            return Err(TlsError::MalformedToken("unknown token version"));
        }
        let fp_bytes =
            hex::decode(fp).map_err(|_| TlsError::MalformedToken("fingerprint is not hex"))?;
        if fp_bytes.len() != 32 {
            return Err(TlsError::MalformedToken("fingerprint is not 32 bytes"));
        }
        let secret_bytes =
            hex::decode(secret).map_err(|_| TlsError::MalformedToken("secret is not hex"))?;
        let secret: [u8; 32] = secret_bytes
            .try_into()
            .map_err(|_| TlsError::MalformedToken("secret is not 32 bytes"))?;
        Ok(JoinToken {
            ca_fingerprint: fp.to_ascii_lowercase(),
            secret,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_round_trip_yields_a_cert_chaining_to_the_ca() {
        let ca = generate_ca("c1").unwrap();
        let key = NodeKey::generate("node-a").unwrap();
        let cert_pem = sign_node_csr(&ca, &key.csr_pem, "node-a").unwrap();
        let der = first_cert_der(&cert_pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        let ca_der = first_cert_der(&ca.cert_pem).unwrap();
        let (_, ca_cert) = x509_parser::parse_x509_certificate(ca_der.as_ref()).unwrap();
        assert_eq!(cert.issuer(), ca_cert.subject());
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(sans, vec!["DNSName(node-a)", "DNSName(novacron)"]);
        assert!(!cert.is_ca());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        // The key in the certificate is the one the node generated.
        let node_key = KeyPair::from_pem(&key.key_pem).unwrap();
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            rcgen::PublicKeyData::der_bytes(&node_key)
        );
        // Both rustls configurations accept the identity.
        let id = NodeIdentity {
            ca_cert_pem: ca.cert_pem.clone(),
            cert_pem,
            key_pem: key.key_pem,
        };
        id.server_config().unwrap();
        id.client_config().unwrap();
    }

    #[test]
    fn a_tampered_csr_is_rejected() {
        let ca = generate_ca("c1").unwrap();
        assert!(matches!(
            sign_node_csr(&ca, "not a csr", "x"),
            Err(TlsError::InvalidCsr(_))
        ));
    }

    #[test]
    fn identity_save_and_load() {
        use std::os::unix::fs::PermissionsExt;
        let ca = generate_ca("c1").unwrap();
        let id = NodeIdentity::issue(&ca, "n1").unwrap();
        let dir = tempfile::tempdir().unwrap();
        id.save(dir.path()).unwrap();
        let back = NodeIdentity::load(dir.path()).unwrap();
        assert_eq!(back.cert_pem, id.cert_pem);
        assert_eq!(back.key_pem, id.key_pem);
        assert_eq!(back.ca_cert_pem, id.ca_cert_pem);
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!format!("{id:?}").contains("PRIVATE KEY"));
        assert!(!format!("{ca:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn join_token_format_parse_and_secret_check() {
        let ca = generate_ca("c1").unwrap();
        let fp = ca_fingerprint(&ca.cert_pem).unwrap();
        assert_eq!(fp.len(), 64);
        let token = JoinToken::generate(&fp);
        let text = token.to_string();
        assert!(text.starts_with(&format!("nct1.{fp}.")));
        let parsed: JoinToken = text.parse().unwrap();
        assert_eq!(parsed, token);
        assert!(parsed.verify_secret(&token.secret_sha256()));

        let other = JoinToken::generate(&fp);
        assert!(!parsed.verify_secret(&other.secret_sha256()));
        assert!(!parsed.verify_secret("zz"));
        assert!(!parsed.verify_secret(""));

        for bad in [
            "",
            "nct1.abc",
            "nct2.".to_string().as_str(),
            &text.replacen("nct1", "nct2", 1),
            &format!("nct1.{fp}.00"),
            &format!("nct1.{}.{}", &fp[..10], hex::encode([0u8; 32])),
            &format!("{text}.extra"),
        ] {
            assert!(bad.parse::<JoinToken>().is_err(), "accepted {bad:?}");
        }
    }
}
