//! The wire protocol: a fixed 16-byte frame header ([`frame`]), then a prost control message
//! ([`messages`]), then an optional raw payload that never goes through protobuf.
//!
//! ```text
//! | magic "KV" | version u8 | op u8 | request id u32 | control len u32 | payload len u32 |
//! | control (prost, `control len` bytes) | payload (`payload len` bytes) |
//! ```
//! All integers are little-endian. A reply carries the request's op with [`frame::REPLY_BIT`]
//! set, or [`frame::Op::Error`] with an [`messages::ErrorReply`].

pub mod frame;
pub mod messages;

pub use frame::{FrameError, FrameHeader, FrameLimits, HEADER_LEN, Op, PROTOCOL_VERSION};
pub use messages::*;
