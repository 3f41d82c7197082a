//! The frame header codec: parsing with limits and clear errors, no I/O.

use thiserror::Error;

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 16;
/// The two magic bytes opening every frame.
pub const MAGIC: [u8; 2] = *b"KV";
/// Protocol version spoken by this build.
pub const PROTOCOL_VERSION: u8 = 1;
/// Set on the op byte of a successful reply.
pub const REPLY_BIT: u8 = 0x80;

/// Operations. Requests use the plain value; replies set [`REPLY_BIT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// Liveness and version check.
    Ping = 1,
    /// Store blocks: allocate, payload inline, commit.
    Put = 2,
    /// Fetch blocks: lookup and lease, payload inline, release.
    Get = 3,
    /// Which keys are present.
    Exists = 4,
    /// How many leading keys of a chain are present.
    PrefixMatch = 5,
    /// Shared memory (Unix socket only): map the node's pool and a staging window; the reply
    /// carries their file descriptors.
    ShmAttach = 6,
    /// Shared memory: lease blocks and learn where they lie in the pool.
    LeaseGet = 7,
    /// Shared memory: end a lease. One-way: the node sends no reply.
    Release = 8,
    /// Shared memory: store blocks the client wrote into its staging window.
    StagedPut = 9,
    /// Lists stored keys in key order, a page at a time (a joining node warms itself with it).
    ListKeys = 10,
    /// RDMA (TCP connections): exchange queue-pair endpoints and registered regions; then the
    /// connection serves `LeaseGet`, `Release` and `StagedPut` with bytes moved by one-sided
    /// READs from the pool and WRITEs into the connection's staging window.
    RdmaConnect = 11,
    /// Authentication: the first frame on a connection to a node started with `--auth`
    /// presents a tenant's token; the node answers with the tenant it serves this connection as.
    Hello = 12,
    /// A request failed as a whole; the control message is an `ErrorReply`.
    Error = 0x7f,
}

impl Op {
    /// Every request op, for metrics and tests.
    pub const REQUESTS: [Op; 12] = [
        Op::Ping,
        Op::Put,
        Op::Get,
        Op::Exists,
        Op::PrefixMatch,
        Op::ShmAttach,
        Op::LeaseGet,
        Op::Release,
        Op::StagedPut,
        Op::ListKeys,
        Op::RdmaConnect,
        Op::Hello,
    ];

    fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Ping,
            2 => Op::Put,
            3 => Op::Get,
            4 => Op::Exists,
            5 => Op::PrefixMatch,
            6 => Op::ShmAttach,
            7 => Op::LeaseGet,
            8 => Op::Release,
            9 => Op::StagedPut,
            10 => Op::ListKeys,
            11 => Op::RdmaConnect,
            12 => Op::Hello,
            0x7f => Op::Error,
            _ => return None,
        })
    }

    /// Lowercase name used in logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Op::Ping => "ping",
            Op::Put => "put",
            Op::Get => "get",
            Op::Exists => "exists",
            Op::PrefixMatch => "prefix_match",
            Op::ShmAttach => "shm_attach",
            Op::LeaseGet => "shm_get",
            Op::Release => "shm_release",
            Op::StagedPut => "shm_put",
            Op::ListKeys => "list_keys",
            Op::RdmaConnect => "rdma_connect",
            Op::Hello => "hello",
            Op::Error => "error",
        }
    }
}

/// Upper bounds a receiver enforces before reading a frame's body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest control message accepted.
    pub max_control: u32,
    /// Largest payload accepted in one frame.
    pub max_payload: u32,
}

impl Default for FrameLimits {
    fn default() -> Self {
        Self {
            max_control: 4 << 20,
            max_payload: 1 << 30,
        }
    }
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// The operation.
    pub op: Op,
    /// True for a successful reply (op with [`REPLY_BIT`]).
    pub reply: bool,
    /// Echoed by the reply so a client can match answers to requests.
    pub request_id: u32,
    /// Length of the prost control message that follows.
    pub control_len: u32,
    /// Length of the raw payload after the control message.
    pub payload_len: u32,
}

/// Why a frame header was rejected. Every variant means the stream cannot be trusted any more.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("bad magic {0:02x?}: not a kvcache frame")]
    BadMagic([u8; 2]),
    #[error("unsupported protocol version {got} (this build speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion { got: u8 },
    #[error("unknown op {0:#04x}")]
    UnknownOp(u8),
    #[error("control message of {len} bytes exceeds the limit of {max}")]
    ControlTooLarge { len: u32, max: u32 },
    #[error("payload of {len} bytes exceeds the frame limit of {max}")]
    PayloadTooLarge { len: u32, max: u32 },
}

impl FrameError {
    /// Short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            FrameError::BadMagic(_) => "bad_magic",
            FrameError::UnsupportedVersion { .. } => "bad_version",
            FrameError::UnknownOp(_) => "unknown_op",
            FrameError::ControlTooLarge { .. } => "control_too_large",
            FrameError::PayloadTooLarge { .. } => "payload_too_large",
        }
    }
}

impl FrameHeader {
    /// A request header.
    pub fn request(op: Op, request_id: u32, control_len: usize, payload_len: usize) -> Self {
        Self::new(op, false, request_id, control_len, payload_len)
    }

    /// A successful reply header.
    pub fn reply(op: Op, request_id: u32, control_len: usize, payload_len: usize) -> Self {
        Self::new(op, true, request_id, control_len, payload_len)
    }

    fn new(op: Op, reply: bool, request_id: u32, control_len: usize, payload_len: usize) -> Self {
        let control_len = u32::try_from(control_len).expect("control message over 4 GiB");
        let payload_len = u32::try_from(payload_len).expect("payload over 4 GiB: split the batch");
        Self {
            op,
            reply,
            request_id,
            control_len,
            payload_len,
        }
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&MAGIC);
        b[2] = PROTOCOL_VERSION;
        b[3] = self.op as u8 | if self.reply { REPLY_BIT } else { 0 };
        b[4..8].copy_from_slice(&self.request_id.to_le_bytes());
        b[8..12].copy_from_slice(&self.control_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.payload_len.to_le_bytes());
        b
    }

    /// Parses and validates a header against `limits`.
    pub fn decode(b: &[u8; HEADER_LEN], limits: &FrameLimits) -> Result<Self, FrameError> {
        let magic = [b[0], b[1]];
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if b[2] != PROTOCOL_VERSION {
            return Err(FrameError::UnsupportedVersion { got: b[2] });
        }
        let reply = b[3] & REPLY_BIT != 0;
        let op = Op::from_u8(b[3] & !REPLY_BIT).ok_or(FrameError::UnknownOp(b[3]))?;
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let (request_id, control_len, payload_len) = (word(4), word(8), word(12));
        if control_len > limits.max_control {
            return Err(FrameError::ControlTooLarge {
                len: control_len,
                max: limits.max_control,
            });
        }
        if payload_len > limits.max_payload {
            return Err(FrameError::PayloadTooLarge {
                len: payload_len,
                max: limits.max_payload,
            });
        }
        Ok(Self {
            op,
            reply,
            request_id,
            control_len,
            payload_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_requests_and_replies() {
        let limits = FrameLimits::default();
        for op in Op::REQUESTS {
            for h in [
                FrameHeader::request(op, 7, 12, 4096),
                FrameHeader::reply(op, 9, 0, 0),
            ] {
                assert_eq!(FrameHeader::decode(&h.encode(), &limits), Ok(h));
            }
        }
    }

    #[test]
    fn rejects_bad_magic_version_and_op() {
        let limits = FrameLimits::default();
        let good = FrameHeader::request(Op::Get, 1, 10, 0).encode();
        let mut b = good;
        b[0] = b'X';
        assert!(matches!(
            FrameHeader::decode(&b, &limits),
            Err(FrameError::BadMagic(_))
        ));
        let mut b = good;
        b[2] = 9;
        assert_eq!(
            FrameHeader::decode(&b, &limits),
            Err(FrameError::UnsupportedVersion { got: 9 })
        );
        let mut b = good;
        b[3] = 0x33;
        assert_eq!(
            FrameHeader::decode(&b, &limits),
            Err(FrameError::UnknownOp(0x33))
        );
    }

    #[test]
    fn enforces_limits_before_reading_the_body() {
        let limits = FrameLimits {
            max_control: 100,
            max_payload: 1000,
        };
        let h = FrameHeader::request(Op::Put, 1, 101, 0).encode();
        assert_eq!(
            FrameHeader::decode(&h, &limits),
            Err(FrameError::ControlTooLarge { len: 101, max: 100 })
        );
        let h = FrameHeader::request(Op::Put, 1, 10, 1001).encode();
        assert_eq!(
            FrameHeader::decode(&h, &limits),
            Err(FrameError::PayloadTooLarge {
                len: 1001,
                max: 1000
            })
        );
    }

    #[test]
    fn every_byte_pattern_decodes_or_errors_without_panicking() {
        // A cheap exhaustive-ish sweep over the fields a fuzzer would find first.
        let limits = FrameLimits::default();
        let mut b = FrameHeader::request(Op::Ping, 0, 0, 0).encode();
        for op in 0..=255u8 {
            for ver in [0u8, 1, 2, 255] {
                b[2] = ver;
                b[3] = op;
                let _ = FrameHeader::decode(&b, &limits);
            }
        }
    }
}
