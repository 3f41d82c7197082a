//! A latency histogram that every connection records into with relaxed atomic adds.
//!
//! `prometheus-client`'s own `Histogram` takes a write lock per observation; shared by every
//! connection of a busy node (one per op), that lock is a contention point on the data path.
//! This one keeps a counter per bucket, the count and the sum in nanoseconds, and encodes as
//! the same Prometheus histogram at scrape time. A scrape may see a bucket and the count of
//! slightly different moments (no lock between them); Prometheus tolerates that, as it does
//! for every lock-free client.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Bucket upper bounds in seconds, and one counter per bucket plus the `+Inf` one.
#[derive(Debug)]
struct Inner {
    bounds_s: &'static [f64],
    bounds_ns: Vec<u64>,
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_ns: AtomicU64,
}

/// A histogram of durations, shared by clones.
#[derive(Clone, Debug)]
pub struct LatencyHistogram(Arc<Inner>);

impl LatencyHistogram {
    /// A histogram with these upper bounds (seconds, ascending) and a `+Inf` bucket.
    pub fn new(bounds_s: &'static [f64]) -> Self {
        let bounds_ns = bounds_s.iter().map(|s| (s * 1e9) as u64).collect();
        Self(Arc::new(Inner {
            bounds_s,
            bounds_ns,
            buckets: (0..=bounds_s.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }))
    }

    /// Records one duration.
    pub fn observe(&self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let i = self.0.bounds_ns.partition_point(|&b| b < ns);
        self.0.buckets[i].fetch_add(1, Relaxed);
        self.0.count.fetch_add(1, Relaxed);
        self.0.sum_ns.fetch_add(ns, Relaxed);
    }

    /// Sum (seconds), count and per-bucket counts (not cumulative), as the encoder takes them.
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let bounds = self.0.bounds_s.iter().copied().chain([f64::MAX]);
        let buckets = bounds
            .zip(&self.0.buckets)
            .map(|(b, n)| (b, n.load(Relaxed)))
            .collect();
        let sum = self.0.sum_ns.load(Relaxed) as f64 / 1e9;
        (sum, self.0.count.load(Relaxed), buckets)
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: &[f64] = &[1e-3, 10e-3];

    #[test]
    fn durations_land_in_the_first_bucket_whose_bound_holds_them() {
        let h = LatencyHistogram::new(BOUNDS);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(1));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(3));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 4);
        assert!((sum - 3.0065).abs() < 1e-9, "{sum}");
        let counts: Vec<u64> = buckets.iter().map(|b| b.1).collect();
        assert_eq!(counts, [2, 1, 1]);
    }

    #[test]
    fn concurrent_observations_are_all_counted() {
        let h = LatencyHistogram::new(BOUNDS);
        std::thread::scope(|s| {
            for _ in 0..4 {
                let h = h.clone();
                s.spawn(move || {
                    for _ in 0..10_000 {
                        h.observe(Duration::from_micros(2));
                    }
                });
            }
        });
        let (_, count, buckets) = h.snapshot();
        assert_eq!(count, 40_000);
        assert_eq!(buckets[0].1, 40_000);
    }
}
