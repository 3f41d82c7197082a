//! Block keys and the token-prefix chain.
//!
//! `key[i] = xxh3-128(key[i-1] ‖ namespace-id ‖ LE-u32 tokens of block i ‖ extras of block i)`
//! with `key[-1] = xxh3-128("kvcache/chain/v{VERSION}" ‖ namespace-id)`. A key therefore names a
//! block *and its whole prefix*: two requests share a key only if they share every token before
//! it, in the same namespace. The byte encoding is canonical and fixed; any change to it must bump
//! [`KEY_SCHEME_VERSION`] and regenerate the golden vectors in `tests/golden/`.

use std::fmt;

use xxhash_rust::xxh3::xxh3_128;

use crate::namespace::NamespaceId;

/// Version of the key derivation; folded into every chain's root so versions never collide.
pub const KEY_SCHEME_VERSION: u32 = 1;

/// A 128-bit block key. Its canonical byte form is big-endian (as xxh3's canonical form).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BlockKey(pub u128);

impl BlockKey {
    /// Size of the canonical byte form.
    pub const LEN: usize = 16;

    /// The canonical 16-byte form, as sent on the wire and exposed to Python.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// Parses the canonical 16-byte form.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(u128::from_be_bytes(bytes))
    }

    /// Parses a slice that must be exactly 16 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        Some(Self::from_bytes(bytes.try_into().ok()?))
    }

    /// Lowercase hex of the canonical form (32 characters).
    pub fn to_hex(self) -> String {
        format!("{:032x}", self.0)
    }

    /// Parses 32 hex characters.
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 32 {
            return None;
        }
        u128::from_str_radix(s, 16).ok().map(Self)
    }

    /// The low 64 bits of the key.
    pub fn low64(self) -> u64 {
        self.0 as u64
    }

    /// 64 well-mixed bits of the key, for placement and sharding. Chain keys are already
    /// uniform, but a key chosen by a user (say, a counter) is not: mixing both halves through
    /// the splitmix64 finalizer spreads any key set evenly, for a few cycles.
    pub fn mixed64(self) -> u64 {
        let mut z = (self.0 as u64) ^ ((self.0 >> 64) as u64).rotate_left(32);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl fmt::Debug for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockKey({})", self.to_hex())
    }
}

impl fmt::Display for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The root of a namespace's chain (`key[-1]`).
pub fn chain_root(ns: &NamespaceId) -> BlockKey {
    let tag = format!("kvcache/chain/v{KEY_SCHEME_VERSION}");
    let mut buf = Vec::with_capacity(tag.len() + 16);
    buf.extend_from_slice(tag.as_bytes());
    buf.extend_from_slice(ns.as_bytes());
    BlockKey(xxh3_128(&buf))
}

/// Incremental chain hasher: feed full blocks one at a time, get each block's key.
#[derive(Clone, Debug)]
pub struct ChainHasher {
    ns: NamespaceId,
    prev: BlockKey,
    buf: Vec<u8>,
}

impl ChainHasher {
    /// Starts a chain at the namespace's root.
    pub fn new(ns: NamespaceId) -> Self {
        Self {
            prev: chain_root(&ns),
            ns,
            buf: Vec::new(),
        }
    }

    /// Continues a chain from a known parent key (e.g. resuming a request's chain).
    pub fn resume(ns: NamespaceId, parent: BlockKey) -> Self {
        Self {
            prev: parent,
            ns,
            buf: Vec::new(),
        }
    }

    /// Keys the next full block. `extras` are per-block content hashes that change the KV
    /// without changing token ids (e.g. multimodal inputs whose placeholders fall in the block).
    pub fn next_block(&mut self, tokens: &[u32], extras: &[u8]) -> BlockKey {
        self.buf.clear();
        self.buf.reserve(32 + tokens.len() * 4 + extras.len());
        self.buf.extend_from_slice(&self.prev.to_bytes());
        self.buf.extend_from_slice(self.ns.as_bytes());
        for t in tokens {
            self.buf.extend_from_slice(&t.to_le_bytes());
        }
        self.buf.extend_from_slice(extras);
        self.prev = BlockKey(xxh3_128(&self.buf));
        self.prev
    }
}

/// Keys of every *full* block of `tokens`; a trailing partial block gets no key.
pub fn chain_keys(ns: &NamespaceId, tokens: &[u32], block_size: usize) -> Vec<BlockKey> {
    assert!(block_size > 0, "block_size must be positive");
    let mut hasher = ChainHasher::new(*ns);
    tokens
        .chunks_exact(block_size)
        .map(|block| hasher.next_block(block, &[]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::namespace::{Namespace, TpPlacement};

    fn ns() -> NamespaceId {
        Namespace::new("tiny-llama", "bfloat16", 16).id()
    }

    #[test]
    fn partial_trailing_block_has_no_key() {
        let tokens: Vec<u32> = (0..40).collect();
        assert_eq!(chain_keys(&ns(), &tokens, 16).len(), 2);
        assert!(chain_keys(&ns(), &tokens[..15], 16).is_empty());
    }

    #[test]
    fn key_depends_on_whole_prefix() {
        let a: Vec<u32> = (0..32).collect();
        let mut b = a.clone();
        b[0] = 999;
        let ka = chain_keys(&ns(), &a, 16);
        let kb = chain_keys(&ns(), &b, 16);
        assert_ne!(ka[0], kb[0]);
        assert_ne!(
            ka[1], kb[1],
            "second block must differ when only the first differs"
        );
    }

    #[test]
    fn shared_prefix_shares_keys() {
        let a: Vec<u32> = (0..48).collect();
        let mut b = a.clone();
        b[40] = 7;
        let ka = chain_keys(&ns(), &a, 16);
        let kb = chain_keys(&ns(), &b, 16);
        assert_eq!(ka[..2], kb[..2]);
        assert_ne!(ka[2], kb[2]);
    }

    #[test]
    fn namespaces_never_share_keys() {
        let tokens: Vec<u32> = (0..16).collect();
        let mut other = Namespace::new("tiny-llama", "bfloat16", 16);
        other.tp = TpPlacement::Rank {
            world_size: 2,
            rank: 1,
        };
        assert_ne!(
            chain_keys(&ns(), &tokens, 16),
            chain_keys(&other.id(), &tokens, 16)
        );
    }

    #[test]
    fn extras_change_the_key_of_their_block_and_after() {
        let tokens: Vec<u32> = (0..32).collect();
        let mut plain = ChainHasher::new(ns());
        let mut with_image = ChainHasher::new(ns());
        assert_eq!(
            plain.next_block(&tokens[..16], &[]),
            with_image.next_block(&tokens[..16], &[])
        );
        assert_ne!(
            plain.next_block(&tokens[16..], &[]),
            with_image.next_block(&tokens[16..], b"image-hash")
        );
    }

    #[test]
    fn resume_continues_the_same_chain() {
        let tokens: Vec<u32> = (0..64).collect();
        let full = chain_keys(&ns(), &tokens, 16);
        let mut resumed = ChainHasher::resume(ns(), full[1]);
        assert_eq!(resumed.next_block(&tokens[32..48], &[]), full[2]);
    }

    #[test]
    fn mixed64_spreads_sequential_keys() {
        // Counters as keys: the top bits of the mixed value must vary as for random keys.
        let mut top = std::collections::HashSet::new();
        for i in 0..4096u128 {
            top.insert(BlockKey(i).mixed64() >> 60);
        }
        assert_eq!(top.len(), 16, "every top nibble is reached");
    }

    #[test]
    fn hex_and_bytes_round_trip() {
        let k = chain_keys(&ns(), &[1; 16], 16)[0];
        assert_eq!(BlockKey::from_hex(&k.to_hex()), Some(k));
        assert_eq!(BlockKey::from_bytes(k.to_bytes()), k);
        assert_eq!(BlockKey::from_slice(&[0; 15]), None);
        assert_eq!(BlockKey::from_hex("zz"), None);
    }
}
