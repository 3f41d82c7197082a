//! The disk tier's on-disk formats (`kvcache_core::disk_record`): arbitrary bytes never panic
//! a decoder; bytes that decode re-encode to themselves (the formats are fixed-width, so there
//! is exactly one encoding per value); and decode(encode(x)) == x for values built from the
//! input.
//!
//! Input: one selector byte (which format) ‖ the bytes to decode, which also seed a value.

#![no_main]

use kvcache_core::BlockKey;
use kvcache_core::disk_record::{
    BlockLocation, DiskRecordError, INDEX_KEY_LEN, LOCATION_LEN, RECORD_HEADER_LEN, RecordHeader,
    SEGMENT_KEY_LEN, decode_index_key, decode_segment_key, index_key, segment_key, segment_prefix,
};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

fn key(u: &mut Unstructured) -> Result<BlockKey> {
    Ok(BlockKey(u.arbitrary()?))
}

/// An error names the length it saw, and only lengths other than the format's are refused
/// for length.
fn check_error(e: &DiskRecordError, bytes: &[u8], len: usize) {
    assert!(!e.to_string().is_empty());
    if let DiskRecordError::BadLength { expected, got, .. } = *e {
        assert_eq!((expected, got), (len, bytes.len()));
        assert_ne!(got, expected);
    } else {
        assert_eq!(bytes.len(), len, "a wrong length is reported first");
    }
}

fn run(selector: u8, bytes: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(bytes);
    match selector % 4 {
        0 => {
            match RecordHeader::decode(bytes) {
                Ok(h) => assert_eq!(h.encode()[..], *bytes),
                Err(e) => check_error(&e, bytes, RECORD_HEADER_LEN),
            }
            let h = RecordHeader {
                key: key(&mut u)?,
                len: u.arbitrary()?,
                checksum: u.arbitrary()?,
            };
            assert_eq!(RecordHeader::decode(&h.encode()), Ok(h));
        }
        1 => {
            match BlockLocation::decode(bytes) {
                Ok(loc) => assert_eq!(loc.encode()[..], *bytes),
                Err(e) => check_error(&e, bytes, LOCATION_LEN),
            }
            let loc = BlockLocation {
                segment: u.arbitrary()?,
                offset: u.arbitrary()?,
                len: u.arbitrary()?,
                checksum: u.arbitrary()?,
            };
            assert_eq!(BlockLocation::decode(&loc.encode()), Ok(loc));
        }
        2 => {
            match decode_index_key(bytes) {
                Ok(k) => assert_eq!(index_key(k)[..], *bytes),
                Err(e) => check_error(&e, bytes, INDEX_KEY_LEN),
            }
            let k = key(&mut u)?;
            assert_eq!(decode_index_key(&index_key(k)), Ok(k));
            // An index key is never a segment key, whatever the key.
            assert!(decode_segment_key(&index_key(k)).is_err());
        }
        _ => {
            match decode_segment_key(bytes) {
                Ok((segment, k)) => {
                    assert_eq!(segment_key(segment, k)[..], *bytes);
                    assert!(bytes.starts_with(&segment_prefix(segment)));
                }
                Err(e) => check_error(&e, bytes, SEGMENT_KEY_LEN),
            }
            let (segment, k) = (u.arbitrary()?, key(&mut u)?);
            let encoded = segment_key(segment, k);
            assert_eq!(decode_segment_key(&encoded), Ok((segment, k)));
            assert!(encoded.starts_with(&segment_prefix(segment)));
            // The prefix scan of a segment sees its own keys only: prefixes of distinct
            // segments differ and keys sort by segment.
            let other: u64 = u.arbitrary()?;
            if other != segment {
                assert!(!encoded.starts_with(&segment_prefix(other)));
                assert_eq!(
                    encoded.cmp(&segment_key(other, k)),
                    segment.cmp(&other),
                    "segment keys sort by segment id"
                );
            }
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    if let Some((&selector, bytes)) = data.split_first() {
        let _ = run(selector, bytes);
    }
});
