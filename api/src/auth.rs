//! Identity: argon2 password hashes, HS256 JWTs signed with the cluster's replicated keys, and
//! the `Caller` extractor every protected route takes.
//!
//! Keys live in the replicated state (`ClusterSecrets::jwt_keys`, newest first), so a token
//! issued by one node verifies on every node, and a rotated-out key stops verifying everywhere.

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use raft::model::{ClusterSecrets, Role, User};
use raft::{codec, keys};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// Hashes a password with argon2id and a random salt (PHC string).
pub fn hash_password(password: &str) -> Result<String, ApiError> {
    // The salt is drawn from the operating system's random source by argon2 itself.
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| ApiError::Internal(format!("password hashing failed: {e}")))
}

/// Checks a password against a stored PHC string. A malformed hash never verifies.
pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// What a token says about its bearer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub name: String,
    pub tenant: String,
    pub iat: u64,
    pub exp: u64,
    pub jti: String,
}

fn key_id(key: &[u8]) -> String {
    hex::encode(&Sha256::digest(key)[..8])
}

pub fn issue_token(
    secrets: &ClusterSecrets,
    user: &User,
    now_secs: u64,
    ttl_secs: u64,
) -> ApiResult<String> {
    let key = secrets
        .jwt_keys
        .first()
        .ok_or_else(|| ApiError::Internal("cluster has no signing key".into()))?;
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(key_id(key));
    let claims = Claims {
        sub: user.id.clone(),
        name: user.username.clone(),
        tenant: user.tenant.clone(),
        iat: now_secs,
        exp: now_secs + ttl_secs,
        jti: uuid::Uuid::new_v4().to_string(),
    };
    let key = EncodingKey::from_secret(key)
        .map_err(|e| ApiError::Internal(format!("signing key is unusable: {e}")))?;
    jsonwebtoken::encode(&header, &claims, &key)
        .map_err(|e| ApiError::Internal(format!("token signing failed: {e}")))
}

pub fn verify_token(secrets: &ClusterSecrets, token: &str) -> ApiResult<Claims> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| ApiError::BadToken)?;
    let kid = header.kid.ok_or(ApiError::BadToken)?;
    let key = secrets
        .jwt_keys
        .iter()
        .find(|k| key_id(k) == kid)
        .ok_or(ApiError::BadToken)?;
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 5;
    let key = DecodingKey::from_secret(key).map_err(|_| ApiError::BadToken)?;
    jsonwebtoken::decode::<Claims>(token, &key, &validation)
        .map(|d| d.claims)
        .map_err(|_| ApiError::BadToken)
}

/// The authenticated caller of a request, as currently stored (role changes apply at once).
#[derive(Debug, Clone)]
pub struct Caller {
    pub user_id: String,
    pub username: String,
    pub tenant: String,
    pub role: Role,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Requires at least `role` within the caller's scope.
    pub fn require(&self, role: Role) -> ApiResult<()> {
        if self.role <= role {
            Ok(())
        } else {
            Err(ApiError::Forbidden)
        }
    }

    /// Whether the caller may see objects of `tenant` (admins see every tenant).
    pub fn sees_tenant(&self, tenant: &str) -> bool {
        self.is_admin() || self.tenant == tenant
    }
}

pub(crate) fn load_secrets(state: &AppState) -> ApiResult<ClusterSecrets> {
    let bytes = state
        .cp
        .get(keys::SECRETS)?
        .ok_or(ApiError::Cluster(crate::control::ClusterError::NoLeader))?;
    codec::decode(&bytes).map_err(|e| ApiError::Internal(e.to_string()))
}

pub(crate) fn load_user(state: &AppState, id: &str) -> ApiResult<Option<User>> {
    match state.cp.get(&keys::user(id))? {
        Some(bytes) => Ok(Some(
            codec::decode(&bytes).map_err(|e| ApiError::Internal(e.to_string()))?,
        )),
        None => Ok(None),
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(ApiError::Unauthenticated)?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or(ApiError::Unauthenticated)?
            .trim();
        let secrets = load_secrets(state)?;
        let claims = verify_token(&secrets, token)?;
        let user = load_user(state, &claims.sub)?.ok_or(ApiError::BadToken)?;
        Ok(Caller {
            user_id: user.id,
            username: user.username,
            tenant: user.tenant,
            role: user.role,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(keys: Vec<Vec<u8>>) -> ClusterSecrets {
        ClusterSecrets {
            cluster_id: "c".into(),
            ca_cert_pem: String::new(),
            ca_key_pem: String::new(),
            jwt_keys: keys,
            join_secret_sha256: String::new(),
            created_at: 0,
        }
    }

    fn user() -> User {
        User {
            id: "u1".into(),
            username: "ann".into(),
            password_hash: String::new(),
            tenant: "t1".into(),
            role: Role::Viewer,
            created_at: 0,
            updated_at: 0,
            version: 1,
        }
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("s3cret").unwrap();
        assert!(verify_password("s3cret", &h));
        assert!(!verify_password("S3cret", &h));
        assert!(!verify_password("s3cret", "not-a-hash"));
    }

    #[test]
    fn tokens_verify_with_old_keys_until_rotated_out() {
        let old = secrets(vec![b"k1".to_vec()]);
        let t = issue_token(&old, &user(), now(), 60).unwrap();
        assert_eq!(verify_token(&old, &t).unwrap().sub, "u1");
        let rotated = secrets(vec![b"k2".to_vec(), b"k1".to_vec()]);
        assert!(verify_token(&rotated, &t).is_ok());
        let dropped = secrets(vec![b"k2".to_vec()]);
        assert!(matches!(
            verify_token(&dropped, &t),
            Err(ApiError::BadToken)
        ));
    }

    #[test]
    fn expired_and_tampered_tokens_fail() {
        let s = secrets(vec![b"k1".to_vec()]);
        let expired = issue_token(&s, &user(), now() - 3600, 60).unwrap();
        assert!(verify_token(&s, &expired).is_err());
        let t = issue_token(&s, &user(), now(), 60).unwrap();
        let mut tampered = t.clone();
        tampered.pop();
        tampered.push(if t.ends_with('A') { 'B' } else { 'A' });
        assert!(verify_token(&s, &tampered).is_err());
    }
}
