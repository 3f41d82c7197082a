//! Whether a soak passed: the pure checks over what the run recorded.

use serde::Serialize;

use super::load::Totals;

/// One resident-memory reading of a node's process.
#[derive(Clone, Debug, Serialize)]
pub struct RssSample {
    pub t_s: f64,
    pub node: usize,
    /// Which start of the node the process is (1 for the first).
    pub instance: u32,
    pub rss_bytes: u64,
}

/// The growth of one process's RSS after its warm-up.
#[derive(Clone, Debug, Serialize)]
pub struct RssGrowth {
    pub node: usize,
    pub instance: u32,
    /// Highest RSS in the middle third of the process's samples.
    pub baseline_bytes: u64,
    /// Highest RSS in the last third.
    pub last_bytes: u64,
    pub growth_bytes: i64,
}

/// What a node's /metrics said after the clients stopped.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NodeEnd {
    pub addr: String,
    pub blocks: u64,
    pub used_bytes: u64,
    pub active_leases: u64,
    pub checksum_failures: u64,
    /// Pool bytes held by no committed block: `used - blocks x (value and checksum trailer,
    /// rounded up to pages)`.
    pub leaked_bytes: i64,
}

/// Processes with fewer samples than this are not judged (too short-lived to have a trend).
const MIN_SAMPLES: usize = 9;

/// RSS growth of each process: the highest reading in the last third of its samples against
/// the highest in the middle third (the first third is warm-up: the pool being touched, the
/// index and the connections growing to their working size).
pub fn rss_growth(samples: &[RssSample]) -> Vec<RssGrowth> {
    let mut procs: Vec<(usize, u32)> = samples.iter().map(|s| (s.node, s.instance)).collect();
    procs.sort_unstable();
    procs.dedup();
    procs
        .into_iter()
        .filter_map(|(node, instance)| {
            let rss: Vec<u64> = samples
                .iter()
                .filter(|s| s.node == node && s.instance == instance)
                .map(|s| s.rss_bytes)
                .collect();
            if rss.len() < MIN_SAMPLES {
                return None;
            }
            let third = rss.len() / 3;
            let baseline = *rss[third..2 * third].iter().max()?;
            let last = *rss[2 * third..].iter().max()?;
            Some(RssGrowth {
                node,
                instance,
                baseline_bytes: baseline,
                last_bytes: last,
                growth_bytes: last as i64 - baseline as i64,
            })
        })
        .collect()
}

/// The allowed RSS growth after warm-up: 5 % of the baseline or 16 MiB, whichever is more.
pub fn rss_bound(baseline: u64) -> i64 {
    (baseline / 20).max(16 << 20) as i64
}

/// Every reason the soak failed (empty: it passed).
pub fn failures(totals: &Totals, growth: &[RssGrowth], ends: &[NodeEnd]) -> Vec<String> {
    let mut out = Vec::new();
    let zero = |out: &mut Vec<String>, what: &str, n: u64| {
        if n > 0 {
            out.push(format!("{what}: {n} (must be 0)"));
        }
    };
    zero(&mut out, "errors", totals.errors);
    zero(&mut out, "wrong bytes", totals.wrong_bytes);
    zero(&mut out, "reads of the wrong size", totals.wrong_size);
    zero(&mut out, "misses R=2 should have prevented", totals.misses);
    zero(&mut out, "puts stored by no owner", totals.puts_refused);
    for e in ends {
        let leases = format!("leases left on {}", e.addr);
        zero(&mut out, &leases, e.active_leases);
        let checksums = format!("checksum failures on {}", e.addr);
        zero(&mut out, &checksums, e.checksum_failures);
        if e.leaked_bytes != 0 {
            out.push(format!(
                "{}: {} pool bytes held by no block (must be 0)",
                e.addr, e.leaked_bytes
            ));
        }
    }
    for g in growth {
        if g.growth_bytes > rss_bound(g.baseline_bytes) {
            out.push(format!(
                "node {} (start {}): RSS grew {} MiB after warm-up (bound {} MiB)",
                g.node,
                g.instance,
                g.growth_bytes >> 20,
                rss_bound(g.baseline_bytes) >> 20
            ));
        }
    }
    if totals.values_read == 0 || totals.puts_new == 0 {
        out.push("the clients neither stored nor read anything".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(node: usize, instance: u32, mib: &[u64]) -> Vec<RssSample> {
        mib.iter()
            .enumerate()
            .map(|(i, m)| RssSample {
                t_s: i as f64,
                node,
                instance,
                rss_bytes: m << 20,
            })
            .collect()
    }

    #[test]
    fn warm_up_growth_is_forgiven_and_later_growth_is_measured_per_process() {
        let mut s = series(0, 1, &[10, 50, 100, 200, 201, 200, 202, 203, 202]);
        s.extend(series(0, 2, &[100, 200, 200, 200, 210, 220, 240, 260, 300]));
        s.extend(series(1, 1, &[5, 6])); // too short to judge
        let g = rss_growth(&s);
        assert_eq!(g.len(), 2);
        assert_eq!((g[0].instance, g[0].growth_bytes), (1, 2 << 20));
        assert_eq!((g[1].instance, g[1].growth_bytes), (2, 80 << 20));
        let fails = failures(
            &Totals {
                values_read: 1,
                puts_new: 1,
                ..Totals::default()
            },
            &g,
            &[],
        );
        assert_eq!(fails.len(), 1, "{fails:?}");
        assert!(fails[0].contains("start 2"), "{fails:?}");
    }

    #[test]
    fn any_wrong_byte_miss_error_or_leak_fails_the_soak() {
        let clean = Totals {
            values_read: 10,
            puts_new: 5,
            ..Totals::default()
        };
        assert!(failures(&clean, &[], &[NodeEnd::default()]).is_empty());
        for bad in [
            Totals {
                wrong_bytes: 1,
                ..clean.clone()
            },
            Totals {
                misses: 1,
                ..clean.clone()
            },
            Totals {
                errors: 1,
                ..clean.clone()
            },
        ] {
            assert_eq!(failures(&bad, &[], &[]).len(), 1);
        }
        let leak = NodeEnd {
            leaked_bytes: 4096,
            ..NodeEnd::default()
        };
        let lease = NodeEnd {
            active_leases: 1,
            ..NodeEnd::default()
        };
        assert_eq!(failures(&clean, &[], &[leak, lease]).len(), 2);
        assert_eq!(failures(&Totals::default(), &[], &[]).len(), 1);
    }
}
