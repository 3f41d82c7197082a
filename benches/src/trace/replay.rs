//! The replay against a real server: starting it (this binary's `serve-kvcache`, a pool of an
//! exact number of blocks), replaying the chains through `kvcache-client` with every byte
//! checked, and reading back what the server counted from its metrics.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kvcache_client::{Client, ClientConfig, GetOutcome, PutBlocks, TransportChoice};
use kvcache_core::BlockKey;
use kvcache_core::metric_names;
use kvcache_core::wire::PutStatus;
use kvcache_store::eviction::PolicyKind;
use serde::Serialize;

use super::blocks::{PAGE_SIZE, fill_value};
use super::sim::{Outcome, Totals};
use crate::systems::{Managed, free_port, wait_listening};

/// No single request (lookup, gets and puts) may take longer: a stuck server fails the run.
const REQUEST_DEADLINE: Duration = Duration::from_secs(60);

/// The value of the first sample of `name` with exactly these `labels` (`""` for none, else
/// `{op="get"}`) in Prometheus/OpenMetrics text.
pub fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(labels)?;
        rest.strip_prefix(' ')?.split(' ').next()?.parse().ok()
    })
}

/// `GET /metrics` from a server's metrics listener (HTTP/1.0, so the body is never chunked).
fn scrape(addr: &str) -> anyhow::Result<String> {
    let sock = addr.parse().context("metrics address")?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut reply = String::new();
    s.take(64 << 20).read_to_string(&mut reply)?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .context("metrics reply without a body")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "metrics answered {}",
        head.lines().next().unwrap_or("")
    );
    Ok(body.to_string())
}

/// What the server reported after a replay.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ServerStats {
    pub blocks_stored: u64,
    pub evictions: u64,
    pub pool_capacity_bytes: u64,
    pub pool_used_bytes: u64,
    /// Its own count of blocks `prefix_match` found.
    pub prefix_hit_blocks: u64,
    pub prefix_requested_blocks: u64,
}

/// Reads [`ServerStats`] from the metrics listener at `metrics_addr`.
pub(super) fn server_stats(metrics_addr: &str) -> anyhow::Result<ServerStats> {
    let text = scrape(metrics_addr)?;
    let get = |name: &str, labels: &str| {
        metric(&text, name, labels)
            .map(|v| v as u64)
            .with_context(|| format!("the server reports no {name}{labels}"))
    };
    let prefix = r#"{op="prefix_match"}"#;
    Ok(ServerStats {
        blocks_stored: get(metric_names::BLOCKS_STORED, "")?,
        evictions: get(metric_names::EVICTIONS_TOTAL, "")?,
        pool_capacity_bytes: get(metric_names::POOL_CAPACITY_BYTES, "")?,
        pool_used_bytes: get(metric_names::POOL_USED_BYTES, "")?,
        prefix_hit_blocks: get(metric_names::HIT_BLOCKS_TOTAL, prefix)?,
        prefix_requested_blocks: get(metric_names::REQUESTED_BLOCKS_TOTAL, prefix)?,
    })
}

/// The policy's name, as the server's `--eviction` takes it.
pub(super) fn policy_name(p: PolicyKind) -> &'static str {
    match p {
        PolicyKind::Lru => "lru",
        PolicyKind::S3fifo => "s3fifo",
    }
}

/// The server flags of one replay: a pool of exactly `pool_bytes`, evicting only when full.
pub fn server_args(policy: PolicyKind, shards: usize, pool_bytes: u64) -> Vec<String> {
    [
        "--memory",
        &format!("{pool_bytes}B"),
        "--page-size",
        &format!("{PAGE_SIZE}B"),
        "--eviction",
        policy_name(policy),
        "--shards",
        &shards.to_string(),
        "--high-watermark",
        "1",
        "--low-watermark",
        "1",
        "--mlock",
        "off",
        "--shm-socket",
        "off",
    ]
    .map(String::from)
    .to_vec()
}

/// A server started for one replay: this binary's `serve-kvcache`, on loopback.
pub(super) struct Server {
    _process: Managed,
    pub(super) addr: String,
    pub(super) metrics_addr: String,
}

/// Starts a server for one replay and waits until both its listeners accept.
pub(super) fn start_server(
    policy: PolicyKind,
    shards: usize,
    pool_bytes: u64,
) -> anyhow::Result<Server> {
    let addr = format!("127.0.0.1:{}", free_port()?);
    let metrics_addr = format!("127.0.0.1:{}", free_port()?);
    let child = Command::new(std::env::current_exe()?)
        .args(["serve-kvcache", "--listen", &addr, "--metrics-listen"])
        .arg(&metrics_addr)
        .args(server_args(policy, shards, pool_bytes))
        .env("KVCACHE_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start kvcache-server")?;
    let mut process = Managed(child);
    wait_listening(&addr, &mut process.0)?;
    wait_listening(&metrics_addr, &mut process.0)?;
    Ok(Server {
        _process: process,
        addr,
        metrics_addr,
    })
}

/// What a replay against a server measured.
#[derive(Debug, Default)]
pub struct Replay {
    pub totals: Totals,
    /// Prefix hits whose get then missed (evicted meanwhile by another request; only with
    /// `--concurrency` above 1).
    pub lost: u64,
    /// Puts the server refused (pool full of leased blocks; only with concurrency).
    pub refused: u64,
    /// Block bytes moved: gets and puts.
    pub bytes: u64,
    /// Per request: lookup, gets and puts, in microseconds.
    pub latency_us: Vec<f64>,
    pub seconds: f64,
    /// False if the replay stopped at its time limit.
    pub complete: bool,
}

/// One client's buffers, reused from request to request.
struct Buffers {
    expected: Vec<u8>,
    got: Vec<u8>,
}

/// Replays `chains` in order against the server at `addr`, `concurrency` requests at a time,
/// stopping at `deadline`.
pub async fn replay(
    addr: &str,
    chains: Arc<Vec<Vec<BlockKey>>>,
    block: usize,
    concurrency: usize,
    deadline: Instant,
) -> anyhow::Result<Replay> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let mut cfg = ClientConfig::new(addr);
        cfg.transport = TransportChoice::Tcp;
        // One connection: the server handles its requests in order, so a get's leases are
        // released before this client's next put can need an eviction.
        cfg.max_connections = 1;
        cfg.timeout = REQUEST_DEADLINE;
        let client = Client::connect(cfg).await?;
        let (chains, next) = (Arc::clone(&chains), Arc::clone(&next));
        let exact = concurrency == 1;
        tasks.push(tokio::spawn(async move {
            let mut r = Replay {
                complete: true,
                ..Replay::default()
            };
            let mut bufs = Buffers {
                expected: Vec::new(),
                got: Vec::new(),
            };
            for _ in 0..chains.len() {
                if Instant::now() >= deadline {
                    r.complete = false;
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(keys) = chains.get(i) else { break };
                tokio::time::timeout(
                    REQUEST_DEADLINE,
                    request(&client, keys, block, exact, &mut bufs, &mut r),
                )
                .await
                .map_err(|_| anyhow::anyhow!("request {i} took over {REQUEST_DEADLINE:?}"))?
                .with_context(|| format!("request {i}"))?;
            }
            anyhow::Ok(r)
        }));
    }
    let mut all = Replay {
        complete: true,
        ..Replay::default()
    };
    for t in tasks {
        let r = t.await??;
        all.totals.requests += r.totals.requests;
        all.totals.blocks += r.totals.blocks;
        all.totals.hits += r.totals.hits;
        all.totals.stored += r.totals.stored;
        all.totals.present += r.totals.present;
        all.lost += r.lost;
        all.refused += r.refused;
        all.bytes += r.bytes;
        all.latency_us.extend(r.latency_us);
        all.complete &= r.complete;
    }
    all.seconds = started.elapsed().as_secs_f64();
    Ok(all)
}

/// One request: lookup, gets of the matched blocks, puts of the others. `exact`: every
/// matched block must then be read back (nothing else runs meanwhile).
async fn request(
    client: &Client,
    keys: &[BlockKey],
    block: usize,
    exact: bool,
    bufs: &mut Buffers,
    r: &mut Replay,
) -> anyhow::Result<()> {
    // Untimed: every block's value, to put or to compare with what a get returns.
    bufs.expected.resize(keys.len() * block, 0);
    for (k, v) in keys.iter().zip(bufs.expected.chunks_exact_mut(block)) {
        fill_value(*k, v);
    }
    bufs.got.clear();
    bufs.got.resize(keys.len() * block, 0);

    let started = Instant::now();
    let matched = client.prefix_match(keys).await?;
    let outcomes = if matched > 0 {
        let mut dst: Vec<Vec<&mut [u8]>> = bufs.got[..matched * block]
            .chunks_exact_mut(block)
            .map(|b| vec![b])
            .collect();
        client.get_many_into(&keys[..matched], &mut dst).await?
    } else {
        Vec::new()
    };
    let statuses = if matched < keys.len() {
        let blocks: Vec<(BlockKey, &[u8])> = keys[matched..]
            .iter()
            .copied()
            .zip(bufs.expected[matched * block..].chunks_exact(block))
            .collect();
        client.put_many(&blocks).await?
    } else {
        Vec::new()
    };
    r.latency_us.push(started.elapsed().as_secs_f64() * 1e6);

    let mut out = Outcome {
        hits: matched as u64,
        ..Outcome::default()
    };
    for (i, o) in outcomes.iter().enumerate() {
        let range = i * block..(i + 1) * block;
        match o {
            GetOutcome::Hit if bufs.got[range.clone()] == bufs.expected[range] => {}
            GetOutcome::Hit => bail!("block {i} came back with wrong bytes"),
            other if exact => bail!("block {i} matched the prefix but its get answered {other:?}"),
            _ => r.lost += 1,
        }
    }
    for s in &statuses {
        match s {
            PutStatus::Stored => out.stored += 1,
            PutStatus::AlreadyPresent => out.present += 1,
            other if exact => bail!("a put answered {other:?}"),
            _ => r.refused += 1,
        }
    }
    r.bytes += (outcomes.len() + statuses.len()) as u64 * block as u64;
    r.totals.add(keys.len(), out);
    Ok(())
}
