//! One scaling target's decisions: its metrics' windows, the algorithm, and what every algorithm
//! shares around it: the largest answer over several metrics wins, panic never scales down, a
//! scale-down waits out the cooldown, min and max bound it, and a failed source freezes it.
//! Pure: each observation carries its time; tested on recorded traces (`tests/replay.rs`).

use crate::metric::MetricSpec;
use crate::policy::{Algorithm, Params, apa, kpa, slo};
use crate::window::Window;

/// A target's decision rules.
#[derive(Clone, Debug, PartialEq)]
pub struct Rules {
    pub algorithm: Algorithm,
    pub params: Params,
    pub metrics: Vec<MetricSpec>,
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub stable_window_ms: u64,
    pub panic_window_ms: u64,
    /// A scale-down happens only after the answer has stayed below the current count this long.
    pub scale_down_cooldown_ms: u64,
}

/// What the sources said at one tick.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    pub at_ms: u64,
    /// Sources that answered.
    pub ready: u32,
    /// Per metric (in `Rules::metrics` order), the total over the sources (the windows keep
    /// totals, so values from before a scale change are not skewed by it; per replica is the
    /// total over the replicas answering now); None when it cannot be known yet (a rate's
    /// first scrape).
    pub values: Vec<Option<f64>>,
    /// Why this tick's data cannot be used (a source failed, none is known): no decision.
    pub failure: Option<String>,
}

/// A decision and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub desired: u32,
    pub reason: String,
    /// Per metric, its stable-window average per replica answering (None before its first value).
    pub stable: Vec<Option<f64>>,
    pub panic: bool,
    /// No decision was taken (stale or missing data): `desired` is the current count.
    pub frozen: bool,
}

/// A target's state between decisions.
#[derive(Clone, Debug)]
pub struct Target {
    pub rules: Rules,
    windows: Vec<Window>,
    panic_until_ms: Option<u64>,
    below_since_ms: Option<u64>,
}

impl Target {
    pub fn new(rules: Rules) -> Self {
        let keep = rules.stable_window_ms.max(rules.panic_window_ms);
        Self {
            windows: rules.metrics.iter().map(|_| Window::new(keep)).collect(),
            rules,
            panic_until_ms: None,
            below_since_ms: None,
        }
    }

    /// Each metric's stable-window average per replica of `ready`.
    fn stable(&self, now: u64, ready: u32) -> Vec<Option<f64>> {
        let n = ready.max(1) as f64;
        self.windows
            .iter()
            .map(|w| w.mean(now, self.rules.stable_window_ms).map(|v| v / n))
            .collect()
    }

    /// The decision at `obs.at_ms` with `current` replicas asked for.
    pub fn decide(&mut self, current: u32, obs: &Observation) -> Decision {
        let now = obs.at_ms;
        let r = &self.rules;
        let hold = |reason: String, stable: Vec<Option<f64>>| Decision {
            desired: current,
            reason,
            stable,
            panic: false,
            frozen: true,
        };
        if let Some(why) = &obs.failure {
            // No decision on stale data; the cooldown starts over once data returns.
            self.below_since_ms = None;
            return hold(format!("frozen: {why}"), self.stable(now, obs.ready));
        }
        for (w, v) in self.windows.iter_mut().zip(&obs.values) {
            if let Some(v) = v {
                w.push(now, *v);
            }
        }
        let stable = self.stable(now, obs.ready);
        if let Some(i) = self.windows.iter().position(Window::is_empty) {
            return hold(
                format!("warming up: no value of {} yet", r.metrics[i].describe()),
                stable,
            );
        }
        // A few samples are noise: decide once every window covers at least the panic window.
        let need = r.panic_window_ms.min(r.stable_window_ms);
        if let Some(w) = self.windows.iter().find(|w| w.span(now) < need) {
            let why = format!(
                "warming up: {:.1} of {:.1} s of data",
                w.span(now) as f64 / 1000.0,
                need as f64 / 1000.0
            );
            return hold(why, stable);
        }
        let (mut desired, mut reason, panicking) = match r.algorithm {
            Algorithm::Kpa | Algorithm::Apa => self.per_metric(current, obs.ready, now, &stable),
            Algorithm::Slo => {
                let (d, why) = self.slo(current, obs.ready, &stable);
                (d, why, false)
            }
        };
        if panicking {
            self.panic_until_ms = Some(now + r.stable_window_ms);
        }
        let in_panic = self.panic_until_ms.is_some_and(|t| now < t);
        if in_panic && desired < current {
            desired = current;
            reason = format!(
                "panic (until the stable window passes without it): holding {current}; {reason}"
            );
        }
        let bounded = desired.clamp(r.min_replicas, r.max_replicas.max(r.min_replicas));
        if bounded != desired {
            reason = format!(
                "{reason}; bounded to {bounded} (min {}, max {})",
                r.min_replicas, r.max_replicas
            );
            desired = bounded;
        }
        if desired < current {
            let since = *self.below_since_ms.get_or_insert(now);
            let waited = now.saturating_sub(since);
            if waited < r.scale_down_cooldown_ms {
                reason = format!(
                    "{reason}; holding {current} until the scale-down cooldown passes ({:.0} of {:.0} s)",
                    waited as f64 / 1000.0,
                    r.scale_down_cooldown_ms as f64 / 1000.0
                );
                desired = current;
            } else {
                // The next step down waits a cooldown of its own.
                self.below_since_ms = None;
            }
        } else {
            self.below_since_ms = None;
        }
        Decision {
            desired,
            reason,
            stable,
            panic: in_panic,
            frozen: false,
        }
    }

    /// KPA or APA per metric; the largest answer wins. Returns it, why, and whether KPA's
    /// panic condition holds now.
    fn per_metric(
        &self,
        current: u32,
        ready: u32,
        now: u64,
        stable: &[Option<f64>],
    ) -> (u32, String, bool) {
        let r = &self.rules;
        let mut best: Option<(u32, String)> = None;
        let mut panicking = false;
        for ((m, w), s) in r.metrics.iter().zip(&self.windows).zip(stable) {
            let (Some(target), Some(s)) = (m.target_value, *s) else {
                continue;
            };
            let (want, extra) = match r.algorithm {
                Algorithm::Kpa => {
                    let p = w
                        .mean(now, r.panic_window_ms)
                        .map_or(s, |v| v / ready.max(1) as f64);
                    let a = kpa::desired(&r.params, current, ready, s, p, target);
                    panicking |= a.panic;
                    (
                        a.desired,
                        format!(
                            ", panic window {p:.3}{}",
                            if a.panic { " (panic)" } else { "" }
                        ),
                    )
                }
                _ => (
                    apa::desired(&r.params, current, ready, s, target),
                    String::new(),
                ),
            };
            let why = format!(
                "{} {}: {} {s:.3} per replica{extra} against target {target}, {} answering",
                r.algorithm.name(),
                if want > current {
                    "up"
                } else if want < current {
                    "down"
                } else {
                    "hold"
                },
                m.describe(),
                ready
            );
            if best.as_ref().is_none_or(|(b, _)| want > *b) {
                best = Some((want, why));
            }
        }
        let (desired, why) = best.unwrap_or((current, "no metric has a target_value".into()));
        (desired, why, panicking)
    }

    fn slo(&self, current: u32, ready: u32, stable: &[Option<f64>]) -> (u32, String) {
        let r = &self.rules;
        let mut demand: Option<(f64, f64)> = None;
        let mut worst: Option<(f64, String)> = None;
        for (m, s) in r.metrics.iter().zip(stable) {
            let Some(s) = *s else { continue };
            if let Some(per) = m.capacity_per_replica {
                // The mean per source times the sources: the whole demand.
                let total = s * ready.max(1) as f64;
                let (d, p) = demand.unwrap_or((0.0, per));
                demand = Some((d + total, p));
            } else if let Some(t) = m.target_value {
                let ratio = s / t;
                if worst.as_ref().is_none_or(|(w, _)| ratio > *w) {
                    worst = Some((
                        ratio,
                        format!("{} {s:.3} against the SLO {t}", m.describe()),
                    ));
                }
            }
        }
        let inputs = slo::Inputs {
            current,
            demand,
            latency_ratio: worst.as_ref().map(|(w, _)| *w),
        };
        let (desired, rule) = slo::desired(&r.params, inputs);
        let latency = worst
            .map(|(_, s)| s)
            .unwrap_or_else(|| "no latency metric".into());
        let demand = demand.map_or("no demand metric".into(), |(d, p)| {
            format!("demand {d:.1}/s at {p}/s per replica")
        });
        let rule = match rule {
            slo::Rule::Demand => "sized by demand",
            slo::Rule::LatencyOver => "latency over the SLO: one more",
            slo::Rule::Hold => "hold",
        };
        (desired, format!("slo {rule}: {demand}; {latency}"))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::metric::Kind;

    fn rules(algorithm: Algorithm) -> Rules {
        Rules {
            algorithm,
            params: Params::default(),
            metrics: vec![MetricSpec {
                name: "running".into(),
                labels: BTreeMap::new(),
                kind: Kind::Gauge,
                per: None,
                target_value: Some(2.0),
                capacity_per_replica: None,
            }],
            min_replicas: 1,
            max_replicas: 4,
            stable_window_ms: 30_000,
            panic_window_ms: 6_000,
            scale_down_cooldown_ms: 10_000,
        }
    }

    fn obs(at_ms: u64, ready: u32, v: f64) -> Observation {
        Observation {
            at_ms,
            ready,
            values: vec![Some(v)],
            failure: None,
        }
    }

    #[test]
    fn a_failed_source_freezes_the_decision_and_says_why() {
        let mut t = Target::new(rules(Algorithm::Kpa));
        let mut o = obs(0, 1, 9.0);
        o.failure = Some("http://e1/metrics: connection refused".into());
        let d = t.decide(1, &o);
        assert_eq!((d.desired, d.frozen), (1, true));
        assert!(d.reason.contains("connection refused"), "{}", d.reason);
    }

    #[test]
    fn a_scale_down_waits_for_the_cooldown_and_stops_at_min() {
        let mut t = Target::new(rules(Algorithm::Apa));
        let mut current = 4;
        let mut downs = vec![];
        for s in 0..40u64 {
            let d = t.decide(current, &obs(s * 1000, current, 0.0));
            if d.desired != current {
                downs.push((s, d.desired));
                current = d.desired;
            }
        }
        assert_eq!(
            downs,
            vec![(16, 2), (27, 1)],
            "the first decision after 6 s of data; each step waits 10 s from the first tick that wanted it; ÷2 per step; min 1"
        );
    }

    #[test]
    fn several_metrics_take_the_largest_answer() {
        let mut r = rules(Algorithm::Kpa);
        let mut kv = r.metrics[0].clone();
        kv.name = "kv".into();
        kv.target_value = Some(0.5);
        r.metrics.push(kv);
        let mut t = Target::new(r);
        let mut d = None;
        for at_ms in (0..=6_000).step_by(1_000) {
            let o = Observation {
                at_ms,
                ready: 2,
                values: vec![Some(4.0), Some(1.8)],
                failure: None,
            };
            d = Some(t.decide(2, &o));
        }
        let d = d.unwrap();
        assert_eq!(d.desired, 4);
        assert!(d.reason.contains("kv 0.900"), "{}", d.reason);
    }
}
