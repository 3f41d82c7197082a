//! Decoding one published vLLM KV-event message (sequence number frame and msgpack payload) into
//! an [`EventBatch`]: pure, no I/O.

use rmpv::Value;

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
pub(super) fn decode_seq(frame: &[u8]) -> Result<u64, EventError> {
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
