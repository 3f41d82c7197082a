//! Server metrics, rendered in the Prometheus text format. Counters are plain atomics indexed by
//! fixed label sets, so recording costs a few relaxed adds on the hot path.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use kvcache_core::wire::Op;

use kvcache_store::StoreStats;

/// Latency bucket upper bounds, in seconds.
const BUCKETS: [f64; 18] = [
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3,
    250e-3, 500e-3, 1.0, 2.5, 10.0,
];

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(d.as_nanos() as u64, Relaxed);
    }
}

/// Why a connection's input was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    BadMagic,
    BadVersion,
    UnknownOp,
    ControlTooLarge,
    PayloadTooLarge,
    Truncated,
    Malformed,
    UnexpectedReply,
    /// No valid token (with `--auth`), or a token removed since.
    Unauthenticated,
    /// A tenant asked for what needs an admin.
    Forbidden,
    /// A request over a limit (keys per request, leased bytes).
    OverLimit,
}

impl ProtocolError {
    const ALL: [ProtocolError; 11] = [
        Self::BadMagic,
        Self::BadVersion,
        Self::UnknownOp,
        Self::ControlTooLarge,
        Self::PayloadTooLarge,
        Self::Truncated,
        Self::Malformed,
        Self::UnexpectedReply,
        Self::Unauthenticated,
        Self::Forbidden,
        Self::OverLimit,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::BadMagic => "bad_magic",
            Self::BadVersion => "bad_version",
            Self::UnknownOp => "unknown_op",
            Self::ControlTooLarge => "control_too_large",
            Self::PayloadTooLarge => "payload_too_large",
            Self::Truncated => "truncated",
            Self::Malformed => "malformed",
            Self::UnexpectedReply => "unexpected_reply",
            Self::Unauthenticated => "unauthenticated",
            Self::Forbidden => "forbidden",
            Self::OverLimit => "over_limit",
        }
    }
}

const OPS: usize = Op::REQUESTS.len();

fn op_index(op: Op) -> usize {
    Op::REQUESTS.iter().position(|&o| o == op).unwrap_or(0)
}

/// All server metrics.
#[derive(Default)]
pub struct Metrics {
    ops_ok: [AtomicU64; OPS],
    ops_err: [AtomicU64; OPS],
    requested_blocks: [AtomicU64; OPS],
    hit_blocks: [AtomicU64; OPS],
    latency: [Histogram; OPS],
    bytes_in: [AtomicU64; 3],
    bytes_out: [AtomicU64; 3],
    shm_leases_revoked: AtomicU64,
    shm_suspects: [AtomicU64; 2],
    put_rejected: [AtomicU64; 3],
    protocol_errors: [AtomicU64; ProtocolError::ALL.len()],
    connections_active: AtomicI64,
    connections_total: AtomicU64,
    connections_rejected: AtomicU64,
    requests_timed_out: AtomicU64,
    connections_idled_out: AtomicU64,
    http_connections_rejected: AtomicU64,
    etcd_registered: AtomicU64,
    etcd_errors: AtomicU64,
    cluster_members: AtomicU64,
    ring_version: AtomicU64,
    warmed_blocks: AtomicU64,
    warmed_bytes: AtomicU64,
}

/// How payload bytes moved (the `via` label of the byte counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Tcp = 0,
    Shm = 1,
    /// One-sided RDMA: the node counts what its leases and staging reads cover.
    Rdma = 2,
}

/// Why a put of one block was refused, for `kvcache_put_rejected_blocks_total`.
#[derive(Clone, Copy, Debug)]
pub enum PutRejection {
    TooLarge = 0,
    PoolFull = 1,
    Empty = 2,
}

impl Metrics {
    /// Records a finished request.
    pub fn op(&self, op: Op, ok: bool, took: Duration) {
        let i = op_index(op);
        if ok {
            &self.ops_ok[i]
        } else {
            &self.ops_err[i]
        }
        .fetch_add(1, Relaxed);
        self.latency[i].observe(took);
    }

    /// Records how many blocks a lookup asked for and how many it found.
    pub fn blocks(&self, op: Op, requested: usize, hit: usize) {
        let i = op_index(op);
        self.requested_blocks[i].fetch_add(requested as u64, Relaxed);
        self.hit_blocks[i].fetch_add(hit as u64, Relaxed);
    }

    pub fn bytes_in(&self, via: Via, n: u64) {
        self.bytes_in[via as usize].fetch_add(n, Relaxed);
    }

    pub fn bytes_out(&self, via: Via, n: u64) {
        self.bytes_out[via as usize].fetch_add(n, Relaxed);
    }

    /// Counts shared-memory leases revoked because the client held them past the timeout.
    pub fn shm_leases_revoked(&self, n: usize) {
        self.shm_leases_revoked.fetch_add(n as u64, Relaxed);
    }

    /// Counts a block a shared-memory client reported as failing its check, and whether the
    /// node's own verification confirmed it.
    pub fn shm_suspect(&self, confirmed: bool) {
        self.shm_suspects[confirmed as usize].fetch_add(1, Relaxed);
    }

    /// Whether this node's etcd registration is live (its lease was last renewed).
    pub fn etcd_registered(&self, live: bool) {
        self.etcd_registered.store(live as u64, Relaxed);
    }

    /// Counts a failed etcd call (grant, put or keep-alive).
    pub fn etcd_error(&self) {
        self.etcd_errors.fetch_add(1, Relaxed);
    }

    /// The node's view of the cluster: members on its ring and the ring's version.
    pub fn cluster_view(&self, members: usize, ring_version: u64) {
        self.cluster_members.store(members as u64, Relaxed);
        self.ring_version.store(ring_version, Relaxed);
    }

    /// Counts a block copied from a peer while warming.
    pub fn warmed(&self, bytes: usize) {
        self.warmed_blocks.fetch_add(1, Relaxed);
        self.warmed_bytes.fetch_add(bytes as u64, Relaxed);
    }

    pub fn put_rejected(&self, why: PutRejection) {
        self.put_rejected[why as usize].fetch_add(1, Relaxed);
    }

    pub fn protocol_error(&self, e: ProtocolError) {
        let i = ProtocolError::ALL
            .iter()
            .position(|&x| x == e)
            .expect("listed");
        self.protocol_errors[i].fetch_add(1, Relaxed);
    }

    pub fn connection_opened(&self) {
        self.connections_active.fetch_add(1, Relaxed);
        self.connections_total.fetch_add(1, Relaxed);
    }

    pub fn connection_rejected(&self) {
        self.connections_rejected.fetch_add(1, Relaxed);
    }

    pub fn request_timed_out(&self) {
        self.requests_timed_out.fetch_add(1, Relaxed);
    }

    /// A data connection closed for waiting past `--idle-timeout`.
    pub fn connection_idled_out(&self) {
        self.connections_idled_out.fetch_add(1, Relaxed);
    }

    /// A metrics-port connection closed at `--metrics-max-connections`.
    pub fn http_connection_rejected(&self) {
        self.http_connections_rejected.fetch_add(1, Relaxed);
    }

    pub fn connection_closed(&self) {
        self.connections_active.fetch_sub(1, Relaxed);
    }

    /// Data connections open now.
    pub fn connections_active(&self) -> i64 {
        self.connections_active.load(Relaxed)
    }

    /// Protocol errors counted so far, all kinds together (for tests and logs).
    pub fn protocol_errors_total(&self) -> u64 {
        self.protocol_errors.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// Renders every metric, with the store's gauges, in the Prometheus text format.
    pub fn render(&self, store: &StoreStats) -> String {
        let mut out = String::with_capacity(8192);
        header(
            &mut out,
            "kvcache_ops_total",
            "counter",
            "Requests served, by op and result.",
        );
        for (i, op) in Op::REQUESTS.iter().enumerate() {
            for (result, c) in [("ok", &self.ops_ok[i]), ("error", &self.ops_err[i])] {
                let _ = writeln!(
                    out,
                    "kvcache_ops_total{{op=\"{}\",result=\"{result}\"}} {}",
                    op.name(),
                    c.load(Relaxed)
                );
            }
        }
        let lookups = [Op::Get, Op::LeaseGet, Op::Exists, Op::PrefixMatch];
        header(
            &mut out,
            "kvcache_requested_blocks_total",
            "counter",
            "Blocks asked for by lookups (hit-rate denominator).",
        );
        for op in lookups {
            let v = self.requested_blocks[op_index(op)].load(Relaxed);
            let _ = writeln!(
                out,
                "kvcache_requested_blocks_total{{op=\"{}\"}} {v}",
                op.name()
            );
        }
        header(
            &mut out,
            "kvcache_hit_blocks_total",
            "counter",
            "Blocks found by lookups.",
        );
        for op in lookups {
            let v = self.hit_blocks[op_index(op)].load(Relaxed);
            let _ = writeln!(out, "kvcache_hit_blocks_total{{op=\"{}\"}} {v}", op.name());
        }
        header(
            &mut out,
            "kvcache_put_blocks_total",
            "counter",
            "Blocks offered by puts.",
        );
        let _ = writeln!(
            out,
            "kvcache_put_blocks_total {}",
            self.requested_blocks[op_index(Op::Put)].load(Relaxed)
                + self.requested_blocks[op_index(Op::StagedPut)].load(Relaxed)
        );
        header(
            &mut out,
            "kvcache_put_rejected_blocks_total",
            "counter",
            "Blocks a put could not store, by reason.",
        );
        for (reason, c) in ["too_large", "pool_full", "empty"]
            .iter()
            .zip(&self.put_rejected)
        {
            let _ = writeln!(
                out,
                "kvcache_put_rejected_blocks_total{{reason=\"{reason}\"}} {}",
                c.load(Relaxed)
            );
        }
        header(
            &mut out,
            "kvcache_bytes_received_total",
            "counter",
            "Payload bytes received.",
        );
        for (via, c) in ["tcp", "shm", "rdma"].iter().zip(&self.bytes_in) {
            let _ = writeln!(
                out,
                "kvcache_bytes_received_total{{transport=\"{via}\"}} {}",
                c.load(Relaxed)
            );
        }
        header(
            &mut out,
            "kvcache_bytes_sent_total",
            "counter",
            "Payload bytes sent.",
        );
        for (via, c) in ["tcp", "shm", "rdma"].iter().zip(&self.bytes_out) {
            let _ = writeln!(
                out,
                "kvcache_bytes_sent_total{{transport=\"{via}\"}} {}",
                c.load(Relaxed)
            );
        }
        header(
            &mut out,
            "kvcache_shm_leases_revoked_total",
            "counter",
            "Shared-memory block leases revoked because a client held them past --shm-lease-timeout.",
        );
        let _ = writeln!(
            out,
            "kvcache_shm_leases_revoked_total {}",
            self.shm_leases_revoked.load(Relaxed)
        );
        header(
            &mut out,
            "kvcache_shm_suspect_blocks_total",
            "counter",
            "Blocks a shared-memory client found corrupt, by whether the node's check confirmed it.",
        );
        for (result, c) in ["clean", "confirmed"].iter().zip(&self.shm_suspects) {
            let _ = writeln!(
                out,
                "kvcache_shm_suspect_blocks_total{{result=\"{result}\"}} {}",
                c.load(Relaxed)
            );
        }
        let cluster = [
            (
                "kvcache_cluster_registered",
                "gauge",
                "1 while this node's etcd registration is live (with --etcd), else 0.",
                &self.etcd_registered,
            ),
            (
                "kvcache_cluster_etcd_errors_total",
                "counter",
                "Failed etcd calls while registering or renewing this node (with --etcd).",
                &self.etcd_errors,
            ),
            (
                "kvcache_cluster_members",
                "gauge",
                "Members on this node's ring (0 for a single node without --etcd or --peers).",
                &self.cluster_members,
            ),
            (
                "kvcache_cluster_ring_version",
                "gauge",
                "Bumped each time this node sees the member set change (1 for the first).",
                &self.ring_version,
            ),
            (
                "kvcache_cluster_warmed_blocks_total",
                "counter",
                "Blocks this node copied from peers on joining (--warm).",
                &self.warmed_blocks,
            ),
            (
                "kvcache_cluster_warmed_bytes_total",
                "counter",
                "Bytes of blocks this node copied from peers on joining (--warm).",
                &self.warmed_bytes,
            ),
        ];
        for (name, kind, help, value) in cluster {
            header(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {}", value.load(Relaxed));
        }
        header(
            &mut out,
            "kvcache_op_duration_seconds",
            "histogram",
            "Server-side request latency, by op.",
        );
        for (i, op) in Op::REQUESTS.iter().enumerate() {
            let h = &self.latency[i];
            let mut cumulative = 0;
            for (b, bound) in BUCKETS.iter().enumerate() {
                cumulative += h.buckets[b].load(Relaxed);
                let _ = writeln!(
                    out,
                    "kvcache_op_duration_seconds_bucket{{op=\"{}\",le=\"{bound}\"}} {cumulative}",
                    op.name()
                );
            }
            let count = h.count.load(Relaxed);
            let _ = writeln!(
                out,
                "kvcache_op_duration_seconds_bucket{{op=\"{}\",le=\"+Inf\"}} {count}",
                op.name()
            );
            let sum = h.sum_ns.load(Relaxed) as f64 / 1e9;
            let _ = writeln!(
                out,
                "kvcache_op_duration_seconds_sum{{op=\"{}\"}} {sum}",
                op.name()
            );
            let _ = writeln!(
                out,
                "kvcache_op_duration_seconds_count{{op=\"{}\"}} {count}",
                op.name()
            );
        }
        header(
            &mut out,
            "kvcache_protocol_errors_total",
            "counter",
            "Rejected input, by kind.",
        );
        for (e, c) in ProtocolError::ALL.iter().zip(&self.protocol_errors) {
            let _ = writeln!(
                out,
                "kvcache_protocol_errors_total{{kind=\"{}\"}} {}",
                e.label(),
                c.load(Relaxed)
            );
        }
        let gauges: [(&str, &str, &str, u64); 9] = [
            (
                "kvcache_pool_capacity_bytes",
                "gauge",
                "Size of the memory pool.",
                store.capacity_bytes,
            ),
            (
                "kvcache_pool_used_bytes",
                "gauge",
                "Pool bytes allocated to blocks (committed or being written).",
                store.used_bytes,
            ),
            (
                "kvcache_blocks_stored",
                "gauge",
                "Committed blocks in the index.",
                store.blocks,
            ),
            (
                "kvcache_active_leases",
                "gauge",
                "Leases held by readers right now.",
                store.active_leases,
            ),
            (
                "kvcache_evictions_total",
                "counter",
                "Blocks evicted to make room.",
                store.evictions,
            ),
            (
                "kvcache_evicted_bytes_total",
                "counter",
                "Bytes evicted to make room.",
                store.evicted_bytes,
            ),
            (
                "kvcache_checksum_failures_total",
                "counter",
                "Stored blocks that failed verification (reported as misses).",
                store.checksum_failures,
            ),
            (
                "kvcache_index_heap_bytes",
                "gauge",
                "Heap memory used by the block index.",
                store.index_heap_bytes,
            ),
            (
                "kvcache_pool_locked",
                "gauge",
                "1 if the pool is locked in RAM.",
                store.locked as u64,
            ),
        ];
        for (name, kind, help, v) in gauges {
            header(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {v}");
        }
        for (i, tier) in store.lower.iter().enumerate() {
            render_tier(&mut out, tier, (i == 0).then_some(store.promotions));
        }
        header(
            &mut out,
            "kvcache_connections_active",
            "gauge",
            "Open data connections.",
        );
        let _ = writeln!(
            out,
            "kvcache_connections_active {}",
            self.connections_active.load(Relaxed)
        );
        header(
            &mut out,
            "kvcache_connections_total",
            "counter",
            "Data connections accepted.",
        );
        let _ = writeln!(
            out,
            "kvcache_connections_total {}",
            self.connections_total.load(Relaxed)
        );
        header(
            &mut out,
            "kvcache_connections_rejected_total",
            "counter",
            "Connections refused at --max-connections.",
        );
        let _ = writeln!(
            out,
            "kvcache_connections_rejected_total {}",
            self.connections_rejected.load(Relaxed)
        );
        header(
            &mut out,
            "kvcache_requests_timed_out_total",
            "counter",
            "Requests that stalled past --request-timeout (connection closed).",
        );
        let _ = writeln!(
            out,
            "kvcache_requests_timed_out_total {}",
            self.requests_timed_out.load(Relaxed)
        );
        header(
            &mut out,
            "kvcache_connections_idle_closed_total",
            "counter",
            "Data connections closed after waiting past --idle-timeout.",
        );
        let _ = writeln!(
            out,
            "kvcache_connections_idle_closed_total {}",
            self.connections_idled_out.load(Relaxed)
        );
        header(
            &mut out,
            "kvcache_http_connections_rejected_total",
            "counter",
            "Metrics-port connections closed at --metrics-max-connections.",
        );
        let _ = writeln!(
            out,
            "kvcache_http_connections_rejected_total {}",
            self.http_connections_rejected.load(Relaxed)
        );
        out
    }
}

/// One lower tier's metrics, named after it (`kvcache_disk_*`, `kvcache_gpu_*`). Promotions
/// into memory are counted on the top tier.
fn render_tier(out: &mut String, t: &kvcache_store::TierStats, promotions: Option<u64>) {
    let tier = t.name;
    let mut lines: Vec<(&str, &str, String, u64)> = vec![
        (
            "capacity_bytes",
            "gauge",
            format!("Bytes the {tier} tier may hold."),
            t.capacity_bytes,
        ),
        (
            "used_bytes",
            "gauge",
            format!("Bytes the {tier} tier holds."),
            t.used_bytes,
        ),
        (
            "blocks",
            "gauge",
            format!("Blocks in the {tier} tier."),
            t.blocks,
        ),
        (
            "demoted_blocks_total",
            "counter",
            format!("Blocks written to the {tier} tier after eviction from the tier above."),
            t.demoted_blocks,
        ),
        (
            "demoted_bytes_total",
            "counter",
            format!("Bytes written to the {tier} tier after eviction from the tier above."),
            t.demoted_bytes,
        ),
        (
            "hits_total",
            "counter",
            format!("Blocks read back from the {tier} tier on a miss above ({tier}-tier hits)."),
            t.read_blocks,
        ),
        (
            "corrupt_blocks_total",
            "counter",
            format!(
                "Blocks in the {tier} tier that failed verification (dropped, read as misses)."
            ),
            t.corrupt_blocks,
        ),
        (
            "dropped_segments_total",
            "counter",
            format!("Segments of the {tier} tier deleted, oldest first, to stay within capacity."),
            t.dropped_segments,
        ),
        (
            "skipped_blocks_total",
            "counter",
            format!("Evicted blocks too large for the {tier} tier, not written to it."),
            t.skipped_blocks,
        ),
        (
            "errors_total",
            "counter",
            format!("Failed reads or writes of the {tier} tier."),
            t.errors,
        ),
    ];
    if let Some(p) = promotions {
        lines.push((
            "promoted_blocks_total",
            "counter",
            format!("Blocks brought back into memory from the {tier} tier or those under it."),
            p,
        ));
    }
    for (suffix, kind, help, v) in lines {
        let name = format!("kvcache_{tier}_{suffix}");
        header(out, &name, kind, &help);
        let _ = writeln!(out, "{name} {v}");
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = Metrics::default();
        m.op(Op::Get, true, Duration::from_micros(30));
        m.op(Op::Get, false, Duration::from_millis(3));
        m.blocks(Op::Get, 10, 7);
        m.protocol_error(ProtocolError::BadMagic);
        let text = m.render(&StoreStats {
            capacity_bytes: 1024,
            ..Default::default()
        });
        assert!(text.contains("kvcache_ops_total{op=\"get\",result=\"ok\"} 1"));
        assert!(text.contains("kvcache_ops_total{op=\"get\",result=\"error\"} 1"));
        assert!(text.contains("kvcache_requested_blocks_total{op=\"get\"} 10"));
        assert!(text.contains("kvcache_hit_blocks_total{op=\"get\"} 7"));
        assert!(text.contains("kvcache_op_duration_seconds_bucket{op=\"get\",le=\"0.00005\"} 1"));
        assert!(text.contains("kvcache_op_duration_seconds_bucket{op=\"get\",le=\"+Inf\"} 2"));
        assert!(text.contains("kvcache_protocol_errors_total{kind=\"bad_magic\"} 1"));
        assert!(text.contains("kvcache_pool_capacity_bytes 1024"));
    }
}
