//! The authentication frame as a node reads the first frame of a connection: the 16-byte
//! header, decoded with the node's limits, then — only for a `Hello` request — the control
//! message as a `HelloRequest`. Mirrors `kvcache-server`'s request loop (service.rs): a reply
//! or an `Error` frame is refused, any other op is refused unauthenticated without reading its
//! body, a short body is a truncated frame, and a hello with a payload is refused.
//!
//! Input: the bytes the peer sent (header, control, anything after).

#![no_main]

use kvcache_core::wire::{FrameError, FrameHeader, FrameLimits, HEADER_LEN, HelloRequest, Op};
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// What the node does with the first frame.
#[derive(Debug, PartialEq)]
enum First {
    /// Fewer than 16 bytes: the connection ends before a header.
    NoHeader,
    /// The header is refused: `ErrorReply`, connection closed.
    BadHeader(FrameError),
    /// A reply or an `Error` frame sent as a request.
    NotARequest,
    /// Any op but `Hello`: refused as unauthenticated; the body is never read.
    NotHello(Op),
    /// Fewer control bytes than the header announces.
    Truncated,
    /// The control bytes are not a `HelloRequest`, or a payload follows them.
    BadHello,
    /// A hello the node checks the token of.
    Hello(HelloRequest),
}

fn first_frame(data: &[u8], limits: &FrameLimits) -> First {
    let Some((header, rest)) = data.split_first_chunk::<HEADER_LEN>() else {
        return First::NoHeader;
    };
    let h = match FrameHeader::decode(header, limits) {
        Ok(h) => h,
        Err(e) => return First::BadHeader(e),
    };
    if h.reply || h.op == Op::Error {
        return First::NotARequest;
    }
    if h.op != Op::Hello {
        return First::NotHello(h.op);
    }
    let Some(control) = rest.get(..h.control_len as usize) else {
        return First::Truncated;
    };
    match HelloRequest::decode(control) {
        Ok(req) if h.payload_len == 0 => First::Hello(req),
        _ => First::BadHello,
    }
}

/// The header of a frame whose first 16 bytes decoded.
fn header(data: &[u8], limits: &FrameLimits) -> FrameHeader {
    let bytes = data.first_chunk::<HEADER_LEN>().expect("a whole header");
    FrameHeader::decode(bytes, limits).expect("the header decoded")
}

fuzz_target!(|data: &[u8]| {
    let limits = FrameLimits::default();
    let outcome = first_frame(data, &limits);
    match &outcome {
        First::NoHeader => assert!(data.len() < HEADER_LEN),
        First::BadHeader(_) | First::NotARequest | First::NotHello(_) => {
            // Decided by the header alone (limits included): the body is never parsed, so no
            // body or any other body gives the same.
            assert_eq!(first_frame(&data[..HEADER_LEN], &limits), outcome);
            let mut other = data[..HEADER_LEN].to_vec();
            other.extend(data[HEADER_LEN..].iter().map(|b| !b));
            assert_eq!(first_frame(&other, &limits), outcome);
        }
        First::Truncated => {
            let h = header(data, &limits);
            assert!(data.len() - HEADER_LEN < h.control_len as usize);
        }
        First::BadHello => {}
        First::Hello(req) => {
            let h = header(data, &limits);
            assert_eq!((h.op, h.reply, h.payload_len), (Op::Hello, false, 0));
            assert!(req.token.len() + req.client.len() <= h.control_len as usize);
            // The same hello, framed by a client, reads back as the same request.
            let control = req.encode_to_vec();
            let mut frame = FrameHeader::request(Op::Hello, h.request_id, control.len(), 0)
                .encode()
                .to_vec();
            frame.extend_from_slice(&control);
            assert_eq!(first_frame(&frame, &limits), outcome);
            // Only the announced control bytes are read: what follows is the next frame.
            frame.extend_from_slice(b"KV\x01\x01 trailing");
            assert_eq!(first_frame(&frame, &limits), outcome);
        }
    }
});
