//! APA (AIBrix's, after Huo et al. 2023): outside a tolerance band, replicas in proportion to
//! the stable average, with each step capped by a rate; no panic mode.

use super::{Params, ceil, step_bounds};

/// Replicas for a per-replica average `stable` against `target`, `ready` of `current` answering.
pub fn desired(p: &Params, current: u32, ready: u32, stable: f64, target: f64) -> u32 {
    let ratio = stable / target;
    let (lo, hi) = step_bounds(p, current);
    if ratio > 1.0 + p.tolerance_up || ratio < 1.0 - p.tolerance_down {
        ceil(ready.max(1) as f64 * ratio).clamp(lo, hi)
    } else {
        current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proportional_outside_the_band_and_capped_per_step() {
        let p = Params::default();
        assert_eq!(desired(&p, 3, 3, 2.1, 2.0), 3);
        assert_eq!(desired(&p, 3, 3, 3.0, 2.0), 5);
        assert_eq!(desired(&p, 3, 3, 10.0, 2.0), 6);
        assert_eq!(desired(&p, 3, 3, 0.2, 2.0), 1);
        assert_eq!(desired(&p, 8, 8, 0.2, 2.0), 4);
    }
}
