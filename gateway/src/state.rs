//! What every request handler and background task shares: the resolved config, the backends,
//! the prefix index, the keys, the tokenizer, the shared tier, the LoRA adapters' routes and the metrics.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

use crate::access::Access;
use crate::adapters::AdapterRoutes;
use crate::config::Config;
use crate::index::{BlockIndex, EngineId};
use crate::metrics::Metrics;
use crate::pd::Role;
use crate::pool::Pool;
use crate::prompt::PromptTokenizer;
use crate::shared_tier::SharedTier;
use crate::upstream::{self, HttpClient};

/// The gateway's shared state.
pub struct Gateway {
    pub config: Config,
    pub pool: Mutex<Pool>,
    pub index: Mutex<BlockIndex>,
    pub access: Mutex<Access>,
    /// LoRA adapters as the manager last reported them (empty without one).
    pub adapters: Mutex<AdapterRoutes>,
    pub metrics: Metrics,
    pub tokenizer: Option<PromptTokenizer>,
    pub shared: Option<Arc<SharedTier>>,
    pub http: HttpClient,
    started: Instant,
    turn: AtomicU64,
    random: RandomState,
}

impl Gateway {
    /// The state for `config` (the tokenizer already loaded, if any).
    pub fn new(config: Config, tokenizer: Option<PromptTokenizer>) -> Arc<Self> {
        let shared = (!config.cache.is_empty()).then(|| {
            SharedTier::new(
                &config.cache,
                config.cache_token.clone(),
                config.cache_lookup_timeout,
            )
        });
        let metrics = Metrics::new();
        metrics.index_budget.set(config.index_budget_blocks as i64);
        Arc::new(Self {
            pool: Mutex::new(Pool::new(config.backends.clone())),
            index: Mutex::new(BlockIndex::new(config.index_budget_blocks)),
            access: Mutex::new(Access::new(config.api_keys.clone())),
            adapters: Mutex::new(AdapterRoutes::new()),
            metrics,
            tokenizer,
            shared,
            http: upstream::client(config.connect_timeout),
            started: Instant::now(),
            turn: AtomicU64::new(0),
            random: RandomState::new(),
            config,
        })
    }

    /// Milliseconds since start: the clock the pure parts take as input.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Seconds since start, for the rate limits.
    pub fn now_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// The next round-robin turn.
    pub fn next_turn(&self) -> u64 {
        self.turn.fetch_add(1, Ordering::Relaxed)
    }

    /// A random number for random picks and ties.
    pub fn draw(&self) -> u64 {
        self.random
            .hash_one((self.next_turn(), self.started.elapsed().as_nanos()))
    }

    /// Sets backend `e`'s gauges from the pool.
    pub fn publish_backend(&self, e: EngineId) {
        let now = self.now_ms();
        let (url, up, in_flight, pools) = {
            let pool = self.pool.lock();
            let b = pool.get(e);
            let pools = pool.disaggregated().then(|| {
                [Role::Prefill, Role::Decode].map(|r| (r, pool.up_for(r.need(), now) > 0))
            });
            (b.config.url.clone(), b.up(now), b.in_flight, pools)
        };
        for (role, up) in pools.into_iter().flatten() {
            self.metrics
                .pd_pool_up
                .get_or_create(&vec![("role", role.name().to_string())])
                .set(up as i64);
        }
        let labels = vec![("backend", url)];
        self.metrics
            .backend_up
            .get_or_create(&labels)
            .set(up as i64);
        self.metrics
            .backend_in_flight
            .get_or_create(&labels)
            .set(in_flight as i64);
    }

    /// Sets the index's gauges.
    pub fn publish_index(&self) {
        let index = self.index.lock();
        self.metrics.index_blocks.set(index.len() as i64);
        self.metrics.index_bytes.set(index.heap_bytes() as i64);
        self.metrics.index_evictions.set(index.evicted() as i64);
    }
}
