//! Federation tokens: `nft1.<site id>.<CA sha256 fingerprint>.<token id>.<secret>`.
//!
//! The text form and its parser are `raft::federation::LinkToken` (the REST side issues tokens
//! with it); this module generates tokens with their stored record and gives parsing a typed
//! error. Like a join token, a federation token binds both directions of the first contact:
//! the linking site checks the issuing site's CA against the fingerprint before it sends
//! anything, and the issuing site checks the secret against the hash it stored (and consumes
//! the token) inside `apply`, so a token links exactly once.

use raft::federation::FederationToken;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// A parsed federation token (its `Debug` redacts the secret).
pub type Token = raft::federation::LinkToken;

/// How long a federation token is valid by default.
pub const DEFAULT_TTL_MS: u64 = 3600 * 1000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("{0}")]
    Malformed(String),
}

/// The hex sha256 of a token secret, as the issuing site stores and compares it.
pub fn secret_sha256(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Parses a token's text form.
pub fn parse(text: &str) -> Result<Token, TokenError> {
    text.parse::<Token>().map_err(TokenError::Malformed)
}

/// A fresh token of site `site_id` whose CA has fingerprint `ca_fingerprint`, with the record
/// to commit (`Command::CreateFederationToken`): only the secret's hash is stored.
pub fn generate(
    site_id: &str,
    ca_fingerprint: &str,
    now_ms: u64,
    ttl_ms: u64,
) -> (Token, FederationToken) {
    let mut id = [0u8; 16];
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
        secret_sha256: secret_sha256(&token.secret),
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
        assert_eq!(record.secret_sha256, token.secret_sha256());
        assert!(!format!("{record:?}{token:?}").contains(&token.secret));
        assert_eq!(record.expires_at, 61_000);
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let fp = "ab".repeat(32);
        let good = generate("site01", &fp, 0, 1).0.to_string();
        assert!(parse(&good).is_ok());
        let mut bad_secret: Vec<String> = good.split('.').map(str::to_string).collect();
        bad_secret[4] = "g".repeat(64);
        let cases = [
            String::new(),
            good.replacen("nft1", "nct1", 1),
            good.replacen("site01", "SITE01", 1),
            good.replacen(&fp, "zz", 1),
            format!("{good}.x"),
            bad_secret.join("."),
        ];
        for text in cases {
            assert!(parse(&text).is_err(), "{text:?} accepted");
        }
    }
}
