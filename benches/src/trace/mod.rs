//! `kvcache-bench trace`: the Mooncake FAST'25 trace (one `{"hash_ids": [...]}` a line, each id
//! a 512-token prefix block) replayed against a real kvcache server, once per eviction policy
//! and pool size, beside a simulation of the same store on the same sequence.
//!
//! Per request, as an engine with the connector does: `prefix_match` of the request's chain
//! keys, one `get_many_into` of the matched blocks (every byte checked against the value derived
//! from its key), one `put_many` of the rest. The block hit rate is matched blocks over
//! requested blocks. Arrival times are ignored: requests run back to back, by default one at a
//! time so the hit rate is deterministic.
//!
//! The pool holds exactly `--pool-blocks` blocks: a block takes whole pages (its data and its
//! checksum trailer), the pool is that many blocks' pages, and both watermarks are 1.0, so the
//! server evicts one block exactly when a put finds the pool full (at the default 0.95/0.90 it
//! would hold 90-95 % of the pool). The server's `kvcache_blocks_stored` says what it held.
//!
//! The simulation ([`sim::StoreModel`]) drives the store's own index shards and eviction
//! policies (`kvcache_store::index::Shard`) with the operations the server performs, in the
//! same order, and picks victims across shards as `Store::evict_one` does, so it models the
//! server at any `--shards`. With one shard (the default) both are one global LRU or S3-FIFO.
//! [`sim::TextbookLru`] is an independent LRU, a check on the store's policy itself.
//!
//! The benchmark's own work (deriving and checking values) runs between the timed calls and on
//! the same cores as the server; it counts in the throughput, not in the latencies.
//!
//! Here: the flags, the trace file and the run; `blocks` keys and values, `sim` the simulated
//! store, `replay` the server and the client side, `report` the rows and their rendering.

mod blocks;
mod replay;
mod report;
mod sim;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use kvcache_core::{BlockKey, ByteSize};
use kvcache_store::eviction::PolicyKind;

use blocks::{block_footprint, chain_keys_of, namespace};
use replay::{policy_name, replay, server_stats, start_server};
pub use report::{Report, render};
use report::{Row, fig9, format_row};
use sim::{StoreModel, TextbookLru, simulate};

/// What to replay and how (the subcommand's flags).
#[derive(clap::Args)]
pub struct Plan {
    /// A Mooncake-format trace: one `{"hash_ids": [...]}` a line (other fields are ignored).
    #[arg(long, value_name = "FILE")]
    pub trace: PathBuf,
    /// Bytes stored per block.
    #[arg(long, default_value = "64KiB")]
    pub block_size: ByteSize,
    /// Pool sizes in blocks; `inf` holds every distinct block of the replayed requests.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000,3000,5859,6000,10000,20000,inf"
    )]
    pub pool_blocks: Vec<Capacity>,
    /// Eviction policies.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "lru,s3fifo")]
    pub policy: Vec<PolicyKind>,
    /// Replay only the first N requests.
    #[arg(long, value_name = "N")]
    pub requests: Option<usize>,
    /// Requests in flight (one connection each). At 1 the replay's order, and so its hit
    /// rate, is the trace's, and the simulation must match it exactly.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Index shards of the server (rounded up to a power of two, as the server does). A sharded
    /// S3-FIFO is not one global S3-FIFO; the simulation models whichever the server runs.
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// Longest one replay may run; it stops starting requests after that and says so.
    #[arg(long, default_value_t = 600.0)]
    pub max_seconds: f64,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

impl Plan {
    /// Refuses flags out of range.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.block_size.0 >= 16 && self.block_size.0 <= 16 << 20,
            "--block-size must be 16B..=16MiB"
        );
        anyhow::ensure!(
            (1..=64).contains(&self.concurrency),
            "--concurrency must be 1..=64"
        );
        anyhow::ensure!(
            (1..=4096).contains(&self.shards),
            "--shards must be 1..=4096"
        );
        anyhow::ensure!(
            self.max_seconds > 0.0 && self.max_seconds <= 3600.0,
            "--max-seconds must be in (0, 3600]"
        );
        anyhow::ensure!(
            !self.pool_blocks.is_empty() && !self.policy.is_empty(),
            "--pool-blocks and --policy need at least one value"
        );
        anyhow::ensure!(self.requests != Some(0), "--requests must be positive");
        Ok(())
    }
}

/// A pool size: a number of blocks, or room for every distinct block of the replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capacity {
    Blocks(u64),
    Unbounded,
}

impl FromStr for Capacity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "inf" | "infinite" => Ok(Capacity::Unbounded),
            n => match n.parse::<u64>() {
                Ok(b) if b > 0 => Ok(Capacity::Blocks(b)),
                _ => Err(format!(
                    "a pool size is a positive number of blocks or `inf`, not {s:?}"
                )),
            },
        }
    }
}

/// One request of a trace: its prefix blocks, first to last.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct TraceRequest {
    pub hash_ids: Vec<u64>,
}

/// Parses a JSON-lines trace; blank lines are skipped, a bad line is named by its number.
pub fn parse_trace(text: &str) -> anyhow::Result<Vec<TraceRequest>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("trace line {} is not {{\"hash_ids\": [...]}}", i + 1))
        })
        .collect()
}

/// The value at fraction `p` of `sorted` (0 when empty).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
}

/// Runs the whole plan: every policy at every pool size, each on a fresh server.
pub async fn run(plan: &Plan) -> anyhow::Result<Report> {
    let text = std::fs::read_to_string(&plan.trace)
        .with_context(|| format!("cannot read the trace {}", plan.trace.display()))?;
    let mut requests = parse_trace(&text)?;
    if let Some(n) = plan.requests {
        requests.truncate(n);
    }
    anyhow::ensure!(!requests.is_empty(), "the trace has no requests");
    let ns = namespace();
    let chains: Arc<Vec<Vec<BlockKey>>> = Arc::new(
        requests
            .iter()
            .map(|r| chain_keys_of(&ns, &r.hash_ids))
            .collect(),
    );
    let distinct = chains.iter().flatten().collect::<HashSet<_>>().len() as u64;
    let mut unbounded = StoreModel::new(PolicyKind::Lru, 1, u64::MAX);
    let infinite = simulate(&chains, &mut unbounded);
    let shards = plan.shards.max(1).next_power_of_two();
    let block = plan.block_size.0;
    let footprint = block_footprint(block);
    eprintln!(
        "trace: {} requests, {} blocks, {distinct} distinct; infinite-cache hit rate {:.2} %; \
         a block takes {footprint} pool bytes; server: {shards} shard(s), watermarks 1.0",
        chains.len(),
        infinite.blocks,
        infinite.hit_rate() * 100.0
    );
    let mut rows = Vec::new();
    for &policy in &plan.policy {
        for &cap in &plan.pool_blocks {
            let (label, blocks) = match cap {
                Capacity::Blocks(b) => (b.to_string(), b),
                Capacity::Unbounded => ("infinite".to_string(), distinct),
            };
            let pool_bytes = blocks
                .checked_mul(footprint)
                .context("pool size overflows")?;
            let server = start_server(policy, shards, pool_bytes)
                .with_context(|| format!("{} at {label} blocks", policy_name(policy)))?;
            let deadline = Instant::now() + Duration::from_secs_f64(plan.max_seconds);
            let mut r = replay(
                &server.addr,
                Arc::clone(&chains),
                block as usize,
                plan.concurrency,
                deadline,
            )
            .await
            .with_context(|| format!("{} at {label} blocks", policy_name(policy)))?;
            let stats = server_stats(&server.metrics_addr)?;
            drop(server);
            // The simulation covers the requests the server saw (all, unless time ran out).
            let done = &chains[..r.totals.requests as usize];
            let mut model = StoreModel::new(policy, shards, blocks);
            let sim = simulate(done, &mut model);
            let textbook = (policy == PolicyKind::Lru).then(|| {
                let mut lru = TextbookLru::new(blocks);
                simulate(done, &mut lru).hit_rate()
            });
            let in_calls_us: f64 = r.latency_us.iter().sum();
            r.latency_us.sort_unstable_by(f64::total_cmp);
            let row = Row {
                policy: policy_name(policy),
                capacity: label,
                capacity_blocks: blocks,
                pool_bytes,
                requests: r.totals.requests,
                blocks_requested: r.totals.blocks,
                complete: r.complete,
                server_hit_rate: r.totals.hit_rate(),
                sim_hit_rate: sim.hit_rate(),
                gap_points: (r.totals.hit_rate() - sim.hit_rate()) * 100.0,
                textbook_lru_hit_rate: textbook,
                server_hit_blocks: r.totals.hits,
                sim_hit_blocks: sim.hits,
                server_present_blocks: r.totals.present,
                sim_present_blocks: sim.present,
                server_blocks_stored: stats.blocks_stored,
                sim_blocks_stored: model.blocks(),
                server_evictions: stats.evictions,
                sim_evictions: model.evictions(),
                server_metric_hit_blocks: stats.prefix_hit_blocks,
                lost_hits: r.lost,
                refused_puts: r.refused,
                seconds: r.seconds,
                requests_per_s: r.totals.requests as f64 / r.seconds.max(1e-9),
                gb_per_s: r.bytes as f64 / r.seconds.max(1e-9) / 1e9,
                gb_per_s_in_calls: r.bytes as f64 / (in_calls_us * 1e3).max(1.0),
                p50_ms: percentile(&r.latency_us, 0.50) / 1e3,
                p99_ms: percentile(&r.latency_us, 0.99) / 1e3,
            };
            eprintln!("{}", format_row(&row));
            if stats.prefix_requested_blocks != r.totals.blocks
                || stats.prefix_hit_blocks != r.totals.hits
            {
                eprintln!(
                    "warning: the server counted {} of {} blocks found by prefix_match, the \
                     replay {} of {}",
                    stats.prefix_hit_blocks,
                    stats.prefix_requested_blocks,
                    r.totals.hits,
                    r.totals.blocks
                );
            }
            rows.push(row);
        }
    }
    let fig9 = fig9(&rows, infinite.hit_rate());
    Ok(Report {
        trace: plan.trace.display().to_string(),
        requests: chains.len() as u64,
        blocks_requested: infinite.blocks,
        distinct_blocks: distinct,
        infinite_hit_rate: infinite.hit_rate(),
        block_bytes: block,
        block_pool_bytes: footprint,
        shards,
        concurrency: plan.concurrency,
        transport: "tcp (loopback)",
        watermarks: "high 1.0, low 1.0 (evict one block when a put finds the pool full)",
        rows,
        fig9,
    })
}
