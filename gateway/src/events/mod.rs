//! vLLM's KV-cache events: a pure decoder for one published message, a pure gap detector over
//! sequence numbers, and the async ZMQ subscriber around both.
//!
//! vLLM publishes each batch on a PUB socket as three frames (topic, 8-byte big-endian sequence
//! number, msgpack `[ts, events, data_parallel_rank]`) and keeps recent batches for replay on a
//! ROUTER socket. A consumer gets `Update::Batch` in sequence order, or `Update::Resync` when
//! events were lost and its picture of the engine can no longer be trusted.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use rmpv::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};
use zeromq::{
    DealerSocket, Endpoint, Socket, SocketEvent, SocketOptions, SocketRecv, SocketSend, SubSocket,
    ZmqError, ZmqMessage,
};

/// A block hash as vLLM reports it (bytes or int), folded to 64 bits for compact maps.
///
/// Ints are taken as they are (negative ones from old vLLM releases wrap to u64). Bytes are
/// folded to the low 64 bits of their big-endian value: exactly what vLLM itself publishes in its
/// int mode (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`, on by default), so an engine folds alike in
/// both modes. vLLM's hashes are sha256 or xxhash digests, whose low bits are as good as any.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EngineHash(pub u64);

impl EngineHash {
    /// Folds a bytes block hash (see the type's documentation for why this fold).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let low = &bytes[bytes.len().saturating_sub(8)..];
        EngineHash(low.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }
}

/// One change to an engine's KV cache, as vLLM reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvEvent {
    /// Blocks became cached: `hashes` chain from `parent`, covering `token_ids` in blocks of `block_size`.
    Stored {
        hashes: Vec<EngineHash>,
        parent: Option<EngineHash>,
        token_ids: Vec<u32>,
        block_size: usize,
        lora_name: Option<String>,
        medium: Option<String>,
    },
    /// Blocks left the cache (of `medium`, when the engine says which).
    Removed {
        hashes: Vec<EngineHash>,
        medium: Option<String>,
    },
    /// The engine dropped every cached block.
    Cleared,
}

/// One published message, decoded: its sequence number and its events in order.
#[derive(Clone, Debug, PartialEq)]
pub struct EventBatch {
    pub seq: u64,
    /// The engine's wall-clock time of the batch, seconds since the epoch.
    pub ts: f64,
    /// The publishing data-parallel rank, when the engine says.
    pub data_parallel_rank: Option<u32>,
    pub events: Vec<KvEvent>,
    /// Events of types this decoder does not know (a newer vLLM), skipped.
    pub unknown: usize,
}

/// Why a published message could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("message has {0} frames, expected 3 (topic, sequence number, payload)")]
    Frames(usize),
    #[error("sequence number frame is {0} bytes, expected 8")]
    SeqLength(usize),
    #[error("payload is not msgpack: {0}")]
    Msgpack(#[from] rmpv::decode::Error),
    #[error("payload has {0} bytes after the batch")]
    TrailingBytes(usize),
    #[error("batch is {0}, expected an array [ts, events, data_parallel_rank?]")]
    NotABatch(String),
    #[error("batch field {field}: expected {expected}, got {got}")]
    BatchField {
        field: &'static str,
        expected: &'static str,
        got: String,
    },
    #[error("event {index} is {got}, expected a map or an array")]
    NotAnEvent { index: usize, got: String },
    #[error("event {index} has no \"type\" tag")]
    MissingTag { index: usize },
    #[error("event {index} has tag {got}, expected a string")]
    BadTag { index: usize, got: String },
    #[error("event {index} ({tag}) lacks field {field}")]
    MissingField {
        index: usize,
        tag: &'static str,
        field: &'static str,
    },
    #[error("event {index} ({tag}) field {field}: expected {expected}, got {got}")]
    BadField {
        index: usize,
        tag: &'static str,
        field: &'static str,
        expected: &'static str,
        got: String,
    },
}

/// How deep msgpack may nest (rmpv counts about two per level). vLLM's batches nest about six
/// levels; rmpv's default (1024) lets hostile input overflow a 2 MiB stack in debug builds.
const MAX_DEPTH: usize = 64;

/// Decodes one published message (its frames after the topic: seq and payload). Pure, no I/O.
pub fn decode(seq: &[u8], payload: &[u8]) -> Result<EventBatch, EventError> {
    let seq = decode_seq(seq)?;
    let mut rest = payload;
    let value = rmpv::decode::read_value_with_max_depth(&mut rest, MAX_DEPTH)?;
    if !rest.is_empty() {
        return Err(EventError::TrailingBytes(rest.len()));
    }
    let Value::Array(items) = &value else {
        return Err(EventError::NotABatch(describe(&value)));
    };
    let (Some(ts), Some(events)) = (items.first(), items.get(1)) else {
        return Err(EventError::NotABatch(describe(&value)));
    };
    let ts = match ts {
        Value::F64(x) => *x,
        Value::F32(x) => f64::from(*x),
        Value::Integer(i) => i.as_f64().unwrap_or(0.0),
        other => return Err(batch_field("ts", "a number", other)),
    };
    let Value::Array(events) = events else {
        return Err(batch_field("events", "an array", events));
    };
    let data_parallel_rank = match items.get(2) {
        None | Some(Value::Nil) => None,
        Some(v @ Value::Integer(i)) => Some(
            i.as_u64()
                .and_then(|r| u32::try_from(r).ok())
                .ok_or_else(|| batch_field("data_parallel_rank", "a u32", v))?,
        ),
        Some(other) => {
            return Err(batch_field(
                "data_parallel_rank",
                "an integer or nil",
                other,
            ));
        }
    };
    let mut batch = EventBatch {
        seq,
        ts,
        data_parallel_rank,
        events: Vec::with_capacity(events.len()),
        unknown: 0,
    };
    for (index, event) in events.iter().enumerate() {
        match decode_event(index, event)? {
            Some(event) => batch.events.push(event),
            None => batch.unknown += 1,
        }
    }
    Ok(batch)
}

/// Reads the 8-byte big-endian sequence number frame.
fn decode_seq(frame: &[u8]) -> Result<u64, EventError> {
    let bytes: [u8; 8] = frame
        .try_into()
        .map_err(|_| EventError::SeqLength(frame.len()))?;
    Ok(u64::from_be_bytes(bytes))
}

/// A short description of a value for error messages (never its whole content).
fn describe(v: &Value) -> String {
    match v {
        Value::Nil => "nil".into(),
        Value::Boolean(b) => format!("bool {b}"),
        Value::Integer(i) => format!("integer {i}"),
        Value::F32(x) => format!("float {x}"),
        Value::F64(x) => format!("float {x}"),
        Value::String(_) => "a string".into(),
        Value::Binary(b) => format!("{} bytes of binary", b.len()),
        Value::Array(a) => format!("an array of {}", a.len()),
        Value::Map(m) => format!("a map of {}", m.len()),
        Value::Ext(t, _) => format!("an ext value of type {t}"),
    }
}

fn batch_field(field: &'static str, expected: &'static str, got: &Value) -> EventError {
    EventError::BatchField {
        field,
        expected,
        got: describe(got),
    }
}

/// Field order of the old positional (msgspec `array_like`) encoding, after the tag.
const STORED_FIELDS: &[&str] = &[
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
];
const REMOVED_FIELDS: &[&str] = &["block_hashes", "medium"];

/// The fields of one event, whichever encoding carried them.
enum Fields<'a> {
    /// Current vLLM: a map with a "type" tag.
    Map(&'a [(Value, Value)]),
    /// Old vLLM: `[tag, field, field, ...]` in declaration order; trailing fields may be absent.
    Positional(&'a [Value]),
}

impl<'a> Fields<'a> {
    fn get(&self, order: &[&str], name: &str) -> Option<&'a Value> {
        match self {
            Fields::Map(pairs) => pairs
                .iter()
                .find(|(k, _)| k.as_str() == Some(name))
                .map(|(_, v)| v),
            Fields::Positional(items) => {
                let at = order.iter().position(|f| *f == name)?;
                items.get(at + 1)
            }
        }
    }
}

/// Decodes one event; `None` for an event type this decoder does not know.
fn decode_event(index: usize, v: &Value) -> Result<Option<KvEvent>, EventError> {
    let (tag, fields) = match v {
        Value::Map(pairs) => {
            let tag = pairs
                .iter()
                .find(|(k, _)| k.as_str() == Some("type"))
                .map(|(_, t)| t)
                .ok_or(EventError::MissingTag { index })?;
            (tag, Fields::Map(pairs))
        }
        Value::Array(items) => {
            let tag = items.first().ok_or(EventError::MissingTag { index })?;
            (tag, Fields::Positional(items))
        }
        other => {
            return Err(EventError::NotAnEvent {
                index,
                got: describe(other),
            });
        }
    };
    let tag = tag.as_str().ok_or_else(|| EventError::BadTag {
        index,
        got: describe(tag),
    })?;
    match tag {
        "BlockStored" => {
            let f = EventFields::new(index, "BlockStored", fields, STORED_FIELDS);
            Ok(Some(KvEvent::Stored {
                hashes: f.hashes("block_hashes")?,
                parent: f.opt_hash("parent_block_hash")?,
                token_ids: f.token_ids("token_ids")?,
                block_size: f.usize("block_size")?,
                lora_name: f.opt_string("lora_name")?,
                medium: f.opt_string("medium")?,
            }))
        }
        "BlockRemoved" => {
            let f = EventFields::new(index, "BlockRemoved", fields, REMOVED_FIELDS);
            Ok(Some(KvEvent::Removed {
                hashes: f.hashes("block_hashes")?,
                medium: f.opt_string("medium")?,
            }))
        }
        "AllBlocksCleared" => Ok(Some(KvEvent::Cleared)),
        _ => Ok(None),
    }
}

/// Typed access to one known event's fields, with errors that name the event and field.
struct EventFields<'a> {
    index: usize,
    tag: &'static str,
    fields: Fields<'a>,
    order: &'static [&'static str],
}

impl<'a> EventFields<'a> {
    fn new(
        index: usize,
        tag: &'static str,
        fields: Fields<'a>,
        order: &'static [&'static str],
    ) -> Self {
        EventFields {
            index,
            tag,
            fields,
            order,
        }
    }

    fn get(&self, field: &'static str) -> Option<&'a Value> {
        self.fields.get(self.order, field)
    }

    fn required(&self, field: &'static str) -> Result<&'a Value, EventError> {
        self.get(field).ok_or(EventError::MissingField {
            index: self.index,
            tag: self.tag,
            field,
        })
    }

    fn bad(&self, field: &'static str, expected: &'static str, got: &Value) -> EventError {
        EventError::BadField {
            index: self.index,
            tag: self.tag,
            field,
            expected,
            got: describe(got),
        }
    }

    fn hash(&self, field: &'static str, v: &Value) -> Result<EngineHash, EventError> {
        match v {
            Value::Integer(i) => i
                .as_u64()
                .or_else(|| i.as_i64().map(|n| n as u64))
                .map(EngineHash)
                .ok_or_else(|| self.bad(field, "a block hash (bytes or int)", v)),
            Value::Binary(b) => Ok(EngineHash::from_bytes(b)),
            other => Err(self.bad(field, "a block hash (bytes or int)", other)),
        }
    }

    fn hashes(&self, field: &'static str) -> Result<Vec<EngineHash>, EventError> {
        match self.required(field)? {
            Value::Array(items) => items.iter().map(|v| self.hash(field, v)).collect(),
            other => Err(self.bad(field, "a list of block hashes", other)),
        }
    }

    fn opt_hash(&self, field: &'static str) -> Result<Option<EngineHash>, EventError> {
        match self.get(field) {
            None | Some(Value::Nil) => Ok(None),
            Some(v) => self.hash(field, v).map(Some),
        }
    }

    fn token_ids(&self, field: &'static str) -> Result<Vec<u32>, EventError> {
        let items = match self.required(field)? {
            Value::Array(items) => items,
            other => return Err(self.bad(field, "a list of token ids", other)),
        };
        items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(|| self.bad(field, "token ids that fit in u32", v))
            })
            .collect()
    }

    fn usize(&self, field: &'static str) -> Result<usize, EventError> {
        let v = self.required(field)?;
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.bad(field, "a non-negative integer", v))
    }

    fn opt_string(&self, field: &'static str) -> Result<Option<String>, EventError> {
        match self.get(field) {
            None | Some(Value::Nil) => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_owned()))
                .ok_or_else(|| self.bad(field, "a UTF-8 string or nil", v)),
        }
    }
}

/// What one sequence number says about the stream so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqVerdict {
    /// The first message since (re)connecting: a starting point, not a gap.
    First,
    /// Exactly the number expected.
    Next,
    /// Batches `from..to` were never received.
    Gap { from: u64, to: u64 },
    /// Lower than expected: the engine restarted and counts from 0 again.
    Restarted { expected: u64 },
}

/// Judges each sequence number against the last; pure, so gap handling is testable without sockets.
#[derive(Clone, Debug, Default)]
pub struct SeqTracker {
    expected: Option<u64>,
}

impl SeqTracker {
    /// Judges `seq` and takes it as the new position, whatever the verdict.
    pub fn observe(&mut self, seq: u64) -> SeqVerdict {
        let verdict = match self.expected {
            None => SeqVerdict::First,
            Some(e) if seq == e => SeqVerdict::Next,
            Some(e) if seq > e => SeqVerdict::Gap { from: e, to: seq },
            Some(e) => SeqVerdict::Restarted { expected: e },
        };
        self.expected = seq.checked_add(1);
        verdict
    }

    /// Forgets the position, so the next number is a starting point (after a reconnect).
    pub fn reset(&mut self) {
        self.expected = None;
    }
}

/// What a subscriber tells its consumer.
#[derive(Clone, Debug, PartialEq)]
pub enum Update {
    /// The next batch, in sequence order.
    Batch(EventBatch),
    /// Events were lost (a gap in sequence numbers that replay could not fill, or a reconnect):
    /// the consumer must forget this engine's blocks and start over.
    Resync { reason: String },
}

/// How long one connection attempt (SUB or replay DEALER) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a whole replay (connect, request, every reply) may take before we resync instead.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(3);
/// Gaps wider than this are not worth replaying (vLLM keeps 10 000 batches by default).
const MAX_REPLAY: u64 = 100_000;
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Subscribes to `endpoint` (e.g. "tcp://127.0.0.1:5557") with `topic`, reconnecting with backoff (100 ms doubling to 5 s) until `updates` is closed; on a gap in sequence numbers it asks `replay` (if given) for the missing range, else (or if replay fails) sends Update::Resync. Logs each degradation once with its reason.
pub async fn subscribe(
    endpoint: String,
    topic: String,
    replay: Option<String>,
    updates: mpsc::Sender<Update>,
) {
    if let Err(e) = endpoint.parse::<Endpoint>() {
        error!(%endpoint, error = %e, "invalid KV event endpoint; not subscribing");
        return;
    }
    let replay = match replay {
        Some(r) => match r.parse::<Endpoint>() {
            Ok(_) => Some(r),
            Err(e) => {
                warn!(%endpoint, replay = %r, error = %e, "invalid KV event replay endpoint; gaps will resync instead");
                None
            }
        },
        None => {
            info!(%endpoint, "no KV event replay endpoint; gaps will resync instead");
            None
        }
    };
    let mut backoff = Backoff::default();
    let mut failures = 0u32;
    loop {
        let attempt = tokio::select! {
            _ = updates.closed() => return,
            attempt = connect_sub(&endpoint, &topic) => attempt,
        };
        let delay = match attempt {
            Ok((socket, monitor)) => {
                info!(%endpoint, %topic, "subscribed to KV events");
                failures = 0;
                let mut session = Session {
                    endpoint: &endpoint,
                    replay: replay.as_deref(),
                    updates: &updates,
                    tracker: SeqTracker::default(),
                    received: false,
                };
                let reason = match session.run(socket, monitor).await {
                    Ok(reason) => reason,
                    Err(Closed) => return,
                };
                if session.received {
                    backoff = Backoff::default();
                }
                warn!(%endpoint, %reason, "KV event stream lost; consumer resyncs, reconnecting");
                if updates.send(Update::Resync { reason }).await.is_err() {
                    return;
                }
                backoff.next_delay()
            }
            Err(e) => {
                let delay = backoff.next_delay();
                if failures == 0 {
                    warn!(%endpoint, error = %e, "cannot connect to KV event publisher; retrying with backoff up to 5 s");
                } else {
                    debug!(%endpoint, error = %e, ?delay, failures, "KV event publisher still unreachable");
                }
                failures = failures.saturating_add(1);
                delay
            }
        };
        tokio::select! {
            _ = updates.closed() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Exponential reconnect delay: 100 ms doubling to 5 s.
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: BACKOFF_FIRST,
        }
    }
}

impl Backoff {
    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (delay * 2).min(BACKOFF_MAX);
        delay
    }
}

/// The consumer went away: the subscriber stops.
struct Closed;

/// Connects a SUB socket, returning it with its monitor (which reports disconnects).
async fn connect_sub(
    endpoint: &str,
    topic: &str,
) -> Result<(SubSocket, impl Stream<Item = SocketEvent> + Unpin + use<>), ZmqError> {
    let mut options = SocketOptions::default();
    options.connect_timeout(CONNECT_TIMEOUT);
    let mut socket = SubSocket::with_options(options);
    let monitor = socket.monitor();
    // Remembered by the socket and sent to the publisher as soon as the connection is up.
    socket.subscribe(topic).await?;
    socket.connect(endpoint).await?;
    Ok((socket, monitor))
}

/// One connection's worth of receiving: gap detection, replay and forwarding.
struct Session<'a> {
    endpoint: &'a str,
    replay: Option<&'a str>,
    updates: &'a mpsc::Sender<Update>,
    tracker: SeqTracker,
    /// Whether any message arrived (a connection that delivers nothing does not reset backoff).
    received: bool,
}

impl Session<'_> {
    /// Receives until the connection is lost (returns why) or the consumer goes away.
    async fn run(
        &mut self,
        mut socket: SubSocket,
        mut monitor: impl Stream<Item = SocketEvent> + Unpin,
    ) -> Result<String, Closed> {
        loop {
            // The monitor reports a disconnect only after the socket has handed out every
            // message that arrived before it, so nothing received is dropped here.
            let message = tokio::select! {
                _ = self.updates.closed() => return Err(Closed),
                event = monitor.next() => match event {
                    Some(SocketEvent::Disconnected(_)) => {
                        return Ok("the publisher closed the connection".into());
                    }
                    Some(_) => continue,
                    None => return Ok("the socket monitor closed".into()),
                },
                message = socket.recv() => match message {
                    Ok(message) => message,
                    Err(e) => return Ok(format!("receiving failed: {e}")),
                },
            };
            self.received = true;
            self.handle(&message).await?;
        }
    }

    async fn handle(&mut self, message: &ZmqMessage) -> Result<(), Closed> {
        let (seq_frame, payload) = match (message.len(), message.get(1), message.get(2)) {
            (3, Some(seq), Some(payload)) => (seq, payload),
            (n, _, _) => {
                self.tracker.reset();
                return self
                    .resync(format!("dropped a message: {}", EventError::Frames(n)))
                    .await;
            }
        };
        let seq = match decode_seq(seq_frame) {
            Ok(seq) => seq,
            Err(e) => {
                self.tracker.reset();
                return self.resync(format!("dropped a message: {e}")).await;
            }
        };
        match self.tracker.observe(seq) {
            SeqVerdict::First | SeqVerdict::Next => {}
            SeqVerdict::Restarted { expected } => {
                self.resync(format!(
                    "sequence number fell from {expected} to {seq}: the engine restarted"
                ))
                .await?;
            }
            SeqVerdict::Gap { from, to } => self.fill_gap(from, to).await?,
        }
        match decode(seq_frame, payload) {
            Ok(batch) => self.send(Update::Batch(batch)).await,
            Err(e) => {
                self.resync(format!("batch {seq} is undecodable: {e}"))
                    .await
            }
        }
    }

    /// Replays batches `from..to` in order, or resyncs when that is impossible.
    async fn fill_gap(&mut self, from: u64, to: u64) -> Result<(), Closed> {
        let Some(replay) = self.replay else {
            return self
                .resync(format!(
                    "missed batches {from}..{to} and no replay endpoint is configured"
                ))
                .await;
        };
        if to - from > MAX_REPLAY {
            return self
                .resync(format!(
                    "missed {} batches ({from}..{to}), more than the {MAX_REPLAY} worth replaying",
                    to - from
                ))
                .await;
        }
        match fetch_replay(replay, from, to).await {
            Ok(batches) => {
                debug!(
                    endpoint = self.endpoint,
                    from, to, "filled a KV event gap from replay"
                );
                for batch in batches {
                    self.send(Update::Batch(batch)).await?;
                }
                Ok(())
            }
            Err(e) => {
                self.resync(format!(
                    "missed batches {from}..{to} and replay from {replay} failed: {e}"
                ))
                .await
            }
        }
    }

    async fn resync(&self, reason: String) -> Result<(), Closed> {
        warn!(endpoint = self.endpoint, %reason, "KV events lost; consumer resyncs");
        self.send(Update::Resync { reason }).await
    }

    async fn send(&self, update: Update) -> Result<(), Closed> {
        self.updates.send(update).await.map_err(|_| Closed)
    }
}

/// vLLM's end-of-replay marker: sequence number -1.
const END_SEQ: [u8; 8] = [0xff; 8];

/// Why a replay could not fill a gap.
#[derive(Debug, thiserror::Error)]
enum ReplayError {
    #[error("{0}")]
    Zmq(#[from] ZmqError),
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    #[error("a reply has {0} frames, expected 4 (empty, topic, sequence number, payload)")]
    Frames(usize),
    #[error("the replay buffer no longer holds batch {wanted}")]
    Evicted { wanted: u64 },
    #[error(transparent)]
    Decode(#[from] EventError),
}

/// Asks a vLLM replay ROUTER for batches `from..to` over a fresh DEALER socket.
async fn fetch_replay(endpoint: &str, from: u64, to: u64) -> Result<Vec<EventBatch>, ReplayError> {
    let deadline = Instant::now() + REPLAY_TIMEOUT;
    let fetch = async {
        let mut options = SocketOptions::default();
        options.connect_timeout(CONNECT_TIMEOUT);
        let mut dealer = DealerSocket::with_options(options);
        dealer.connect(endpoint).await?;
        // vLLM's ROUTER expects [identity, empty, start]; it adds the identity, we add the
        // empty delimiter a REQ socket would.
        let mut request = ZmqMessage::from(Bytes::new());
        request.push_back(Bytes::copy_from_slice(&from.to_be_bytes()));
        dealer.send(request).await?;
        let mut batches = Vec::new();
        let mut next = from;
        while next < to {
            let reply = dealer.recv().await?;
            let (Some(seq), Some(payload), 4) = (reply.get(2), reply.get(3), reply.len()) else {
                return Err(ReplayError::Frames(reply.len()));
            };
            if seq[..] == END_SEQ {
                return Err(ReplayError::Evicted { wanted: next });
            }
            let got = decode_seq(seq)?;
            if got < next {
                continue;
            }
            if got > next {
                return Err(ReplayError::Evicted { wanted: next });
            }
            batches.push(decode(seq, payload)?);
            next += 1;
        }
        Ok(batches)
    };
    tokio::time::timeout_at(deadline, fetch)
        .await
        .map_err(|_| ReplayError::Timeout(REPLAY_TIMEOUT))?
}

#[cfg(test)]
mod tests;
