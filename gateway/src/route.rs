//! The routing decision, pure: no clock, no I/O, no randomness of its own (the caller passes a
//! random draw), so it is tested on recorded states.
//!
//! Every candidate instance gets one cost, an expected time to first token in units of "one
//! prompt block computed": the blocks it must compute, plus the blocks it loads from the shared
//! cache tier at a fraction of that (cheaper from a cache node on its own host), plus its queue
//! (prefill blocks the gateway dispatched to it that have not produced a first byte yet, the
//! requests waiting in the engine, the requests it runs) and a penalty as its KV cache fills.
//! The lowest cost wins; candidates within a hair of it tie, and the draw breaks the tie. There
//! is no mode switch between "affinity" and "balance": a prefix any instance can load from a
//! cache node makes affinity cheap to give up, so load wins exactly when it should.

use serde::Deserialize;

/// How to pick an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Any healthy instance, uniformly.
    Random,
    /// Each healthy instance in turn.
    RoundRobin,
    /// The instance with the fewest requests in flight from this gateway.
    LeastRequest,
    /// The one cost without the shared-tier credit: the engines' own caches and load only
    /// (the baseline the peers' cache-aware routers implement).
    Prefix,
    /// The one cost with the shared-tier credit.
    CacheAware,
}

impl Strategy {
    /// The name used in flags, headers and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Random => "random",
            Strategy::RoundRobin => "round-robin",
            Strategy::LeastRequest => "least-request",
            Strategy::Prefix => "prefix",
            Strategy::CacheAware => "cache-aware",
        }
    }

    /// Parses a name as [`name`](Self::name) writes it.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Strategy::Random,
            Strategy::RoundRobin,
            Strategy::LeastRequest,
            Strategy::Prefix,
            Strategy::CacheAware,
        ]
        .into_iter()
        .find(|k| k.name() == s.trim())
    }

    /// Whether the strategy looks at prompt blocks at all.
    pub fn uses_prefixes(self) -> bool {
        matches!(self, Strategy::Prefix | Strategy::CacheAware)
    }
}

/// The weights of the cost, in units of computing one prompt block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CostModel {
    /// Loading one block from a cache node on another host.
    pub transfer: f64,
    /// Loading one block from a cache node on the instance's own host.
    pub near_transfer: f64,
    /// Each request the instance is running (its decode steps slow a new prefill).
    pub running: f64,
    /// Each request waiting in the engine's queue.
    pub waiting: f64,
    /// At a full KV cache; scaled by usage squared (preemption looms as it fills).
    pub kv_pressure: f64,
}

impl Default for CostModel {
    fn default() -> Self {
        Self {
            transfer: 0.1,
            near_transfer: 0.05,
            running: 0.5,
            waiting: 4.0,
            kv_pressure: 8.0,
        }
    }
}

/// What is known of one instance when a request arrives.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Candidate {
    /// Leading prompt blocks in the instance's own KV cache.
    pub local_blocks: usize,
    /// Leading prompt blocks the shared tier holds (the same for every candidate of a
    /// namespace; zero where the instance's namespace is unknown).
    pub shared_blocks: usize,
    /// Whether a cache node runs on the instance's host.
    pub near_cache: bool,
    /// Requests this gateway has in flight there.
    pub in_flight: u32,
    /// Prompt blocks this gateway sent there to compute that have not produced a first byte.
    pub pending_blocks: u64,
    /// The engine's own `vllm:num_requests_waiting` (last scrape).
    pub engine_waiting: u32,
    /// The engine's own `vllm:num_requests_running` (last scrape).
    pub engine_running: u32,
    /// The engine's `vllm:kv_cache_usage_perc`, 0..1 (last scrape).
    pub kv_usage: f64,
}

/// One candidate's cost, by part.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    pub compute_blocks: usize,
    pub loaded_blocks: usize,
    pub local_blocks: usize,
    pub total: f64,
}

/// The pick.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    /// Index into the candidates.
    pub index: usize,
    /// The winner's cost (zeros for strategies that do not score).
    pub cost: Cost,
}

/// The expected time to first token of a prompt of `blocks` full blocks on `c`.
pub fn cost(model: &CostModel, blocks: usize, c: &Candidate, shared_credit: bool) -> Cost {
    let local = c.local_blocks.min(blocks);
    let shared = if shared_credit {
        c.shared_blocks.min(blocks)
    } else {
        0
    };
    let loaded = shared.saturating_sub(local);
    let compute = blocks - local - loaded;
    let per_load = if c.near_cache {
        model.near_transfer
    } else {
        model.transfer
    };
    // The running count the engine reports includes what this gateway sent; take the larger so
    // a stale scrape does not hide a burst the gateway just dispatched.
    let running = c.engine_running.max(c.in_flight) as f64;
    let usage = c.kv_usage.clamp(0.0, 1.0);
    let total = compute as f64
        + loaded as f64 * per_load
        + c.pending_blocks as f64
        + c.engine_waiting as f64 * model.waiting
        + running * model.running
        + usage * usage * model.kv_pressure;
    Cost {
        compute_blocks: compute,
        loaded_blocks: loaded,
        local_blocks: local,
        total,
    }
}

/// Picks among `candidates` (none empty: the caller filters healthy ones and refuses when
/// none is left). `turn` is a counter for round-robin; `draw` a random number for random
/// picks and ties.
pub fn choose(
    strategy: Strategy,
    model: &CostModel,
    blocks: usize,
    candidates: &[Candidate],
    turn: u64,
    draw: u64,
) -> Decision {
    assert!(!candidates.is_empty(), "choose needs a candidate");
    let n = candidates.len();
    let pick = |index: usize| Decision {
        index,
        cost: Cost::default(),
    };
    match strategy {
        Strategy::Random => pick((draw % n as u64) as usize),
        Strategy::RoundRobin => pick((turn % n as u64) as usize),
        Strategy::LeastRequest => {
            let scores: Vec<f64> = candidates.iter().map(|c| c.in_flight as f64).collect();
            pick(lowest(&scores, draw))
        }
        Strategy::Prefix | Strategy::CacheAware => {
            let credit = strategy == Strategy::CacheAware;
            let costs: Vec<Cost> = candidates
                .iter()
                .map(|c| cost(model, blocks, c, credit))
                .collect();
            let totals: Vec<f64> = costs.iter().map(|c| c.total).collect();
            let index = lowest(&totals, draw);
            Decision {
                index,
                cost: costs[index],
            }
        }
    }
}

/// The index of the lowest score; among those within 1e-9 of it, the `draw`-th.
fn lowest(scores: &[f64], draw: u64) -> usize {
    let min = scores.iter().copied().fold(f64::INFINITY, f64::min);
    let ties: Vec<usize> = (0..scores.len())
        .filter(|&i| scores[i] <= min + 1e-9)
        .collect();
    ties[(draw % ties.len() as u64) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle() -> Candidate {
        Candidate::default()
    }

    #[test]
    fn equal_loads_send_a_prompt_to_the_instance_that_holds_its_prefix() {
        let holder = Candidate {
            local_blocks: 6,
            ..idle()
        };
        for draw in 0..8 {
            let d = choose(
                Strategy::Prefix,
                &CostModel::default(),
                8,
                &[idle(), holder, idle()],
                0,
                draw,
            );
            assert_eq!(d.index, 1);
            assert_eq!(d.cost.compute_blocks, 2);
        }
    }

    #[test]
    fn a_queue_on_the_holder_sends_work_elsewhere_sooner_when_the_shared_tier_has_the_prefix() {
        let m = CostModel::default();
        // The holder has 8 of 10 blocks but 6 blocks of other prompts queued ahead.
        let holder = Candidate {
            local_blocks: 8,
            shared_blocks: 8,
            pending_blocks: 6,
            in_flight: 1,
            ..idle()
        };
        let other = Candidate {
            shared_blocks: 8,
            ..idle()
        };
        // Without the credit the other instance would compute 10 blocks: the holder wins.
        assert_eq!(
            choose(Strategy::Prefix, &m, 10, &[holder, other], 0, 0).index,
            0
        );
        // With it, the other loads 8 blocks cheaply and computes 2: it wins.
        let d = choose(Strategy::CacheAware, &m, 10, &[holder, other], 0, 0);
        assert_eq!(d.index, 1);
        assert_eq!((d.cost.loaded_blocks, d.cost.compute_blocks), (8, 2));
    }

    #[test]
    fn a_burst_sharing_one_prefix_spreads_as_dispatches_pile_up() {
        // Replays a burst: each dispatch adds its computed blocks to the chosen instance's
        // queue and (as a prediction) its prefix to that instance's cache.
        let m = CostModel::default();
        let blocks = 16;
        let mut cands = [idle(), idle(), idle()];
        let mut counts = [0; 3];
        for draw in 0..30u64 {
            let d = choose(Strategy::CacheAware, &m, blocks, &cands, 0, draw);
            counts[d.index] += 1;
            let c = &mut cands[d.index];
            c.pending_blocks += d.cost.compute_blocks as u64;
            c.in_flight += 1;
            c.local_blocks = blocks;
        }
        assert!(counts.iter().all(|&n| n >= 5), "burst piled up: {counts:?}");
    }

    #[test]
    fn a_near_cache_node_makes_loading_cheaper() {
        let m = CostModel::default();
        let far = Candidate {
            shared_blocks: 10,
            ..idle()
        };
        let near = Candidate {
            near_cache: true,
            ..far
        };
        assert_eq!(
            choose(Strategy::CacheAware, &m, 10, &[far, near], 0, 0).index,
            1
        );
    }

    #[test]
    fn ties_are_broken_by_the_draw_and_every_tied_instance_can_win() {
        let cands = [idle(), idle(), idle()];
        let mut seen = [false; 3];
        for draw in 0..3 {
            seen[choose(
                Strategy::CacheAware,
                &CostModel::default(),
                4,
                &cands,
                0,
                draw,
            )
            .index] = true;
        }
        assert_eq!(seen, [true; 3]);
    }

    #[test]
    fn engine_queue_and_kv_pressure_count_against_an_instance() {
        let m = CostModel::default();
        let busy = Candidate {
            local_blocks: 4,
            engine_waiting: 2,
            ..idle()
        };
        assert_eq!(
            choose(Strategy::Prefix, &m, 4, &[busy, idle()], 0, 0).index,
            1
        );
        let full = Candidate {
            local_blocks: 4,
            kv_usage: 1.0,
            ..idle()
        };
        assert_eq!(
            choose(Strategy::Prefix, &m, 4, &[full, idle()], 0, 0).index,
            1
        );
    }

    #[test]
    fn the_simple_strategies_do_what_their_names_say() {
        let m = CostModel::default();
        let cands = [
            Candidate {
                in_flight: 3,
                ..idle()
            },
            Candidate {
                in_flight: 1,
                ..idle()
            },
            Candidate {
                in_flight: 2,
                ..idle()
            },
        ];
        assert_eq!(choose(Strategy::LeastRequest, &m, 0, &cands, 0, 0).index, 1);
        let rr: Vec<usize> = (0..6)
            .map(|t| choose(Strategy::RoundRobin, &m, 0, &cands, t, 0).index)
            .collect();
        assert_eq!(rr, [0, 1, 2, 0, 1, 2]);
        assert_eq!(choose(Strategy::Random, &m, 0, &cands, 0, 5).index, 2);
        assert_eq!(Strategy::parse("cache-aware"), Some(Strategy::CacheAware));
        assert_eq!(Strategy::parse("bogus"), None);
    }
}
