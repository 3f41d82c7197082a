//! Every prost control message of `kvcache_core::wire::messages`: arbitrary bytes never panic
//! the decoder, and a message that decodes re-encodes to bytes that decode to the same message
//! (and re-encode to the same bytes). The key list codec round-trips both ways.
//!
//! Input: one selector byte (which message) ‖ the bytes to decode.

#![no_main]

use std::fmt::Debug;

use kvcache_core::BlockKey;
use kvcache_core::wire::messages::*;
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// Decode, re-encode, decode again: equal messages, stable bytes.
fn round_trip<M: Message + Default + PartialEq + Debug>(bytes: &[u8]) {
    let Ok(m) = M::decode(bytes) else {
        return;
    };
    let encoded = m.encode_to_vec();
    assert_eq!(encoded.len(), m.encoded_len());
    let again = M::decode(encoded.as_slice()).expect("a re-encoded message decodes");
    assert_eq!(again, m);
    assert_eq!(
        again.encode_to_vec(),
        encoded,
        "the encoding of a decoded message is stable"
    );
    // A length-delimited copy frames the same message.
    let delimited = m.encode_length_delimited_to_vec();
    assert_eq!(
        M::decode_length_delimited(delimited.as_slice()).expect("delimited"),
        m
    );
}

/// The key list codec: a list decodes iff it is whole 16-byte keys, and both directions invert.
fn keys(bytes: &[u8]) {
    match decode_keys(bytes) {
        Ok(keys) => {
            assert_eq!(bytes.len() % BlockKey::LEN, 0);
            assert_eq!(keys.len(), bytes.len() / BlockKey::LEN);
            assert_eq!(encode_keys(&keys), bytes);
        }
        Err(BadKeyList(len)) => {
            assert_eq!(len, bytes.len());
            assert_ne!(len % BlockKey::LEN, 0);
        }
    }
    let whole = &bytes[..bytes.len() / BlockKey::LEN * BlockKey::LEN];
    let keys: Vec<BlockKey> = whole
        .chunks_exact(BlockKey::LEN)
        .map(|c| BlockKey::from_slice(c).expect("16 bytes"))
        .collect();
    assert_eq!(decode_keys(&encode_keys(&keys)), Ok(keys));
}

/// A message whose keys field must be a whole key list: check the codec on what it carries.
fn keys_field<M: Message + Default>(bytes: &[u8], field: impl Fn(&M) -> &[u8]) {
    if let Ok(m) = M::decode(bytes) {
        keys(field(&m));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    match selector % 25 {
        0 => round_trip::<PingRequest>(bytes),
        1 => round_trip::<PingReply>(bytes),
        2 => {
            round_trip::<PutRequest>(bytes);
            keys_field::<PutRequest>(bytes, |m| &m.keys);
        }
        3 => round_trip::<PutReply>(bytes),
        4 => {
            round_trip::<GetRequest>(bytes);
            keys_field::<GetRequest>(bytes, |m| &m.keys);
        }
        5 => round_trip::<GetReply>(bytes),
        6 => {
            round_trip::<ExistsRequest>(bytes);
            keys_field::<ExistsRequest>(bytes, |m| &m.keys);
        }
        7 => round_trip::<ExistsReply>(bytes),
        8 => {
            round_trip::<PrefixMatchRequest>(bytes);
            keys_field::<PrefixMatchRequest>(bytes, |m| &m.keys);
        }
        9 => round_trip::<PrefixMatchReply>(bytes),
        10 => round_trip::<ShmAttachRequest>(bytes),
        11 => round_trip::<ShmAttachReply>(bytes),
        12 => round_trip::<RdmaConnectRequest>(bytes),
        13 => round_trip::<RdmaConnectReply>(bytes),
        14 => {
            round_trip::<LeaseGetRequest>(bytes);
            keys_field::<LeaseGetRequest>(bytes, |m| &m.keys);
        }
        15 => round_trip::<LeaseGetReply>(bytes),
        16 => {
            round_trip::<ReleaseRequest>(bytes);
            keys_field::<ReleaseRequest>(bytes, |m| &m.suspect);
        }
        17 => {
            round_trip::<StagedPutRequest>(bytes);
            keys_field::<StagedPutRequest>(bytes, |m| &m.keys);
        }
        18 => round_trip::<ListKeysRequest>(bytes),
        19 => {
            round_trip::<ListKeysReply>(bytes);
            keys_field::<ListKeysReply>(bytes, |m| &m.keys);
        }
        20 => {
            round_trip::<ErrorReply>(bytes);
            // Unknown codes survive as raw integers; known ones convert back to the same value.
            if let Ok(m) = ErrorReply::decode(bytes)
                && let Ok(code) = ErrorCode::try_from(m.code)
            {
                assert_eq!(code as i32, m.code);
            }
        }
        21 => round_trip::<HelloRequest>(bytes),
        22 => round_trip::<HelloReply>(bytes),
        23 => {
            // PutReply statuses: every value decodes to a known status or is left as a number.
            if let Ok(m) = PutReply::decode(bytes) {
                for s in m.statuses {
                    if let Ok(status) = PutStatus::try_from(s) {
                        assert_eq!(status as i32, s);
                    }
                }
            }
        }
        _ => keys(bytes),
    }
});
