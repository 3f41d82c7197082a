//! The chunk checksum: a 64-bit multiply-accumulate hash that can copy the bytes it hashes in
//! the same pass.
//!
//! Its shape is XXH3's long-input loop (eight 64-bit lanes; per 64-byte stripe each lane adds
//! the 32x32-bit product of its keyed word's halves and its neighbour takes the raw word; lanes
//! are scrambled every 1 KiB; the lanes are folded and avalanched at the end), with its own
//! keys drawn from splitmix64. It exists because a shared-memory reader must both copy a block
//! into the engine's memory and check it: XXH3 proper cannot store the words it loads, so the
//! reader paid a copy plus a hash (0.75x of memcpy here), where the fused loop pays about one
//! copy (benches/results/README.md). It detects corruption; it is not a MAC.
//!
//! On x86-64 with AVX2 the loop runs on 256-bit vectors; elsewhere a scalar loop computes the
//! same digest (tested against each other).

const STRIPE: usize = 64;
const LANES: usize = 8;
/// Stripes between scrambles.
const STRIPES_PER_BLOCK: usize = 16;
/// How many blocks ahead the vector loop prefetches (8 KiB; 1 and 4 measured slower).
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
const PREFETCH_BLOCKS: usize = 8;
const PRIME32: u64 = 0x9E37_79B1;
const PRIME64: u64 = 0x9E37_79B1_85EB_CA87;

/// Keys: one lane set per stripe of a block, one for the scramble, one for the final fold.
const KEYS: [u64; LANES * (STRIPES_PER_BLOCK + 2)] = keys();

const fn keys() -> [u64; LANES * (STRIPES_PER_BLOCK + 2)] {
    let mut out = [0u64; LANES * (STRIPES_PER_BLOCK + 2)];
    let mut x: u64 = 0x6b76_6361_6368_6531; // "kvcache1"
    let mut i = 0;
    while i < out.len() {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out[i] = z ^ (z >> 31);
        i += 1;
    }
    out
}

const INIT: [u64; LANES] = [
    0x243F_6A88_85A3_08D3,
    0x1319_8A2E_0370_7344,
    0xA409_3822_299F_31D0,
    0x082E_FA98_EC4E_6C89,
    0x4528_21E6_38D0_1377,
    0xBE54_66CF_34E9_0C6C,
    0xC0AC_29B7_C97C_50DD,
    0x3F84_D5B5_B547_0917,
];

/// Checksum of `data`.
pub fn hash(data: &[u8]) -> u64 {
    run::<false, false>(data, None, &[])
}

/// Copies `src` into `dst` (of equal length) and returns the checksum of the bytes as they
/// were loaded, which are exactly the bytes stored: what lands in `dst` is what was checked.
pub fn copy_and_hash(src: &[u8], dst: &mut [u8]) -> u64 {
    copy_and_hash_before(src, dst, &[])
}

/// [`copy_and_hash`] of one piece of a longer read, where `next` is what will be read next:
/// the loop's prefetches run on into it, so the next call does not start on cold lines.
pub fn copy_and_hash_before(src: &[u8], dst: &mut [u8], next: &[u8]) -> u64 {
    assert_eq!(src.len(), dst.len(), "copy_and_hash needs equal lengths");
    run::<true, false>(src, Some(dst), next)
}

/// [`copy_and_hash`] for a destination nobody reads soon (a store's pool): where the vector
/// loop runs and `dst` is 32-byte aligned, the stores bypass the caches, so they neither read
/// the cold destination lines first nor evict the hot source. Shared-memory puts of 1 MiB x4
/// went from 4.1-4.8 to 5.1-6.6 GB/s with it, the node's CPU per GB from 0.18-0.22 to
/// 0.12-0.15 s (benches/results/shm-put-streaming-ab.json). Same digest, same bytes.
pub fn copy_and_hash_streaming(src: &[u8], dst: &mut [u8]) -> u64 {
    assert_eq!(src.len(), dst.len(), "copy_and_hash needs equal lengths");
    if dst.as_ptr().align_offset(32) != 0 {
        return run::<true, false>(src, Some(dst), &[]);
    }
    run::<true, true>(src, Some(dst), &[])
}

fn run<const COPY: bool, const STREAM: bool>(
    src: &[u8],
    dst: Option<&mut [u8]>,
    next: &[u8],
) -> u64 {
    run_with(src, dst, next, stripes::<COPY, STREAM>)
}

/// The whole digest, with `stripes` running the loop over the whole stripes.
fn run_with(src: &[u8], mut dst: Option<&mut [u8]>, next: &[u8], stripes: StripeLoop) -> u64 {
    let mut acc = INIT;
    let full = src.len() / STRIPE;
    let body = full * STRIPE;
    let dst_body = dst.as_deref_mut().map(|d| &mut d[..body]);
    stripes(&mut acc, &src[..body], dst_body, next);
    // The last partial stripe, zero-padded; its keys follow on from the stripes before it.
    let tail = &src[body..];
    if !tail.is_empty() {
        let mut padded = [0u8; STRIPE];
        padded[..tail.len()].copy_from_slice(tail);
        accumulate_scalar(&mut acc, &padded, full % STRIPES_PER_BLOCK);
        if let Some(d) = dst {
            d[body..].copy_from_slice(&padded[..tail.len()]);
        }
    }
    finish(&acc, src.len())
}

/// Runs over whole stripes (`src.len()` a multiple of 64), copying into `dst` if given; it
/// may prefetch `next`, which is read next.
type StripeLoop = fn(&mut [u64; LANES], &[u8], Option<&mut [u8]>, &[u8]);

fn finish(acc: &[u64; LANES], len: usize) -> u64 {
    let k = &KEYS[LANES * (STRIPES_PER_BLOCK + 1)..];
    let mut h = (len as u64).wrapping_mul(PRIME64);
    for i in 0..LANES / 2 {
        let m = ((acc[2 * i] ^ k[2 * i]) as u128) * ((acc[2 * i + 1] ^ k[2 * i + 1]) as u128);
        h = h.wrapping_add((m as u64) ^ ((m >> 64) as u64));
    }
    h ^= h >> 37;
    h = h.wrapping_mul(0x1656_6791_9E37_79F9);
    h ^ (h >> 32)
}

fn accumulate_scalar(acc: &mut [u64; LANES], stripe: &[u8], index: usize) {
    let keys = &KEYS[index * LANES..(index + 1) * LANES];
    for i in 0..LANES {
        let d = u64::from_le_bytes(stripe[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let k = d ^ keys[i];
        acc[i ^ 1] = acc[i ^ 1].wrapping_add(d);
        acc[i] = acc[i].wrapping_add((k & 0xFFFF_FFFF).wrapping_mul(k >> 32));
    }
}

fn scramble_scalar(acc: &mut [u64; LANES]) {
    let keys = &KEYS[STRIPES_PER_BLOCK * LANES..(STRIPES_PER_BLOCK + 1) * LANES];
    for i in 0..LANES {
        let mut a = acc[i];
        a ^= a >> 47;
        a ^= keys[i];
        acc[i] = a.wrapping_mul(PRIME32);
    }
}

/// The scalar stripe loop: used where AVX2 is not, and in tests as the reference.
#[cfg_attr(
    all(target_arch = "x86_64", target_feature = "avx2", not(test)),
    allow(dead_code)
)]
fn stripes_scalar(acc: &mut [u64; LANES], src: &[u8], dst: Option<&mut [u8]>, _next: &[u8]) {
    // With a destination, hash the copy, not the source: another process may rewrite the
    // source (a revoked lease, a client's staging window) between the two passes, and the
    // checksum must describe exactly the bytes that landed.
    let hashed: &[u8] = match dst {
        Some(d) => {
            d.copy_from_slice(src);
            d
        }
        None => src,
    };
    for (i, stripe) in hashed.chunks_exact(STRIPE).enumerate() {
        let index = i % STRIPES_PER_BLOCK;
        accumulate_scalar(acc, stripe, index);
        if index == STRIPES_PER_BLOCK - 1 {
            scramble_scalar(acc);
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
fn stripes<const COPY: bool, const STREAM: bool>(
    acc: &mut [u64; LANES],
    src: &[u8],
    dst: Option<&mut [u8]>,
    next: &[u8],
) {
    stripes_scalar(acc, src, dst, next)
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
fn stripes<const COPY: bool, const STREAM: bool>(
    acc: &mut [u64; LANES],
    src: &[u8],
    dst: Option<&mut [u8]>,
    next: &[u8],
) {
    use std::arch::x86_64::*;
    debug_assert_eq!(src.len() % STRIPE, 0);
    let dst_ptr = dst.map_or(std::ptr::null_mut(), |d| {
        debug_assert_eq!(d.len(), src.len());
        d.as_mut_ptr()
    });
    debug_assert!(!STREAM || dst_ptr.align_offset(32) == 0);
    // SAFETY: AVX2 is enabled for this build (cfg above). Every load reads 32 bytes inside
    // `src` (offsets < src.len(), a multiple of 64), every store writes the same offsets of
    // `dst`, which has the same length; loads and ordinary stores are unaligned, streaming
    // stores need 32-byte alignment, which the only STREAM caller checked.
    unsafe {
        let mut a0 = _mm256_loadu_si256(acc.as_ptr().cast());
        let mut a1 = _mm256_loadu_si256(acc.as_ptr().add(4).cast());
        let p32 = _mm256_set1_epi64x(PRIME32 as i64);
        let scr0 = _mm256_loadu_si256(KEYS.as_ptr().add(STRIPES_PER_BLOCK * LANES).cast());
        let scr1 = _mm256_loadu_si256(KEYS.as_ptr().add(STRIPES_PER_BLOCK * LANES + 4).cast());
        let n = src.len() / STRIPE;
        let s = src.as_ptr();
        for i in 0..n {
            let index = i % STRIPES_PER_BLOCK;
            if index == 0 {
                // Ask for one block, PREFETCH_BLOCKS ahead, at each block start: loads stay
                // ahead of the loop without flooding the line-fill buffers all at once. Near
                // the end the block ahead lies in `next`.
                let at = (i + PREFETCH_BLOCKS * STRIPES_PER_BLOCK) * STRIPE;
                let ahead = match at.checked_sub(src.len()) {
                    None => &src[at..],
                    Some(past) => next.get(past..).unwrap_or_default(),
                };
                for line in (0..ahead.len().min(STRIPES_PER_BLOCK * STRIPE)).step_by(STRIPE) {
                    _mm_prefetch(ahead.as_ptr().add(line).cast(), _MM_HINT_T0);
                }
            }
            let p = s.add(i * STRIPE);
            let d0 = _mm256_loadu_si256(p.cast());
            let d1 = _mm256_loadu_si256(p.add(32).cast());
            if COPY {
                let q = dst_ptr.add(i * STRIPE);
                if STREAM {
                    _mm256_stream_si256(q.cast(), d0);
                    _mm256_stream_si256(q.add(32).cast(), d1);
                } else {
                    _mm256_storeu_si256(q.cast(), d0);
                    _mm256_storeu_si256(q.add(32).cast(), d1);
                }
            }
            let k = KEYS.as_ptr().add(index * LANES);
            let k0 = _mm256_xor_si256(d0, _mm256_loadu_si256(k.cast()));
            let k1 = _mm256_xor_si256(d1, _mm256_loadu_si256(k.add(4).cast()));
            let m0 = _mm256_mul_epu32(k0, _mm256_srli_epi64::<32>(k0));
            let m1 = _mm256_mul_epu32(k1, _mm256_srli_epi64::<32>(k1));
            // Swap the two words of each 128-bit half: lane i's word goes to lane i ^ 1.
            let s0 = _mm256_shuffle_epi32::<0b01_00_11_10>(d0);
            let s1 = _mm256_shuffle_epi32::<0b01_00_11_10>(d1);
            a0 = _mm256_add_epi64(a0, _mm256_add_epi64(m0, s0));
            a1 = _mm256_add_epi64(a1, _mm256_add_epi64(m1, s1));
            if index == STRIPES_PER_BLOCK - 1 {
                a0 = scramble_avx2(a0, scr0, p32);
                a1 = scramble_avx2(a1, scr1, p32);
            }
        }
        _mm256_storeu_si256(acc.as_mut_ptr().cast(), a0);
        _mm256_storeu_si256(acc.as_mut_ptr().add(4).cast(), a1);
        if STREAM {
            // Streaming stores are weakly ordered: fence them before whatever publishes the
            // block (the commit's index update) can be seen by another thread or process.
            _mm_sfence();
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[inline(always)]
fn scramble_avx2(
    a: std::arch::x86_64::__m256i,
    key: std::arch::x86_64::__m256i,
    p32: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: AVX2 is enabled for this build; register-only operations.
    unsafe {
        let a = _mm256_xor_si256(a, _mm256_srli_epi64::<47>(a));
        let a = _mm256_xor_si256(a, key);
        // a * p32 mod 2^64 = lo(a) * p32 + (hi(a) * p32) << 32.
        let lo = _mm256_mul_epu32(a, p32);
        let hi = _mm256_mul_epu32(_mm256_srli_epi64::<32>(a), p32);
        _mm256_add_epi64(lo, _mm256_slli_epi64::<32>(hi))
    }
}

/// The digest through the scalar loop, to test the vector one against it.
#[cfg(test)]
fn reference(data: &[u8]) -> u64 {
    run_with(data, None, &[], stripes_scalar)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        crate::sample::bytes(seed, len)
    }

    #[test]
    fn vector_and_scalar_loops_agree_and_the_copy_is_exact() {
        for len in [
            0, 1, 63, 64, 65, 1023, 1024, 1025, 4096, 5000, 131_072, 131_071,
        ] {
            let src = bytes(len, len as u64);
            let mut dst = vec![0u8; len];
            let h = copy_and_hash(&src, &mut dst);
            assert_eq!(dst, src, "len {len}");
            assert_eq!(h, hash(&src), "len {len}");
            assert_eq!(h, reference(&src), "len {len}");
        }
    }

    #[test]
    fn streaming_copy_stores_the_same_bytes_and_digest_aligned_or_not() {
        for len in [0, 63, 64, 1000, 4096, 131_072, 131_071] {
            let src = bytes(len, 7 + len as u64);
            // A 32-byte aligned destination takes the streaming stores; one byte further
            // does not.
            let mut whole = vec![0u8; len + 64];
            let skip = whole.as_ptr().align_offset(32);
            for shift in [skip, skip + 1] {
                let dst = &mut whole[shift..shift + len];
                assert_eq!(copy_and_hash_streaming(&src, dst), hash(&src), "len {len}");
                assert_eq!(dst, &src[..], "len {len} shift {shift}");
            }
        }
    }

    #[test]
    fn prefetching_into_the_next_piece_changes_nothing() {
        let src = bytes(40_000, 3);
        for next_len in [0, 1, 700, 9000, 40_000] {
            let next = bytes(next_len, 4);
            let mut dst = vec![0u8; src.len()];
            assert_eq!(copy_and_hash_before(&src, &mut dst, &next), hash(&src));
            assert_eq!(dst, src, "next {next_len}");
        }
    }

    #[test]
    fn every_single_bit_flip_and_length_change_changes_the_digest() {
        let src = bytes(3000, 9);
        let h = hash(&src);
        for byte in (0..src.len()).step_by(37) {
            for bit in 0..8 {
                let mut b = src.clone();
                b[byte] ^= 1 << bit;
                assert_ne!(hash(&b), h, "flip at {byte}.{bit}");
            }
        }
        let mut longer = src.clone();
        longer.push(0);
        assert_ne!(hash(&longer), h, "a zero byte appended");
        assert_ne!(hash(&src[..2999]), h);
    }

    #[test]
    fn digests_are_pinned() {
        // The digest is part of the pool layout and of the shared-memory protocol: changing
        // it is a format change. The same values come from the scalar loop (built with
        // RUSTFLAGS="-C target-cpu=x86-64") and the AVX2 one.
        let pinned = [hash(b""), hash(b"kvcache"), hash(&[0u8; 4096])];
        assert_eq!(
            pinned,
            [0xa18e7029fe259785, 0x2a510652eaf75821, 0x3d2e8f5f0b122ae0]
        );
    }
}
