//! Control messages. Keys travel as one `bytes` field of concatenated 16-byte keys (no per-key
//! allocation); payloads never appear here, they follow the control message raw.

use thiserror::Error;

use crate::key::BlockKey;

/// `Ping` request: no fields.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PingRequest {}

/// `Ping` reply: who answers and what it accepts.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PingReply {
    #[prost(string, tag = "1")]
    pub server_version: String,
    #[prost(uint32, tag = "2")]
    pub protocol_version: u32,
    #[prost(uint32, tag = "3")]
    pub max_payload: u32,
    #[prost(uint32, tag = "4")]
    pub max_control: u32,
    /// Path of the node's shared-memory Unix socket; empty when shared memory is off.
    #[prost(string, tag = "5")]
    pub shm_socket: String,
    /// Identifies the node's host (its kernel boot id): a client whose own id matches may
    /// try shared memory.
    #[prost(string, tag = "6")]
    pub host_id: String,
    /// The node's RDMA device; empty when it has none (or was built without RDMA).
    #[prost(string, tag = "7")]
    pub rdma_device: String,
}

/// `Put` request: `keys[i]` has `lens[i]` bytes; the payload is the blocks back to back.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub keys: Vec<u8>,
    #[prost(uint32, repeated, tag = "2")]
    pub lens: Vec<u32>,
}

/// Outcome of one block of a put.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum PutStatus {
    /// Committed and visible.
    Stored = 0,
    /// The key already existed; blocks are immutable, so this is a successful no-op.
    AlreadyPresent = 1,
    /// Larger than the whole pool could ever hold.
    TooLarge = 2,
    /// No space even after evicting everything evictable (the rest is leased).
    PoolFull = 3,
    /// Zero-length blocks are not stored.
    Empty = 4,
}

impl PutStatus {
    /// Whether the block is stored after the put (now, or already before it).
    pub fn is_stored(self) -> bool {
        matches!(self, PutStatus::Stored | PutStatus::AlreadyPresent)
    }
}

/// `Put` reply: one status per key, in request order.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutReply {
    #[prost(enumeration = "PutStatus", repeated, tag = "1")]
    pub statuses: Vec<i32>,
}

/// `Get` request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub keys: Vec<u8>,
    /// The client checks every chunk where it lands, against the reply's `chunk_sums`: the
    /// node checks only each block's trailer and sends the data as stored. One check covers
    /// the node's memory, the network and the client's receive path, and it runs on bytes in
    /// the client's cache instead of the node's DRAM. Without it the node checks each chunk
    /// before sending it.
    #[prost(bool, tag = "2")]
    pub client_verifies: bool,
}

/// `Get` reply: `lens[i]` bytes for key i in the payload, 0 for a miss (blocks are never empty).
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetReply {
    #[prost(uint32, repeated, tag = "1")]
    pub lens: Vec<u32>,
    /// With `client_verifies`: the checksum of every chunk of every block sent, in payload
    /// order ([`crate::checksum::chunk_count`] of each block's length), from trailers the node
    /// checked against its index. Empty otherwise.
    #[prost(fixed64, repeated, tag = "2")]
    pub chunk_sums: Vec<u64>,
}

/// `Exists` request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExistsRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub keys: Vec<u8>,
}

/// `Exists` reply: one flag per key.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExistsReply {
    #[prost(bool, repeated, tag = "1")]
    pub present: Vec<bool>,
}

/// `PrefixMatch` request: a key chain, first block first.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PrefixMatchRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub keys: Vec<u8>,
}

/// `PrefixMatch` reply: the number of leading keys present.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PrefixMatchReply {
    #[prost(uint32, tag = "1")]
    pub matched: u32,
}

/// `ShmAttach` request: the staging window the client wants for puts.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ShmAttachRequest {
    #[prost(uint64, tag = "1")]
    pub staging_bytes: u64,
}

/// `ShmAttach` reply. Sent with two file descriptors: the pool (read-only) and the staging
/// window (read-write), both sealed against resizing.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ShmAttachReply {
    #[prost(uint64, tag = "1")]
    pub pool_bytes: u64,
    #[prost(uint64, tag = "2")]
    pub staging_bytes: u64,
    /// Leases not released within this time are revoked.
    #[prost(uint32, tag = "3")]
    pub lease_timeout_ms: u32,
    /// Unique per pool: two connections that report the same value share one pool.
    #[prost(string, tag = "4")]
    pub pool_id: String,
}

/// `RdmaConnect` request: the client's queue pair and the staging window it wants for puts.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RdmaConnectRequest {
    /// `kvcache_transport::rdma::QpEndpoint`, encoded.
    #[prost(bytes = "vec", tag = "1")]
    pub endpoint: Vec<u8>,
    #[prost(uint64, tag = "2")]
    pub staging_bytes: u64,
}

/// `RdmaConnect` reply: the node's queue pair (already connected to the client's), its pool
/// (remote read only) and this connection's staging window (remote write only).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RdmaConnectReply {
    #[prost(bytes = "vec", tag = "1")]
    pub endpoint: Vec<u8>,
    /// `kvcache_transport::rdma::RemoteRegion`, encoded.
    #[prost(bytes = "vec", tag = "2")]
    pub pool: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub staging: Vec<u8>,
    #[prost(uint32, tag = "4")]
    pub lease_timeout_ms: u32,
}

/// `LeaseGet` request: lease these blocks.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseGetRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub keys: Vec<u8>,
    /// The node checks every chunk of each block before it answers, and a block that fails is
    /// dropped and answered as a miss. For readers that cannot check the bytes where they land
    /// (RDMA READs into GPU memory): the block is intact when leased and stays unchanged while
    /// the lease holds.
    #[prost(bool, tag = "2")]
    pub verify: bool,
}

/// `LeaseGet` reply: per key its place in the pool (`lens[i]` = 0 for a miss) and the checksum of
/// its trailer, all leased under `lease_id` until released.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseGetReply {
    #[prost(uint64, tag = "1")]
    pub lease_id: u64,
    #[prost(uint64, repeated, tag = "2")]
    pub offsets: Vec<u64>,
    #[prost(uint32, repeated, tag = "3")]
    pub lens: Vec<u32>,
    #[prost(fixed64, repeated, tag = "4")]
    pub trailer_checksums: Vec<u64>,
}

/// `Release` (one-way): ends a lease. `suspect` lists keys whose bytes failed the client's
/// check; the node re-verifies them itself and drops any that fail. On a connection without
/// leases (TCP), `lease_id` 0 with `suspect` reports what a `client_verifies` get found.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReleaseRequest {
    #[prost(uint64, tag = "1")]
    pub lease_id: u64,
    #[prost(bytes = "vec", tag = "2")]
    pub suspect: Vec<u8>,
}

/// `StagedPut` request: `keys[i]` has `lens[i]` bytes at `offsets[i]` of the staging window.
/// The reply is a `PutReply`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StagedPutRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub keys: Vec<u8>,
    #[prost(uint32, repeated, tag = "2")]
    pub lens: Vec<u32>,
    #[prost(uint64, repeated, tag = "3")]
    pub offsets: Vec<u64>,
}

/// `ListKeys` request: up to `limit` stored keys greater than `after` (16 bytes; empty for the
/// first page), in ascending key order.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListKeysRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub after: Vec<u8>,
    #[prost(uint32, tag = "2")]
    pub limit: u32,
}

/// `ListKeys` reply: the page's keys, ascending; `more` when keys beyond the last remain.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListKeysReply {
    #[prost(bytes = "vec", tag = "1")]
    pub keys: Vec<u8>,
    #[prost(bool, tag = "2")]
    pub more: bool,
}

/// `Hello` request: the first frame of a connection to a node that authenticates (`--auth`).
/// A node without `--auth` accepts any token and serves the connection in its open space.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloRequest {
    /// One of a tenant's tokens.
    #[prost(string, tag = "1")]
    pub token: String,
    /// Free-form client identity for the node's logs (`kvcache-client/0.1`).
    #[prost(string, tag = "2")]
    pub client: String,
}

/// `Hello` reply: whom the node serves this connection as.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloReply {
    /// Whether the node authenticates at all (`--auth`); false means the data plane is open.
    #[prost(bool, tag = "1")]
    pub auth: bool,
    /// The tenant the token belongs to; empty when the node does not authenticate.
    #[prost(string, tag = "2")]
    pub tenant: String,
    /// Whether the tenant may list keys and warm nodes.
    #[prost(bool, tag = "3")]
    pub admin: bool,
}

/// Why a whole request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ErrorCode {
    Unknown = 0,
    /// The control message or payload did not make sense (bad keys, lengths that disagree).
    Malformed = 1,
    /// The request exceeds a limit (frame size, batch size).
    TooLarge = 2,
    /// The server failed internally.
    Internal = 3,
    /// The server is shutting down; retry elsewhere.
    ShuttingDown = 4,
    /// The node authenticates (`--auth`) and the connection has not presented a valid token:
    /// the connection is closed after this reply.
    Unauthenticated = 5,
    /// The tenant may not do this (listing keys and warming need an admin tenant).
    Forbidden = 6,
    /// The request asks for more than the node allows one request or one connection (keys
    /// per request, leased bytes); ask for less at a time.
    LimitExceeded = 7,
}

/// Error reply for a request that failed as a whole.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ErrorReply {
    #[prost(enumeration = "ErrorCode", tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

/// A key list that is not a whole number of 16-byte keys.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("key list of {0} bytes is not a multiple of 16")]
pub struct BadKeyList(pub usize);

/// Concatenates keys in their canonical form.
pub fn encode_keys(keys: &[BlockKey]) -> Vec<u8> {
    let mut out = Vec::with_capacity(keys.len() * BlockKey::LEN);
    for k in keys {
        out.extend_from_slice(&k.to_bytes());
    }
    out
}

/// Splits a concatenated key list.
pub fn decode_keys(bytes: &[u8]) -> Result<Vec<BlockKey>, BadKeyList> {
    if bytes.len() % BlockKey::LEN != 0 {
        return Err(BadKeyList(bytes.len()));
    }
    Ok(bytes
        .chunks_exact(BlockKey::LEN)
        .map(|c| BlockKey::from_slice(c).expect("chunk is 16 bytes"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn keys_round_trip_and_reject_ragged_lists() {
        let keys = vec![BlockKey(1), BlockKey(u128::MAX), BlockKey(42 << 64)];
        assert_eq!(decode_keys(&encode_keys(&keys)), Ok(keys));
        assert_eq!(decode_keys(&[0; 17]), Err(BadKeyList(17)));
        assert_eq!(decode_keys(&[]), Ok(vec![]));
    }

    #[test]
    fn garbage_control_bytes_fail_to_decode_without_panicking() {
        let garbage = [0xffu8, 0xff, 0xff, 0xff, 0x0f, 0x12];
        assert!(PutRequest::decode(&garbage[..]).is_err());
        // Unknown enum values survive decoding as raw integers and are handled by the caller.
        let reply = PutReply { statuses: vec![99] };
        let back = PutReply::decode(reply.encode_to_vec().as_slice()).unwrap();
        assert!(PutStatus::try_from(back.statuses[0]).is_err());
    }
}
