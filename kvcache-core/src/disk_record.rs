//! The disk tier's on-disk formats, without the disk: the segment-file record header and the
//! index's keys and values. The tier (`kvcache-server`, feature `disk`) does the I/O; keeping
//! the bytes here makes them unit-testable and fuzzable without RocksDB.
//!
//! - A segment record is a [`RecordHeader`] (`KVD1`, key, length, checksum: 32 bytes) and then
//!   the block's bytes.
//! - The index maps [`index_key`] (`k` ‖ key) to a [`BlockLocation`] (segment, offset, length,
//!   checksum: 28 bytes), and holds an empty value under [`segment_key`] (`s` ‖ segment ‖ key)
//!   so a segment's keys are one prefix scan of [`segment_prefix`].
//!
//! Every format is fixed-width: a decoder accepts exactly the bytes its encoder writes, so a
//! value that decodes re-encodes to the same bytes. Integers in records and index values are
//! little-endian; the segment id in index keys is big-endian so keys sort by segment.

use thiserror::Error;

use crate::key::BlockKey;

/// The four bytes opening every segment record.
pub const RECORD_MAGIC: [u8; 4] = *b"KVD1";
/// Bytes in a segment record header: magic (4), key (16), length (4), checksum (8).
pub const RECORD_HEADER_LEN: usize = 32;
/// Bytes in an encoded [`BlockLocation`].
pub const LOCATION_LEN: usize = 28;
/// The tag byte of an index key (`k<key>`).
pub const INDEX_KEY_TAG: u8 = b'k';
/// Bytes in an index key.
pub const INDEX_KEY_LEN: usize = 1 + BlockKey::LEN;
/// The tag byte of a segment membership key (`s<segment><key>`).
pub const SEGMENT_KEY_TAG: u8 = b's';
/// Bytes in a segment prefix (`s<segment>`).
pub const SEGMENT_PREFIX_LEN: usize = 1 + 8;
/// Bytes in a segment membership key.
pub const SEGMENT_KEY_LEN: usize = SEGMENT_PREFIX_LEN + BlockKey::LEN;

/// Why bytes read from a segment file or the index are not a valid record, key or value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DiskRecordError {
    #[error("{what} of {got} bytes, expected {expected}")]
    BadLength {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("bad record magic {0:02x?}: not a kvcache segment record")]
    BadMagic([u8; 4]),
    #[error("{what} starts with {got:#04x}, expected {expected:#04x}")]
    BadTag {
        what: &'static str,
        expected: u8,
        got: u8,
    },
}

/// Checks that `b` is exactly `expected` bytes long.
fn exactly<'a, const N: usize>(
    what: &'static str,
    b: &'a [u8],
) -> Result<&'a [u8; N], DiskRecordError> {
    b.try_into().map_err(|_| DiskRecordError::BadLength {
        what,
        expected: N,
        got: b.len(),
    })
}

/// Checks the tag byte of an index key.
fn tagged(what: &'static str, b: &[u8], expected: u8) -> Result<(), DiskRecordError> {
    match b.first() {
        Some(&got) if got == expected => Ok(()),
        got => Err(DiskRecordError::BadTag {
            what,
            expected,
            got: got.copied().unwrap_or(0),
        }),
    }
}

fn key_at(b: &[u8], at: usize) -> BlockKey {
    let mut k = [0u8; BlockKey::LEN];
    k.copy_from_slice(&b[at..at + BlockKey::LEN]);
    BlockKey::from_bytes(k)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// The header before each block in a segment file: it makes a segment readable without the
/// index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// The block's key.
    pub key: BlockKey,
    /// Bytes of the block that follow the header.
    pub len: u32,
    /// The block's checksum (the tier's xxh3 seeded with the key), as in the index.
    pub checksum: u64,
}

impl RecordHeader {
    /// Encodes the header: magic, key (canonical form), LE length, LE checksum.
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[..4].copy_from_slice(&RECORD_MAGIC);
        b[4..20].copy_from_slice(&self.key.to_bytes());
        b[20..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..].copy_from_slice(&self.checksum.to_le_bytes());
        b
    }

    /// Parses exactly [`RECORD_HEADER_LEN`] bytes.
    pub fn decode(b: &[u8]) -> Result<Self, DiskRecordError> {
        let b = exactly::<RECORD_HEADER_LEN>("record header", b)?;
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != RECORD_MAGIC {
            return Err(DiskRecordError::BadMagic(magic));
        }
        Ok(Self {
            key: key_at(b, 4),
            len: u32_at(b, 20),
            checksum: u64_at(b, 24),
        })
    }
}

/// Where a block lies on disk: the index's value for its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLocation {
    /// The segment file's id.
    pub segment: u64,
    /// Offset of the block's bytes (after its record header) in the segment.
    pub offset: u64,
    /// Bytes of the block.
    pub len: u32,
    /// The block's checksum, checked on every read.
    pub checksum: u64,
}

impl BlockLocation {
    /// Encodes the location: LE segment, offset, length and checksum.
    pub fn encode(&self) -> [u8; LOCATION_LEN] {
        let mut b = [0u8; LOCATION_LEN];
        b[..8].copy_from_slice(&self.segment.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..20].copy_from_slice(&self.len.to_le_bytes());
        b[20..].copy_from_slice(&self.checksum.to_le_bytes());
        b
    }

    /// Parses exactly [`LOCATION_LEN`] bytes.
    pub fn decode(b: &[u8]) -> Result<Self, DiskRecordError> {
        let b = exactly::<LOCATION_LEN>("index value", b)?;
        Ok(Self {
            segment: u64_at(b, 0),
            offset: u64_at(b, 8),
            len: u32_at(b, 16),
            checksum: u64_at(b, 20),
        })
    }
}

/// The index key under which a block's [`BlockLocation`] is stored (`k<key>`).
pub fn index_key(key: BlockKey) -> [u8; INDEX_KEY_LEN] {
    let mut k = [0u8; INDEX_KEY_LEN];
    k[0] = INDEX_KEY_TAG;
    k[1..].copy_from_slice(&key.to_bytes());
    k
}

/// The block key of an index key.
pub fn decode_index_key(b: &[u8]) -> Result<BlockKey, DiskRecordError> {
    let b = exactly::<INDEX_KEY_LEN>("index key", b)?;
    tagged("index key", b, INDEX_KEY_TAG)?;
    Ok(key_at(b, 1))
}

/// The prefix every membership key of `segment` starts with (`s<segment>`, segment big-endian
/// so that segments sort in id order).
pub fn segment_prefix(segment: u64) -> [u8; SEGMENT_PREFIX_LEN] {
    let mut k = [0u8; SEGMENT_PREFIX_LEN];
    k[0] = SEGMENT_KEY_TAG;
    k[1..].copy_from_slice(&segment.to_be_bytes());
    k
}

/// The membership key saying that `segment` holds `key` (`s<segment><key>`).
pub fn segment_key(segment: u64, key: BlockKey) -> [u8; SEGMENT_KEY_LEN] {
    let mut k = [0u8; SEGMENT_KEY_LEN];
    k[..SEGMENT_PREFIX_LEN].copy_from_slice(&segment_prefix(segment));
    k[SEGMENT_PREFIX_LEN..].copy_from_slice(&key.to_bytes());
    k
}

/// The segment and block key of a membership key.
pub fn decode_segment_key(b: &[u8]) -> Result<(u64, BlockKey), DiskRecordError> {
    let b = exactly::<SEGMENT_KEY_LEN>("segment key", b)?;
    tagged("segment key", b, SEGMENT_KEY_TAG)?;
    let mut id = [0u8; 8];
    id.copy_from_slice(&b[1..SEGMENT_PREFIX_LEN]);
    Ok((u64::from_be_bytes(id), key_at(b, SEGMENT_PREFIX_LEN)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: BlockKey = BlockKey(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10);

    #[test]
    fn record_header_bytes_are_the_documented_layout() {
        let h = RecordHeader {
            key: KEY,
            len: 0x1122_3344,
            checksum: 0x5566_7788_99aa_bbcc,
        };
        let b = h.encode();
        assert_eq!(&b[..4], b"KVD1");
        assert_eq!(&b[4..20], &KEY.to_bytes());
        assert_eq!(&b[20..24], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&b[24..], &0x5566_7788_99aa_bbccu64.to_le_bytes());
        assert_eq!(RecordHeader::decode(&b), Ok(h));
    }

    #[test]
    fn encodings_match_the_bytes_existing_tiers_hold() {
        // Golden bytes of the format written before this module existed: a change here makes
        // every disk tier on disk unreadable.
        let loc = BlockLocation {
            segment: 0x0102,
            offset: 0x0304,
            len: 0x05,
            checksum: 0x0607,
        };
        let mut want = [0u8; 28];
        want[..2].copy_from_slice(&[0x02, 0x01]);
        want[8..10].copy_from_slice(&[0x04, 0x03]);
        want[16] = 0x05;
        want[20..22].copy_from_slice(&[0x07, 0x06]);
        assert_eq!(loc.encode(), want);
        let mut want = [0u8; 17];
        want[0] = b'k';
        want[1..].copy_from_slice(&KEY.0.to_be_bytes());
        assert_eq!(index_key(KEY), want);
        assert_eq!(segment_prefix(0x0102), *b"s\0\0\0\0\0\0\x01\x02");
        let seg = segment_key(0x0102, KEY);
        assert_eq!(&seg[..9], b"s\0\0\0\0\0\0\x01\x02");
        assert_eq!(&seg[9..], &KEY.0.to_be_bytes());
    }

    #[test]
    fn record_header_rejects_bad_magic_and_lengths() {
        let mut b = RecordHeader {
            key: KEY,
            len: 1,
            checksum: 2,
        }
        .encode();
        assert_eq!(
            RecordHeader::decode(&b[..31]),
            Err(DiskRecordError::BadLength {
                what: "record header",
                expected: 32,
                got: 31
            })
        );
        b[3] = b'0';
        assert_eq!(
            RecordHeader::decode(&b),
            Err(DiskRecordError::BadMagic(*b"KVD0"))
        );
    }

    #[test]
    fn location_round_trips_and_rejects_other_lengths() {
        let loc = BlockLocation {
            segment: 7,
            offset: 32 + 4096,
            len: 4096,
            checksum: u64::MAX,
        };
        let b = loc.encode();
        assert_eq!(&b[..8], &7u64.to_le_bytes());
        assert_eq!(BlockLocation::decode(&b), Ok(loc));
        assert!(BlockLocation::decode(&b[..27]).is_err());
        assert!(BlockLocation::decode(&[0; 29]).is_err());
        assert!(BlockLocation::decode(&[]).is_err());
    }

    #[test]
    fn index_keys_round_trip_and_check_their_tag() {
        let k = index_key(KEY);
        assert_eq!(k[0], b'k');
        assert_eq!(decode_index_key(&k), Ok(KEY));
        let mut wrong = k;
        wrong[0] = b's';
        assert_eq!(
            decode_index_key(&wrong),
            Err(DiskRecordError::BadTag {
                what: "index key",
                expected: b'k',
                got: b's'
            })
        );
        assert!(decode_index_key(b"k").is_err());
    }

    #[test]
    fn segment_keys_sort_by_segment_and_start_with_its_prefix() {
        let a = segment_key(1, BlockKey(u128::MAX));
        let b = segment_key(256, BlockKey(0));
        assert!(a < b, "big-endian segment ids sort numerically");
        assert!(b.starts_with(&segment_prefix(256)));
        assert_eq!(decode_segment_key(&a), Ok((1, BlockKey(u128::MAX))));
        assert_eq!(decode_segment_key(&b), Ok((256, BlockKey(0))));
    }

    #[test]
    fn a_short_segment_key_is_an_error_not_a_panic() {
        // The index scan sees any key starting with `s`; a lone tag byte must not be sliced.
        assert_eq!(
            decode_segment_key(b"s"),
            Err(DiskRecordError::BadLength {
                what: "segment key",
                expected: 25,
                got: 1
            })
        );
        assert!(decode_segment_key(&[]).is_err());
        assert!(decode_segment_key(&index_key(KEY)).is_err());
    }
}
