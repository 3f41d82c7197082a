//! The manager's Prometheus metrics (`prometheus-client`, as the server and gateway use).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// Every metric the manager exports.
pub struct Metrics {
    registry: Registry,
    /// Adapters by `phase`.
    pub adapters: Family<Labels, Gauge>,
    /// Loads and unloads by `op` (`load`, `unload`) and `outcome` (`ok`, `refused`, `unreachable`).
    pub operations: Family<Labels, Counter>,
    /// Times an instance stopped serving an adapter it held (it went down, or came back
    /// without it): each one is loaded again.
    pub lost: Counter,
    /// 1 while an instance answers, by `instance`.
    pub instance_up: Family<Labels, Gauge>,
    /// Seconds per reconcile pass (observe, decide, act).
    pub reconcile_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            adapters: Family::default(),
            operations: Family::default(),
            lost: Counter::default(),
            instance_up: Family::default(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            registry: Registry::default(),
        };
        registry.register(
            "kvcache_lora_adapters",
            "Adapters by phase",
            m.adapters.clone(),
        );
        registry.register(
            "kvcache_lora_operations",
            "Adapter loads and unloads by op and outcome",
            m.operations.clone(),
        );
        registry.register(
            "kvcache_lora_lost",
            "Times an instance stopped serving an adapter it held (down, or back without it)",
            m.lost.clone(),
        );
        registry.register(
            "kvcache_lora_instance_up",
            "1 while an instance answers",
            m.instance_up.clone(),
        );
        registry.register(
            "kvcache_lora_reconcile_seconds",
            "Seconds per reconcile pass (observe, decide, act)",
            m.reconcile_seconds.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts one operation.
    pub fn operation(&self, op: &'static str, outcome: &'static str) {
        self.operations
            .get_or_create(&vec![
                ("op", op.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        kvcache_control::render(&self.registry)
    }
}
