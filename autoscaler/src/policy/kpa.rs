//! KPA (Knative's pod autoscaler, as AIBrix implements it): replicas for the stable window's
//! average and for the short panic window's; when the panic window asks for `panic_threshold`
//! times the replicas that answer, the target panics: it scales up at once and never down.

use super::{Params, ceil, step_bounds};

/// KPA's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    pub desired: u32,
    /// The panic condition holds now.
    pub panic: bool,
}

/// Replicas for a per-replica average `stable` (and `panic`) against `target`, with `ready`
/// replicas answering out of `current`.
pub fn desired(
    p: &Params,
    current: u32,
    ready: u32,
    stable: f64,
    panic: f64,
    target: f64,
) -> Answer {
    let ready_f = ready.max(1) as f64;
    let (lo, hi) = step_bounds(p, current);
    let ratio = stable / target;
    let stable_want = if ratio > 1.0 + p.tolerance_up || ratio < 1.0 - p.tolerance_down {
        ceil(ready_f * ratio)
    } else {
        current
    };
    let panic_want = ceil(ready_f * panic / target);
    // Unrounded: at one replica, ceil() would call any load just over the target a panic.
    let panicking = panic / target >= p.panic_threshold;
    let want = if panicking {
        stable_want.max(panic_want)
    } else {
        stable_want
    };
    Answer {
        desired: want.clamp(lo, hi),
        panic: panicking,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_the_band_nothing_changes_and_outside_it_replicas_follow_the_load() {
        let p = Params::default();
        assert_eq!(desired(&p, 2, 2, 2.1, 2.1, 2.0).desired, 2);
        assert_eq!(desired(&p, 2, 2, 1.85, 1.85, 2.0).desired, 2);
        assert_eq!(desired(&p, 2, 2, 3.0, 3.0, 2.0).desired, 3);
        assert_eq!(
            desired(&p, 4, 4, 0.5, 0.5, 2.0).desired,
            2,
            "÷2 at most per step"
        );
        assert_eq!(desired(&p, 4, 4, 0.0, 0.0, 2.0).desired, 2);
    }

    #[test]
    fn a_panic_window_twice_over_scales_up_at_once_within_the_rate_cap() {
        let p = Params::default();
        let a = desired(&p, 1, 1, 1.0, 6.0, 2.0);
        assert!(a.panic);
        assert_eq!(a.desired, 2, "×2 at most per step");
        let a = desired(&p, 2, 2, 2.0, 8.0, 2.0);
        assert_eq!((a.desired, a.panic), (4, true));
        assert!(!desired(&p, 2, 2, 2.0, 3.0, 2.0).panic);
    }
}
