//! A trace block's key and value: chain keys as the connector derives them from the block's
//! tokens, a value every reader can check from the key alone, and the pool bytes it takes.

use kvcache_core::key::ChainHasher;
use kvcache_core::{BlockKey, Namespace, NamespaceId, checksum};

/// Tokens in one trace block (the trace's block size).
pub(super) const TRACE_BLOCK_TOKENS: usize = 512;
/// The server's page size (its default), which block footprints are rounded up to.
pub(super) const PAGE_SIZE: u64 = 4096;

/// The namespace every replayed key lives in.
pub(super) fn namespace() -> NamespaceId {
    Namespace::new("mooncake-trace", "bfloat16", TRACE_BLOCK_TOKENS as u32).id()
}

/// The tokens of trace block `id`: a fixed run, so equal ids are equal tokens (the same rule as
/// `gateway-index`, so both benchmarks key a trace alike).
pub(super) fn block_tokens(id: u64) -> impl Iterator<Item = u32> {
    (0..TRACE_BLOCK_TOKENS as u64).map(move |i| (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i) as u32)
}

/// The chain keys of a request, as the connector derives them from its tokens: key i names
/// blocks 0..=i, so requests share a key only if they share the whole prefix up to it.
pub fn chain_keys_of(ns: &NamespaceId, hash_ids: &[u64]) -> Vec<BlockKey> {
    let mut hasher = ChainHasher::new(*ns);
    let mut tokens = Vec::with_capacity(TRACE_BLOCK_TOKENS);
    hash_ids
        .iter()
        .map(|&id| {
            tokens.clear();
            tokens.extend(block_tokens(id));
            hasher.next_block(&tokens, &[])
        })
        .collect()
}

/// One step of splitmix64: the generator behind [`fill_value`].
pub(super) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The value stored under `key`: bytes drawn from a generator seeded by the key, so a reader
/// can check every byte of a block without keeping what was written.
pub fn fill_value(key: BlockKey, out: &mut [u8]) {
    let mut state = key.mixed64();
    let mut words = out.chunks_exact_mut(8);
    for w in &mut words {
        w.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
    let tail = words.into_remainder();
    let n = tail.len();
    tail.copy_from_slice(&splitmix64(&mut state).to_le_bytes()[..n]);
}

/// Pool bytes one block of `block` bytes takes: its data and checksum trailer, in whole pages.
pub fn block_footprint(block: u64) -> u64 {
    (checksum::stored_len(block as usize) as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE
}
