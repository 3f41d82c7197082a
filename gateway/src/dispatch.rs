//! One request's route: the prompt's chain keys per backend namespace, what each candidate
//! holds (the index) and what the shared tier holds (one `prefix_match` per namespace, under a
//! deadline), then the pure [`route::choose`].

use std::collections::HashMap;

use kvcache_core::{BlockKey, NamespaceId, chain_keys};
use serde_json::{Value, json};
use tracing::debug;

use crate::index::{BlockIndex, EngineId};
use crate::pd::Need;
use crate::pool::{Backend, NoBackend, Pool, adapter_namespace};
use crate::route::{self, Candidate, Cost, Strategy};
use crate::state::Gateway;

/// What the gateway knows of a prompt before picking: its tokens' chain keys in each backend
/// namespace, and how many leading blocks the shared tier holds in each.
pub struct PromptView {
    tokens: Option<Vec<u32>>,
    /// The LoRA adapter the request names, if it names one: its blocks are keyed apart.
    adapter: Option<String>,
    keys: HashMap<(NamespaceId, usize), Vec<BlockKey>>,
    shared: HashMap<NamespaceId, usize>,
}

impl PromptView {
    /// The view of `tokens` (None: the prompt could not be tokenized) for a request of
    /// `model` under `strategy`: the shared tier is asked only for `cache-aware`, and not for
    /// a LoRA adapter (its engines' namespace folds in the adapter's files, which the gateway
    /// does not read; no credit is safer than a wrong one).
    pub async fn new(
        gw: &Gateway,
        tokens: Option<Vec<u32>>,
        strategy: Strategy,
        model: &str,
    ) -> Self {
        let adapter = (gw.pool.lock().is_adapter(model) || gw.adapters.lock().contains_key(model))
            .then(|| model.to_string());
        let mut view = Self {
            adapter,
            tokens,
            keys: HashMap::new(),
            shared: HashMap::new(),
        };
        let Some(tokens) = view.tokens.as_ref() else {
            return view;
        };
        let backends: Vec<(NamespaceId, usize, bool)> = {
            let pool = gw.pool.lock();
            pool.backends()
                .iter()
                .filter(|b| !b.retired)
                .map(|b| {
                    (
                        view.namespace_of(b),
                        b.config.block_size,
                        b.config.namespace.is_some() && view.adapter.is_none(),
                    )
                })
                .collect()
        };
        for (ns, block_size, real_namespace) in backends {
            let keys = view
                .keys
                .entry((ns, block_size))
                .or_insert_with(|| chain_keys(&ns, tokens, block_size));
            // The tier is asked in the engines' own namespaces only: a derived one names no
            // block any engine stored there.
            if strategy == Strategy::CacheAware
                && real_namespace
                && !keys.is_empty()
                && !view.shared.contains_key(&ns)
                && let Some(tier) = &gw.shared
            {
                let held = match tier.matched(keys).await {
                    Ok(n) => n,
                    Err(why) => {
                        debug!(%why, "shared-tier lookup failed; routing without its credit");
                        gw.metrics.cache_lookup_errors.inc();
                        0
                    }
                };
                view.shared.insert(ns, held);
            }
        }
        view
    }

    /// The prompt's tokens, when known.
    pub fn tokens(&self) -> Option<&[u32]> {
        self.tokens.as_deref()
    }

    /// The namespace the prompt's blocks have in backend `b`'s index.
    fn namespace_of(&self, b: &Backend) -> NamespaceId {
        match &self.adapter {
            Some(a) => adapter_namespace(b.index_namespace, a),
            None => b.index_namespace,
        }
    }

    /// The chain keys of a backend's namespace (empty without tokens).
    fn keys_of(&self, b: &Backend) -> &[BlockKey] {
        self.keys
            .get(&(self.namespace_of(b), b.config.block_size))
            .map_or(&[], Vec::as_slice)
    }
}

/// A pick.
#[derive(Clone, Debug)]
pub struct Pick {
    pub engine: EngineId,
    pub url: String,
    /// Full prompt blocks.
    pub blocks: usize,
    /// Tokens per block of its engine.
    pub block_size: usize,
    pub cost: Cost,
}

/// Every candidate's routing view, with the prompt's block count.
fn candidates(
    gw: &Gateway,
    pool: &Pool,
    index: &mut BlockIndex,
    view: &PromptView,
    engines: &[EngineId],
    now: u64,
) -> (Vec<Candidate>, usize) {
    let mut out = Vec::with_capacity(engines.len());
    let mut blocks = 0;
    for &e in engines {
        let b = pool.get(e);
        let keys = view.keys_of(b);
        blocks = blocks.max(keys.len());
        let mut c = pool.candidate(e);
        c.local_blocks = index.matched(e, keys, now);
        c.shared_blocks = view.shared.get(&view.namespace_of(b)).copied().unwrap_or(0);
        c.near_cache = gw.shared.as_ref().is_some_and(|t| t.near(&b.config.url));
        out.push(c);
    }
    (out, blocks)
}

/// The backends that may take work of kind `need` for `model`: for an adapter the LoRA manager
/// knows, only those where it is Ready (the manager verified it in their /v1/models); for any
/// other model, those whose /v1/models lists it.
fn engines_for(
    gw: &Gateway,
    pool: &Pool,
    model: &str,
    now: u64,
    tried: &[EngineId],
    need: Need,
) -> Result<Vec<EngineId>, NoBackend> {
    let route = gw.adapters.lock().get(model).cloned();
    let Some(route) = route else {
        return pool.available(model, now, tried, need);
    };
    pool.available_where(|b| route.ready.contains(&b.config.url), now, tried, need)
        .map_err(|no| match no {
            NoBackend::UnknownModel => NoBackend::AdapterNotReady {
                phase: route.phase.clone(),
                error: route.error.clone(),
            },
            other => other,
        })
}

/// Picks a backend for work of kind `need` on `model` among those not yet `tried`, records the
/// dispatch in the pool (and, for a backend without KV events, the blocks it will hold in the
/// index).
pub fn pick(
    gw: &Gateway,
    view: &PromptView,
    model: &str,
    strategy: Strategy,
    tried: &[EngineId],
    need: Need,
) -> Result<Pick, NoBackend> {
    let now = gw.now_ms();
    let turn = gw.next_turn();
    let draw = gw.draw();
    let mut pool = gw.pool.lock();
    let engines = engines_for(gw, &pool, model, now, tried, need)?;
    let mut index = gw.index.lock();
    let (cands, blocks) = candidates(gw, &pool, &mut index, view, &engines, now);
    let decision = route::choose(strategy, &gw.config.cost, blocks, &cands, turn, draw);
    let engine = engines[decision.index];
    let b = pool.get(engine);
    let url = b.config.url.clone();
    let block_size = b.config.block_size;
    let keys = view.keys_of(b);
    let blocks = keys.len();
    // What the engine must compute: its prefill queue grows by that much until its first byte.
    let cost = if strategy.uses_prefixes() {
        decision.cost
    } else {
        let local = cands[decision.index].local_blocks;
        Cost {
            compute_blocks: blocks - local,
            local_blocks: local,
            ..Cost::default()
        }
    };
    if b.config.kv_events.is_none() && !keys.is_empty() {
        let until = now + gw.config.learned_ttl.as_millis() as u64;
        index.learn(engine, keys, until);
    }
    pool.dispatched(engine, cost.compute_blocks as u64);
    drop(index);
    drop(pool);
    gw.metrics.decision(
        strategy.name(),
        &url,
        blocks,
        cost.local_blocks,
        cost.loaded_blocks,
    );
    gw.publish_backend(engine);
    gw.publish_index();
    Ok(Pick {
        engine,
        url,
        blocks,
        block_size,
        cost,
    })
}

/// What routing sees for a request and what it would pick, without sending anything: the
/// answer of `POST /explain/v1/...` (operators asking "why there?", and the tests).
pub fn explain(
    gw: &Gateway,
    view: &PromptView,
    model: &str,
    strategy: Strategy,
) -> Result<Value, NoBackend> {
    let now = gw.now_ms();
    let pool = gw.pool.lock();
    // With P/D, the decode instance is picked first (what a request's route starts from).
    let need = if pool.disaggregated() {
        Need::Decode
    } else {
        Need::Any
    };
    let engines = engines_for(gw, &pool, model, now, &[], need)?;
    let mut index = gw.index.lock();
    let (cands, blocks) = candidates(gw, &pool, &mut index, view, &engines, now);
    let decision = route::choose(
        strategy,
        &gw.config.cost,
        blocks,
        &cands,
        gw.next_turn(),
        gw.draw(),
    );
    let rows: Vec<Value> = engines
        .iter()
        .zip(&cands)
        .map(|(&e, c)| {
            let cost = route::cost(&gw.config.cost, blocks, c, strategy == Strategy::CacheAware);
            json!({
                "backend": pool.get(e).config.url,
                "local_blocks": c.local_blocks,
                "shared_blocks": c.shared_blocks,
                "near_cache": c.near_cache,
                "in_flight": c.in_flight,
                "pending_blocks": c.pending_blocks,
                "engine_waiting": c.engine_waiting,
                "engine_running": c.engine_running,
                "kv_usage": c.kv_usage,
                "cost": cost.total,
            })
        })
        .collect();
    Ok(json!({
        "model": model,
        "strategy": strategy.name(),
        "prompt_tokens": view.tokens().map(<[u32]>::len),
        "token_ids": view.tokens(),
        "blocks": blocks,
        "candidates": rows,
        "disaggregated": need == Need::Decode,
        "choice": pool.get(engines[decision.index]).config.url,
    }))
}
