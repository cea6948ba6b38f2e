//! Federation tokens: `nft1.<site id>.<CA sha256 fingerprint>.<token id>.<secret>`.
//!
//! Like a join token, a federation token binds both directions of the first contact: the
//! linking site checks the issuing site's CA against the fingerprint before it sends anything,
//! and the issuing site checks the secret against the hash it stored (and consumes the token)
//! inside `apply`, so a token links exactly once.

use std::fmt;
use std::str::FromStr;

use rand::RngCore;
use raft::federation::{FederationToken, SiteIdentity};
use sha2::{Digest, Sha256};

const PREFIX: &str = "nft1";

/// How long a federation token is valid by default.
pub const DEFAULT_TTL_MS: u64 = 24 * 3600 * 1000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("federation token is malformed: {0}")]
    Malformed(&'static str),
}

/// A parsed federation token. The secret is redacted from `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// The issuing site's id.
    pub site_id: String,
    /// Hex sha256 of the issuing site's CA certificate (DER).
    pub ca_fingerprint: String,
    pub token_id: String,
    /// Hex of 32 random bytes.
    pub secret: String,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("site_id", &self.site_id)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .field("token_id", &self.token_id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}.{}.{}.{}.{}",
            self.site_id, self.ca_fingerprint, self.token_id, self.secret
        )
    }
}

impl Token {
    /// The hex sha256 of the secret, as the issuing site stores and compares it.
    pub fn secret_sha256(&self) -> String {
        secret_sha256(&self.secret)
    }
}

/// The hex sha256 of a token secret.
pub fn secret_sha256(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Parses a token's text form.
pub fn parse(text: &str) -> Result<Token, TokenError> {
    let parts: Vec<&str> = text.trim().split('.').collect();
    let [prefix, site, fp, id, secret] = parts.as_slice() else {
        return Err(TokenError::Malformed("expected 5 dot-separated parts"));
    };
    if *prefix != PREFIX {
        return Err(TokenError::Malformed("unknown token version"));
    }
    if !SiteIdentity::valid_id(site) {
        return Err(TokenError::Malformed("bad site id"));
    }
    if fp.len() != 64 || !is_hex(fp) {
        return Err(TokenError::Malformed("bad CA fingerprint"));
    }
    if id.len() != 16 || !is_hex(id) {
        return Err(TokenError::Malformed("bad token id"));
    }
    if secret.len() != 64 || !is_hex(secret) {
        return Err(TokenError::Malformed("bad secret"));
    }
    Ok(Token {
        site_id: site.to_string(),
        ca_fingerprint: fp.to_ascii_lowercase(),
        token_id: id.to_ascii_lowercase(),
        secret: secret.to_ascii_lowercase(),
    })
}

impl FromStr for Token {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

/// A fresh token of site `site_id` whose CA has fingerprint `ca_fingerprint`, with the record
/// to commit (`Command::CreateFederationToken`): only the secret's hash is stored.
pub fn generate(
    site_id: &str,
    ca_fingerprint: &str,
    now_ms: u64,
    ttl_ms: u64,
) -> (Token, FederationToken) {
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut id);
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let token = Token {
        site_id: site_id.to_string(),
        ca_fingerprint: ca_fingerprint.to_ascii_lowercase(),
        token_id: hex::encode(id),
        secret: hex::encode(secret),
    };
    let record = FederationToken {
        id: token.token_id.clone(),
        secret_sha256: token.secret_sha256(),
        created_at: now_ms,
        expires_at: now_ms.saturating_add(ttl_ms),
    };
    (token, record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_token_parses_back_and_its_record_holds_only_the_hash() {
        let fp = "ab".repeat(32);
        let (token, record) = generate("site01", &fp, 1_000, 60_000);
        let text = token.to_string();
        assert!(text.starts_with("nft1.site01."));
        let parsed = parse(&text).unwrap();
        assert_eq!(parsed, token);
        assert_eq!(record.id, token.token_id);
        assert_eq!(record.secret_sha256, secret_sha256(&token.secret));
        assert!(!format!("{record:?}{token:?}").contains(&token.secret));
        assert_eq!(record.expires_at, 61_000);
    }

    #[test]
    fn malformed_tokens_are_refused_with_a_reason() {
        let fp = "ab".repeat(32);
        let good = generate("site01", &fp, 0, 1).0.to_string();
        assert!(parse(&good).is_ok());
        let cases = [
            ("", "expected 5"),
            (&good.replacen("nft1", "nct1", 1), "version"),
            (&good.replacen("site01", "SITE01", 1), "site id"),
            (&good.replacen(&fp, "zz", 1), "fingerprint"),
            (&format!("{good}.x"), "expected 5"),
        ];
        for (text, why) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(why), "{text:?}: {err}");
        }
        let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
        parts[4] = "g".repeat(64);
        assert!(parse(&parts.join(".")).is_err(), "non-hex secret");
    }
}
