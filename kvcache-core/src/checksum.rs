//! Block checksums, laid out so verification and sending share one pass over memory.
//!
//! A block occupies `data | pad to 8 | trailer` in its pages. The trailer holds one checksum
//! ([`crate::chunk_hash`]) per 128 KiB chunk of data; the index keeps one u64, the xxh3-64 of
//! the trailer. A reader checks the trailer against the index once (a few bytes), then
//! verifies each chunk immediately before that chunk leaves, while it is still in L2: a
//! corrupt byte is never sent, and the kernel's copy reads the chunk from cache rather than
//! DRAM. With the prefetching hash, gets reach about 0.8-0.9x of the loopback TCP ceiling
//! (benches/results/README.md).
//!
//! The layout is part of the protocol: a shared-memory client reads blocks straight from the
//! node's pool and verifies them itself with [`copy_chunk_checked`], hashing the bytes as they
//! landed in its own memory, so nothing the pool does after the check can reach the engine.

use xxhash_rust::xxh3::xxh3_64;

use crate::chunk_hash;

/// Bytes covered by one chunk checksum: small enough to stay in L2 between hash and copy.
pub const CHUNK: usize = 128 * 1024;

/// Chunks in a block of `len` bytes.
pub fn chunk_count(len: usize) -> usize {
    len.div_ceil(CHUNK)
}

/// Offset of the trailer from the start of the block.
pub fn trailer_offset(len: usize) -> usize {
    len.next_multiple_of(8)
}

/// Bytes of the trailer of a block of `len` data bytes: one checksum per chunk.
pub fn trailer_len(len: usize) -> usize {
    8 * chunk_count(len)
}

/// Bytes a block of `len` data bytes occupies in the pool, trailer included.
pub fn stored_len(len: usize) -> usize {
    trailer_offset(len) + trailer_len(len)
}

/// Range of chunk `i` within the data.
pub fn chunk_range(len: usize, i: usize) -> std::ops::Range<usize> {
    let start = i * CHUNK;
    start..(start + CHUNK).min(len)
}

/// Checksum of one chunk, as stored in the trailer (see [`crate::chunk_hash`]).
pub fn chunk_checksum(chunk: &[u8]) -> u64 {
    chunk_hash::hash(chunk)
}

/// A cursor over destination segments that a block is scattered into, in order.
pub struct Scatter<'a, 'b> {
    segs: &'a mut [&'b mut [u8]],
    seg: usize,
    off: usize,
}

impl<'a, 'b> Scatter<'a, 'b> {
    /// Starts at the first byte of the first segment.
    pub fn new(segs: &'a mut [&'b mut [u8]]) -> Self {
        Self {
            segs,
            seg: 0,
            off: 0,
        }
    }

    /// Total bytes the segments hold.
    pub fn capacity(&self) -> usize {
        self.segs.iter().map(|s| s.len()).sum()
    }

    /// The next `n` bytes at the cursor if they lie in one segment (the cursor moves past
    /// them); `None` if they span segments.
    pub fn contiguous(&mut self, n: usize) -> Option<&mut [u8]> {
        while self.segs.get(self.seg).is_some_and(|s| s.len() == self.off) {
            self.seg += 1;
            self.off = 0;
        }
        let seg = self.segs.get_mut(self.seg)?;
        if seg.len() - self.off < n {
            return None;
        }
        let start = self.off;
        self.off += n;
        Some(&mut seg[start..start + n])
    }

    /// Copies `src` to the cursor, spanning segments. False, copying nothing more, if the
    /// segments run out.
    fn copy_from(&mut self, mut src: &[u8]) -> bool {
        while !src.is_empty() {
            let Some(seg) = self.segs.get_mut(self.seg) else {
                return false;
            };
            let room = seg.len() - self.off;
            if room == 0 {
                self.seg += 1;
                self.off = 0;
                continue;
            }
            let n = room.min(src.len());
            seg[self.off..self.off + n].copy_from_slice(&src[..n]);
            self.off += n;
            src = &src[n..];
        }
        true
    }
}

/// Copies one chunk into `dst` and returns the checksum of the bytes that landed there (equal
/// to [`chunk_checksum`] of `src` unless `src` changed under the copy). The copy and the hash
/// are one pass over `src` ([`chunk_hash::copy_and_hash`]); a chunk that spans destination
/// segments goes through a private bounce buffer, so what is scattered is still exactly what
/// was hashed. `next` is the chunk to be copied after this one (or nothing), prefetched as
/// this one ends. `None` if `dst` is too short.
pub fn copy_chunk_checked(src: &[u8], next: &[u8], dst: &mut Scatter<'_, '_>) -> Option<u64> {
    if let Some(d) = dst.contiguous(src.len()) {
        return Some(chunk_hash::copy_and_hash_before(src, d, next));
    }
    thread_local! {
        static BOUNCE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BOUNCE.with_borrow_mut(|bounce| {
        bounce.resize(src.len(), 0);
        let sum = chunk_hash::copy_and_hash_before(src, bounce, next);
        dst.copy_from(bounce).then_some(sum)
    })
}

/// [`copy_chunk_checked`] into a destination nobody reads soon (a get's landing place in the
/// engine's memory): where one segment holds the chunk, its stores bypass the caches
/// ([`chunk_hash::copy_and_hash_streaming`]). Same digest, same bytes.
pub fn copy_chunk_checked_streaming(src: &[u8], dst: &mut Scatter<'_, '_>) -> Option<u64> {
    match dst.contiguous(src.len()) {
        Some(d) => Some(chunk_hash::copy_and_hash_streaming(src, d)),
        None => copy_chunk_checked(src, &[], dst),
    }
}

/// Checksum of a whole trailer, as stored in the index.
pub fn trailer_checksum(trailer: &[u8]) -> u64 {
    xxh3_64(trailer)
}

/// The checksum recorded for chunk `i` in a trailer.
pub fn recorded(trailer: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(trailer[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

/// Records chunk `i`'s checksum in a trailer.
pub fn record(trailer: &mut [u8], i: usize, sum: u64) {
    trailer[i * 8..i * 8 + 8].copy_from_slice(&sum.to_le_bytes());
}

/// Whether a block of `len` bytes that landed across `segs` (an RDMA READ straight into KV
/// segments) matches `trailer`, itself checked against the index's `trailer_sum` first. Each
/// chunk is hashed in place where one segment holds it, else gathered first.
pub fn scattered_intact(segs: &[&mut [u8]], len: usize, trailer: &[u8], trailer_sum: u64) -> bool {
    if trailer_checksum(trailer) != trailer_sum {
        return false;
    }
    let mut gather = Vec::new();
    let (mut seg, mut off) = (0usize, 0usize);
    for i in 0..chunk_count(len) {
        let want = chunk_range(len, i).len();
        // The chunk in place when one segment holds it, else gathered.
        let sum = if segs[seg].len() - off >= want {
            let s = chunk_checksum(&segs[seg][off..off + want]);
            off += want;
            s
        } else {
            gather.clear();
            while gather.len() < want {
                let take = (segs[seg].len() - off).min(want - gather.len());
                gather.extend_from_slice(&segs[seg][off..off + take]);
                off += take;
                if off == segs[seg].len() && gather.len() < want {
                    (seg, off) = (seg + 1, 0);
                }
            }
            chunk_checksum(&gather)
        };
        if sum != recorded(trailer, i) {
            return false;
        }
        if off == segs[seg].len() && seg + 1 < segs.len() {
            (seg, off) = (seg + 1, 0);
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `buf` cut at `cuts` (ascending, from 0 to its length) into segments.
    fn cut<'a>(buf: &'a mut [u8], cuts: &[usize]) -> Vec<&'a mut [u8]> {
        let mut rest = buf;
        let mut segs = Vec::new();
        for w in cuts.windows(2) {
            let (a, b) = std::mem::take(&mut rest).split_at_mut(w[1] - w[0]);
            segs.push(a);
            rest = b;
        }
        segs
    }

    #[test]
    fn a_block_scattered_over_ragged_segments_verifies_in_place() {
        let len = CHUNK * 2 + 1000;
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
        let mut trailer = vec![0u8; trailer_len(len)];
        for i in 0..chunk_count(len) {
            record(&mut trailer, i, chunk_checksum(&data[chunk_range(len, i)]));
        }
        let sum = trailer_checksum(&trailer);
        // Cuts inside the first chunk, on a chunk boundary, and inside the last chunk.
        let mut buf = data.clone();
        let mut segs = cut(&mut buf, &[0, 5000, CHUNK, CHUNK * 2 + 10, len]);
        assert!(scattered_intact(&segs, len, &trailer, sum));
        assert!(
            !scattered_intact(&segs, len, &trailer, sum ^ 1),
            "wrong trailer sum"
        );
        segs[3][2] ^= 1;
        assert!(
            !scattered_intact(&segs, len, &trailer, sum),
            "a flipped byte"
        );
    }

    #[test]
    fn scattered_copy_lands_every_byte_and_hashes_like_the_stored_checksum() {
        for len in [1, 100, 4096, 4097, CHUNK - 3, CHUNK] {
            let src: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            // Ragged segments that split 4 KiB steps at odd places.
            let mut cuts = [0, len / 3, (len / 3 + 1).min(len), len * 5 / 7, len];
            cuts.sort();
            let mut buf = vec![0u8; len];
            let mut segs = cut(&mut buf, &cuts);
            let mut sc = Scatter::new(&mut segs);
            assert_eq!(sc.capacity(), len);
            assert_eq!(
                copy_chunk_checked(&src, &[], &mut sc),
                Some(chunk_checksum(&src))
            );
            assert_eq!(buf, src, "len {len}");
        }
    }

    #[test]
    fn streaming_copy_lands_the_same_bytes_and_digest_in_one_segment_or_many() {
        let len = CHUNK;
        let src: Vec<u8> = (0..len).map(|i| (i * 13 % 241) as u8).collect();
        // One aligned segment (streaming stores), one at an odd address (plain stores), and
        // ragged segments (through the bounce buffer).
        let mut whole = vec![0u8; len + 64];
        let at = whole.as_ptr().align_offset(32);
        for (start, cuts) in [
            (at, vec![0, len]),
            (at + 1, vec![0, len]),
            (at, vec![0, 999, 70_001, len]),
        ] {
            whole.fill(0);
            let mut segs = cut(&mut whole[start..start + len], &cuts);
            let mut sc = Scatter::new(&mut segs);
            assert_eq!(
                copy_chunk_checked_streaming(&src, &mut sc),
                Some(chunk_checksum(&src))
            );
            assert_eq!(
                &whole[start..start + len],
                &src[..],
                "start {start} cuts {cuts:?}"
            );
        }
        let mut short = vec![0u8; len - 1];
        let mut segs = [&mut short[..]];
        assert_eq!(
            copy_chunk_checked_streaming(&src, &mut Scatter::new(&mut segs)),
            None
        );
    }

    #[test]
    fn scattered_copy_reports_short_destinations() {
        let src = vec![7u8; 5000];
        let mut small = vec![0u8; 4999];
        let mut segs = [&mut small[..]];
        assert_eq!(
            copy_chunk_checked(&src, &[], &mut Scatter::new(&mut segs)),
            None
        );
    }

    #[test]
    fn layout_of_small_exact_and_ragged_blocks() {
        assert_eq!(
            (chunk_count(1), trailer_offset(1), stored_len(1)),
            (1, 8, 16)
        );
        assert_eq!((chunk_count(CHUNK), stored_len(CHUNK)), (1, CHUNK + 8));
        assert_eq!(
            (chunk_count(CHUNK + 1), stored_len(CHUNK + 1)),
            (2, CHUNK + 8 + 16)
        );
        assert_eq!(chunk_range(CHUNK + 5, 1), CHUNK..CHUNK + 5);
        assert_eq!(
            stored_len(1 << 20) - (1 << 20),
            64,
            "1 MiB carries 64 bytes of checksums"
        );
    }
}
