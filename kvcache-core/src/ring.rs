//! The consistent-hash ring: which nodes own a block key.
//!
//! Each node places `vnodes` points on a 64-bit circle at `xxh3-64(node-id ‖ '#' ‖ i)`. A key's
//! owners are the first distinct nodes met walking clockwise from the key's position. Adding or
//! removing one of N nodes therefore moves about 1/N of the keys and leaves the rest in place.

use xxhash_rust::xxh3::xxh3_64;

use crate::key::BlockKey;

/// Default virtual nodes per member: enough for ±10% balance at 8 nodes (see tests).
pub const DEFAULT_VNODES: u32 = 512;

/// A consistent-hash ring over named members.
#[derive(Clone, Debug)]
pub struct HashRing {
    vnodes: u32,
    members: Vec<String>,
    /// Sorted `(position, member index)`.
    points: Vec<(u64, u32)>,
}

impl HashRing {
    /// An empty ring with `vnodes` points per member.
    pub fn new(vnodes: u32) -> Self {
        assert!(
            vnodes > 0,
            "a ring needs at least one virtual node per member"
        );
        Self {
            vnodes,
            members: Vec::new(),
            points: Vec::new(),
        }
    }

    /// A ring holding `members` with the default number of virtual nodes.
    pub fn with_members<I, S>(members: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut ring = Self::new(DEFAULT_VNODES);
        for m in members {
            ring.add(m);
        }
        ring
    }

    /// Members in insertion order.
    pub fn members(&self) -> &[String] {
        &self.members
    }

    /// Adds a member; returns false if it was already present.
    pub fn add(&mut self, member: impl Into<String>) -> bool {
        let member = member.into();
        if self.members.contains(&member) {
            return false;
        }
        self.members.push(member);
        self.rebuild();
        true
    }

    /// Removes a member; returns false if it was absent.
    pub fn remove(&mut self, member: &str) -> bool {
        let Some(pos) = self.members.iter().position(|m| m == member) else {
            return false;
        };
        self.members.remove(pos);
        self.rebuild();
        true
    }

    fn rebuild(&mut self) {
        self.points.clear();
        self.points
            .reserve(self.members.len() * self.vnodes as usize);
        let mut buf = Vec::new();
        for (idx, member) in self.members.iter().enumerate() {
            for v in 0..self.vnodes {
                buf.clear();
                buf.extend_from_slice(member.as_bytes());
                buf.push(b'#');
                buf.extend_from_slice(&v.to_le_bytes());
                self.points.push((xxh3_64(&buf), idx as u32));
            }
        }
        // Ties (astronomically rare) are broken by member index so every process agrees.
        self.points.sort_unstable();
    }

    /// The primary owner of `key`, or `None` on an empty ring.
    pub fn primary(&self, key: BlockKey) -> Option<&str> {
        self.owners(key, 1).into_iter().next()
    }

    /// Up to `replicas` distinct owners of `key`, primary first.
    pub fn owners(&self, key: BlockKey, replicas: usize) -> Vec<&str> {
        let want = replicas.min(self.members.len());
        let mut out: Vec<&str> = Vec::with_capacity(want);
        if want == 0 {
            return out;
        }
        let pos = key.mixed64();
        let start = self.points.partition_point(|&(p, _)| p < pos);
        for i in 0..self.points.len() {
            let (_, idx) = self.points[(start + i) % self.points.len()];
            let m = self.members[idx as usize].as_str();
            if !out.contains(&m) {
                out.push(m);
                if out.len() == want {
                    break;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xxhash_rust::xxh3::xxh3_128;

    fn keys(n: u32) -> Vec<BlockKey> {
        (0..n)
            .map(|i| BlockKey(xxh3_128(&i.to_le_bytes())))
            .collect()
    }

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:7400")).collect()
    }

    #[test]
    fn balance_within_ten_percent_over_eight_nodes() {
        let ring = HashRing::with_members(nodes(8));
        let keys = keys(200_000);
        let mut counts = std::collections::HashMap::new();
        for k in &keys {
            *counts.entry(ring.primary(*k).unwrap()).or_insert(0usize) += 1;
        }
        let mean = keys.len() as f64 / 8.0;
        for (node, c) in counts {
            let dev = (c as f64 - mean) / mean;
            assert!(
                dev.abs() <= 0.10,
                "{node} holds {c} keys, {:.1}% off the mean",
                dev * 100.0
            );
        }
    }

    #[test]
    fn sequential_user_keys_spread_like_random_ones() {
        let ring = HashRing::with_members(nodes(4));
        let mut counts = std::collections::HashMap::new();
        for i in 0..40_000u128 {
            *counts
                .entry(ring.primary(BlockKey(i)).unwrap())
                .or_insert(0usize) += 1;
        }
        assert_eq!(counts.len(), 4);
        assert!(
            counts.values().all(|&c| (8_000..=12_000).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn join_moves_about_one_nth_of_keys_and_only_to_the_newcomer() {
        let mut ring = HashRing::with_members(nodes(8));
        let keys = keys(100_000);
        let before: Vec<String> = keys
            .iter()
            .map(|k| ring.primary(*k).unwrap().to_string())
            .collect();
        ring.add("10.0.0.99:7400");
        let mut moved = 0;
        for (k, old) in keys.iter().zip(&before) {
            let new = ring.primary(*k).unwrap();
            if new != old {
                assert_eq!(new, "10.0.0.99:7400", "a key moved between old members");
                moved += 1;
            }
        }
        let frac = moved as f64 / keys.len() as f64;
        assert!(
            (frac - 1.0 / 9.0).abs() < 0.02,
            "moved {frac:.3}, expected about 1/9"
        );
    }

    #[test]
    fn leave_moves_only_the_leavers_keys() {
        let mut ring = HashRing::with_members(nodes(5));
        let keys = keys(20_000);
        let before: Vec<String> = keys
            .iter()
            .map(|k| ring.primary(*k).unwrap().to_string())
            .collect();
        assert!(ring.remove("10.0.0.2:7400"));
        assert!(!ring.remove("10.0.0.2:7400"));
        for (k, old) in keys.iter().zip(&before) {
            if old != "10.0.0.2:7400" {
                assert_eq!(ring.primary(*k).unwrap(), old);
            }
        }
    }

    #[test]
    fn owners_are_distinct_and_bounded_by_membership() {
        let ring = HashRing::with_members(nodes(3));
        for k in keys(1000) {
            let o = ring.owners(k, 2);
            assert_eq!(o.len(), 2);
            assert_ne!(o[0], o[1]);
            assert_eq!(o[0], ring.primary(k).unwrap());
            assert_eq!(ring.owners(k, 10).len(), 3);
        }
        assert!(HashRing::new(4).primary(BlockKey(1)).is_none());
    }

    #[test]
    fn placement_is_independent_of_insertion_order() {
        let a = HashRing::with_members(nodes(6));
        let b = HashRing::with_members(nodes(6).into_iter().rev());
        for k in keys(5000) {
            assert_eq!(a.owners(k, 3), b.owners(k, 3));
        }
    }
}
