//! The shell around the pure decisions: per target, every interval, observe the sources, decide,
//! and ask the actuator for the new count when it changed; keep what /status and /metrics show.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::Serialize;
use tracing::{info, warn};

use crate::actuator::{Actuator, Scale};
use crate::config::{Config, SourceConfig, TargetConfig};
use crate::metrics::Metrics;
use crate::sources::{SourceHealth, Sources};
use crate::target::Target;

/// One metric as /status shows it.
#[derive(Clone, Debug, Serialize)]
pub struct MetricStatus {
    pub metric: String,
    /// Its stable-window average (per replica), None before its first value.
    pub value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_per_replica: Option<f64>,
}

/// The last change the actuator made.
#[derive(Clone, Debug, Serialize)]
pub struct LastScale {
    pub from: u32,
    pub to: u32,
    pub at_unix_ms: u64,
    pub reason: String,
}

/// A target as /status shows it.
#[derive(Clone, Debug, Serialize)]
pub struct TargetStatus {
    pub name: String,
    pub algorithm: &'static str,
    pub actuator: &'static str,
    pub current: u32,
    pub desired: u32,
    /// Sources answering.
    pub ready: u32,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// The first metric's stable average (the others are in `metrics`).
    pub metric_value: Option<f64>,
    pub metrics: Vec<MetricStatus>,
    /// Why `desired` is what it is.
    pub reason: String,
    pub source_ok: bool,
    pub sources: Vec<SourceHealth>,
    pub panic: bool,
    /// No decision is taken now (stale or missing data).
    pub frozen: bool,
    pub actuator_error: Option<String>,
    pub last_scale: Option<LastScale>,
}

/// Every target's status and the metrics.
pub struct Scaler {
    pub metrics: Metrics,
    statuses: Mutex<Vec<TargetStatus>>,
    interval: std::time::Duration,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Scaler {
    pub fn new(config: &Config) -> Arc<Self> {
        let statuses = config
            .targets
            .iter()
            .map(|t| TargetStatus {
                name: t.name.clone(),
                algorithm: t.rules.algorithm.name(),
                actuator: t.actuator.name(),
                current: t.initial_replicas.unwrap_or(0),
                desired: t.initial_replicas.unwrap_or(0),
                ready: 0,
                min_replicas: t.rules.min_replicas,
                max_replicas: t.rules.max_replicas,
                metric_value: None,
                metrics: Vec::new(),
                reason: "starting: no observation yet".into(),
                source_ok: false,
                sources: Vec::new(),
                panic: false,
                frozen: true,
                actuator_error: None,
                last_scale: None,
            })
            .collect();
        Arc::new(Self {
            metrics: Metrics::new(),
            statuses: Mutex::new(statuses),
            interval: config.interval,
        })
    }

    /// Every target's status.
    pub fn status(&self) -> Vec<TargetStatus> {
        self.statuses.lock().clone()
    }

    fn publish(&self, i: usize, s: TargetStatus) {
        let t = vec![("target", s.name.clone())];
        self.metrics.desired.get_or_create(&t).set(s.desired as i64);
        self.metrics.current.get_or_create(&t).set(s.current as i64);
        self.metrics.ready.get_or_create(&t).set(s.ready as i64);
        self.metrics.panic.get_or_create(&t).set(s.panic as i64);
        for m in &s.metrics {
            let labels = vec![("target", s.name.clone()), ("metric", m.metric.clone())];
            self.metrics
                .value
                .get_or_create(&labels)
                .set(m.value.unwrap_or(f64::NAN));
        }
        for src in &s.sources {
            let labels = vec![("target", s.name.clone()), ("source", src.url.clone())];
            self.metrics
                .source_up
                .get_or_create(&labels)
                .set(src.ok as i64);
        }
        self.statuses.lock()[i] = s;
    }

    /// Runs target `i` of `config` until the process ends.
    pub async fn run_target(self: Arc<Self>, i: usize, config: TargetConfig) {
        let name = config.name.clone();
        // Without an actuator (none can be made here), decisions are reported, and so is why.
        let (mut actuator, missing) = match Actuator::new(&config).await {
            Ok(a) => (Some(a), None),
            Err(why) => {
                warn!(target = %name, error = %why, "no actuator: decisions are reported only");
                (None, Some(why))
            }
        };
        let timeout = self.interval.max(std::time::Duration::from_secs(2));
        let prometheus = matches!(config.source, SourceConfig::Prometheus { .. });
        let mut sources = Sources::new(config.source.clone(), timeout);
        let mut target = Target::new(config.rules.clone());
        let started = Instant::now();
        let mut current: Option<u32> = config.initial_replicas;
        let mut last_said: Option<(u32, bool, String)> = None;
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = started.elapsed().as_millis() as u64;
            let (mut obs, health) = sources.observe(&config.rules.metrics, now).await;
            let mut status = self.statuses.lock()[i].clone();
            status.actuator_error = missing.clone();
            if let Some(a) = actuator.as_mut() {
                match a.current().await {
                    Ok(Some(n)) => current = Some(n),
                    Ok(None) => {}
                    Err(why) => {
                        obs.failure.get_or_insert(format!("actuator: {why}"));
                        status.actuator_error = Some(why);
                    }
                }
            }
            // Without a count from the actuator or the config, the instances answering are it.
            let cur = *current.get_or_insert(if obs.failure.is_none() {
                obs.ready
                    .clamp(config.rules.min_replicas, config.rules.max_replicas)
            } else {
                config.rules.min_replicas
            });
            if prometheus {
                obs.ready = cur;
            }
            let d = target.decide(cur, &obs);
            let action = if d.frozen {
                "frozen"
            } else if d.desired > cur {
                "up"
            } else if d.desired < cur {
                "down"
            } else {
                "hold"
            };
            self.metrics
                .decisions
                .get_or_create(&vec![
                    ("target", name.clone()),
                    ("action", action.to_string()),
                ])
                .inc();
            let class = (d.desired, d.frozen, action.to_string());
            if last_said.as_ref() != Some(&class) {
                info!(target = %name, action, current = cur, desired = d.desired, ready = obs.ready, "{}", d.reason);
                last_said = Some(class);
            }
            if !d.frozen && d.desired != cur {
                if let Some(a) = actuator.as_mut() {
                    match a.set(d.desired).await {
                        Ok(()) => {
                            info!(target = %name, from = cur, to = d.desired, "scaled: {}", d.reason);
                            status.last_scale = Some(LastScale {
                                from: cur,
                                to: d.desired,
                                at_unix_ms: unix_ms(),
                                reason: d.reason.clone(),
                            });
                            current = Some(d.desired);
                        }
                        Err(why) => {
                            warn!(target = %name, to = d.desired, error = %why, "scaling failed");
                            self.metrics
                                .actuator_errors
                                .get_or_create(&vec![("target", name.clone())])
                                .inc();
                            status.actuator_error = Some(why);
                        }
                    }
                }
            }
            status.current = current.unwrap_or(cur);
            status.desired = d.desired;
            status.ready = obs.ready;
            status.metrics = config
                .rules
                .metrics
                .iter()
                .zip(&d.stable)
                .map(|(m, v)| MetricStatus {
                    metric: m.describe(),
                    value: *v,
                    target_value: m.target_value,
                    capacity_per_replica: m.capacity_per_replica,
                })
                .collect();
            status.metric_value = d.stable.first().copied().flatten();
            status.reason = d.reason;
            status.source_ok = health.iter().all(|h| h.ok) && !health.is_empty();
            status.sources = health;
            status.panic = d.panic;
            status.frozen = d.frozen;
            self.publish(i, status);
        }
    }
}
