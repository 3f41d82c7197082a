//! The names of every metric a kvcache node exposes on `/metrics`: a contract with dashboards,
//! alerts and the autoscaler, which read them by name. A name here never changes meaning; a
//! metric that goes away is removed from this list in the same change.
//!
//! Counters end in `_total`. Labels: `op` (the request's op, `kvcache_core::wire::Op::name`),
//! `result` (`ok`/`error`, or `clean`/`confirmed` for suspect blocks), `transport`
//! (`tcp`/`shm`/`rdma`), `reason` (`too_large`/`pool_full`/`empty`), `kind` (protocol errors).

/// Requests served, by `op` and `result`.
pub const OPS_TOTAL: &str = "kvcache_ops_total";
/// Blocks asked for by lookups, by `op` (the hit rate's denominator).
pub const REQUESTED_BLOCKS_TOTAL: &str = "kvcache_requested_blocks_total";
/// Blocks found by lookups, by `op`.
pub const HIT_BLOCKS_TOTAL: &str = "kvcache_hit_blocks_total";
/// Blocks offered by puts.
pub const PUT_BLOCKS_TOTAL: &str = "kvcache_put_blocks_total";
/// Blocks a put could not store, by `reason`.
pub const PUT_REJECTED_BLOCKS_TOTAL: &str = "kvcache_put_rejected_blocks_total";
/// Payload bytes received, by `transport`.
pub const BYTES_RECEIVED_TOTAL: &str = "kvcache_bytes_received_total";
/// Payload bytes sent, by `transport`.
pub const BYTES_SENT_TOTAL: &str = "kvcache_bytes_sent_total";
/// Leases revoked because a client held them past the lease timeout.
pub const SHM_LEASES_REVOKED_TOTAL: &str = "kvcache_shm_leases_revoked_total";
/// Blocks a client found corrupt, by `result` (whether the node's check confirmed it).
pub const SUSPECT_BLOCKS_TOTAL: &str = "kvcache_suspect_blocks_total";
/// 1 while this node's etcd registration is live.
pub const CLUSTER_REGISTERED: &str = "kvcache_cluster_registered";
/// Failed etcd calls while registering or renewing.
pub const CLUSTER_ETCD_ERRORS_TOTAL: &str = "kvcache_cluster_etcd_errors_total";
/// Members on this node's ring.
pub const CLUSTER_MEMBERS: &str = "kvcache_cluster_members";
/// Bumped each time this node sees the member set change.
pub const CLUSTER_RING_VERSION: &str = "kvcache_cluster_ring_version";
/// Blocks copied from peers on joining.
pub const CLUSTER_WARMED_BLOCKS_TOTAL: &str = "kvcache_cluster_warmed_blocks_total";
/// Bytes copied from peers on joining.
pub const CLUSTER_WARMED_BYTES_TOTAL: &str = "kvcache_cluster_warmed_bytes_total";
/// Warming of a node that joined a cluster: 0 not on the ring yet, 1 copying, 2 done.
pub const CLUSTER_WARM_STATE: &str = "kvcache_cluster_warm_state";
/// Server-side request latency in seconds, by `op` (a histogram).
pub const OP_DURATION_SECONDS: &str = "kvcache_op_duration_seconds";
/// Rejected input, by `kind`.
pub const PROTOCOL_ERRORS_TOTAL: &str = "kvcache_protocol_errors_total";
/// Size of the memory pool.
pub const POOL_CAPACITY_BYTES: &str = "kvcache_pool_capacity_bytes";
/// Pool bytes allocated to blocks.
pub const POOL_USED_BYTES: &str = "kvcache_pool_used_bytes";
/// Committed blocks in the index.
pub const BLOCKS_STORED: &str = "kvcache_blocks_stored";
/// Leases held by readers now.
pub const ACTIVE_LEASES: &str = "kvcache_active_leases";
/// Blocks evicted to make room.
pub const EVICTIONS_TOTAL: &str = "kvcache_evictions_total";
/// Bytes evicted to make room.
pub const EVICTED_BYTES_TOTAL: &str = "kvcache_evicted_bytes_total";
/// Stored blocks that failed verification.
pub const CHECKSUM_FAILURES_TOTAL: &str = "kvcache_checksum_failures_total";
/// Heap memory of the block index.
pub const INDEX_HEAP_BYTES: &str = "kvcache_index_heap_bytes";
/// 1 if the pool is locked in RAM.
pub const POOL_LOCKED: &str = "kvcache_pool_locked";
/// Open data connections.
pub const CONNECTIONS_ACTIVE: &str = "kvcache_connections_active";
/// Data connections accepted.
pub const CONNECTIONS_TOTAL: &str = "kvcache_connections_total";
/// Connections refused at `--max-connections`.
pub const CONNECTIONS_REJECTED_TOTAL: &str = "kvcache_connections_rejected_total";
/// Requests that stalled past `--request-timeout`.
pub const REQUESTS_TIMED_OUT_TOTAL: &str = "kvcache_requests_timed_out_total";
/// Data connections closed after waiting past `--idle-timeout`.
pub const CONNECTIONS_IDLE_CLOSED_TOTAL: &str = "kvcache_connections_idle_closed_total";
/// Metrics-port connections closed at `--metrics-max-connections`.
pub const HTTP_CONNECTIONS_REJECTED_TOTAL: &str = "kvcache_http_connections_rejected_total";

/// Every name above, in the order `/metrics` lists them.
pub const ALL: [&str; 33] = [
    OPS_TOTAL,
    REQUESTED_BLOCKS_TOTAL,
    HIT_BLOCKS_TOTAL,
    PUT_BLOCKS_TOTAL,
    PUT_REJECTED_BLOCKS_TOTAL,
    BYTES_RECEIVED_TOTAL,
    BYTES_SENT_TOTAL,
    SHM_LEASES_REVOKED_TOTAL,
    SUSPECT_BLOCKS_TOTAL,
    CLUSTER_REGISTERED,
    CLUSTER_ETCD_ERRORS_TOTAL,
    CLUSTER_MEMBERS,
    CLUSTER_RING_VERSION,
    CLUSTER_WARMED_BLOCKS_TOTAL,
    CLUSTER_WARMED_BYTES_TOTAL,
    CLUSTER_WARM_STATE,
    OP_DURATION_SECONDS,
    PROTOCOL_ERRORS_TOTAL,
    POOL_CAPACITY_BYTES,
    POOL_USED_BYTES,
    BLOCKS_STORED,
    ACTIVE_LEASES,
    EVICTIONS_TOTAL,
    EVICTED_BYTES_TOTAL,
    CHECKSUM_FAILURES_TOTAL,
    INDEX_HEAP_BYTES,
    POOL_LOCKED,
    CONNECTIONS_ACTIVE,
    CONNECTIONS_TOTAL,
    CONNECTIONS_REJECTED_TOTAL,
    REQUESTS_TIMED_OUT_TOTAL,
    CONNECTIONS_IDLE_CLOSED_TOTAL,
    HTTP_CONNECTIONS_REJECTED_TOTAL,
];

/// Each tier under the pool (`gpu`, `disk`) exposes `kvcache_<tier>_<suffix>` for these.
pub const TIER_SUFFIXES: [&str; 10] = [
    "capacity_bytes",
    "used_bytes",
    "blocks",
    "demoted_blocks_total",
    "demoted_bytes_total",
    "hits_total",
    "corrupt_blocks_total",
    "dropped_segments_total",
    "skipped_blocks_total",
    "errors_total",
];

/// The top tier under the pool also exposes `kvcache_<tier>_` + this: blocks brought back
/// into memory from it or those under it.
pub const TIER_PROMOTED_SUFFIX: &str = "promoted_blocks_total";

/// The name of one tier's metric.
pub fn tier(tier: &str, suffix: &str) -> String {
    format!("kvcache_{tier}_{suffix}")
}
