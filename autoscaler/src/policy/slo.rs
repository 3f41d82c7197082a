//! An SLO policy, after Dynamo's planner: the replicas the demand needs (a rate, such as prompt
//! tokens per second, over what one replica was measured to carry), corrected by latency: a
//! latency over its SLO adds a replica now (the capacity figure was optimistic), one well
//! under it lets the demand's answer bring the count down.

use super::{Params, ceil};

/// The inputs of one decision.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Inputs {
    pub current: u32,
    /// Total demand (all replicas together) and what one replica carries; None without a
    /// throughput metric.
    pub demand: Option<(f64, f64)>,
    /// The worst latency metric's stable average over its SLO; None without one.
    pub latency_ratio: Option<f64>,
}

/// The answer and which rule gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    Demand,
    LatencyOver,
    Hold,
}

/// Replicas for `i`.
pub fn desired(p: &Params, i: Inputs) -> (u32, Rule) {
    let by_demand = i.demand.map(|(rate, per)| ceil(rate / per).max(1));
    match i.latency_ratio {
        Some(r) if r > 1.0 + p.tolerance_up => {
            let up = (i.current + 1).max(by_demand.unwrap_or(0));
            (up, Rule::LatencyOver)
        }
        Some(r) if r >= 1.0 - p.tolerance_down => match by_demand {
            Some(d) if d > i.current => (d, Rule::Demand),
            _ => (i.current, Rule::Hold),
        },
        _ => match by_demand {
            Some(d) => (d, Rule::Demand),
            None => (i.current, Rule::Hold),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(current: u32, demand: Option<(f64, f64)>, latency_ratio: Option<f64>) -> (u32, Rule) {
        desired(
            &Params::default(),
            Inputs {
                current,
                demand,
                latency_ratio,
            },
        )
    }

    #[test]
    fn demand_sizes_the_pool_and_latency_over_the_slo_adds_a_replica() {
        assert_eq!(at(1, Some((2500.0, 1000.0)), Some(0.5)), (3, Rule::Demand));
        assert_eq!(at(3, Some((500.0, 1000.0)), Some(0.5)), (1, Rule::Demand));
        assert_eq!(
            at(2, Some((500.0, 1000.0)), Some(1.5)),
            (3, Rule::LatencyOver)
        );
        assert_eq!(
            at(2, Some((500.0, 1000.0)), Some(0.95)),
            (2, Rule::Hold),
            "near the SLO: hold"
        );
        assert_eq!(at(2, None, Some(0.2)), (2, Rule::Hold));
    }
}
