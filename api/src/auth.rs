//! Identity: argon2 password hashes, HS256 JWTs signed with the cluster's replicated keys, and
//! the `Caller` extractor every protected route takes.
//!
//! Bearer credentials are either JWTs or API keys (`nck_<id>_<secret>`); both are checked
//! against the replicated state on every request, so a revocation committed through Raft takes
//! effect on every node at once. Rate limits are charged here too, once per request.
//!
//! Keys live in the replicated state (`ClusterSecrets::jwt_keys`, newest first), so a token
//! issued by one node verifies on every node, and a rotated-out key stops verifying everywhere.

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use raft::model::{ApiKey, ClusterSecrets, Role, User, UserSecurity};
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
    /// A token that may only enrol TOTP: issued when an administrator requires a second factor
    /// the user does not have yet.
    #[serde(default)]
    pub enroll_only: bool,
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
    sign_token(secrets, user, now_secs, ttl_secs, false)
}

/// A short token that allows only TOTP enrolment and confirmation for `user`.
pub fn issue_enrollment_token(
    secrets: &ClusterSecrets,
    user: &User,
    now_secs: u64,
    ttl_secs: u64,
) -> ApiResult<String> {
    sign_token(secrets, user, now_secs, ttl_secs, true)
}

fn sign_token(
    secrets: &ClusterSecrets,
    user: &User,
    now_secs: u64,
    ttl_secs: u64,
    enroll_only: bool,
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
        enroll_only,
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

/// How a caller proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A login token, with its id and expiry (seconds since the epoch).
    Token { jti: String, exp: u64 },
    /// An API key, by id.
    ApiKey { id: String },
    /// A call forwarded by a linked site on behalf of one of the users this site knows (its
    /// own or one replicated from the user's home site).
    Forwarded { site: String },
}

/// Set as a request extension by the federation endpoint, never from HTTP: the mutually
/// authenticated site `site` forwards a call made by `user_id`. Extensions cannot be set by an
/// HTTP client, so this cannot be forged from outside.
#[derive(Debug, Clone)]
pub struct ForwardedPrincipal {
    pub site: String,
    pub user_id: String,
}

/// The authenticated caller of a request, as currently stored (role changes apply at once).
#[derive(Debug, Clone)]
pub struct Caller {
    pub user_id: String,
    pub username: String,
    pub tenant: String,
    /// The effective role: for an API key, the lesser of the key's and its owner's roles.
    pub role: Role,
    pub credential: Credential,
}

/// Prefix of API keys, so that scanners and people recognise them.
pub const API_KEY_PREFIX: &str = "nck_";

/// A new API key: its id, the full bearer string (shown once) and the stored hash.
pub fn generate_api_key() -> (String, String, String) {
    use rand::RngCore;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let secret = hex::encode(secret);
    let hash = hex::encode(Sha256::digest(secret.as_bytes()));
    (id.clone(), format!("{API_KEY_PREFIX}{id}_{secret}"), hash)
}

/// Splits `nck_<id>_<secret>`; `None` when the string does not have that shape.
pub fn parse_api_key(bearer: &str) -> Option<(&str, &str)> {
    let rest = bearer.strip_prefix(API_KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some((id, secret))
}

/// Compares two byte strings in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks an API key against the stored record at `now_ms`.
pub fn verify_api_key(key: &ApiKey, secret: &str, now_ms: u64) -> ApiResult<()> {
    let hash = hex::encode(Sha256::digest(secret.as_bytes()));
    if !constant_time_eq(hash.as_bytes(), key.secret_sha256.as_bytes()) || key.revoked {
        return Err(ApiError::BadToken);
    }
    if key.expires_at.is_some_and(|exp| exp <= now_ms) {
        return Err(ApiError::BadToken);
    }
    Ok(())
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

/// A user of this site, or one replicated read-only from its home site.
pub(crate) fn load_user(state: &AppState, id: &str) -> ApiResult<Option<User>> {
    if let Some(user) = load(state, &keys::user(id))? {
        return Ok(Some(user));
    }
    crate::federation::catalog_user(state, id)
}

pub(crate) fn load_security(state: &AppState, user_id: &str) -> ApiResult<UserSecurity> {
    Ok(load(state, &keys::user_security(user_id))?.unwrap_or_default())
}

pub(crate) fn load<T>(state: &AppState, key: &[u8]) -> ApiResult<Option<T>>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    match state.cp.get(key)? {
        Some(bytes) => Ok(Some(
            codec::decode(&bytes).map_err(|e| ApiError::Internal(e.to_string()))?,
        )),
        None => Ok(None),
    }
}

/// Whether a request path is one an enrolment-only token may call. Inside the nested API
/// router the path has lost its `/api/v1` prefix, so only the end is compared.
fn enrollment_path(path: &str, user_id: &str) -> bool {
    let base = format!("/users/{user_id}/totp");
    path.ends_with(&base) || path.ends_with(&format!("{base}/confirm"))
}

/// Resolves a bearer string to the caller it stands for, refusing revoked credentials.
pub(crate) fn authenticate(state: &AppState, bearer: &str, path: &str) -> ApiResult<Caller> {
    if let Some((id, secret)) = parse_api_key(bearer) {
        let key: ApiKey = load(state, &keys::api_key(id))?.ok_or(ApiError::BadToken)?;
        verify_api_key(&key, secret, crate::now_ms())?;
        let owner = load_user(state, &key.owner)?.ok_or(ApiError::BadToken)?;
        if owner.tenant != key.tenant {
            return Err(ApiError::BadToken);
        }
        return Ok(Caller {
            user_id: owner.id,
            username: owner.username,
            tenant: owner.tenant,
            // Role order runs from most to least powerful, so the max is the lesser role: a
            // demoted owner's keys lose power at once.
            role: owner.role.max(key.role),
            credential: Credential::ApiKey { id: key.id },
        });
    }
    let secrets = load_secrets(state)?;
    let claims = verify_token(&secrets, bearer)?;
    if state.cp.get(&keys::revoked_jti(&claims.jti))?.is_some() {
        return Err(ApiError::BadToken);
    }
    if claims.enroll_only && !enrollment_path(path, &claims.sub) {
        return Err(ApiError::TotpRequired);
    }
    let user = load_user(state, &claims.sub)?.ok_or(ApiError::BadToken)?;
    Ok(Caller {
        user_id: user.id,
        username: user.username,
        tenant: user.tenant,
        role: user.role,
        credential: Credential::Token {
            jti: claims.jti,
            exp: claims.exp,
        },
    })
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if let Some(fwd) = parts.extensions.get::<ForwardedPrincipal>().cloned() {
            let user = load_user(state, &fwd.user_id)?.ok_or(ApiError::BadToken)?;
            let caller = Caller {
                user_id: user.id,
                username: user.username,
                tenant: user.tenant,
                role: user.role,
                credential: Credential::Forwarded { site: fwd.site },
            };
            state
                .limiters
                .check_caller(&caller.user_id, &caller.tenant)?;
            return Ok(caller);
        }
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(ApiError::Unauthenticated)?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or(ApiError::Unauthenticated)?
            .trim();
        let caller = authenticate(state, token, parts.uri.path())?;
        state
            .limiters
            .check_caller(&caller.user_id, &caller.tenant)?;
        Ok(caller)
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
    fn api_keys_parse_verify_expire_and_revoke() {
        let (id, bearer, hash) = generate_api_key();
        let (pid, secret) = parse_api_key(&bearer).unwrap();
        assert_eq!(pid, id);
        let mut key = ApiKey {
            id: id.clone(),
            name: "ci".into(),
            owner: "u1".into(),
            tenant: "t1".into(),
            role: Role::Viewer,
            secret_sha256: hash,
            created_at: 0,
            expires_at: Some(1000),
            revoked: false,
        };
        assert!(verify_api_key(&key, secret, 999).is_ok());
        assert!(verify_api_key(&key, secret, 1000).is_err());
        assert!(verify_api_key(&key, "wrong", 0).is_err());
        key.revoked = true;
        assert!(verify_api_key(&key, secret, 0).is_err());
        assert!(parse_api_key("nck_").is_none());
        assert!(parse_api_key("eyJhbGciOi.x.y").is_none());
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
