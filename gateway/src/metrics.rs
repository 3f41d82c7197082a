//! The gateway's Prometheus metrics (`prometheus-client`, as the cache server uses). Every name
//! is in [`names`], the one list dashboards and the autoscaler depend on.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Every metric name the gateway exports (without the `_total` suffix counters get).
pub mod names {
    /// Requests answered, by `backend` (the URL, or `none`), `strategy` and HTTP `status`.
    pub const REQUESTS: &str = "kvcache_gateway_requests";
    /// Seconds from dispatch to the first response byte from the backend, by `backend`.
    pub const TTFB_SECONDS: &str = "kvcache_gateway_time_to_first_byte_seconds";
    /// Seconds from arrival to the last byte sent, by `backend`.
    pub const REQUEST_SECONDS: &str = "kvcache_gateway_request_seconds";
    /// Seconds the gateway itself spent on a request before dispatch (parse, tokenize, score).
    pub const ROUTING_SECONDS: &str = "kvcache_gateway_routing_seconds";
    /// Routing decisions, by `strategy` and chosen `backend`.
    pub const DECISIONS: &str = "kvcache_gateway_routing_decisions";
    /// Prompt blocks of routed requests, by `strategy`.
    pub const PROMPT_BLOCKS: &str = "kvcache_gateway_prompt_blocks";
    /// Of those, blocks the chosen instance was predicted to hold itself, by `strategy`.
    pub const PREDICTED_LOCAL_BLOCKS: &str = "kvcache_gateway_predicted_local_blocks";
    /// Of those, blocks predicted to load from the shared cache tier, by `strategy`.
    pub const PREDICTED_SHARED_BLOCKS: &str = "kvcache_gateway_predicted_shared_blocks";
    /// 1 while a backend takes requests (healthy and not ejected), by `backend`.
    pub const BACKEND_UP: &str = "kvcache_gateway_backend_up";
    /// Requests in flight to a backend from this gateway, by `backend`.
    pub const BACKEND_IN_FLIGHT: &str = "kvcache_gateway_backend_in_flight";
    /// Times a backend was ejected after a failed request, by `backend`.
    pub const EJECTIONS: &str = "kvcache_gateway_ejections";
    /// Requests sent again to another backend after a failure before any response byte.
    pub const RETRIES: &str = "kvcache_gateway_retries";
    /// Requests refused by a rate limit, by `limit` (`requests` or `tokens`).
    pub const RATE_LIMITED: &str = "kvcache_gateway_rate_limited";
    /// Entries (engine, block) in the prefix index.
    pub const INDEX_BLOCKS: &str = "kvcache_gateway_index_blocks";
    /// The index's budget, in entries.
    pub const INDEX_BUDGET_BLOCKS: &str = "kvcache_gateway_index_budget_blocks";
    /// Heap bytes of the index's tables.
    pub const INDEX_BYTES: &str = "kvcache_gateway_index_bytes";
    /// Entries dropped to stay within the budget.
    pub const INDEX_EVICTIONS: &str = "kvcache_gateway_index_evictions";
    /// KV events applied, by `backend` and `kind` (`stored`, `stored_lora` for an adapter's
    /// blocks, `removed`, `cleared`,
    /// `unchained`, `resync`, `unknown`).
    pub const KV_EVENTS: &str = "kvcache_gateway_kv_events";
    /// How the index learns what a backend holds, by `backend` and `source`: 1 for the one in
    /// use (`events` from its KV events, `routing` learned from this gateway's decisions).
    pub const INDEX_SOURCE: &str = "kvcache_gateway_index_source";
    /// Shared-tier lookups that failed or timed out (routing went on without the credit).
    pub const CACHE_LOOKUP_ERRORS: &str = "kvcache_gateway_cache_lookup_errors";
    /// P/D: requests by `path`: `disaggregated` (prefill leg, then decode), `bypass` (decode
    /// only: `reason` `cached` when little is uncached, `busy` when the prefill instance is
    /// further behind than the decode instance's cost of computing it, `no_prefill` when no prefill instance can
    /// take it) or `fallback` (the prefill leg failed: `reason` `connect`, `status`,
    /// `timeout`, `params`).
    pub const PD_REQUESTS: &str = "kvcache_gateway_pd_requests";
    /// P/D: seconds of the prefill leg (dispatch to its whole answer: the prompt computed and
    /// its blocks committed to the cache), by `backend`.
    pub const PD_PREFILL_SECONDS: &str = "kvcache_gateway_pd_prefill_seconds";
    /// 1 while at least one backend that takes the `role`'s work (`prefill`, `decode`) is up.
    pub const PD_POOL_UP: &str = "kvcache_gateway_pd_pool_up";
}

type Labels = Vec<(&'static str, String)>;

/// Latency buckets, in seconds: 100 µs to 2 minutes.
const BUCKETS: [f64; 16] = [
    1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
    120.0,
];

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// The gateway's metric families.
pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    ttfb: Family<Labels, Histogram, fn() -> Histogram>,
    request_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    routing_seconds: Histogram,
    decisions: Family<Labels, Counter>,
    prompt_blocks: Family<Labels, Counter>,
    predicted_local: Family<Labels, Counter>,
    predicted_shared: Family<Labels, Counter>,
    pub backend_up: Family<Labels, Gauge>,
    pub backend_in_flight: Family<Labels, Gauge>,
    ejections: Family<Labels, Counter>,
    pub retries: Counter,
    rate_limited: Family<Labels, Counter>,
    pub index_blocks: Gauge,
    pub index_budget: Gauge,
    pub index_bytes: Gauge,
    pub index_evictions: Gauge,
    kv_events: Family<Labels, Counter>,
    pub index_source: Family<Labels, Gauge>,
    pub cache_lookup_errors: Counter,
    pd_requests: Family<Labels, Counter>,
    pd_prefill_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    pub pd_pool_up: Family<Labels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            requests: Family::default(),
            ttfb: Family::new_with_constructor(histogram),
            request_seconds: Family::new_with_constructor(histogram),
            routing_seconds: histogram(),
            decisions: Family::default(),
            prompt_blocks: Family::default(),
            predicted_local: Family::default(),
            predicted_shared: Family::default(),
            backend_up: Family::default(),
            backend_in_flight: Family::default(),
            ejections: Family::default(),
            retries: Counter::default(),
            rate_limited: Family::default(),
            index_blocks: Gauge::default(),
            index_budget: Gauge::default(),
            index_bytes: Gauge::default(),
            index_evictions: Gauge::default(),
            kv_events: Family::default(),
            index_source: Family::default(),
            cache_lookup_errors: Counter::default(),
            pd_requests: Family::default(),
            pd_prefill_seconds: Family::new_with_constructor(histogram),
            pd_pool_up: Family::default(),
            registry: Registry::default(),
        };
        registry.register(names::REQUESTS, "Requests answered", m.requests.clone());
        registry.register(
            names::TTFB_SECONDS,
            "Dispatch to first backend byte",
            m.ttfb.clone(),
        );
        registry.register(
            names::REQUEST_SECONDS,
            "Arrival to last byte",
            m.request_seconds.clone(),
        );
        registry.register(
            names::ROUTING_SECONDS,
            "Gateway time before dispatch",
            m.routing_seconds.clone(),
        );
        registry.register(names::DECISIONS, "Routing decisions", m.decisions.clone());
        registry.register(
            names::PROMPT_BLOCKS,
            "Prompt blocks routed",
            m.prompt_blocks.clone(),
        );
        registry.register(
            names::PREDICTED_LOCAL_BLOCKS,
            "Prompt blocks predicted in the chosen engine's cache",
            m.predicted_local.clone(),
        );
        registry.register(
            names::PREDICTED_SHARED_BLOCKS,
            "Prompt blocks predicted to load from the shared cache tier",
            m.predicted_shared.clone(),
        );
        registry.register(
            names::BACKEND_UP,
            "Backend takes requests",
            m.backend_up.clone(),
        );
        registry.register(
            names::BACKEND_IN_FLIGHT,
            "Requests in flight",
            m.backend_in_flight.clone(),
        );
        registry.register(names::EJECTIONS, "Backend ejections", m.ejections.clone());
        registry.register(
            names::RETRIES,
            "Requests retried on another backend",
            m.retries.clone(),
        );
        registry.register(
            names::RATE_LIMITED,
            "Requests refused by a rate limit",
            m.rate_limited.clone(),
        );
        registry.register(
            names::INDEX_BLOCKS,
            "Prefix index entries",
            m.index_blocks.clone(),
        );
        registry.register(
            names::INDEX_BUDGET_BLOCKS,
            "Prefix index budget",
            m.index_budget.clone(),
        );
        registry.register(
            names::INDEX_BYTES,
            "Prefix index heap bytes",
            m.index_bytes.clone(),
        );
        registry.register(
            names::INDEX_EVICTIONS,
            "Prefix index entries evicted",
            m.index_evictions.clone(),
        );
        registry.register(names::KV_EVENTS, "KV events applied", m.kv_events.clone());
        registry.register(
            names::INDEX_SOURCE,
            "Where the index learns a backend's blocks",
            m.index_source.clone(),
        );
        registry.register(
            names::CACHE_LOOKUP_ERRORS,
            "Shared-tier lookups that failed",
            m.cache_lookup_errors.clone(),
        );
        registry.register(
            names::PD_REQUESTS,
            "P/D requests by path",
            m.pd_requests.clone(),
        );
        registry.register(
            names::PD_PREFILL_SECONDS,
            "P/D prefill leg time",
            m.pd_prefill_seconds.clone(),
        );
        registry.register(
            names::PD_POOL_UP,
            "P/D pool has an instance up",
            m.pd_pool_up.clone(),
        );
        Self { registry, ..m }
    }

    /// A P/D request took `path` (for `reason`).
    pub fn pd_request(&self, path: &'static str, reason: &'static str) {
        self.pd_requests
            .get_or_create(&vec![
                ("path", path.to_string()),
                ("reason", reason.to_string()),
            ])
            .inc();
    }

    /// A prefill leg on `backend` took `took`.
    pub fn pd_prefill(&self, backend: &str, took: Duration) {
        self.pd_prefill_seconds
            .get_or_create(&vec![("backend", backend.to_string())])
            .observe(took.as_secs_f64());
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        kvcache_control::render(&self.registry)
    }

    /// A request answered.
    pub fn request(&self, backend: &str, strategy: &str, status: u16, total: Duration) {
        self.requests
            .get_or_create(&vec![
                ("backend", backend.to_string()),
                ("strategy", strategy.to_string()),
                ("status", status.to_string()),
            ])
            .inc();
        if backend != "none" {
            self.request_seconds
                .get_or_create(&vec![("backend", backend.to_string())])
                .observe(total.as_secs_f64());
        }
    }

    /// The first byte from `backend`.
    pub fn first_byte(&self, backend: &str, after: Duration) {
        self.ttfb
            .get_or_create(&vec![("backend", backend.to_string())])
            .observe(after.as_secs_f64());
    }

    /// The gateway's own time on a request.
    pub fn routed(&self, took: Duration) {
        self.routing_seconds.observe(took.as_secs_f64());
    }

    /// A routing decision and what it predicted.
    pub fn decision(
        &self,
        strategy: &str,
        backend: &str,
        blocks: usize,
        local: usize,
        shared: usize,
    ) {
        let s = vec![("strategy", strategy.to_string())];
        self.decisions
            .get_or_create(&vec![
                ("strategy", strategy.to_string()),
                ("backend", backend.to_string()),
            ])
            .inc();
        self.prompt_blocks.get_or_create(&s).inc_by(blocks as u64);
        self.predicted_local.get_or_create(&s).inc_by(local as u64);
        self.predicted_shared
            .get_or_create(&s)
            .inc_by(shared as u64);
    }

    /// A backend ejected.
    pub fn ejected(&self, backend: &str) {
        self.ejections
            .get_or_create(&vec![("backend", backend.to_string())])
            .inc();
    }

    /// A request refused by a rate limit.
    pub fn rate_limited(&self, limit: &'static str) {
        self.rate_limited
            .get_or_create(&vec![("limit", limit.to_string())])
            .inc();
    }

    /// KV events of one kind applied for a backend.
    pub fn kv_events(&self, backend: &str, kind: &'static str, n: u64) {
        self.kv_events
            .get_or_create(&vec![
                ("backend", backend.to_string()),
                ("kind", kind.to_string()),
            ])
            .inc_by(n);
    }

    /// Says where the index learns `backend`'s blocks from.
    pub fn set_index_source(&self, backend: &str, events: bool) {
        for (source, on) in [("events", events), ("routing", !events)] {
            self.index_source
                .get_or_create(&vec![
                    ("backend", backend.to_string()),
                    ("source", source.to_string()),
                ])
                .set(on as i64);
        }
    }
}

/// Shared handle.
pub type SharedMetrics = Arc<Metrics>;
