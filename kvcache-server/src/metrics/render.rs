//! `/metrics`: the registry's metrics, then the store's and each lower tier's, read at scrape
//! time from [`StoreStats`], in the OpenMetrics text format.

use kvcache_core::metric_names as names;
use kvcache_store::{StoreStats, TierStats};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::metrics::Metrics;

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl Metrics {
    /// Renders every metric, with the store's gauges and counters.
    pub fn render(&self, store: &StoreStats) -> String {
        let mut out = String::with_capacity(16 << 10);
        let mut scraped = Registry::default();
        scraped.register_collector(Box::new(StoreCollector(store.clone())));
        // Writing into a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry);
        let _ = encode_registry(&mut out, &scraped);
        let _ = encode_eof(&mut out);
        out
    }
}

/// A gauge or a counter read from the store's stats.
enum Value {
    Gauge(u64),
    Counter(u64),
}

/// The store's and tiers' stats as metrics.
#[derive(Debug)]
struct StoreCollector(StoreStats);

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let store = [
            (
                names::POOL_CAPACITY_BYTES,
                "Size of the memory pool.",
                Value::Gauge(s.capacity_bytes),
            ),
            (
                names::POOL_USED_BYTES,
                "Pool bytes allocated to blocks (committed or being written).",
                Value::Gauge(s.used_bytes),
            ),
            (
                names::BLOCKS_STORED,
                "Committed blocks in the index.",
                Value::Gauge(s.blocks),
            ),
            (
                names::ACTIVE_LEASES,
                "Leases held by readers right now.",
                Value::Gauge(s.active_leases),
            ),
            (
                names::EVICTIONS_TOTAL,
                "Blocks evicted to make room.",
                Value::Counter(s.evictions),
            ),
            (
                names::EVICTED_BYTES_TOTAL,
                "Bytes evicted to make room.",
                Value::Counter(s.evicted_bytes),
            ),
            (
                names::CHECKSUM_FAILURES_TOTAL,
                "Stored blocks that failed verification (reported as misses).",
                Value::Counter(s.checksum_failures),
            ),
            (
                names::INDEX_HEAP_BYTES,
                "Heap memory used by the block index.",
                Value::Gauge(s.index_heap_bytes),
            ),
            (
                names::POOL_LOCKED,
                "1 if the pool is locked in RAM.",
                Value::Gauge(s.locked as u64),
            ),
        ];
        for (name, help, value) in store {
            encode(&mut encoder, name, help, value)?;
        }
        for (i, tier) in s.lower.iter().enumerate() {
            encode_tier(&mut encoder, tier, (i == 0).then_some(s.promotions))?;
        }
        Ok(())
    }
}

fn encode(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: Value,
) -> Result<(), std::fmt::Error> {
    match value {
        Value::Gauge(v) => {
            let g = ConstGauge::new(v as i64);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
        }
        Value::Counter(v) => {
            let c = ConstCounter::new(v);
            let family = name.strip_suffix("_total").unwrap_or(name);
            c.encode(encoder.encode_descriptor(family, help, None, c.metric_type())?)
        }
    }
}

/// One lower tier's metrics, named after it (`kvcache_disk_*`, `kvcache_gpu_*`). Promotions
/// into memory are counted on the top tier.
fn encode_tier(
    encoder: &mut DescriptorEncoder,
    t: &TierStats,
    promotions: Option<u64>,
) -> Result<(), std::fmt::Error> {
    let tier = t.name;
    let [
        capacity,
        used,
        blocks,
        demoted,
        demoted_bytes,
        hits,
        corrupt,
        dropped,
        skipped,
        errors,
    ] = names::TIER_SUFFIXES;
    let mut lines = vec![
        (
            capacity,
            format!("Bytes the {tier} tier may hold."),
            Value::Gauge(t.capacity_bytes),
        ),
        (
            used,
            format!("Bytes the {tier} tier holds."),
            Value::Gauge(t.used_bytes),
        ),
        (
            blocks,
            format!("Blocks in the {tier} tier."),
            Value::Gauge(t.blocks),
        ),
        (
            demoted,
            format!("Blocks written to the {tier} tier after eviction from the tier above."),
            Value::Counter(t.demoted_blocks),
        ),
        (
            demoted_bytes,
            format!("Bytes written to the {tier} tier after eviction from the tier above."),
            Value::Counter(t.demoted_bytes),
        ),
        (
            hits,
            format!("Blocks read back from the {tier} tier on a miss above ({tier}-tier hits)."),
            Value::Counter(t.read_blocks),
        ),
        (
            corrupt,
            format!(
                "Blocks in the {tier} tier that failed verification (dropped, read as misses)."
            ),
            Value::Counter(t.corrupt_blocks),
        ),
        (
            dropped,
            format!("Segments of the {tier} tier deleted, oldest first, to stay within capacity."),
            Value::Counter(t.dropped_segments),
        ),
        (
            skipped,
            format!("Evicted blocks too large for the {tier} tier, not written to it."),
            Value::Counter(t.skipped_blocks),
        ),
        (
            errors,
            format!("Failed reads or writes of the {tier} tier."),
            Value::Counter(t.errors),
        ),
    ];
    if let Some(p) = promotions {
        lines.push((
            names::TIER_PROMOTED_SUFFIX,
            format!("Blocks brought back into memory from the {tier} tier or those under it."),
            Value::Counter(p),
        ));
    }
    for (suffix, help, value) in lines {
        encode(encoder, &names::tier(tier, suffix), &help, value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kvcache_core::metric_names;
    use kvcache_core::wire::Op;

    use super::*;
    use crate::metrics::ProtocolError;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = Metrics::default();
        m.op(Op::Get, true, Duration::from_micros(30));
        m.op(Op::Get, false, Duration::from_millis(3));
        m.blocks(Op::Get, 10, 7);
        m.blocks(Op::StagedPut, 4, 0);
        m.protocol_error(ProtocolError::BadMagic);
        let text = m.render(&StoreStats {
            capacity_bytes: 1024,
            evictions: 3,
            ..Default::default()
        });
        for sample in [
            "kvcache_ops_total{op=\"get\",result=\"ok\"} 1",
            "kvcache_ops_total{op=\"get\",result=\"error\"} 1",
            "kvcache_requested_blocks_total{op=\"get\"} 10",
            "kvcache_hit_blocks_total{op=\"get\"} 7",
            "kvcache_put_blocks_total 4",
            "kvcache_op_duration_seconds_count{op=\"get\"} 2",
            "kvcache_protocol_errors_total{kind=\"bad_magic\"} 1",
            "kvcache_pool_capacity_bytes 1024",
            "kvcache_evictions_total 3",
        ] {
            assert!(
                text.lines().any(|l| l == sample),
                "{sample} missing:\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn every_listed_name_is_exposed_and_no_other() {
        let m = Metrics::default();
        let tier = TierStats {
            name: "disk",
            ..Default::default()
        };
        let text = m.render(&StoreStats {
            lower: vec![tier],
            ..Default::default()
        });
        let mut exposed: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        exposed.sort();
        let mut listed: Vec<String> = metric_names::ALL
            .iter()
            .map(|n| n.strip_suffix("_total").unwrap_or(n).to_string())
            .chain(
                metric_names::TIER_SUFFIXES
                    .iter()
                    .chain([&metric_names::TIER_PROMOTED_SUFFIX])
                    .map(|s| metric_names::tier("disk", s))
                    .map(|n| n.strip_suffix("_total").unwrap_or(&n).to_string()),
            )
            .collect();
        listed.sort();
        assert_eq!(exposed, listed);
    }
}
