//! The REST API of NovaCron, served by every node.
//!
//! Handlers authenticate, validate, turn requests into `raft::Command`s and hand them to the
//! cluster through the [`ControlPlane`] trait; they never touch storage or Raft directly. Errors
//! are one enum ([`ApiError`]) rendered as RFC 9457 problem+json.

pub mod auth;
pub mod control;
pub mod error;
pub mod events;
pub mod federation;
pub mod limits;
pub mod metrics;
pub mod openapi;
mod routes;
pub mod scheduler;
pub mod totp;

use std::sync::Arc;
use std::time::Duration;

pub use control::{
    ClusterError, ClusterStatus, Consistency, ControlPlane, JoinRequest, JoinResponse,
};
pub use error::{ApiError, ApiResult};

/// Settings of the HTTP layer.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest accepted request body.
    pub body_limit: usize,
    /// Longest time a request may take before it is answered 408/503.
    pub request_timeout: Duration,
    /// Lifetime of login tokens.
    pub token_ttl: Duration,
    /// Per-user, per-tenant and per-address request limits.
    pub rate_limits: limits::RateLimits,
    /// Origins allowed to call the API from a browser. Empty (the default) sends no CORS
    /// headers at all, so browsers refuse cross-origin calls.
    pub cors_allow_origins: Vec<String>,
    /// JWT signing keys kept after a rotation (the newest signs, all verify).
    pub jwt_keys_kept: u32,
    /// A linked site whose catalog is older than this is shown as stale.
    pub site_stale_after: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            body_limit: 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            token_ttl: Duration::from_secs(12 * 3600),
            rate_limits: limits::RateLimits::default(),
            cors_allow_origins: Vec::new(),
            jwt_keys_kept: 3,
            site_stale_after: Duration::from_secs(15),
        }
    }
}

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub cp: Arc<dyn ControlPlane>,
    pub config: Arc<ApiConfig>,
    pub metrics: metrics::ApiMetrics,
    pub limiters: Arc<limits::Limiters>,
    pub events: Arc<events::EventBuffer>,
}

impl AppState {
    pub fn new(cp: Arc<dyn ControlPlane>, config: ApiConfig) -> Self {
        Self {
            limiters: Arc::new(limits::Limiters::new(&config.rate_limits)),
            events: Arc::new(events::EventBuffer::new(cp.clone())),
            cp,
            config: Arc::new(config),
            metrics: metrics::ApiMetrics::new(),
        }
    }
}

/// The whole HTTP surface of a node, with its middleware applied once.
pub fn router(state: AppState) -> axum::Router {
    routes::router(state)
}

/// Milliseconds since the Unix epoch: the proposer's clock, read before a command is proposed.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
