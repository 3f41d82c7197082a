//! vLLM's KV-cache events: a pure decoder for one published message, a pure gap detector over
//! sequence numbers, and the async ZMQ subscriber around both.
//!
//! vLLM publishes each batch on a PUB socket as three frames (topic, 8-byte big-endian sequence
//! number, msgpack `[ts, events, data_parallel_rank]`) and keeps recent batches for replay on a
//! ROUTER socket. A consumer gets `Update::Batch` in sequence order, or `Update::Resync` when
//! events were lost and its picture of the engine can no longer be trusted.
//!
//! What lives where:
//! - `decode`: [`EngineHash`], [`KvEvent`], [`EventBatch`], [`EventError`] and [`decode()`], the
//!   pure msgpack decoder of one message.
//! - `seq`: [`SeqTracker`] and its [`SeqVerdict`], the pure gap detector.
//! - `subscribe`: [`subscribe()`] and its [`Update`]s: connecting, reconnecting with backoff, gap
//!   handling and forwarding.
//! - `replay`: the client that fetches missed batches from vLLM's replay ROUTER.

mod decode;
mod replay;
mod seq;
mod subscribe;

pub use decode::{EngineHash, EventBatch, EventError, KvEvent, decode};
pub use seq::{SeqTracker, SeqVerdict};
pub use subscribe::{Update, subscribe};

#[cfg(test)]
mod tests;
