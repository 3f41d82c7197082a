//! Least recently used: an intrusive doubly linked list over slot ids.

use kvcache_core::BlockKey;

use super::EvictionPolicy;

const NIL: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct Link {
    prev: u32,
    next: u32,
    stamp: u32,
}

/// LRU over slot ids; 12 bytes per slot.
pub struct Lru {
    links: Vec<Link>,
    /// Most recently used.
    head: u32,
    /// Least recently used: the next victim.
    tail: u32,
}

impl Default for Lru {
    fn default() -> Self {
        Self {
            links: Vec::new(),
            head: NIL,
            tail: NIL,
        }
    }
}

impl Lru {
    fn unlink(&mut self, slot: u32) {
        let Link { prev, next, .. } = self.links[slot as usize];
        match prev {
            NIL => self.head = next,
            p => self.links[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.links[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, slot: u32) {
        let link = &mut self.links[slot as usize];
        link.prev = NIL;
        link.next = self.head;
        match self.head {
            NIL => self.tail = slot,
            h => self.links[h as usize].prev = slot,
        }
        self.head = slot;
    }
}

impl EvictionPolicy for Lru {
    fn insert(&mut self, slot: u32, _key: BlockKey, now: u32) {
        let idx = slot as usize;
        if idx >= self.links.len() {
            self.links.resize(
                idx + 1,
                Link {
                    prev: NIL,
                    next: NIL,
                    stamp: 0,
                },
            );
        }
        self.links[idx].stamp = now;
        self.push_front(slot);
    }

    fn touch(&mut self, slot: u32, now: u32) {
        self.links[slot as usize].stamp = now;
        if self.head != slot {
            self.unlink(slot);
            self.push_front(slot);
        }
    }

    fn remove(&mut self, slot: u32) {
        self.unlink(slot);
    }

    fn pop_victim(&mut self, evictable: &mut dyn FnMut(u32) -> bool) -> Option<u32> {
        let mut cur = self.tail;
        while cur != NIL {
            if evictable(cur) {
                self.unlink(cur);
                return Some(cur);
            }
            cur = self.links[cur as usize].prev;
        }
        None
    }

    fn next_victim_stamp(&self) -> Option<u32> {
        (self.tail != NIL).then(|| self.links[self.tail as usize].stamp)
    }

    fn heap_bytes(&self) -> usize {
        self.links.capacity() * std::mem::size_of::<Link>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_first() {
        let mut lru = Lru::default();
        for s in 0..4 {
            lru.insert(s, BlockKey(s as u128), s);
        }
        lru.touch(0, 9);
        let order: Vec<u32> = std::iter::from_fn(|| lru.pop_victim(&mut |_| true)).collect();
        assert_eq!(order, [1, 2, 3, 0]);
    }

    #[test]
    fn skips_leased_blocks_without_losing_them() {
        let mut lru = Lru::default();
        for s in 0..3 {
            lru.insert(s, BlockKey(s as u128), s);
        }
        assert_eq!(lru.pop_victim(&mut |s| s != 0), Some(1));
        assert_eq!(lru.pop_victim(&mut |_| true), Some(0));
    }
}
