//! Request rate limits (governor): per user and per tenant on every authenticated request, and
//! per source address on login.
//!
//! Limits are kept in this node's memory, not in the replicated state: a client spreading its
//! requests over N nodes gets up to N times the limit. That is deliberate, since replicating a
//! counter per request would put every read through Raft.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::error::ApiError;

/// A sustained rate with a burst allowance. `per_second == 0` disables the limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Requests per second allowed on average.
    pub per_second: f64,
    /// Requests allowed at once after a quiet period.
    pub burst: u32,
}

impl Rate {
    fn quota(self) -> Option<Quota> {
        if self.per_second <= 0.0 || !self.per_second.is_finite() {
            return None;
        }
        let period = Duration::from_secs_f64(1.0 / self.per_second);
        let burst = NonZeroU32::new(self.burst.max(1))?;
        Quota::with_period(period).map(|q| q.allow_burst(burst))
    }
}

/// Limits of the HTTP layer, part of [`crate::ApiConfig`].
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimits {
    pub per_user: Rate,
    pub per_tenant: Rate,
    /// Login attempts per source address, to slow password guessing.
    pub login_per_ip: Rate,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            // Generous enough for automation driving a cluster hard through one account; the
            // point is to stop a runaway client from starving everyone else.
            per_user: Rate {
                per_second: 2000.0,
                burst: 4000,
            },
            per_tenant: Rate {
                per_second: 5000.0,
                burst: 10000,
            },
            login_per_ip: Rate {
                per_second: 5.0,
                burst: 20,
            },
        }
    }
}

/// The live limiters of one node.
pub struct Limiters {
    per_user: Option<DefaultKeyedRateLimiter<String>>,
    per_tenant: Option<DefaultKeyedRateLimiter<String>>,
    login_per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    clock: DefaultClock,
}

fn check<K: std::hash::Hash + Eq + Clone>(
    limiter: &Option<DefaultKeyedRateLimiter<K>>,
    key: &K,
    clock: &DefaultClock,
) -> Result<(), ApiError> {
    let Some(limiter) = limiter else {
        return Ok(());
    };
    limiter.check_key(key).map_err(|not_until| {
        let wait = not_until.wait_time_from(clock.now());
        // Retry-After has whole seconds; round up so that a client waiting that long succeeds.
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        ApiError::RateLimited {
            retry_after_secs: secs.max(1),
        }
    })
}

impl Limiters {
    pub fn new(limits: &RateLimits) -> Self {
        Self {
            per_user: limits.per_user.quota().map(DefaultKeyedRateLimiter::keyed),
            per_tenant: limits
                .per_tenant
                .quota()
                .map(DefaultKeyedRateLimiter::keyed),
            login_per_ip: limits
                .login_per_ip
                .quota()
                .map(DefaultKeyedRateLimiter::keyed),
            clock: DefaultClock::default(),
        }
    }

    /// Charges one request to a user and to its tenant.
    pub fn check_caller(&self, user_id: &str, tenant: &str) -> Result<(), ApiError> {
        check(&self.per_user, &user_id.to_string(), &self.clock)?;
        check(&self.per_tenant, &tenant.to_string(), &self.clock)
    }

    /// Charges one login attempt to a source address.
    pub fn check_login(&self, ip: IpAddr) -> Result<(), ApiError> {
        check(&self.login_per_ip, &ip, &self.clock)
    }

    /// Forgets keys whose limit is fully replenished, so memory stays bounded.
    pub fn prune(&self) {
        if let Some(l) = &self.per_user {
            l.retain_recent();
        }
        if let Some(l) = &self.per_tenant {
            l.retain_recent();
        }
        if let Some(l) = &self.login_per_ip {
            l.retain_recent();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_allowed_then_refused_with_a_retry_time() {
        let l = Limiters::new(&RateLimits {
            per_user: Rate {
                per_second: 0.5,
                burst: 2,
            },
            per_tenant: Rate {
                per_second: 0.0,
                burst: 0,
            },
            login_per_ip: Rate {
                per_second: 0.0,
                burst: 0,
            },
        });
        assert!(l.check_caller("u", "t").is_ok());
        assert!(l.check_caller("u", "t").is_ok());
        match l.check_caller("u", "t") {
            Err(ApiError::RateLimited { retry_after_secs }) => {
                assert!((1..=2).contains(&retry_after_secs))
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        // Another user has its own budget; disabled limits never refuse.
        assert!(l.check_caller("v", "t").is_ok());
        assert!(l.check_login("127.0.0.1".parse().unwrap()).is_ok());
    }
}
