//! S3-FIFO (Yang et al., SOSP'23): new blocks enter a small FIFO; blocks read while there move to
//! the main FIFO, the rest leave early (and are remembered in a ghost list, so a quick return
//! goes straight to main). The main FIFO reinserts blocks read since their last pass. A hit only
//! bumps a counter, so reads never reorder a list.

use std::collections::{HashMap, VecDeque};

use kvcache_core::BlockKey;

use super::EvictionPolicy;

/// Share of tracked blocks the small FIFO aims for.
const SMALL_SHARE: f64 = 0.10;
/// Frequency saturates here (two bits in the paper).
const MAX_FREQ: u8 = 3;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Queue {
    None,
    Small,
    Main,
}

#[derive(Clone, Copy)]
struct Meta {
    /// Bumped on every insert so stale queue entries of a reused slot are recognised.
    epoch: u32,
    /// Low bits of the key, for the ghost list.
    fingerprint: u32,
    /// Logical time of the last insert or read.
    stamp: u32,
    freq: u8,
    queue: Queue,
}

/// S3-FIFO over slot ids.
#[derive(Default)]
pub struct S3Fifo {
    meta: Vec<Meta>,
    small: VecDeque<(u32, u32)>,
    main: VecDeque<(u32, u32)>,
    ghost_order: VecDeque<u32>,
    ghost: HashMap<u32, u32>,
    tracked: usize,
    small_len: usize,
}

impl S3Fifo {
    fn live(&self, (slot, epoch): (u32, u32), queue: Queue) -> bool {
        let m = self.meta[slot as usize];
        m.epoch == epoch && m.queue == queue
    }

    fn remember_ghost(&mut self, fingerprint: u32) {
        *self.ghost.entry(fingerprint).or_insert(0) += 1;
        self.ghost_order.push_back(fingerprint);
        let cap = (self.tracked - self.small_len).max(16);
        while self.ghost_order.len() > cap {
            let old = self.ghost_order.pop_front().expect("non-empty");
            if let Some(n) = self.ghost.get_mut(&old) {
                *n -= 1;
                if *n == 0 {
                    self.ghost.remove(&old);
                }
            }
        }
    }

    fn untrack(&mut self, slot: u32) {
        let m = &mut self.meta[slot as usize];
        if m.queue == Queue::Small {
            self.small_len -= 1;
        }
        m.queue = Queue::None;
        self.tracked -= 1;
    }

    /// Drops stale entries at the queues' fronts so lengths stay meaningful.
    fn compact_front(&mut self) {
        while let Some(&e) = self.small.front() {
            if self.live(e, Queue::Small) {
                break;
            }
            self.small.pop_front();
        }
        while let Some(&e) = self.main.front() {
            if self.live(e, Queue::Main) {
                break;
            }
            self.main.pop_front();
        }
    }
}

impl EvictionPolicy for S3Fifo {
    fn insert(&mut self, slot: u32, key: BlockKey, now: u32) {
        let idx = slot as usize;
        if idx >= self.meta.len() {
            self.meta.resize(
                idx + 1,
                Meta {
                    epoch: 0,
                    fingerprint: 0,
                    stamp: 0,
                    freq: 0,
                    queue: Queue::None,
                },
            );
        }
        let fingerprint = key.low64() as u32;
        let to_main = self.ghost.contains_key(&fingerprint);
        let m = &mut self.meta[idx];
        m.epoch = m.epoch.wrapping_add(1);
        m.fingerprint = fingerprint;
        m.stamp = now;
        m.freq = 0;
        m.queue = if to_main { Queue::Main } else { Queue::Small };
        let entry = (slot, m.epoch);
        if to_main {
            self.main.push_back(entry);
        } else {
            self.small.push_back(entry);
            self.small_len += 1;
        }
        self.tracked += 1;
    }

    fn touch(&mut self, slot: u32, now: u32) {
        let m = &mut self.meta[slot as usize];
        m.freq = (m.freq + 1).min(MAX_FREQ);
        m.stamp = now;
    }

    fn remove(&mut self, slot: u32) {
        self.untrack(slot);
        self.compact_front();
    }

    fn pop_victim(&mut self, evictable: &mut dyn FnMut(u32) -> bool) -> Option<u32> {
        // Every live entry is visited at most a few times (freq ≤ 3, one promotion), so this
        // bound ends the loop even when every block is leased.
        let mut budget = (self.small.len() + self.main.len()) * (MAX_FREQ as usize + 2) + 1;
        while budget > 0 && self.tracked > 0 {
            budget -= 1;
            self.compact_front();
            let small_target = ((self.tracked as f64 * SMALL_SHARE).ceil() as usize).max(1);
            if !self.small.is_empty() && (self.small_len >= small_target || self.main.is_empty()) {
                let (slot, epoch) = self.small.pop_front().expect("non-empty");
                let m = self.meta[slot as usize];
                if m.freq > 0 || !evictable(slot) {
                    // Read while on probation (or leased now): promote to main.
                    self.small_len -= 1;
                    let meta = &mut self.meta[slot as usize];
                    meta.queue = Queue::Main;
                    meta.freq = 0;
                    self.main.push_back((slot, epoch));
                    continue;
                }
                self.untrack(slot);
                self.remember_ghost(m.fingerprint);
                return Some(slot);
            }
            let Some((slot, epoch)) = self.main.pop_front() else {
                break;
            };
            let m = &mut self.meta[slot as usize];
            if m.freq > 0 {
                m.freq -= 1;
                self.main.push_back((slot, epoch));
                continue;
            }
            if !evictable(slot) {
                self.main.push_back((slot, epoch));
                continue;
            }
            self.untrack(slot);
            return Some(slot);
        }
        None
    }

    fn next_victim_stamp(&self) -> Option<u32> {
        // The front of the queue `pop_victim` would start with (same rule), skipping stale
        // entries; the other queue if that one holds none.
        let first = |q: &VecDeque<(u32, u32)>, queue: Queue| {
            q.iter().copied().find(|&e| self.live(e, queue))
        };
        let small_target = ((self.tracked as f64 * SMALL_SHARE).ceil() as usize).max(1);
        let from_small =
            !self.small.is_empty() && (self.small_len >= small_target || self.main.is_empty());
        let (small, main) = (
            first(&self.small, Queue::Small),
            first(&self.main, Queue::Main),
        );
        let entry = if from_small {
            small.or(main)
        } else {
            main.or(small)
        };
        entry.map(|(slot, _)| self.meta[slot as usize].stamp)
    }

    fn heap_bytes(&self) -> usize {
        self.meta.capacity() * std::mem::size_of::<Meta>()
            + (self.small.capacity() + self.main.capacity()) * 8
            + self.ghost_order.capacity() * 4
            + self.ghost.capacity() * 12
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_hit_wonders_leave_before_reused_blocks() {
        let mut p = S3Fifo::default();
        for s in 0..10 {
            p.insert(s, BlockKey(s as u128), s);
        }
        for s in [0, 1, 2] {
            p.touch(s, 20 + s);
        }
        let first_three: Vec<u32> = (0..3)
            .map(|_| p.pop_victim(&mut |_| true).unwrap())
            .collect();
        assert!(
            first_three.iter().all(|s| *s >= 3),
            "touched blocks evicted early: {first_three:?}"
        );
    }

    #[test]
    fn ghost_hit_goes_straight_to_main() {
        let mut p = S3Fifo::default();
        for s in 0..20 {
            p.insert(s, BlockKey(s as u128), s);
        }
        let victim = p.pop_victim(&mut |_| true).unwrap();
        p.insert(victim, BlockKey(victim as u128), 99);
        assert!(p.meta[victim as usize].queue == Queue::Main);
    }
}
