//! The decision core replayed on a metric trace recorded from a real `vllm serve` on CPU under a
//! scripted load (`tests/traces/record.py`: idle, 2 clients, a 4 s spike of 8, 2 again, a step
//! up to 6, a step down to 1, idle). The metric is the engine's concurrency by Little's law,
//! `rate(vllm:e2e_request_latency_seconds_sum)`, read through the same parser and metric code as
//! a live scrape. The trace carried all its load on one instance; the replay gives each of the
//! `current` replicas its share (the observation carries the total; the target divides).

use std::collections::BTreeMap;

use kvcache_autoscaler::metric::{Kind, MetricSpec, Reading};
use kvcache_autoscaler::policy::{Algorithm, Params};
use kvcache_autoscaler::target::{Observation, Rules, Target};
use kvcache_control::prometheus_text::parse;
use serde::Deserialize;

const TRACE: &str = include_str!("traces/vllm-cpu-load.jsonl");

#[derive(Deserialize)]
struct Row {
    t: f64,
    phase: String,
    e2e_sum: f64,
}

fn rows() -> Vec<Row> {
    TRACE
        .lines()
        .map(|l| serde_json::from_str(l).expect("a trace row"))
        .collect()
}

/// The rows from `seconds_in` seconds into phase `from` up to (not including) phase `to`.
fn segment(rows: Vec<Row>, from: &str, seconds_in: f64, to: Option<&str>) -> Vec<Row> {
    let start = rows
        .iter()
        .find(|r| r.phase == from)
        .expect("the phase is in the trace")
        .t
        + seconds_in;
    let end = to.map_or(f64::INFINITY, |p| {
        rows.iter()
            .find(|r| r.phase == p)
            .expect("the phase is in the trace")
            .t
    });
    rows.into_iter()
        .filter(|r| r.t >= start && r.t < end)
        .collect()
}

/// When a phase starts, in ms.
fn start_of(rows: &[Row], phase: &str) -> u64 {
    (rows
        .iter()
        .find(|r| r.phase == phase)
        .expect("the phase is in the trace")
        .t
        * 1000.0) as u64
}

fn concurrency() -> MetricSpec {
    MetricSpec {
        name: "vllm:e2e_request_latency_seconds_sum".into(),
        labels: BTreeMap::new(),
        kind: Kind::Rate,
        per: None,
        target_value: Some(2.0),
        capacity_per_replica: None,
    }
}

fn rules(algorithm: Algorithm) -> Rules {
    Rules {
        algorithm,
        params: Params::default(),
        metrics: vec![concurrency()],
        min_replicas: 1,
        max_replicas: 4,
        stable_window_ms: 30_000,
        panic_window_ms: 6_000,
        scale_down_cooldown_ms: 10_000,
    }
}

/// One replayed tick: its time, the replicas before it, and the decision.
struct Tick {
    at_ms: u64,
    current: u32,
    desired: u32,
    frozen: bool,
    reason: String,
}

/// Replays `rows` through `rules` from `current` replicas; rows for which `dead` is true are
/// ticks whose source failed.
fn replay(rules: Rules, rows: &[Row], mut current: u32, dead: impl Fn(u64) -> bool) -> Vec<Tick> {
    let spec = rules.metrics[0].clone();
    let mut target = Target::new(rules);
    let mut prev: Option<(f64, Reading)> = None;
    let mut out = Vec::new();
    for row in rows {
        let at_ms = (row.t * 1000.0) as u64;
        let samples = parse(&format!(
            "vllm:e2e_request_latency_seconds_sum {}\n",
            row.e2e_sum
        ));
        let reading = spec.read(&samples).expect("the trace has the metric");
        let obs = if dead(at_ms) {
            prev = None;
            Observation {
                at_ms,
                ready: 0,
                values: vec![None],
                failure: Some("http://engine/metrics: connection refused".into()),
            }
        } else {
            let total = prev
                .as_ref()
                .and_then(|(t, p)| spec.value(Some(p), &reading, row.t - t));
            prev = Some((row.t, reading));
            Observation {
                at_ms,
                ready: current,
                values: vec![total],
                failure: None,
            }
        };
        let d = target.decide(current, &obs);
        out.push(Tick {
            at_ms,
            current,
            desired: d.desired,
            frozen: d.frozen,
            reason: d.reason,
        });
        if !d.frozen {
            current = d.desired;
        }
    }
    out
}

fn changes(ticks: &[Tick]) -> Vec<(u64, u32, u32)> {
    ticks
        .iter()
        .filter(|t| !t.frozen && t.desired != t.current)
        .map(|t| (t.at_ms, t.current, t.desired))
        .collect()
}

#[test]
fn a_step_up_scales_up_within_the_panic_window() {
    let all = rows();
    let step = start_of(&all, "step_up");
    let down = start_of(&all, "step_down");
    // From two clients (the spike long gone) into the step up to six.
    let rows = segment(all, "after_spike", 12.0, None);
    let ticks = replay(rules(Algorithm::Kpa), &rows, 1, |_| false);
    let first_up = changes(&ticks)
        .into_iter()
        .find(|(t, from, to)| *t >= step && to > from);
    let (t, _, _) = first_up.expect("the step up scaled up");
    assert!(
        t <= step + 6_000 + 1_000,
        "scaled up {} ms after the step; the panic window is 6 s",
        t - step
    );
    let during: Vec<u32> = ticks
        .iter()
        .filter(|t| t.at_ms > step + 10_000 && t.at_ms < down)
        .map(|t| t.desired)
        .collect();
    assert!(
        during.iter().all(|&d| d >= 2),
        "the step's load kept at least 2 replicas: {during:?}"
    );
}

#[test]
fn a_spike_does_not_thrash() {
    let rows = rows();
    let ticks = replay(rules(Algorithm::Kpa), &rows, 1, |_| false);
    let c = changes(&ticks);
    for pair in c.windows(2) {
        let ((t1, a1, b1), (t2, a2, b2)) = (pair[0], pair[1]);
        let opposite = (b1 > a1) != (b2 > a2);
        assert!(
            !opposite || t2 - t1 >= 10_000,
            "{a1}->{b1} at {t1} ms, then {a2}->{b2} at {t2} ms: a reversal inside the cooldown ({c:?})"
        );
    }
    let spike = start_of(&rows, "spike");
    let settled = start_of(&rows, "step_up");
    let around: Vec<_> = c
        .iter()
        .filter(|(t, _, _)| *t >= spike && *t < settled)
        .collect();
    assert!(
        around.len() <= 2,
        "the spike moved the count {} times: {around:?}",
        around.len()
    );
}

#[test]
fn a_step_down_scales_down_after_the_cooldown_and_stops_at_min() {
    let all = rows();
    let down = start_of(&all, "step_down");
    // Six clients (20 s in), then one, then none.
    let rows = segment(all, "step_up", 20.0, None);
    for algorithm in [Algorithm::Kpa, Algorithm::Apa] {
        let ticks = replay(rules(algorithm), &rows, 2, |_| false);
        let before = ticks.iter().rev().find(|t| t.at_ms < down).unwrap().desired;
        assert!(
            before >= 2,
            "{algorithm:?}: the step up had scaled up ({before})"
        );
        let downs: Vec<_> = changes(&ticks)
            .into_iter()
            .filter(|(t, from, to)| *t >= down && to < from)
            .collect();
        let (first, _, _) = *downs
            .first()
            .unwrap_or_else(|| panic!("{algorithm:?}: no scale-down"));
        assert!(
            first >= down + 10_000,
            "{algorithm:?}: scaled down {} ms after the step; cooldown 10 s",
            first - down
        );
        assert_eq!(
            ticks.last().unwrap().desired,
            1,
            "{algorithm:?}: back at min"
        );
        assert!(ticks.iter().all(|t| t.desired >= 1 && t.desired <= 4));
    }
}

#[test]
fn noise_inside_the_tolerance_band_changes_nothing() {
    // One client: the engine's concurrency wanders around 1 (0.8 to 1.15 per half second).
    let rows = rows();
    let quiet: Vec<Row> = rows
        .into_iter()
        .filter(|r| r.phase == "step_down")
        .skip(4)
        .collect();
    for algorithm in [Algorithm::Kpa, Algorithm::Apa] {
        let mut r = rules(algorithm);
        r.metrics[0].target_value = Some(1.0);
        r.params.tolerance_up = 0.25;
        r.params.tolerance_down = 0.25;
        let ticks = replay(r, &quiet, 1, |_| false);
        assert!(
            changes(&ticks).is_empty(),
            "{algorithm:?}: {:?}",
            changes(&ticks)
        );
        assert!(
            ticks.iter().skip(2).any(|t| t.reason.contains("hold")),
            "{}",
            ticks[3].reason
        );
    }
}

#[test]
fn a_dead_source_freezes_decisions_until_it_answers() {
    let all = rows();
    let step = start_of(&all, "step_up");
    let rows = segment(all, "after_spike", 12.0, Some("step_down"));
    // The engine's /metrics fails from 2 s before the step up to 20 s into it.
    let dead = |t: u64| t + 2_000 >= step && t < step + 20_000;
    let ticks = replay(rules(Algorithm::Kpa), &rows, 1, dead);
    for t in ticks.iter().filter(|t| dead(t.at_ms)) {
        assert!(
            t.frozen && t.desired == t.current,
            "decided on stale data at {} ms: {}",
            t.at_ms,
            t.reason
        );
        assert!(
            t.reason.contains("frozen") && t.reason.contains("connection refused"),
            "{}",
            t.reason
        );
    }
    let after = changes(&ticks)
        .into_iter()
        .find(|(t, from, to)| *t >= step + 20_000 && to > from);
    assert!(
        after.is_some(),
        "decisions resumed once the source answered"
    );
}
