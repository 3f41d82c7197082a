//! The page allocator: carves the pool into runs of fixed-size pages.
//!
//! Best fit over free runs with immediate coalescing: `by_start` finds a freed run's neighbours,
//! `by_len` finds the smallest run that fits. Both are O(log free-runs). Blocks of one model are
//! all the same size, so in steady state a freed run is reused whole and fragmentation stays low.

use std::collections::{BTreeMap, BTreeSet};

/// A run of pages: `start..start+len`, in page units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRun {
    pub start: u32,
    pub len: u32,
}

/// Free-run allocator over `total` pages.
#[derive(Debug)]
pub struct PageAllocator {
    total: u32,
    used: u32,
    by_start: BTreeMap<u32, u32>,
    by_len: BTreeSet<(u32, u32)>,
}

impl PageAllocator {
    /// An allocator with every page free.
    pub fn new(total: u32) -> Self {
        let mut a = Self {
            total,
            used: 0,
            by_start: BTreeMap::new(),
            by_len: BTreeSet::new(),
        };
        if total > 0 {
            a.insert_free(0, total);
        }
        a
    }

    /// Pages in the pool.
    pub fn total(&self) -> u32 {
        self.total
    }

    /// Pages handed out and not yet freed.
    pub fn used(&self) -> u32 {
        self.used
    }

    /// The largest run that could be allocated right now.
    pub fn largest_free(&self) -> u32 {
        self.by_len.last().map_or(0, |&(len, _)| len)
    }

    fn insert_free(&mut self, start: u32, len: u32) {
        self.by_start.insert(start, len);
        self.by_len.insert((len, start));
    }

    fn remove_free(&mut self, start: u32, len: u32) {
        self.by_start.remove(&start);
        self.by_len.remove(&(len, start));
    }

    /// Allocates `len` contiguous pages (best fit), or `None` if no free run is long enough.
    pub fn alloc(&mut self, len: u32) -> Option<PageRun> {
        assert!(len > 0, "zero-page allocation");
        let &(run_len, start) = self.by_len.range((len, 0)..).next()?;
        self.remove_free(start, run_len);
        if run_len > len {
            self.insert_free(start + len, run_len - len);
        }
        self.used += len;
        Some(PageRun { start, len })
    }

    /// Returns a run to the free pool, merging it with free neighbours.
    ///
    /// Panics on a double free or a run outside the pool: both are store bugs that would
    /// otherwise hand the same bytes to two blocks.
    pub fn free(&mut self, run: PageRun) {
        let PageRun { mut start, mut len } = run;
        assert!(
            len > 0 && start.checked_add(len).is_some_and(|end| end <= self.total),
            "bad free {run:?}"
        );
        if let Some((&prev_start, &prev_len)) = self.by_start.range(..=start).next_back() {
            assert!(prev_start + prev_len <= start, "double free of {run:?}");
            if prev_start + prev_len == start {
                self.remove_free(prev_start, prev_len);
                start = prev_start;
                len += prev_len;
            }
        }
        if let Some((&next_start, &next_len)) = self.by_start.range(start + 1..).next() {
            assert!(start + len <= next_start, "double free of {run:?}");
            if start + len == next_start {
                self.remove_free(next_start, next_len);
                len += next_len;
            }
        }
        self.insert_free(start, len);
        self.used -= run.len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_disjoint_and_frees_coalesce() {
        let mut a = PageAllocator::new(100);
        let x = a.alloc(30).unwrap();
        let y = a.alloc(30).unwrap();
        let z = a.alloc(40).unwrap();
        assert!(a.alloc(1).is_none());
        assert_eq!(a.used(), 100);
        let mut runs = [x, y, z];
        runs.sort_by_key(|r| r.start);
        assert_eq!(
            runs.iter().map(|r| r.start).collect::<Vec<_>>(),
            [0, 30, 60]
        );
        a.free(y);
        a.free(x);
        assert_eq!(a.largest_free(), 60, "neighbouring frees must merge");
        a.free(z);
        assert_eq!(a.largest_free(), 100);
        assert_eq!(a.used(), 0);
    }

    #[test]
    fn best_fit_prefers_the_smallest_hole() {
        let mut a = PageAllocator::new(100);
        let r: Vec<_> = (0..5).map(|_| a.alloc(20).unwrap()).collect();
        a.free(r[1]); // hole of 20
        a.free(r[3]); // hole of 20
        let small = a.alloc(5).unwrap();
        assert!(small.start == r[1].start || small.start == r[3].start);
        assert_eq!(a.largest_free(), 20);
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_panics() {
        let mut a = PageAllocator::new(10);
        let x = a.alloc(4).unwrap();
        let _y = a.alloc(2).unwrap();
        a.free(x);
        a.free(x);
    }

    #[test]
    fn random_alloc_free_keeps_accounting_exact() {
        let mut a = PageAllocator::new(10_000);
        let mut live: Vec<PageRun> = Vec::new();
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut rand = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            if rand() % 3 != 0 {
                if let Some(r) = a.alloc((rand() % 64 + 1) as u32) {
                    live.push(r);
                }
            } else if !live.is_empty() {
                let i = (rand() as usize) % live.len();
                a.free(live.swap_remove(i));
            }
            assert_eq!(a.used(), live.iter().map(|r| r.len).sum::<u32>());
        }
        live.sort_by_key(|r| r.start);
        for w in live.windows(2) {
            assert!(w[0].start + w[0].len <= w[1].start, "overlap {:?}", w);
        }
        for r in live.drain(..) {
            a.free(r);
        }
        assert_eq!(a.largest_free(), 10_000);
    }
}
