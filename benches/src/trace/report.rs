//! What a run reports: a row per policy and pool size (server beside simulation), the Mooncake
//! paper's Fig. 9 point, the JSON schema of `--json` and the Markdown table.

use serde::Serialize;

use super::blocks::TRACE_BLOCK_TOKENS;

/// The pool size Fig. 9 of the Mooncake paper quotes: 3M tokens in 512-token blocks.
const FIG9_BLOCKS: u64 = 3_000_000 / TRACE_BLOCK_TOKENS as u64;
/// Fig. 9: that pool reaches 46 % of the maximum (infinite-cache) hit rate on this workload.
const FIG9_FRACTION: f64 = 0.46;

/// One policy at one pool size: the server's figures beside the simulation's.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub policy: &'static str,
    /// `"infinite"` or the number of blocks asked for.
    pub capacity: String,
    pub capacity_blocks: u64,
    pub pool_bytes: u64,
    pub requests: u64,
    pub blocks_requested: u64,
    /// False if the replay stopped at `--max-seconds` (the simulation then covers the same
    /// requests).
    pub complete: bool,
    pub server_hit_rate: f64,
    pub sim_hit_rate: f64,
    /// Server minus simulation, in percentage points.
    pub gap_points: f64,
    /// The independent LRU's hit rate (LRU rows only).
    pub textbook_lru_hit_rate: Option<f64>,
    pub server_hit_blocks: u64,
    pub sim_hit_blocks: u64,
    /// Blocks after a request's prefix that the cache held already (puts answered "present").
    pub server_present_blocks: u64,
    pub sim_present_blocks: u64,
    /// Blocks held at the end, by the server's own metric and by the simulation.
    pub server_blocks_stored: u64,
    pub sim_blocks_stored: u64,
    pub server_evictions: u64,
    pub sim_evictions: u64,
    /// The server's own count of prefix-matched blocks (must equal server_hit_blocks).
    pub server_metric_hit_blocks: u64,
    pub lost_hits: u64,
    pub refused_puts: u64,
    pub seconds: f64,
    pub requests_per_s: f64,
    /// Block bytes moved (gets and puts) over the replay's wall time, which includes the
    /// benchmark deriving and checking every value.
    pub gb_per_s: f64,
    /// The same bytes over the time spent inside the requests' calls alone (summed over
    /// connections, so per connection when `--concurrency` is above 1).
    pub gb_per_s_in_calls: f64,
    /// Per request (lookup, gets and puts), milliseconds.
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// The paper's Fig. 9 point: the hit rate of a 3M-token pool as a fraction of the infinite one.
#[derive(Clone, Debug, Serialize)]
pub struct Fig9 {
    pub policy: &'static str,
    pub blocks: u64,
    pub hit_rate: f64,
    pub infinite_hit_rate: f64,
    pub fraction_of_infinite: f64,
    pub sim_fraction_of_infinite: f64,
    pub paper_fraction: f64,
}

/// The whole run, in the JSON schema of `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub trace: String,
    pub requests: u64,
    pub blocks_requested: u64,
    pub distinct_blocks: u64,
    /// Every block seen before is a hit (the simulation; the `inf` rows measure it too).
    pub infinite_hit_rate: f64,
    pub block_bytes: u64,
    /// Pool bytes one block takes (data, checksum trailer, page rounding).
    pub block_pool_bytes: u64,
    pub shards: usize,
    pub concurrency: usize,
    pub transport: &'static str,
    pub watermarks: &'static str,
    pub rows: Vec<Row>,
    pub fig9: Vec<Fig9>,
}

/// The Fig. 9 comparison, for each policy with a row at [`FIG9_BLOCKS`].
pub(super) fn fig9(rows: &[Row], sim_infinite: f64) -> Vec<Fig9> {
    rows.iter()
        .filter(|r| r.capacity_blocks == FIG9_BLOCKS && r.capacity != "infinite")
        .map(|r| {
            // The server's own infinite row where there is one, else the simulation's ceiling.
            let inf = rows
                .iter()
                .find(|i| i.policy == r.policy && i.capacity == "infinite" && i.complete)
                .map_or(sim_infinite, |i| i.server_hit_rate);
            Fig9 {
                policy: r.policy,
                blocks: FIG9_BLOCKS,
                hit_rate: r.server_hit_rate,
                infinite_hit_rate: inf,
                fraction_of_infinite: r.server_hit_rate / inf.max(1e-12),
                sim_fraction_of_infinite: r.sim_hit_rate / sim_infinite.max(1e-12),
                paper_fraction: FIG9_FRACTION,
            }
        })
        .collect()
}

/// One row as a line of the progress log.
pub(super) fn format_row(r: &Row) -> String {
    format!(
        "{:<6} {:>9} blocks: server {:6.2} %  sim {:6.2} %  gap {:+.2} pt  stored {:>6} \
         (sim {:>6})  {:7.1} req/s  {:5.2} GB/s ({:5.2} in calls)  p50 {:7.2} ms  p99 {:7.2} ms{}",
        r.policy,
        r.capacity,
        r.server_hit_rate * 100.0,
        r.sim_hit_rate * 100.0,
        r.gap_points,
        r.server_blocks_stored,
        r.sim_blocks_stored,
        r.requests_per_s,
        r.gb_per_s,
        r.gb_per_s_in_calls,
        r.p50_ms,
        r.p99_ms,
        if r.complete {
            ""
        } else {
            "  (stopped at --max-seconds)"
        }
    )
}

/// The report as a Markdown table, then the Fig. 9 lines.
pub fn render(report: &Report) -> String {
    let mut s = String::from(
        "| policy | capacity (blocks) | server hit rate | simulated | gap (pt) | blocks held (server) | req/s | GB/s (wall / in calls) | p50 / p99 ms |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &report.rows {
        let mut cap = if r.capacity == "infinite" {
            format!("infinite ({})", r.capacity_blocks)
        } else {
            r.capacity.clone()
        };
        if !r.complete {
            cap += &format!(" (stopped after {} requests)", r.requests);
        }
        s += &format!(
            "| {} | {cap} | {:.2} % | {:.2} % | {:+.2} | {} | {:.1} | {:.2} / {:.2} | {:.2} / {:.2} |\n",
            r.policy,
            r.server_hit_rate * 100.0,
            r.sim_hit_rate * 100.0,
            r.gap_points,
            r.server_blocks_stored,
            r.requests_per_s,
            r.gb_per_s,
            r.gb_per_s_in_calls,
            r.p50_ms,
            r.p99_ms
        );
    }
    for f in &report.fig9 {
        s += &format!(
            "\nFig. 9, {}: {} blocks (3M tokens) hit {:.2} % against {:.2} % infinite: {:.1} % of \
             the maximum (paper: {:.0} %)",
            f.policy,
            f.blocks,
            f.hit_rate * 100.0,
            f.infinite_hit_rate * 100.0,
            f.fraction_of_infinite * 100.0,
            f.paper_fraction * 100.0
        );
    }
    s
}
