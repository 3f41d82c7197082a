//! `kvcache-bench gateway-index`: the gateway's prefix index under its memory budget while the
//! whole Mooncake trace is replayed into it: every request's blocks stored on one of the
//! engines (as its KV events would report them) after a prefix lookup on every engine (as
//! routing does). Reports entries, allocator-measured bytes per entry, the index's own
//! accounting, lookup latency and the hit rate the index saw.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use kvcache_core::{Namespace, chain_keys};
use kvcache_gateway::events::EngineHash;
use kvcache_gateway::index::{BlockIndex, EngineId};
use serde::Serialize;

use crate::index_memory;

/// One trace request: its prefix block ids.
#[derive(serde::Deserialize)]
struct TraceLine {
    hash_ids: Vec<u64>,
}

/// The replay's figures.
#[derive(Serialize, Debug)]
pub struct Report {
    pub trace: String,
    pub requests: usize,
    pub engines: u32,
    pub tokens_per_block: usize,
    pub budget_blocks: usize,
    pub entries_at_end: usize,
    pub max_entries: usize,
    pub evicted: u64,
    pub bytes_per_entry_measured: f64,
    pub bytes_per_entry_reported: f64,
    pub lookup_p50_us: f64,
    pub lookup_p99_us: f64,
    pub blocks_looked_up: u64,
    pub blocks_found_on_best_engine: u64,
}

/// The tokens of trace block `id`: a fixed run, so equal ids are equal tokens.
fn block_tokens(id: u64, n: usize) -> impl Iterator<Item = u32> {
    (0..n as u64).map(move |i| (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i) as u32)
}

/// Replays `trace` into a budget of `budget` entries over `engines` engines.
pub fn run(trace: &PathBuf, engines: u32, budget: usize, block: usize) -> anyhow::Result<Report> {
    let text = std::fs::read_to_string(trace)
        .with_context(|| format!("cannot read the trace {}", trace.display()))?;
    let lines: Vec<TraceLine> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("a trace line is not {\"hash_ids\": [...]}")?;
    let ns = Namespace::new("bench", "bfloat16", block as u32).id();
    let before = index_memory::live();
    let mut index = BlockIndex::new(budget);
    let mut lookups = Vec::with_capacity(lines.len());
    let (mut looked, mut found, mut max_entries) = (0u64, 0u64, 0usize);
    for (r, line) in lines.iter().enumerate() {
        let tokens: Vec<u32> = line
            .hash_ids
            .iter()
            .flat_map(|&id| block_tokens(id, block))
            .collect();
        let keys = chain_keys(&ns, &tokens, block);
        // Routing: every engine's cached prefix.
        let started = Instant::now();
        let best = (0..engines)
            .map(|e| (index.matched(e, &keys, r as u64), e))
            .max()
            .unwrap_or((0, 0));
        lookups.push(started.elapsed().as_secs_f64() * 1e6);
        looked += keys.len() as u64;
        found += best.0 as u64;
        // The chosen engine reports the blocks it computed (its own hashes: the trace ids).
        let engine: EngineId = if best.0 > 0 {
            best.1
        } else {
            (r as u32) % engines
        };
        let from = best.0;
        let hashes: Vec<EngineHash> = line.hash_ids[from..]
            .iter()
            .map(|&id| EngineHash(id))
            .collect();
        let parent = from.checked_sub(1).map(|i| EngineHash(line.hash_ids[i]));
        if !hashes.is_empty() {
            // A parent evicted from the index in between is refused, as with a live engine.
            let _ = index.stored(engine, ns, parent, &hashes, &tokens[from * block..], block);
        }
        max_entries = max_entries.max(index.len());
    }
    let measured = (index_memory::live() - before) as f64 / index.len().max(1) as f64;
    lookups.sort_by(f64::total_cmp);
    let pct = |p: f64| lookups[((lookups.len() - 1) as f64 * p) as usize];
    Ok(Report {
        trace: trace.display().to_string(),
        requests: lines.len(),
        engines,
        tokens_per_block: block,
        budget_blocks: budget,
        entries_at_end: index.len(),
        max_entries,
        evicted: index.evicted(),
        bytes_per_entry_measured: measured,
        bytes_per_entry_reported: index.heap_bytes() as f64 / index.len().max(1) as f64,
        lookup_p50_us: pct(0.5),
        lookup_p99_us: pct(0.99),
        blocks_looked_up: looked,
        blocks_found_on_best_engine: found,
    })
}
