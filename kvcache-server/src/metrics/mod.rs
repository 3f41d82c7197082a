//! Server metrics, kept in a `prometheus-client` registry. Every metric's name comes from
//! `kvcache_core::metric_names` (the contract with dashboards and the autoscaler). On the hot
//! path a request costs a few relaxed adds on counters looked up once, at start, per label
//! set; the store's and tiers' gauges are read at scrape time ([`render`]).

mod histogram;
pub mod render;

use std::time::Duration;

use kvcache_core::metric_names as names;
use kvcache_core::wire::Op;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use self::histogram::LatencyHistogram;

/// Latency bucket upper bounds, in seconds.
const BUCKETS: [f64; 18] = [
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3,
    250e-3, 500e-3, 1.0, 2.5, 10.0,
];

/// Why a connection's input was rejected (the `kind` label).
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

/// How payload bytes moved (the `transport` label of the byte counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Tcp = 0,
    Shm = 1,
    /// One-sided RDMA: the node counts what its leases and staging reads cover.
    Rdma = 2,
}

const VIAS: [&str; 3] = ["tcp", "shm", "rdma"];

/// Where a node that joined a cluster stands with warming (the value of
/// `kvcache_cluster_warm_state`; before the first change it reads 0, not on the ring yet).
#[derive(Clone, Copy, Debug)]
pub enum WarmState {
    /// Copying the blocks it owns from its peers.
    Copying = 1,
    /// Done, or warming is off.
    Done = 2,
}

/// Why a put of one block was refused (the `reason` label).
#[derive(Clone, Copy, Debug)]
pub enum PutRejection {
    TooLarge = 0,
    PoolFull = 1,
    Empty = 2,
}

const REJECTIONS: [&str; 3] = ["too_large", "pool_full", "empty"];

/// The ops whose blocks are counted as lookups (hit rate = hit / requested).
const LOOKUPS: [Op; 4] = [Op::Get, Op::LeaseGet, Op::Exists, Op::PrefixMatch];

type Labels = Vec<(&'static str, &'static str)>;

/// Counters of one op, looked up once.
struct PerOp {
    ok: Counter,
    err: Counter,
    latency: LatencyHistogram,
    /// Lookups only.
    requested: Option<Counter>,
    hit: Option<Counter>,
}

/// All server metrics.
pub struct Metrics {
    registry: Registry,
    ops: Vec<PerOp>,
    put_blocks: Counter,
    put_rejected: [Counter; 3],
    bytes_in: [Counter; 3],
    bytes_out: [Counter; 3],
    shm_leases_revoked: Counter,
    suspects: [Counter; 2],
    protocol_errors: [Counter; ProtocolError::ALL.len()],
    etcd_registered: Gauge,
    etcd_errors: Counter,
    cluster_members: Gauge,
    ring_version: Gauge,
    warmed_blocks: Counter,
    warmed_bytes: Counter,
    warm_state: Gauge,
    connections_active: Gauge,
    connections_total: Counter,
    connections_rejected: Counter,
    requests_timed_out: Counter,
    connections_idled_out: Counter,
    http_connections_rejected: Counter,
}

/// The metric of `f` for `labels`. A function, not an inline call: the read guard
/// `get_or_create` returns must end before the next call may take the family's write lock.
fn labeled<M: Clone, C: prometheus_client::metrics::family::MetricConstructor<M>>(
    f: &Family<Labels, M, C>,
    labels: Labels,
) -> M {
    f.get_or_create(&labels).clone()
}

/// A counter's family name: `prometheus-client` appends `_total` itself.
fn family(name: &'static str) -> &'static str {
    name.strip_suffix("_total").unwrap_or(name)
}

/// Registers a counter family and takes its counter for each label value.
fn counters<const N: usize>(
    registry: &mut Registry,
    name: &'static str,
    help: &str,
    label: &'static str,
    values: [&'static str; N],
) -> [Counter; N] {
    let f = Family::<Labels, Counter>::default();
    registry.register(family(name), help, f.clone());
    values.map(|v| labeled(&f, vec![(label, v)]))
}

fn counter(registry: &mut Registry, name: &'static str, help: &str) -> Counter {
    let c = Counter::default();
    registry.register(family(name), help, c.clone());
    c
}

fn gauge(registry: &mut Registry, name: &'static str, help: &str) -> Gauge {
    let g = Gauge::default();
    registry.register(name, help, g.clone());
    g
}

impl Default for Metrics {
    fn default() -> Self {
        let r = &mut Registry::default();
        let ops_family = Family::<Labels, Counter>::default();
        r.register(
            family(names::OPS_TOTAL),
            "Requests served, by op and result.",
            ops_family.clone(),
        );
        let requested = Family::<Labels, Counter>::default();
        r.register(
            family(names::REQUESTED_BLOCKS_TOTAL),
            "Blocks asked for by lookups (hit-rate denominator).",
            requested.clone(),
        );
        let hit = Family::<Labels, Counter>::default();
        r.register(
            family(names::HIT_BLOCKS_TOTAL),
            "Blocks found by lookups.",
            hit.clone(),
        );
        let latency =
            Family::<Labels, LatencyHistogram, fn() -> LatencyHistogram>::new_with_constructor(
                || LatencyHistogram::new(&BUCKETS),
            );
        r.register(
            names::OP_DURATION_SECONDS,
            "Server-side request latency, by op.",
            latency.clone(),
        );
        let ops = Op::REQUESTS
            .iter()
            .map(|op| {
                let by_op = |f: &Family<Labels, Counter>| {
                    LOOKUPS
                        .contains(op)
                        .then(|| labeled(f, vec![("op", op.name())]))
                };
                PerOp {
                    ok: labeled(&ops_family, vec![("op", op.name()), ("result", "ok")]),
                    err: labeled(&ops_family, vec![("op", op.name()), ("result", "error")]),
                    latency: labeled(&latency, vec![("op", op.name())]),
                    requested: by_op(&requested),
                    hit: by_op(&hit),
                }
            })
            .collect();
        Metrics {
            put_blocks: counter(r, names::PUT_BLOCKS_TOTAL, "Blocks offered by puts."),
            put_rejected: counters(
                r,
                names::PUT_REJECTED_BLOCKS_TOTAL,
                "Blocks a put could not store, by reason.",
                "reason",
                REJECTIONS,
            ),
            bytes_in: counters(
                r,
                names::BYTES_RECEIVED_TOTAL,
                "Payload bytes received.",
                "transport",
                VIAS,
            ),
            bytes_out: counters(
                r,
                names::BYTES_SENT_TOTAL,
                "Payload bytes sent.",
                "transport",
                VIAS,
            ),
            shm_leases_revoked: counter(
                r,
                names::SHM_LEASES_REVOKED_TOTAL,
                "Block leases revoked because a client held them past the lease timeout.",
            ),
            suspects: counters(
                r,
                names::SUSPECT_BLOCKS_TOTAL,
                "Blocks a client found corrupt, by whether the node's check confirmed it.",
                "result",
                ["clean", "confirmed"],
            ),
            etcd_registered: gauge(
                r,
                names::CLUSTER_REGISTERED,
                "1 while this node's etcd registration is live (with --etcd), else 0.",
            ),
            etcd_errors: counter(
                r,
                names::CLUSTER_ETCD_ERRORS_TOTAL,
                "Failed etcd calls while registering or renewing this node (with --etcd).",
            ),
            cluster_members: gauge(
                r,
                names::CLUSTER_MEMBERS,
                "Members on this node's ring (0 for a single node without --etcd or --peers).",
            ),
            ring_version: gauge(
                r,
                names::CLUSTER_RING_VERSION,
                "Bumped each time this node sees the member set change (1 for the first).",
            ),
            warmed_blocks: counter(
                r,
                names::CLUSTER_WARMED_BLOCKS_TOTAL,
                "Blocks this node copied from peers on joining (--warm).",
            ),
            warmed_bytes: counter(
                r,
                names::CLUSTER_WARMED_BYTES_TOTAL,
                "Bytes of blocks this node copied from peers on joining (--warm).",
            ),
            warm_state: gauge(
                r,
                names::CLUSTER_WARM_STATE,
                "In a cluster: 0 until this node sees itself on the ring, 1 while it copies its \
                 blocks from peers, 2 once done (at once with --warm=false).",
            ),
            protocol_errors: counters(
                r,
                names::PROTOCOL_ERRORS_TOTAL,
                "Rejected input, by kind.",
                "kind",
                ProtocolError::ALL.map(ProtocolError::label),
            ),
            connections_active: gauge(r, names::CONNECTIONS_ACTIVE, "Open data connections."),
            connections_total: counter(r, names::CONNECTIONS_TOTAL, "Data connections accepted."),
            connections_rejected: counter(
                r,
                names::CONNECTIONS_REJECTED_TOTAL,
                "Connections refused at --max-connections.",
            ),
            requests_timed_out: counter(
                r,
                names::REQUESTS_TIMED_OUT_TOTAL,
                "Requests that stalled past --request-timeout (connection closed).",
            ),
            connections_idled_out: counter(
                r,
                names::CONNECTIONS_IDLE_CLOSED_TOTAL,
                "Data connections closed after waiting past --idle-timeout.",
            ),
            http_connections_rejected: counter(
                r,
                names::HTTP_CONNECTIONS_REJECTED_TOTAL,
                "Metrics-port connections closed at --metrics-max-connections.",
            ),
            ops,
            registry: std::mem::take(r),
        }
    }
}

fn op_index(op: Op) -> usize {
    Op::REQUESTS.iter().position(|&o| o == op).unwrap_or(0)
}

impl Metrics {
    /// Records a finished request.
    pub fn op(&self, op: Op, ok: bool, took: Duration) {
        let per = &self.ops[op_index(op)];
        if ok { &per.ok } else { &per.err }.inc();
        per.latency.observe(took);
    }

    /// Records how many blocks a request named and how many a lookup found.
    pub fn blocks(&self, op: Op, requested: usize, hit: usize) {
        if matches!(op, Op::Put | Op::StagedPut) {
            self.put_blocks.inc_by(requested as u64);
            return;
        }
        let per = &self.ops[op_index(op)];
        if let (Some(r), Some(h)) = (&per.requested, &per.hit) {
            r.inc_by(requested as u64);
            h.inc_by(hit as u64);
        }
    }

    pub fn bytes_in(&self, via: Via, n: u64) {
        self.bytes_in[via as usize].inc_by(n);
    }

    pub fn bytes_out(&self, via: Via, n: u64) {
        self.bytes_out[via as usize].inc_by(n);
    }

    /// Counts leases revoked because the client held them past the timeout.
    pub fn shm_leases_revoked(&self, n: usize) {
        self.shm_leases_revoked.inc_by(n as u64);
    }

    /// Counts a block a client reported as failing its check, and whether the node's own
    /// verification confirmed it.
    pub fn suspect(&self, confirmed: bool) {
        self.suspects[confirmed as usize].inc();
    }

    /// Whether this node's etcd registration is live (its lease was last renewed).
    pub fn etcd_registered(&self, live: bool) {
        self.etcd_registered.set(live as i64);
    }

    /// Counts a failed etcd call (grant, put or keep-alive).
    pub fn etcd_error(&self) {
        self.etcd_errors.inc();
    }

    /// The node's view of the cluster: members on its ring and the ring's version.
    pub fn cluster_view(&self, members: usize, ring_version: u64) {
        self.cluster_members.set(members as i64);
        self.ring_version.set(ring_version as i64);
    }

    /// Where warming stands.
    pub fn warm_state(&self, state: WarmState) {
        self.warm_state.set(state as i64);
    }

    /// Counts a block copied from a peer while warming.
    pub fn warmed(&self, bytes: usize) {
        self.warmed_blocks.inc();
        self.warmed_bytes.inc_by(bytes as u64);
    }

    pub fn put_rejected(&self, why: PutRejection) {
        self.put_rejected[why as usize].inc();
    }

    pub fn protocol_error(&self, e: ProtocolError) {
        let i = ProtocolError::ALL
            .iter()
            .position(|&x| x == e)
            .expect("listed");
        self.protocol_errors[i].inc();
    }

    pub fn connection_opened(&self) {
        self.connections_active.inc();
        self.connections_total.inc();
    }

    pub fn connection_rejected(&self) {
        self.connections_rejected.inc();
    }

    pub fn request_timed_out(&self) {
        self.requests_timed_out.inc();
    }

    /// A data connection closed for waiting past `--idle-timeout`.
    pub fn connection_idled_out(&self) {
        self.connections_idled_out.inc();
    }

    /// A metrics-port connection closed at `--metrics-max-connections`.
    pub fn http_connection_rejected(&self) {
        self.http_connections_rejected.inc();
    }

    pub fn connection_closed(&self) {
        self.connections_active.dec();
    }

    /// Data connections open now.
    pub fn connections_active(&self) -> i64 {
        self.connections_active.get()
    }

    /// Protocol errors counted so far, all kinds together (for tests and logs).
    pub fn protocol_errors_total(&self) -> u64 {
        self.protocol_errors.iter().map(Counter::get).sum()
    }
}
