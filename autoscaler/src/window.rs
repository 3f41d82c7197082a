//! A metric's recent values with their times, averaged over a trailing span (the stable and
//! panic windows). Pure: times are milliseconds given by the caller.

use std::collections::VecDeque;

/// Values of one metric, oldest first, kept for `keep_ms`.
#[derive(Clone, Debug)]
pub struct Window {
    samples: VecDeque<(u64, f64)>,
    keep_ms: u64,
}

impl Window {
    pub fn new(keep_ms: u64) -> Self {
        Self {
            samples: VecDeque::new(),
            keep_ms,
        }
    }

    /// Adds `value` seen at `at_ms`, dropping what is older than the window.
    pub fn push(&mut self, at_ms: u64, value: f64) {
        self.samples.push_back((at_ms, value));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| at_ms.saturating_sub(*t) > self.keep_ms)
        {
            self.samples.pop_front();
        }
    }

    /// The mean of the values within `span_ms` before `now_ms` (None when it holds none).
    pub fn mean(&self, now_ms: u64, span_ms: u64) -> Option<f64> {
        let recent: Vec<f64> = self
            .samples
            .iter()
            .filter(|(t, _)| now_ms.saturating_sub(*t) <= span_ms)
            .map(|(_, v)| *v)
            .collect();
        (!recent.is_empty()).then(|| recent.iter().sum::<f64>() / recent.len() as f64)
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// How long before `now_ms` its oldest value was seen (0 when empty).
    pub fn span(&self, now_ms: u64) -> u64 {
        self.samples
            .front()
            .map_or(0, |(t, _)| now_ms.saturating_sub(*t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn means_cover_the_trailing_span_and_old_values_go() {
        let mut w = Window::new(10_000);
        for (t, v) in [(0, 10.0), (5_000, 2.0), (9_000, 4.0), (10_000, 6.0)] {
            w.push(t, v);
        }
        assert_eq!(w.mean(10_000, 10_000), Some(5.5));
        assert_eq!(w.mean(10_000, 1_000), Some(5.0));
        w.push(16_000, 0.0);
        let left = w.mean(16_000, 100_000).unwrap();
        assert!(
            (left - 10.0 / 3.0).abs() < 1e-9,
            "the values at 0 and 5 s left the 10 s window: {left}"
        );
        assert_eq!(Window::new(1).mean(0, 1), None);
    }
}
