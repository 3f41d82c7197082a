//! `kvcache-bench compare`: put and get throughput and latency of every system, for every value
//! size and concurrency, in one run on one machine, so the ratios are meaningful.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use kvcache_core::ByteSize;
use serde::Serialize;

use crate::systems::mooncake::Mooncake;
use crate::systems::{self, Conn, Managed, check_stamp, stamp};

/// A system `compare` can measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SystemKind {
    #[value(name = "kvcache-tcp")]
    KvcacheTcp,
    #[value(name = "kvcache-shm")]
    KvcacheShm,
    #[value(name = "redis")]
    Redis,
    #[value(name = "tcp-ceiling")]
    TcpCeiling,
    #[value(name = "memcpy-ceiling")]
    MemcpyCeiling,
    /// Mooncake Store over its TCP transport (needs `--mooncake-venv`).
    #[value(name = "mooncake")]
    Mooncake,
}

impl SystemKind {
    fn name(self) -> &'static str {
        match self {
            SystemKind::KvcacheTcp => "kvcache-tcp",
            SystemKind::KvcacheShm => "kvcache-shm",
            SystemKind::Redis => "redis",
            SystemKind::TcpCeiling => "tcp-ceiling",
            SystemKind::MemcpyCeiling => "memcpy-ceiling",
            SystemKind::Mooncake => "mooncake",
        }
    }
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct Plan {
    pub systems: Vec<SystemKind>,
    pub sizes: Vec<ByteSize>,
    pub concurrency: Vec<usize>,
    /// `put`, `get` or both.
    pub ops: Vec<String>,
    /// Values per get call (puts always store one value per call).
    pub batches: Vec<usize>,
    /// Measured seconds per row and system, split into `rounds` interleaved slices.
    pub seconds: f64,
    pub rounds: usize,
    /// Memory budget for each store (our pool, Redis' maxmemory, Mooncake's segment).
    pub memory: ByteSize,
    /// Bytes each client's values rotate through, a call's values at a time (0: one call's
    /// worth, reused). Not for Mooncake, whose drivers keep their own buffers.
    pub client_buffers: usize,
    /// A venv with `mooncake-transfer-engine-non-cuda`, for the `mooncake` system.
    pub mooncake_venv: Option<std::path::PathBuf>,
}

/// One measured row, in the JSON schema of `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub system: &'static str,
    pub op: &'static str,
    pub value_bytes: u64,
    pub concurrency: usize,
    /// Values per call (gets; 1 for puts). Throughput counts values; latency is per call.
    pub batch: usize,
    pub ops_per_s: f64,
    pub gb_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// CPU seconds the system's server process spent per GB moved (warm-ups included on both
    /// sides); null for systems with no server process (memcpy) or their own (Mooncake).
    pub node_cpu_s_per_gb: Option<f64>,
    /// The same for the benchmark process, which holds the clients (and the memcpy store).
    pub client_cpu_s_per_gb: Option<f64>,
}

/// Operations per task and slice, whatever the clock says: every load loop is bounded.
const MAX_OPS_PER_TASK: u64 = 2_000_000;

/// Measurements of one system for one row, summed over its slices.
#[derive(Default)]
struct Tally {
    lat_ns: Vec<u64>,
    span: Duration,
    /// Bytes moved in the slices, warm-ups included, and the CPU spent meanwhile (`None` once
    /// a reading failed or for a system measured elsewhere).
    bytes: u64,
    node_cpu: Option<f64>,
    client_cpu: Option<f64>,
}

/// CPU seconds of the server process (if any) and of this process, read around a slice.
fn cpu_now(server: Option<u32>) -> (Option<f64>, Option<f64>) {
    (
        server.and_then(|pid| systems::cpu_seconds(&pid.to_string())),
        systems::cpu_seconds("self"),
    )
}

/// `total + (after - before)`, or `None` as soon as any reading is missing.
fn add_cpu(total: Option<f64>, before: Option<f64>, after: Option<f64>) -> Option<f64> {
    Some(total? + (after? - before?))
}

/// Runs the whole plan.
///
/// Every system is started first and runs for the whole benchmark. Each row (op, size,
/// concurrency) is measured in `rounds` short slices per system, interleaved (kvcache, redis,
/// ceiling, kvcache, ...), so a machine that speeds up or slows down during the run moves every
/// system alike and the ratios stay meaningful.
pub async fn run(plan: &Plan) -> anyhow::Result<Vec<Row>> {
    let mut running: Vec<Running> = Vec::new();
    for &system in &plan.systems {
        let (proc_, addr) = match system {
            SystemKind::KvcacheTcp | SystemKind::KvcacheShm => {
                let (p, a) = systems::kvcache::start(&plan.memory.to_string())?;
                (Some(p), a)
            }
            SystemKind::Redis => {
                let (p, a) = systems::redis::start(plan.memory.0)?;
                (Some(p), a)
            }
            SystemKind::TcpCeiling => {
                let (p, a) = systems::ceiling::start()?;
                (Some(p), a)
            }
            SystemKind::MemcpyCeiling | SystemKind::Mooncake => (None, String::new()),
        };
        let mooncake = match (system, &plan.mooncake_venv) {
            (SystemKind::Mooncake, Some(venv)) => Some(
                Mooncake::start(venv, plan.memory.0)
                    .await
                    .context("starting Mooncake")?,
            ),
            (SystemKind::Mooncake, None) => {
                anyhow::bail!("the mooncake system needs --mooncake-venv DIR")
            }
            _ => None,
        };
        running.push(Running {
            system,
            process: proc_,
            addr,
            mooncake,
        });
    }
    let memcpy = systems::memcpy::MemcpyStore::new()?;
    let keys = Arc::new(AtomicU64::new(1));
    let slice = Duration::from_secs_f64(plan.seconds / plan.rounds as f64);
    let mut rows = Vec::new();
    for &size in &plan.sizes {
        let size_b = size.0 as usize;
        for &conc in &plan.concurrency {
            let rows_here = ["put", "get"]
                .into_iter()
                .filter(|op| plan.ops.iter().any(|o| o == op))
                .flat_map(|op| {
                    let batches = if op == "get" {
                        &plan.batches[..]
                    } else {
                        &[1][..]
                    };
                    batches.iter().map(move |&b| (op, b))
                });
            for (op, batch) in rows_here {
                let shape = Shape {
                    op,
                    size: size_b,
                    conc,
                    batch,
                };
                let label = shape.label();
                let mut working_sets = Vec::new();
                for r in &mut running {
                    let name = r.system.name();
                    let ws = match &mut r.mooncake {
                        Some(m) => m.row(op, size_b, batch, conc).await.map(|()| Vec::new()),
                        None => prepare(r.system, &r.addr, &memcpy, &shape, plan, &keys).await,
                    }
                    .with_context(|| format!("{name} {label}: setup"))?;
                    working_sets.push(Arc::new(ws));
                }
                // Connections are opened once per row and kept across its slices, so no system
                // pays connection setup or a cold TCP window inside a measured slice (Mooncake's
                // driver keeps its worker processes across the row's slices alike).
                let mut conns: Vec<Vec<Conn>> = Vec::new();
                for r in &running {
                    let mut cs = Vec::with_capacity(conc);
                    if r.mooncake.is_none() {
                        for _ in 0..conc {
                            cs.push(connect(r.system, &r.addr, &memcpy).await?);
                        }
                    }
                    conns.push(cs);
                }
                let mut tallies: Vec<Tally> = running
                    .iter()
                    .map(|r| Tally {
                        node_cpu: r.process.as_ref().map(|_| 0.0),
                        client_cpu: r.mooncake.is_none().then_some(0.0),
                        ..Tally::default()
                    })
                    .collect();
                for round in 0..plan.rounds {
                    for i in 0..running.len() {
                        // Rotate who goes first so no system always follows the same one.
                        let j = (i + round) % running.len();
                        let system = running[j].system;
                        let server = running[j].process.as_ref().map(|p| p.0.id());
                        let (node_before, client_before) = cpu_now(server);
                        let measured = match &mut running[j].mooncake {
                            Some(m) => m
                                .slice(slice.as_secs_f64())
                                .await
                                .map(|s| (s.lat_ns, s.span, 0)),
                            None => {
                                measure_slice(
                                    system,
                                    &mut conns[j],
                                    &shape,
                                    slice,
                                    plan.client_buffers,
                                    &working_sets[j],
                                    &keys,
                                )
                                .await
                            }
                        };
                        let (node_after, client_after) = cpu_now(server);
                        let (lat, span, calls) =
                            measured.with_context(|| format!("{} {label}", system.name()))?;
                        let t = &mut tallies[j];
                        t.lat_ns.extend(lat);
                        t.span += span;
                        t.bytes += calls * (shape.batch * shape.size) as u64;
                        t.node_cpu = add_cpu(t.node_cpu, node_before, node_after);
                        t.client_cpu = add_cpu(t.client_cpu, client_before, client_after);
                    }
                }
                for r in &mut running {
                    if let Some(m) = &mut r.mooncake {
                        m.end_row().await.context("mooncake: ending a row")?;
                    }
                }
                for (r, tally) in running.iter().zip(tallies) {
                    let row = summarize(r.system.name(), &shape, tally);
                    eprintln!("{}", format_row(&row));
                    rows.push(row);
                }
            }
        }
    }
    Ok(rows)
}

/// A system started for the whole run.
struct Running {
    system: SystemKind,
    /// Our server, Redis or the TCP ceiling; stopped when dropped.
    process: Option<Managed>,
    addr: String,
    /// Mooncake is driven by its own processes, row by row and slice by slice.
    mooncake: Option<Mooncake>,
}

async fn connect(
    system: SystemKind,
    addr: &str,
    memcpy: &Arc<systems::memcpy::MemcpyStore>,
) -> anyhow::Result<Conn> {
    use kvcache_client::TransportChoice;
    Ok(match system {
        SystemKind::KvcacheTcp => {
            Conn::Kvcache(systems::kvcache::KvConn::connect(addr, TransportChoice::Tcp).await?)
        }
        SystemKind::KvcacheShm => {
            Conn::Kvcache(systems::kvcache::KvConn::connect(addr, TransportChoice::Shm).await?)
        }
        SystemKind::MemcpyCeiling => Conn::Memcpy(systems::memcpy::MemcpyConn::new(memcpy)),
        SystemKind::Redis => Conn::Redis(systems::redis::RedisConn::connect(addr).await?),
        SystemKind::TcpCeiling => {
            Conn::Ceiling(systems::ceiling::CeilingConn::connect(addr).await?)
        }
        SystemKind::Mooncake => anyhow::bail!("mooncake is driven by its own processes"),
    })
}

/// What one row measures.
struct Shape {
    op: &'static str,
    size: usize,
    conc: usize,
    /// Values per call.
    batch: usize,
}

impl Shape {
    fn label(&self) -> String {
        let batch = match self.batch {
            1 => String::new(),
            b => format!(" b{b}"),
        };
        format!(
            "{} {} x{}{batch}",
            self.op,
            ByteSize(self.size as u64),
            self.conc
        )
    }
}

/// Resets the system and, for gets, writes the working set the row will read: as many
/// distinct values as fit in a quarter of the memory budget (at least one per value in flight,
/// at most 256 unless more are in flight), so reads come from DRAM, not from a CPU cache.
async fn prepare(
    system: SystemKind,
    addr: &str,
    memcpy: &Arc<systems::memcpy::MemcpyStore>,
    shape: &Shape,
    plan: &Plan,
    keys: &AtomicU64,
) -> anyhow::Result<Vec<u64>> {
    let mut c = connect(system, addr, memcpy).await?;
    c.reset().await?;
    if shape.op != "get" {
        return Ok(Vec::new());
    }
    let size = shape.size;
    let in_flight = shape.conc * shape.batch;
    let n = ((plan.memory.0 as usize / 4) / size).clamp(in_flight, in_flight.max(256));
    let first = keys.fetch_add(n as u64, Ordering::Relaxed);
    let mut v = vec![0u8; size];
    for k in first..first + n as u64 {
        stamp(&mut v, k);
        c.put(k, &v).await?;
    }
    Ok((first..first + n as u64).collect())
}

/// One slice: one client per connection runs `op` back to back for `slice` after a short
/// warm-up. Returns every latency, the measured span and the calls made, warm-up included;
/// the connections come back for the next slice.
async fn measure_slice(
    system: SystemKind,
    conns: &mut Vec<Conn>,
    shape: &Shape,
    slice: Duration,
    client_buffers: usize,
    working_set: &Arc<Vec<u64>>,
    keys: &Arc<AtomicU64>,
) -> anyhow::Result<(Vec<u64>, Duration, u64)> {
    let warmup = (slice / 4).min(Duration::from_millis(100));
    let (op, size, batch) = (shape.op, shape.size, shape.batch);
    let conc = conns.len();
    let mut tasks = Vec::new();
    for (t, mut conn) in conns.drain(..).enumerate() {
        let keys = Arc::clone(keys);
        let ws = Arc::clone(working_set);
        tasks.push(tokio::spawn(async move {
            // Call i uses set i mod sets: with --client-buffers beyond the L3 every call
            // reads or writes memory the CPU's caches no longer hold, as an engine's does.
            let sets = (client_buffers / (size * batch)).max(1);
            let mut ring = vec![vec![vec![0u8; size]; batch]; sets];
            let mut batch_keys = vec![0u64; batch];
            let mut lat_ns: Vec<u64> = Vec::with_capacity(1 << 14);
            let begin = Instant::now();
            let (warm_end, end) = (begin + warmup, begin + warmup + slice);
            let mut measured_start = None;
            let mut calls = 0u64;
            for i in 0..MAX_OPS_PER_TASK {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                if now >= warm_end && measured_start.is_none() {
                    measured_start = Some(now);
                }
                let bufs = &mut ring[i as usize % sets];
                let t0 = Instant::now();
                if op == "put" {
                    let k = keys.fetch_add(1, Ordering::Relaxed);
                    stamp(&mut bufs[0], k);
                    conn.put(k, &bufs[0]).await?;
                } else {
                    // Task t reads values t, t + conc, ...; a batch takes the next `batch` of them.
                    for (j, k) in batch_keys.iter_mut().enumerate() {
                        *k = ws[(t + (i as usize * batch + j) * conc) % ws.len()];
                    }
                    conn.get(&batch_keys, bufs).await?;
                    if system != SystemKind::TcpCeiling {
                        for (b, &k) in bufs.iter().zip(&batch_keys) {
                            check_stamp(b, k)?;
                        }
                    }
                }
                calls += 1;
                if measured_start.is_some() {
                    lat_ns.push(t0.elapsed().as_nanos() as u64);
                }
            }
            let span = measured_start.map_or(Duration::ZERO, |s| s.elapsed());
            Ok::<_, anyhow::Error>((lat_ns, span, calls, conn))
        }));
    }
    let mut lat = Vec::new();
    let mut span = Duration::ZERO;
    let mut calls = 0;
    for t in tasks {
        let (l, s, c, conn) = t.await??;
        lat.extend(l);
        span = span.max(s);
        calls += c;
        conns.push(conn);
    }
    Ok((lat, span, calls))
}

fn summarize(system: &'static str, shape: &Shape, mut t: Tally) -> Row {
    t.lat_ns.sort_unstable();
    let lat = &t.lat_ns;
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
    };
    // Each latency is one call of `batch` values.
    let ops_per_s = (lat.len() * shape.batch) as f64 / t.span.as_secs_f64().max(1e-9);
    let per_gb = |cpu: Option<f64>| {
        cpu.filter(|_| t.bytes > 0)
            .map(|c| c / (t.bytes as f64 / 1e9))
    };
    Row {
        system,
        op: shape.op,
        value_bytes: shape.size as u64,
        concurrency: shape.conc,
        batch: shape.batch,
        ops_per_s,
        gb_per_s: ops_per_s * shape.size as f64 / 1e9,
        p50_us: pct(0.50).unwrap_or(0) as f64 / 1e3,
        p99_us: pct(0.99).unwrap_or(0) as f64 / 1e3,
        node_cpu_s_per_gb: per_gb(t.node_cpu),
        client_cpu_s_per_gb: per_gb(t.client_cpu),
    }
}

fn format_row(r: &Row) -> String {
    let cpu = |c: Option<f64>| c.map_or_else(|| "-".into(), |c| format!("{c:.3}"));
    format!(
        "{:<14} {:<4} {:>8} x{:<3} b{:<3} {:>10.0} ops/s {:>7.2} GB/s  p50 {:>9.1} us  p99 {:>9.1} us  {:>6} {:>6}",
        r.system,
        r.op,
        ByteSize(r.value_bytes).to_string(),
        r.concurrency,
        r.batch,
        r.ops_per_s,
        r.gb_per_s,
        r.p50_us,
        r.p99_us,
        cpu(r.node_cpu_s_per_gb),
        cpu(r.client_cpu_s_per_gb),
    )
}

/// The table and, for our server, its ratios to Redis and to the ceilings.
pub fn report(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str(
        "system         op       size conc batch       ops/s    GB/s   p50 per call   p99 per call  CPU-s per GB: node client\n",
    );
    for r in rows {
        out.push_str(&format_row(r));
        out.push('\n');
    }
    let peers_of: [(&str, &[&str]); 2] = [
        ("kvcache-tcp", &["redis", "mooncake", "tcp-ceiling"]),
        ("kvcache-shm", &["kvcache-tcp", "memcpy-ceiling"]),
    ];
    for (ours, peers) in peers_of {
        let mine: Vec<&Row> = rows.iter().filter(|r| r.system == ours).collect();
        if mine.is_empty() {
            continue;
        }
        out.push_str(&format!("\n{ours} ratios (throughput):\n"));
        for r in mine {
            let peer = |name: &str| {
                rows.iter()
                    .find(|p| {
                        p.system == name
                            && p.op == r.op
                            && p.value_bytes == r.value_bytes
                            && p.concurrency == r.concurrency
                            && p.batch == r.batch
                    })
                    .map(|p| format!("{:.2}x", r.ops_per_s / p.ops_per_s))
                    .unwrap_or_else(|| "-".into())
            };
            out.push_str(&format!(
                "  {:<4} {:>8} x{:<3} b{:<3}",
                r.op,
                ByteSize(r.value_bytes).to_string(),
                r.concurrency,
                r.batch,
            ));
            for name in peers
                .iter()
                .filter(|n| rows.iter().any(|p| p.system == **n))
            {
                out.push_str(&format!("   vs {name} {:>7}", peer(name)));
            }
            out.push('\n');
        }
    }
    out
}
