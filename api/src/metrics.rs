//! Prometheus metrics of the API layer: requests by route and status, and their latency.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

#[derive(Clone)]
pub struct ApiMetrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub latency: HistogramVec,
}

impl ApiMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "novacron_http_requests_total",
                "HTTP requests by route and status",
            ),
            &["method", "route", "status"],
        )
        .expect("metric definition is static and valid");
        let latency = HistogramVec::new(
            HistogramOpts::new("novacron_http_request_seconds", "HTTP request latency")
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16).expect("static buckets")),
            &["method", "route"],
        )
        .expect("metric definition is static and valid");
        // Registration only fails on duplicate names inside this fresh registry.
        let _ = registry.register(Box::new(requests.clone()));
        let _ = registry.register(Box::new(latency.clone()));
        Self {
            registry,
            requests,
            latency,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for ApiMetrics {
    fn default() -> Self {
        Self::new()
    }
}
