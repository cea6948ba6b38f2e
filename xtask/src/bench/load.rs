//! The closed-loop write load and the leader-failover measurement, shared by both systems.
//!
//! Closed loop: each of N clients sends one write, waits for its answer, and sends the next, for
//! a fixed duration; client i always talks to member i mod 3, so the load is spread over every
//! member's API and followers' forwarding is part of what is measured.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use reqwest::{Client, RequestBuilder};
use tokio::task::JoinSet;

/// Builds one durable write: (client, member base URL, a key unique in this run) -> request.
pub(crate) type MakeWrite = Arc<dyn Fn(&Client, &str, &str) -> RequestBuilder + Send + Sync>;

/// Where and how to write.
#[derive(Clone)]
pub(crate) struct WriteTarget {
    pub(crate) urls: Vec<String>,
    pub(crate) make: MakeWrite,
}

/// What one load run at one concurrency measured.
pub(crate) struct LoadSummary {
    pub(crate) concurrency: usize,
    pub(crate) ok: u64,
    pub(crate) errors: u64,
    pub(crate) elapsed: Duration,
    /// Latencies of successful writes, in microseconds.
    pub(crate) hist: Histogram<u64>,
    /// One error message, to tell what went wrong when `errors` is not zero.
    pub(crate) sample_error: Option<String>,
}

impl LoadSummary {
    pub(crate) fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }
}

/// A request that takes longer than this counts as an error; it bounds every client's loop.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Latencies above this are clamped into the histogram's top bucket.
const MAX_LATENCY_US: u64 = 60_000_000;

/// An HTTP client for loopback with at most `connections` pooled connections per member.
pub(crate) fn http_client(connections: usize) -> Result<Client> {
    Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(connections)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("building the HTTP client")
}

fn new_histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).context("creating a latency histogram")
}

/// Runs `concurrency` closed-loop clients for `duration` against `target`.
pub(crate) async fn run(
    target: &WriteTarget,
    concurrency: usize,
    duration: Duration,
    key_prefix: &str,
) -> Result<LoadSummary> {
    // One client per run, so the connections of a run at 500 are closed before the next one.
    let client = http_client(concurrency.div_ceil(target.urls.len().max(1)))?;
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = JoinSet::new();
    for worker in 0..concurrency {
        let client = client.clone();
        let make = Arc::clone(&target.make);
        let url = target.urls[worker % target.urls.len()].clone();
        let prefix = format!("{key_prefix}-{worker}");
        tasks.spawn(async move {
            let mut hist = new_histogram()?;
            let (mut ok, mut errors, mut sample_error) = (0u64, 0u64, None);
            let mut seq = 0u64;
            while Instant::now() < deadline {
                let key = format!("{prefix}-{seq}");
                seq += 1;
                let t0 = Instant::now();
                let outcome = make(&client, &url, &key).send().await;
                let took = t0.elapsed();
                match outcome {
                    Ok(resp) if resp.status().is_success() => {
                        ok += 1;
                        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
                        hist.saturating_record(us.clamp(1, MAX_LATENCY_US));
                    }
                    Ok(resp) => {
                        errors += 1;
                        let status = resp.status();
                        let body = resp.text().await.unwrap_or_default();
                        sample_error.get_or_insert_with(|| format!("{status}: {body}"));
                    }
                    Err(e) => {
                        errors += 1;
                        sample_error.get_or_insert_with(|| format!("{e}"));
                    }
                }
            }
            anyhow::Ok((hist, ok, errors, sample_error))
        });
    }
    let mut total = LoadSummary {
        concurrency,
        ok: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        hist: new_histogram()?,
        sample_error: None,
    };
    while let Some(joined) = tasks.join_next().await {
        let (hist, ok, errors, sample_error) = joined.context("a load client panicked")??;
        total.hist.add(&hist).context("merging histograms")?;
        total.ok += ok;
        total.errors += errors;
        if total.sample_error.is_none() {
            total.sample_error = sample_error;
        }
    }
    // The last requests may end after the deadline: count the time they really took.
    total.elapsed = started.elapsed();
    Ok(total)
}

/// How long failover may take before a trial counts as failed.
pub(crate) const FAILOVER_DEADLINE: Duration = Duration::from_secs(30);
/// A new write attempt starts this often while no write has succeeded yet.
const ATTEMPT_EVERY: Duration = Duration::from_millis(10);
/// Each attempt gives up after this long; a write that waits for a new leader answers sooner.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

/// From `killed_at`, sends writes to the surviving members (a new one every 10 ms, alternating
/// between them, several in flight) and returns the time until the first one succeeds.
/// Overlapping attempts make the measurement independent of any single request's timeout.
pub(crate) async fn time_to_first_write(
    target: &WriteTarget,
    survivors: &[usize],
    killed_at: Instant,
    key_prefix: &str,
) -> Result<Option<Duration>> {
    let client = Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .timeout(ATTEMPT_TIMEOUT)
        .build()
        .context("building the HTTP client")?;
    let deadline = killed_at + FAILOVER_DEADLINE;
    let mut tick = tokio::time::interval(ATTEMPT_EVERY);
    let mut in_flight = JoinSet::new();
    let mut n = 0usize;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                let url = target.urls[survivors[n % survivors.len()]].clone();
                let request = (target.make)(&client, &url, &format!("{key_prefix}-{n}"));
                n += 1;
                in_flight.spawn(async move {
                    match request.send().await {
                        Ok(resp) if resp.status().is_success() => Some(Instant::now()),
                        _ => None,
                    }
                });
            }
            Some(joined) = in_flight.join_next() => {
                if let Ok(Some(done_at)) = joined {
                    in_flight.abort_all();
                    return Ok(Some(done_at.duration_since(killed_at)));
                }
            }
        }
    }
}
