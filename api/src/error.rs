//! API errors: one enum, mapped to an HTTP status and a stable `code` in one exhaustive match,
//! rendered as RFC 9457 `application/problem+json`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use raft::RejectCode;
use serde::Serialize;

use crate::control::ClusterError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Validation(String),
    /// The body is not JSON at all.
    #[error("{0}")]
    MalformedBody(String),
    /// The body is not sent as `application/json`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The body is JSON of the wrong shape for this route (unknown or missing fields, types).
    #[error("{0}")]
    InvalidBody(String),
    #[error("authentication required")]
    Unauthenticated,
    #[error("invalid username or password")]
    BadCredentials,
    #[error("the token is invalid or expired")]
    BadToken,
    #[error("a TOTP code is required")]
    TotpRequired,
    #[error("this action needs a role the caller does not have")]
    Forbidden,
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PreconditionFailed(String),
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("request body is too large")]
    PayloadTooLarge,
    #[error("too many requests")]
    RateLimited { retry_after_secs: u64 },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("internal error: {0}")]
    Internal(String),
    /// An upload chunk did not start where the upload stands; resume at `expected`.
    #[error("the upload is at byte {expected}, the chunk starts at byte {got}")]
    OffsetMismatch { expected: u64, got: u64 },
    #[error("{0}")]
    ChecksumMismatch(String),
}

impl From<crate::control::ImageBytesError> for ApiError {
    fn from(e: crate::control::ImageBytesError) -> Self {
        use crate::control::ImageBytesError as E;
        match e {
            E::OffsetMismatch { expected, got } => ApiError::OffsetMismatch { expected, got },
            e @ E::ChecksumMismatch { .. } => ApiError::ChecksumMismatch(e.to_string()),
            E::Invalid(m) => ApiError::Validation(m),
            E::Cluster(c) => ApiError::Cluster(c),
        }
    }
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: String,
    code: &'a str,
}

impl ApiError {
    /// Status, stable code and title of each error. Adding a variant fails to compile here.
    pub fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            ApiError::Validation(_) => (
                StatusCode::BAD_REQUEST,
                "validation_failed",
                "Invalid request",
            ),
            ApiError::MalformedBody(_) => (
                StatusCode::BAD_REQUEST,
                "malformed_body",
                "Malformed request body",
            ),
            ApiError::UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Unsupported media type",
            ),
            ApiError::InvalidBody(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
                "Invalid request body",
            ),
            ApiError::Unauthenticated => (
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "Authentication required",
            ),
            ApiError::BadCredentials => {
                (StatusCode::UNAUTHORIZED, "bad_credentials", "Login failed")
            }
            ApiError::BadToken => (StatusCode::UNAUTHORIZED, "bad_token", "Invalid token"),
            ApiError::TotpRequired => (
                StatusCode::UNAUTHORIZED,
                "totp_required",
                "Second factor required",
            ),
            ApiError::Forbidden => (StatusCode::FORBIDDEN, "forbidden", "Forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found", "Not found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict", "Conflict"),
            ApiError::PreconditionFailed(_) => (
                StatusCode::PRECONDITION_FAILED,
                "precondition_failed",
                "Precondition failed",
            ),
            ApiError::QuotaExceeded(_) => {
                (StatusCode::CONFLICT, "quota_exceeded", "Quota exceeded")
            }
            ApiError::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "Payload too large",
            ),
            ApiError::RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "Too many requests",
            ),
            ApiError::Cluster(ClusterError::NoLeader) => {
                (StatusCode::SERVICE_UNAVAILABLE, "no_leader", "No leader")
            }
            ApiError::Cluster(ClusterError::Timeout) => (
                StatusCode::GATEWAY_TIMEOUT,
                "cluster_timeout",
                "Cluster timeout",
            ),
            ApiError::Cluster(ClusterError::NotLeader { .. }) => (
                StatusCode::MISDIRECTED_REQUEST,
                "not_leader",
                "Not the leader",
            ),
            ApiError::OffsetMismatch { .. } => (
                StatusCode::CONFLICT,
                "offset_mismatch",
                "Wrong upload offset",
            ),
            ApiError::ChecksumMismatch(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "checksum_mismatch",
                "Checksum mismatch",
            ),
            ApiError::Cluster(ClusterError::Unavailable(_)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Unavailable",
            ),
            ApiError::Cluster(ClusterError::JoinRefused(_)) => {
                (StatusCode::FORBIDDEN, "join_refused", "Join refused")
            }
            ApiError::Cluster(ClusterError::FeatureUnavailable { .. }) => (
                StatusCode::CONFLICT,
                "feature_unavailable",
                "Feature not available on every voter",
            ),
            ApiError::Cluster(ClusterError::Invalid(_)) => (
                StatusCode::BAD_REQUEST,
                "validation_failed",
                "Invalid request",
            ),
            ApiError::Cluster(ClusterError::Unsupported(_)) => {
                (StatusCode::NOT_IMPLEMENTED, "unsupported", "Not supported")
            }
            ApiError::Cluster(ClusterError::Internal(_)) | ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
            ),
        }
    }

    /// Maps a deterministic refusal of `apply` to the API error a client should see.
    pub fn from_reject(code: RejectCode, message: String) -> Self {
        match code {
            RejectCode::NotFound => ApiError::NotFound(message),
            RejectCode::AlreadyExists | RejectCode::NotEmpty | RejectCode::AlreadyInitialized => {
                ApiError::Conflict(message)
            }
            RejectCode::VersionMismatch | RejectCode::StaleEpoch => {
                ApiError::PreconditionFailed(message)
            }
            RejectCode::QuotaExceeded => ApiError::QuotaExceeded(message),
            RejectCode::Invalid => ApiError::Validation(message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, title) = self.parts();
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        }
        // Internal errors may carry stored objects (hashes included) in their message: that
        // goes to the log only, never to the client.
        let detail = match &self {
            ApiError::Internal(_) | ApiError::Cluster(ClusterError::Internal(_)) => {
                "internal error; see the node's log".to_string()
            }
            other => other.to_string(),
        };
        let body = Problem {
            kind: format!("https://novacron.dev/problems/{code}"),
            title,
            status: status.as_u16(),
            detail,
            code,
        };
        let mut resp = (status, axum::Json(body)).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let ApiError::RateLimited { retry_after_secs } = self {
            if let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if let ApiError::Cluster(ClusterError::NotLeader {
            leader_api: Some(addr),
        }) = &self
        {
            if let Ok(v) = HeaderValue::from_str(addr) {
                resp.headers_mut().insert("x-novacron-leader", v);
            }
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
