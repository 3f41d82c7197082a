//! The autoscaler's Prometheus metrics: per target what /status says.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// Every metric the autoscaler exports.
pub struct Metrics {
    registry: Registry,
    /// Replicas decided, by `target`.
    pub desired: Family<Labels, Gauge>,
    /// Replicas asked for now, by `target`.
    pub current: Family<Labels, Gauge>,
    /// Sources answering, by `target`.
    pub ready: Family<Labels, Gauge>,
    /// Each metric's stable-window average, by `target` and `metric`.
    pub value: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// 1 while a source answers, by `target` and `source`.
    pub source_up: Family<Labels, Gauge>,
    /// Decisions by `target` and `action` (`up`, `down`, `hold`, `frozen`).
    pub decisions: Family<Labels, Counter>,
    /// Actuator calls that failed, by `target`.
    pub actuator_errors: Family<Labels, Counter>,
    /// 1 while a KPA target is in panic mode, by `target`.
    pub panic: Family<Labels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let m = Self {
            registry: Registry::default(),
            desired: Family::default(),
            current: Family::default(),
            ready: Family::default(),
            value: Family::default(),
            source_up: Family::default(),
            decisions: Family::default(),
            actuator_errors: Family::default(),
            panic: Family::default(),
        };
        let mut registry = Registry::default();
        registry.register(
            "kvcache_autoscaler_desired_replicas",
            "Replicas decided",
            m.desired.clone(),
        );
        registry.register(
            "kvcache_autoscaler_current_replicas",
            "Replicas asked for now",
            m.current.clone(),
        );
        registry.register(
            "kvcache_autoscaler_ready_replicas",
            "Sources answering",
            m.ready.clone(),
        );
        registry.register(
            "kvcache_autoscaler_metric_value",
            "Each metric's stable-window average",
            m.value.clone(),
        );
        registry.register(
            "kvcache_autoscaler_source_up",
            "1 while a source answers",
            m.source_up.clone(),
        );
        registry.register(
            "kvcache_autoscaler_decisions",
            "Decisions by action",
            m.decisions.clone(),
        );
        registry.register(
            "kvcache_autoscaler_actuator_errors",
            "Actuator calls that failed",
            m.actuator_errors.clone(),
        );
        registry.register(
            "kvcache_autoscaler_panic",
            "1 while a KPA target panics",
            m.panic.clone(),
        );
        Self { registry, ..m }
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        kvcache_control::render(&self.registry)
    }
}
