//! Tenant key folding: a node that authenticates stores tenant T's key `k` under
//! `fold(T, k)`, so tenants sharing a node never see, test or overwrite each other's blocks,
//! even when they send the same key bytes.
//!
//! The fold keeps [`BlockKey::mixed64`] unchanged, and with it the index shard and the key's
//! place on the ring. A node that warms itself from its peers places the folded keys it lists
//! exactly where clients place the keys they send, so warming needs no knowledge of tenants.
//!
//! `mixed64` depends only on `x = lo ^ rotl(hi, 32)`. The fold keeps `x` and replaces the high
//! half with 64 bits of BLAKE3 keyed by the tenant:
//!
//! ```text
//! h   = BLAKE3-keyed(derive_key("kvcache tenant key fold v1", name), k as 16 bytes)[..8]
//! hi' = h,  lo' = x ^ rotl(h, 32)          (so lo' ^ rotl(hi', 32) == x)
//! ```
//!
//! Reaching tenant A's folded key from tenant B means finding a key whose 64-bit keyed BLAKE3
//! under B equals A's, with `x` fixed: a 2^64 search per target key, offline, against a
//! cryptographic hash. docs/SECURITY.md discusses the bound.

use crate::key::BlockKey;

const CONTEXT: &str = "kvcache tenant key fold v1";

/// The fold of one tenant, derived once from its name.
#[derive(Clone)]
pub struct TenantFold {
    key: [u8; 32],
}

impl std::fmt::Debug for TenantFold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TenantFold")
    }
}

impl TenantFold {
    /// The fold for the tenant called `name`.
    pub fn new(name: &str) -> Self {
        Self {
            key: blake3::derive_key(CONTEXT, name.as_bytes()),
        }
    }

    /// Where this tenant's key `key` lives on the node.
    pub fn fold(&self, key: BlockKey) -> BlockKey {
        let hi = (key.0 >> 64) as u64;
        let lo = key.0 as u64;
        let x = lo ^ hi.rotate_left(32);
        let digest = blake3::keyed_hash(&self.key, &key.to_bytes());
        let h = u64::from_le_bytes(digest.as_bytes()[..8].try_into().expect("8 bytes"));
        BlockKey(((h as u128) << 64) | (x ^ h.rotate_left(32)) as u128)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folding_keeps_shard_and_ring_position_but_separates_tenants() {
        let a = TenantFold::new("team-a");
        let b = TenantFold::new("team-b");
        for i in 0..1000u128 {
            let k = BlockKey(i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835));
            let (fa, fb) = (a.fold(k), b.fold(k));
            assert_eq!(fa.mixed64(), k.mixed64());
            assert_eq!(fb.mixed64(), k.mixed64());
            assert_ne!(fa, fb);
            assert_ne!(fa, k);
            assert_eq!(fa, TenantFold::new("team-a").fold(k), "deterministic");
        }
    }

    #[test]
    fn fold_is_pinned() {
        // Keys already on nodes (and their disk tiers) must keep their place across releases.
        // The value was computed independently with Python's `blake3` package.
        let k = BlockKey(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        assert_eq!(
            TenantFold::new("team-a").fold(k).to_hex(),
            "14df726f362d3cc7415a4bb063a80518"
        );
    }
}
