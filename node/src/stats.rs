//! Per-VM statistics on the node that hosts the VMs: a sampler that reads the hypervisor's
//! cumulative counters every few seconds, a bounded in-memory series per VM with rates computed
//! from consecutive samples (an hour of raw samples, then a day downsampled to one point a
//! minute), and their Prometheus form for `/metrics`.
//!
//! Nothing here is replicated: the series of a VM lives on the node running it and is lost with
//! that node's process (statistics are an observation, not state). Other nodes ask for it over
//! the `vm-metrics` extension RPC (see `console.rs`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::control::{VmMetrics, VmSample};
use hypervisor::DomainStats;
use prometheus::{Encoder, GaugeVec, Opts, Registry, TextEncoder};
use raft::keys;
use raft::model::{NodeId, Vm};
use raft::store::StateReader;
use tokio::sync::watch;

use crate::console::SharedHypervisor;

/// Raw samples kept per VM: one hour at the default 5 s interval.
pub const DEFAULT_CAPACITY: usize = 720;
/// Raw samples merged into one downsampled point once they leave the raw window (one minute
/// at the default interval).
pub const DOWNSAMPLE_EVERY: usize = 12;
/// Downsampled points kept per VM: a day of minutes.
pub const DOWNSAMPLED_CAPACITY: usize = 1_440;

/// Builds the sample taken at `at_ms` from the counters `now`, with rates over the time since
/// `prev`. A counter lower than before means the domain restarted (counters reset): that
/// interval has no rate rather than a negative or huge one.
pub fn sample(prev: Option<&VmSample>, at_ms: u64, now: &DomainStats) -> VmSample {
    let mut s = VmSample {
        at_ms,
        merged: 1,
        vcpus: now.vcpus,
        memory_bytes: now.memory_bytes,
        max_memory_bytes: now.max_memory_bytes,
        cpu_time_ns: now.cpu_time_ns,
        disk_read_bytes: now.disk_read_bytes,
        disk_write_bytes: now.disk_write_bytes,
        net_rx_bytes: now.net_rx_bytes,
        net_tx_bytes: now.net_tx_bytes,
        ..VmSample::default()
    };
    let Some(prev) = prev else {
        return s;
    };
    if at_ms <= prev.at_ms {
        return s;
    }
    let secs = (at_ms - prev.at_ms) as f64 / 1000.0;
    let per_sec = |cur: u64, old: u64| cur.checked_sub(old).map(|d| d as f64 / secs);
    // CPU nanoseconds per wall nanosecond, as a percentage of one host CPU.
    s.cpu_percent = per_sec(now.cpu_time_ns, prev.cpu_time_ns).map(|ns| ns / 1e9 * 100.0);
    s.disk_read_bytes_per_sec = per_sec(now.disk_read_bytes, prev.disk_read_bytes);
    s.disk_write_bytes_per_sec = per_sec(now.disk_write_bytes, prev.disk_write_bytes);
    s.net_rx_bytes_per_sec = per_sec(now.net_rx_bytes, prev.net_rx_bytes);
    s.net_tx_bytes_per_sec = per_sec(now.net_tx_bytes, prev.net_tx_bytes);
    s
}

/// One point standing for `samples` (oldest first, non-empty): rates are averaged over the
/// samples that have one, counters and gauges are those of the last sample.
pub fn merge(samples: &[VmSample]) -> Option<VmSample> {
    let last = samples.last()?;
    let mean = |f: fn(&VmSample) -> Option<f64>| {
        let v: Vec<f64> = samples.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    Some(VmSample {
        merged: samples.iter().map(|s| s.merged.max(1)).sum(),
        cpu_percent: mean(|s| s.cpu_percent),
        disk_read_bytes_per_sec: mean(|s| s.disk_read_bytes_per_sec),
        disk_write_bytes_per_sec: mean(|s| s.disk_write_bytes_per_sec),
        net_rx_bytes_per_sec: mean(|s| s.net_rx_bytes_per_sec),
        net_tx_bytes_per_sec: mean(|s| s.net_tx_bytes_per_sec),
        ..last.clone()
    })
}

/// The bounded series of one VM: the recent raw samples, and before them older samples
/// downsampled by [`merge`], each tier bounded. Oldest first.
#[derive(Debug, Clone)]
pub struct Series {
    raw: VecDeque<VmSample>,
    capacity: usize,
    /// Raw samples that left the raw window, waiting to fill one downsampled point.
    leaving: Vec<VmSample>,
    downsampled: VecDeque<VmSample>,
    downsample_every: usize,
    downsampled_capacity: usize,
}

impl Series {
    pub fn new(capacity: usize) -> Self {
        Self::with_downsampling(capacity, DOWNSAMPLE_EVERY, DOWNSAMPLED_CAPACITY)
    }

    pub fn with_downsampling(capacity: usize, every: usize, downsampled_capacity: usize) -> Self {
        Self {
            raw: VecDeque::new(),
            capacity: capacity.max(1),
            leaving: Vec::new(),
            downsampled: VecDeque::new(),
            downsample_every: every.max(1),
            downsampled_capacity,
        }
    }

    /// Records the counters read at `at_ms`; the oldest raw sample moves towards the
    /// downsampled tier, whose oldest point is dropped when it is full.
    pub fn push(&mut self, at_ms: u64, stats: &DomainStats) {
        let s = sample(self.raw.back(), at_ms, stats);
        if self.raw.len() == self.capacity {
            if let Some(old) = self.raw.pop_front() {
                self.leaving.push(old);
            }
            if self.leaving.len() >= self.downsample_every {
                if let Some(point) = merge(&self.leaving) {
                    self.downsampled.push_back(point);
                }
                self.leaving.clear();
                while self.downsampled.len() > self.downsampled_capacity {
                    self.downsampled.pop_front();
                }
            }
        }
        self.raw.push_back(s);
    }

    fn all(&self) -> impl Iterator<Item = &VmSample> {
        self.downsampled
            .iter()
            .chain(self.leaving.iter())
            .chain(self.raw.iter())
    }

    /// The points taken strictly after `since_ms` (all of them for `None`), oldest first.
    pub fn since(&self, since_ms: Option<u64>) -> Vec<VmSample> {
        self.all()
            .filter(|s| since_ms.is_none_or(|t| s.at_ms > t))
            .cloned()
            .collect()
    }

    pub fn latest(&self) -> Option<&VmSample> {
        self.raw.back()
    }

    /// Points held, raw and downsampled.
    pub fn len(&self) -> usize {
        self.downsampled.len() + self.leaving.len() + self.raw.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Entry {
    tenant: String,
    series: Series,
}

/// The series of every VM this node hosts. Cheap to clone (shared).
#[derive(Clone)]
pub struct VmStatsStore {
    me: NodeId,
    interval: Duration,
    capacity: usize,
    inner: Arc<Mutex<BTreeMap<String, Entry>>>,
}

impl VmStatsStore {
    pub fn new(me: NodeId, interval: Duration, capacity: usize) -> Self {
        Self {
            me,
            interval,
            capacity,
            inner: Arc::default(),
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        // A panic while holding the lock cannot leave a series half-written in a way that
        // matters (each push is one VecDeque operation), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds one sample of `vm_id`.
    pub fn record(&self, vm_id: &str, tenant: &str, at_ms: u64, stats: &DomainStats) {
        let mut map = self.lock();
        let entry = map.entry(vm_id.to_string()).or_insert_with(|| Entry {
            tenant: tenant.to_string(),
            series: Series::new(self.capacity),
        });
        entry.tenant = tenant.to_string();
        entry.series.push(at_ms, stats);
    }

    /// Forgets every VM not in `keep` (deleted, or moved to another node).
    pub fn retain(&self, keep: &BTreeSet<String>) {
        self.lock().retain(|id, _| keep.contains(id));
    }

    /// The series of `vm_id` after `since_ms`; empty when nothing was sampled yet.
    pub fn metrics(&self, vm_id: &str, since_ms: Option<u64>) -> VmMetrics {
        let samples = self
            .lock()
            .get(vm_id)
            .map(|e| e.series.since(since_ms))
            .unwrap_or_default();
        VmMetrics {
            vm_id: vm_id.to_string(),
            node: self.me,
            interval_ms: self.interval.as_millis() as u64,
            samples,
        }
    }

    /// The latest sample of every VM in Prometheus text form, labelled with the VM id and its
    /// tenant. Built afresh on each scrape so a deleted VM's series disappears with it.
    pub fn render(&self) -> String {
        let registry = Registry::new();
        let labels = ["vm", "tenant"];
        let gauge = |name: &str, help: &str| -> Option<GaugeVec> {
            let g = GaugeVec::new(Opts::new(name, help), &labels).ok()?;
            registry.register(Box::new(g.clone())).ok()?;
            Some(g)
        };
        let metrics = [
            gauge("novacron_vm_vcpus", "Virtual CPUs of the VM"),
            gauge("novacron_vm_memory_bytes", "Memory assigned to the guest"),
            gauge(
                "novacron_vm_max_memory_bytes",
                "Maximum memory of the guest",
            ),
            gauge(
                "novacron_vm_cpu_time_seconds",
                "CPU time used by the guest since it started (cumulative)",
            ),
            gauge(
                "novacron_vm_disk_read_bytes",
                "Bytes read from the guest's disks since it started (cumulative)",
            ),
            gauge(
                "novacron_vm_disk_written_bytes",
                "Bytes written to the guest's disks since it started (cumulative)",
            ),
            gauge(
                "novacron_vm_network_receive_bytes",
                "Bytes received by the guest's NICs since it started (cumulative)",
            ),
            gauge(
                "novacron_vm_network_transmit_bytes",
                "Bytes sent by the guest's NICs since it started (cumulative)",
            ),
            gauge(
                "novacron_vm_cpu_percent",
                "CPU use over the last sampling interval, percent of one host CPU",
            ),
        ];
        let [Some(vcpus), Some(mem), Some(max_mem), Some(cpu), Some(rd), Some(wr), Some(rx), Some(tx), Some(cpu_pct)] =
            metrics
        else {
            return String::new();
        };
        for (id, e) in self.lock().iter() {
            let Some(s) = e.series.latest() else {
                continue;
            };
            let l = [id.as_str(), e.tenant.as_str()];
            vcpus.with_label_values(&l).set(f64::from(s.vcpus));
            mem.with_label_values(&l).set(s.memory_bytes as f64);
            max_mem.with_label_values(&l).set(s.max_memory_bytes as f64);
            cpu.with_label_values(&l).set(s.cpu_time_ns as f64 / 1e9);
            rd.with_label_values(&l).set(s.disk_read_bytes as f64);
            wr.with_label_values(&l).set(s.disk_write_bytes as f64);
            rx.with_label_values(&l).set(s.net_rx_bytes as f64);
            tx.with_label_values(&l).set(s.net_tx_bytes as f64);
            if let Some(p) = s.cpu_percent {
                cpu_pct.with_label_values(&l).set(p);
            }
        }
        let mut buf = Vec::new();
        if TextEncoder::new()
            .encode(&registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// The VMs the replica places on `me`.
fn vms_on(reader: &StateReader, me: NodeId) -> Result<Vec<Vm>, raft::store::StoreError> {
    Ok(reader
        .scan::<Vm>(keys::VM_PREFIX, None, usize::MAX)?
        .into_iter()
        .map(|(_, v)| v)
        .filter(|v| v.node == Some(me))
        .collect())
}

/// Samples the VMs placed on this node every `store.interval()` until `stop` fires. Waits for
/// the agent to connect to the hypervisor first; a VM whose domain does not exist (yet) is
/// skipped, and the series of VMs no longer placed here are dropped.
pub async fn run_sampler(
    store: VmStatsStore,
    hv: SharedHypervisor,
    reader: StateReader,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(store.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let Some(hv) = hv.get() else {
            continue;
        };
        let vms = match vms_on(&reader, store.me) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the VMs to sample");
                continue;
            }
        };
        store.retain(&vms.iter().map(|v| v.id.clone()).collect());
        for vm in vms {
            let name = hypervisor::spec::domain_name(&vm.id);
            match hv.stats(&name).await {
                Ok(stats) => store.record(&vm.id, &vm.tenant, api::now_ms(), &stats),
                Err(hypervisor::HypervisorError::NotFound { .. }) => {}
                Err(e) => tracing::debug!(vm = %vm.id, error = %e, "sampling failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(cpu_ns: u64, rd: u64, wr: u64, rx: u64, tx: u64) -> DomainStats {
        DomainStats {
            cpu_time_ns: cpu_ns,
            memory_bytes: 128 << 20,
            max_memory_bytes: 256 << 20,
            vcpus: 2,
            disk_read_bytes: rd,
            disk_write_bytes: wr,
            net_rx_bytes: rx,
            net_tx_bytes: tx,
        }
    }

    #[test]
    fn first_sample_has_counters_but_no_rates() {
        let s = sample(None, 1_000, &stats(5, 6, 7, 8, 9));
        assert_eq!(s.cpu_time_ns, 5);
        assert_eq!(s.net_tx_bytes, 9);
        assert_eq!(s.memory_bytes, 128 << 20);
        assert_eq!(s.cpu_percent, None);
        assert_eq!(s.disk_read_bytes_per_sec, None);
    }

    #[test]
    fn rates_are_deltas_over_elapsed_time() {
        let a = sample(None, 10_000, &stats(0, 1_000, 0, 0, 500));
        // 2 s later: 1 s of CPU time (50 % of one CPU), 4 KiB read, 1 MB received.
        let b = sample(
            Some(&a),
            12_000,
            &stats(1_000_000_000, 1_000 + 4096, 0, 1_000_000, 500),
        );
        assert_eq!(b.cpu_percent, Some(50.0));
        assert_eq!(b.disk_read_bytes_per_sec, Some(2048.0));
        assert_eq!(b.disk_write_bytes_per_sec, Some(0.0));
        assert_eq!(b.net_rx_bytes_per_sec, Some(500_000.0));
        assert_eq!(b.net_tx_bytes_per_sec, Some(0.0));
    }

    #[test]
    fn a_counter_reset_gives_no_rate_for_that_counter() {
        let a = sample(None, 0, &stats(9_000_000_000, 100, 100, 100, 100));
        // The domain restarted: CPU and disk counters start again from small values.
        let b = sample(Some(&a), 1_000, &stats(1_000, 10, 200, 150, 100));
        assert_eq!(b.cpu_percent, None);
        assert_eq!(b.disk_read_bytes_per_sec, None);
        assert_eq!(b.disk_write_bytes_per_sec, Some(100.0));
        assert_eq!(b.net_rx_bytes_per_sec, Some(50.0));
        // The next interval measures from the reset values again.
        let c = sample(Some(&b), 2_000, &stats(500_001_000, 20, 200, 150, 100));
        assert_eq!(c.cpu_percent, Some(50.0));
        assert_eq!(c.disk_read_bytes_per_sec, Some(10.0));
    }

    #[test]
    fn a_clock_that_did_not_advance_gives_no_rate() {
        let a = sample(None, 5_000, &stats(0, 0, 0, 0, 0));
        let b = sample(Some(&a), 5_000, &stats(10, 10, 10, 10, 10));
        assert_eq!(b.cpu_percent, None);
        assert_eq!(b.net_rx_bytes_per_sec, None);
    }

    #[test]
    fn old_samples_are_downsampled_then_dropped() {
        // 2 raw samples; every 2 leaving ones become one point; at most 2 points.
        let mut s = Series::with_downsampling(2, 2, 2);
        for i in 1..=9u64 {
            // CPU runs at 10 % for the first 4 s, then at 50 %.
            let cpu = if i <= 5 {
                i * 100_000_000
            } else {
                500_000_000 + (i - 5) * 500_000_000
            };
            s.push(i * 1_000, &stats(cpu, 0, 0, 0, 0));
        }
        let at: Vec<(u64, u32)> = s.since(None).iter().map(|x| (x.at_ms, x.merged)).collect();
        // Samples 1-2 were merged and then dropped for being the oldest point; 3-4 and 5-6
        // are points; 7 waits for a partner; 8 and 9 are raw.
        assert_eq!(
            at,
            [(4_000, 2), (6_000, 2), (7_000, 1), (8_000, 1), (9_000, 1)]
        );
        let points = s.since(None);
        assert_eq!(points[0].cpu_percent, Some(10.0));
        // Samples 5 (10 %) and 6 (50 %) average to 30 %; counters are the last one's.
        assert_eq!(points[1].cpu_percent, Some(30.0));
        assert_eq!(points[1].cpu_time_ns, 1_000_000_000);
        assert_eq!(s.len(), 5);
        let later: Vec<u64> = s.since(Some(6_000)).iter().map(|x| x.at_ms).collect();
        assert_eq!(later, [7_000, 8_000, 9_000]);
    }

    #[test]
    fn merge_averages_rates_that_exist() {
        let a = sample(None, 0, &stats(0, 0, 0, 0, 0));
        let b = sample(Some(&a), 1_000, &stats(1_000_000_000, 100, 0, 0, 0));
        let m = merge(&[a, b.clone()]).unwrap();
        assert_eq!(m.merged, 2);
        // The first sample has no rate: the mean is over the second alone.
        assert_eq!(m.cpu_percent, Some(100.0));
        assert_eq!(m.disk_read_bytes_per_sec, Some(100.0));
        assert_eq!(m.at_ms, b.at_ms);
        assert!(merge(&[]).is_none());
    }

    #[test]
    fn the_series_is_bounded_and_filtered_by_time() {
        let mut s = Series::with_downsampling(3, 1, 0);
        for i in 1..=5u64 {
            s.push(i * 1_000, &stats(i * 1_000_000_000, 0, 0, 0, 0));
        }
        assert_eq!(s.len(), 3);
        let all: Vec<u64> = s.since(None).iter().map(|x| x.at_ms).collect();
        assert_eq!(all, [3_000, 4_000, 5_000]);
        let after: Vec<u64> = s.since(Some(3_000)).iter().map(|x| x.at_ms).collect();
        assert_eq!(after, [4_000, 5_000]);
        // Rates survive eviction: each sample was computed against its predecessor.
        assert_eq!(s.latest().and_then(|x| x.cpu_percent), Some(100.0));
    }

    #[test]
    fn store_renders_latest_sample_per_vm_and_forgets_removed_vms() {
        let store = VmStatsStore::new(7, Duration::from_secs(5), 10);
        store.record("vm-a", "t1", 1_000, &stats(0, 0, 0, 0, 0));
        store.record("vm-a", "t1", 2_000, &stats(250_000_000, 0, 0, 0, 0));
        store.record("vm-b", "t2", 2_000, &stats(0, 0, 0, 0, 0));
        let text = store.render();
        assert!(
            text.contains("novacron_vm_cpu_percent{tenant=\"t1\",vm=\"vm-a\"} 25"),
            "{text}"
        );
        assert!(
            text.contains("novacron_vm_memory_bytes{tenant=\"t2\",vm=\"vm-b\"} 134217728"),
            "{text}"
        );
        let m = store.metrics("vm-a", Some(1_000));
        assert_eq!(m.node, 7);
        assert_eq!(m.interval_ms, 5_000);
        assert_eq!(m.samples.len(), 1);

        store.retain(&["vm-b".to_string()].into_iter().collect());
        assert!(store.metrics("vm-a", None).samples.is_empty());
        assert!(!store.render().contains("vm-a"));
    }
}
