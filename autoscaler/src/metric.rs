//! What a target measures: a metric by name (and labels) read from each source's scrape, as a
//! gauge, a per-second rate of a counter, or a histogram's mean over the interval, optionally
//! divided by another gauge of the same source. Pure: two scrapes in, one number out.

use std::collections::BTreeMap;

use serde::Deserialize;

use kvcache_control::prometheus_text::{Sample, sum};

/// How a metric's samples become a value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The samples' sum now (`vllm:num_requests_running`, `vllm:kv_cache_usage_perc`).
    #[default]
    Gauge,
    /// The counter's increase per second since the last scrape (`kvcache_evicted_bytes_total`,
    /// `vllm:prompt_tokens_total`).
    Rate,
    /// A histogram's mean over the interval: Δ`_sum` / Δ`_count` (`name` is the histogram's
    /// base name, `vllm:time_to_first_token_seconds`); 0 when nothing was observed.
    HistogramMean,
}

/// One metric of a target, as configured.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricSpec {
    pub name: String,
    /// Only samples with these labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub kind: Kind,
    /// Divide each source's value by this gauge of the same source (e.g. evicted bytes per
    /// second per byte of `kvcache_pool_capacity_bytes`: how fast the pool turns over).
    pub per: Option<String>,
    /// The value one replica should carry (kpa, apa), or the SLO (slo's latency metrics).
    pub target_value: Option<f64>,
    /// slo only: what one replica can carry of this rate (tokens per second, measured).
    pub capacity_per_replica: Option<f64>,
}

/// What one scrape says of a metric.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Reading {
    /// The gauge, the counter, or the histogram's `_sum`.
    pub value: f64,
    /// The histogram's `_count`.
    pub count: f64,
    /// The `per` gauge.
    pub per: Option<f64>,
}

impl MetricSpec {
    fn matchers(&self) -> Vec<(String, String)> {
        self.labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// A short name for status and logs: `rate(name)/per`.
    pub fn describe(&self) -> String {
        let base = match self.kind {
            Kind::Gauge => self.name.clone(),
            Kind::Rate => format!("rate({})", self.name),
            Kind::HistogramMean => format!("mean({})", self.name),
        };
        match &self.per {
            Some(per) => format!("{base}/{per}"),
            None => base,
        }
    }

    /// Its reading in one scrape, or why there is none.
    pub fn read(&self, samples: &[Sample]) -> Result<Reading, String> {
        let m = self.matchers();
        let missing = |name: &str| format!("no sample named {name}");
        let mut r = match self.kind {
            Kind::Gauge | Kind::Rate => Reading {
                value: sum(samples, &self.name, &m).ok_or_else(|| missing(&self.name))?,
                ..Reading::default()
            },
            Kind::HistogramMean => {
                let s = format!("{}_sum", self.name);
                let c = format!("{}_count", self.name);
                Reading {
                    value: sum(samples, &s, &m).ok_or_else(|| missing(&s))?,
                    count: sum(samples, &c, &m).ok_or_else(|| missing(&c))?,
                    per: None,
                }
            }
        };
        if let Some(per) = &self.per {
            r.per = Some(sum(samples, per, &[]).ok_or_else(|| missing(per))?);
        }
        Ok(r)
    }

    /// The value between two readings `dt_s` apart (`prev` None: the first scrape, which only
    /// a gauge can use). None when it cannot be known yet or the counter went back (a restart).
    pub fn value(&self, prev: Option<&Reading>, cur: &Reading, dt_s: f64) -> Option<f64> {
        let raw = match self.kind {
            Kind::Gauge => cur.value,
            Kind::Rate => {
                let p = prev?;
                if cur.value < p.value || dt_s <= 0.0 {
                    return None;
                }
                (cur.value - p.value) / dt_s
            }
            Kind::HistogramMean => {
                let p = prev?;
                if cur.count < p.count || cur.value < p.value {
                    return None;
                }
                let n = cur.count - p.count;
                if n == 0.0 {
                    0.0
                } else {
                    (cur.value - p.value) / n
                }
            }
        };
        match cur.per {
            Some(per) if per > 0.0 => Some(raw / per),
            Some(_) => None,
            None => Some(raw),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvcache_control::prometheus_text::parse;

    fn spec(name: &str, kind: Kind) -> MetricSpec {
        MetricSpec {
            name: name.into(),
            labels: BTreeMap::new(),
            kind,
            per: None,
            target_value: Some(1.0),
            capacity_per_replica: None,
        }
    }

    #[test]
    fn gauges_rates_and_histogram_means_from_two_scrapes() {
        let a = parse("c_total 100\nh_sum 2.0\nh_count 4\ng 3\ncap 1000\n");
        let b = parse("c_total 160\nh_sum 5.0\nh_count 10\ng 5\ncap 1000\n");
        let g = spec("g", Kind::Gauge);
        assert_eq!(g.value(None, &g.read(&b).unwrap(), 0.0), Some(5.0));
        let r = spec("c_total", Kind::Rate);
        assert_eq!(
            r.value(None, &r.read(&a).unwrap(), 2.0),
            None,
            "a rate needs two scrapes"
        );
        assert_eq!(
            r.value(Some(&r.read(&a).unwrap()), &r.read(&b).unwrap(), 2.0),
            Some(30.0)
        );
        assert_eq!(
            r.value(Some(&r.read(&b).unwrap()), &r.read(&a).unwrap(), 2.0),
            None,
            "a reset"
        );
        let h = spec("h", Kind::HistogramMean);
        assert_eq!(
            h.value(Some(&h.read(&a).unwrap()), &h.read(&b).unwrap(), 2.0),
            Some(0.5)
        );
        assert_eq!(
            h.value(Some(&h.read(&b).unwrap()), &h.read(&b).unwrap(), 2.0),
            Some(0.0)
        );
        let mut per = spec("c_total", Kind::Rate);
        per.per = Some("cap".into());
        assert_eq!(
            per.value(Some(&per.read(&a).unwrap()), &per.read(&b).unwrap(), 2.0),
            Some(0.03)
        );
        assert_eq!(per.describe(), "rate(c_total)/cap");
        assert_eq!(
            spec("absent", Kind::Gauge).read(&a).unwrap_err(),
            "no sample named absent"
        );
    }
}
