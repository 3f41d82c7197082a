//! The scaling algorithms, one file each, all pure: given the current replica count, the
//! replicas answering and a metric's windowed averages against its target, how many replicas.
//! `kpa.rs` (stable and panic windows), `apa.rs` (a tolerance band and rate caps), `slo.rs`
//! (replicas from demand over measured capacity, corrected by a latency SLO). What they share
//! (the bounds, the cooldown, panic's hold) is applied around them in `target.rs`.

pub mod apa;
pub mod kpa;
pub mod slo;

use serde::Deserialize;

/// Which algorithm a target uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    #[default]
    Kpa,
    Apa,
    Slo,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Self::Kpa => "kpa",
            Self::Apa => "apa",
            Self::Slo => "slo",
        }
    }
}

/// The knobs the algorithms share (AIBrix's defaults where it has one).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    /// Inside [target·(1−down), target·(1+up)] nothing changes.
    pub tolerance_up: f64,
    pub tolerance_down: f64,
    /// At most ×rate_up (and at least +1) replicas in one step up, ÷rate_down in one step down.
    pub rate_up: f64,
    pub rate_down: f64,
    /// KPA panics when the panic window asks for this many times the replicas that answer.
    pub panic_threshold: f64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            tolerance_up: 0.1,
            tolerance_down: 0.1,
            rate_up: 2.0,
            rate_down: 2.0,
            panic_threshold: 2.0,
        }
    }
}

/// `ceil(x)`, forgiving float noise (`2.0000000001` is 2).
pub fn ceil(x: f64) -> u32 {
    (x - 1e-9).ceil().max(0.0) as u32
}

/// The bounds one step may move `current` within.
pub fn step_bounds(p: &Params, current: u32) -> (u32, u32) {
    let n = current.max(1) as f64;
    let up = ceil(p.rate_up * n).max(current + 1);
    let down = (n / p.rate_down).floor() as u32;
    (down, up)
}
