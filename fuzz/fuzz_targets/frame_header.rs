//! `FrameHeader::decode` with arbitrary limits: it never panics, it agrees with the header
//! layout of docs/ARCHITECTURE.md ("Wire protocol"), a header that decodes re-encodes to the
//! same 16 bytes, and both limits are enforced.
//!
//! Input: `max_control` (LE u32) ‖ `max_payload` (LE u32) ‖ the 16 header bytes.

#![no_main]

use kvcache_core::wire::frame::REPLY_BIT;
use kvcache_core::wire::{FrameError, FrameHeader, FrameLimits, HEADER_LEN, Op, PROTOCOL_VERSION};
use libfuzzer_sys::fuzz_target;

const UNLIMITED: FrameLimits = FrameLimits {
    max_control: u32::MAX,
    max_payload: u32::MAX,
};

fn word(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fuzz_target!(|data: &[u8]| {
    let Some((limits, header)) = data.split_first_chunk::<8>() else {
        return;
    };
    let Some(header) = header.first_chunk::<HEADER_LEN>() else {
        return;
    };
    let limits = FrameLimits {
        max_control: word(limits, 0),
        max_payload: word(limits, 4),
    };
    let (control_len, payload_len) = (word(header, 8), word(header, 12));

    match FrameHeader::decode(header, &limits) {
        Ok(h) => {
            assert_eq!(
                &h.encode(),
                header,
                "a decoded header re-encodes to its bytes"
            );
            assert_eq!(header[..2], *b"KV");
            assert_eq!(header[2], PROTOCOL_VERSION);
            assert_eq!(h.op as u8 | if h.reply { REPLY_BIT } else { 0 }, header[3]);
            assert_eq!(h.request_id, word(header, 4));
            assert_eq!((h.control_len, h.payload_len), (control_len, payload_len));
            assert!(h.control_len <= limits.max_control);
            assert!(h.payload_len <= limits.max_payload);
            // Building the same header through the constructors gives the same bytes.
            let rebuilt = if h.reply {
                FrameHeader::reply(
                    h.op,
                    h.request_id,
                    h.control_len as usize,
                    h.payload_len as usize,
                )
            } else {
                FrameHeader::request(
                    h.op,
                    h.request_id,
                    h.control_len as usize,
                    h.payload_len as usize,
                )
            };
            assert_eq!(rebuilt, h);
            // Looser limits accept what tighter ones accept.
            assert_eq!(FrameHeader::decode(header, &UNLIMITED), Ok(h));
        }
        Err(e) => {
            assert!(!e.kind().is_empty() && !e.to_string().is_empty());
            match e {
                FrameError::BadMagic(m) => {
                    assert_ne!(m, *b"KV");
                    assert_eq!(m, [header[0], header[1]]);
                }
                FrameError::UnsupportedVersion { got } => {
                    assert_eq!(header[..2], *b"KV");
                    assert_ne!(got, PROTOCOL_VERSION);
                    assert_eq!(got, header[2]);
                }
                FrameError::UnknownOp(op) => {
                    assert_eq!(header[..3], [b'K', b'V', PROTOCOL_VERSION]);
                    assert_eq!(op, header[3]);
                    // Every op the crate knows, request or reply, is accepted.
                    let known = Op::REQUESTS
                        .iter()
                        .chain(&[Op::Error])
                        .any(|o| *o as u8 == op & !REPLY_BIT);
                    assert!(!known, "op {op:#04x} is known but was refused");
                }
                FrameError::ControlTooLarge { len, max } => {
                    assert_eq!((len, max), (control_len, limits.max_control));
                    assert!(len > max);
                }
                FrameError::PayloadTooLarge { len, max } => {
                    assert_eq!((len, max), (payload_len, limits.max_payload));
                    assert!(len > max);
                    assert!(
                        control_len <= limits.max_control,
                        "control is checked first"
                    );
                }
            }
            // A header refused only for a limit is well formed and passes without limits.
            if matches!(
                e,
                FrameError::ControlTooLarge { .. } | FrameError::PayloadTooLarge { .. }
            ) {
                let h = FrameHeader::decode(header, &UNLIMITED).expect("well formed");
                assert_eq!(&h.encode(), header);
            } else {
                assert_eq!(FrameHeader::decode(header, &UNLIMITED), Err(e));
            }
        }
    }
});
