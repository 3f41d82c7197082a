//! `kvcache-bench soak`: a bounded run of many clients putting and reading over TCP and shared
//! memory against three nodes found through etcd (R=2), while a conductor kills a node (SIGKILL)
//! and restarts it in a loop, one at a time and warmed before the next, and restarts etcd
//! itself every few rounds. Every read is compared byte for byte; the run fails on any error,
//! wrong byte, miss of a stored key, lease or pool page left at the end, or RSS growth after
//! warm-up beyond [`verdict::rss_bound`].
//!
//! - `nodes`: the server processes, their RSS and metrics;
//! - `load`: the clients and the ledger of stored keys;
//! - `verdict`: the pure pass/fail checks.

mod load;
mod nodes;
mod verdict;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Context;
use kvcache_client::TransportChoice;
use kvcache_core::ByteSize;
use kvcache_core::metric_names as names;
use kvcache_membership::testing::EtcdProcess;
use parking_lot::Mutex;
use serde::Serialize;

use load::{ClientPlan, Shared, Totals};
use nodes::Node;
use verdict::{NodeEnd, RssGrowth, RssSample};

/// The node count: R=2 over three nodes survives any one of them.
const NODES: usize = 3;
/// Seconds a node stays registered after it stops renewing (its etcd lease).
const ETCD_TTL_S: u64 = 2;
/// Pool allocation granularity of the nodes; values are a whole number of pages.
const PAGE: u64 = 4096;
/// How long a killed node (or etcd) stays down: past the TTL, so the ring really loses it.
const DOWN_FOR: Duration = Duration::from_secs(ETCD_TTL_S + 1);

/// What to run.
#[derive(Clone, Debug, Serialize, clap::Args)]
pub struct Plan {
    /// Seconds the clients run (the conductor's last event ends before them).
    #[arg(long, default_value_t = 1800.0)]
    pub seconds: f64,
    /// Clients over TCP, each its own cluster client.
    #[arg(long, default_value_t = 6)]
    pub tcp_clients: usize,
    /// Clients over shared memory.
    #[arg(long, default_value_t = 6)]
    pub shm_clients: usize,
    /// Value size, a whole number of 4 KiB pages.
    #[arg(long, default_value = "64KiB")]
    pub value: ByteSize,
    /// Values per get call.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Fraction of calls that are puts.
    #[arg(long, default_value_t = 0.3)]
    pub put_fraction: f64,
    /// Pool of each node.
    #[arg(long, default_value = "256MiB")]
    pub memory: ByteSize,
    /// Seconds between the conductor's events (a node killed and restarted, or etcd).
    #[arg(long, default_value_t = 20.0)]
    pub kill_every: f64,
    /// Every this many events, etcd is restarted instead of a node (0: never).
    #[arg(long, default_value_t = 4)]
    pub etcd_every: usize,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub json: Option<std::path::PathBuf>,
}

/// One event of the conductor.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    pub t_s: f64,
    pub what: String,
    /// From the kill to the restarted process registered and warm again.
    pub back_after_s: f64,
    /// Blocks the restarted node copied from its peers.
    pub warmed_blocks: u64,
}

/// The run's report (the JSON's `results`).
#[derive(Debug, Serialize)]
pub struct Report {
    pub plan: Plan,
    pub elapsed_s: f64,
    pub key_budget: u64,
    pub totals: Totals,
    pub node_kills: usize,
    pub etcd_restarts: usize,
    pub events: Vec<Event>,
    pub rss_growth: Vec<RssGrowth>,
    pub ends: Vec<NodeEnd>,
    pub rss: Vec<RssSample>,
    /// The first failures the clients saw (at most 20).
    pub first_failures: Vec<String>,
    /// Failed reads and writes per second of the run, for the seconds that had any.
    pub failures_by_second: std::collections::BTreeMap<u64, u64>,
    /// Why the soak failed; empty when it passed.
    pub failures: Vec<String>,
}

impl Plan {
    /// Refuses plans that cannot run.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.seconds > 0.0 && self.seconds <= 4.0 * 3600.0,
            "--seconds must be in (0, 14400]"
        );
        anyhow::ensure!(
            self.tcp_clients + self.shm_clients > 0,
            "at least one client is needed"
        );
        anyhow::ensure!((1..=64).contains(&self.batch), "--batch must be 1..=64");
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.put_fraction),
            "--put-fraction must be in [0, 1]"
        );
        anyhow::ensure!(self.kill_every >= 1.0, "--kill-every must be at least 1 s");
        anyhow::ensure!(
            self.value.0 >= 8 && self.value.0 % PAGE == 0,
            "--value must be a whole number of 4 KiB pages"
        );
        anyhow::ensure!(
            self.memory.0 >= 8 * self.value.0,
            "--memory must hold at least 8 values"
        );
        Ok(())
    }

    /// New keys stop at this many, so that all of them fit under one node's eviction watermark
    /// (with one node of three down, the other two each take every new key): the run checks
    /// replication and recovery, not eviction.
    pub fn key_budget(&self) -> u64 {
        (self.memory.0 * 6 / 10 / self.value.0.div_ceil(PAGE) / PAGE).max(1)
    }
}

/// Runs the soak (a plan that passed [`Plan::check`]); the report says whether it passed.
pub async fn run(plan: &Plan) -> anyhow::Result<Report> {
    let etcd = EtcdProcess::start().context(
        "etcd not found: install Debian's etcd-server (scripts/test.sh does) and run again",
    )?;
    let args = vec![
        "--memory".to_string(),
        plan.memory.to_string(),
        "--page-size".into(),
        format!("{PAGE}B"),
        "--etcd".into(),
        etcd.client_url.clone(),
        "--etcd-ttl".into(),
        ETCD_TTL_S.to_string(),
        // The clients' R: a joining node warms every block it is one of the owners of.
        "--replicas".into(),
        "2".into(),
    ];
    let mut started = Vec::new();
    for _ in 0..NODES {
        started.push(Node::start(args.clone())?);
    }
    for n in &started {
        nodes::wait_registered_and_warm(&n.metrics_addr, Duration::from_secs(30))?;
    }
    let nodes = Arc::new(Mutex::new(started));
    let etcd = Arc::new(Mutex::new(etcd));
    let begin = Instant::now();
    let deadline = begin + Duration::from_secs_f64(plan.seconds);
    let shared = Arc::new(Shared::new(plan.key_budget(), begin));
    eprintln!(
        "soak: {} s, {} TCP + {} shared-memory clients, {NODES} nodes of {} (R=2), {} values, \
         up to {} keys; a node killed every {} s, etcd restarted every {} events",
        plan.seconds,
        plan.tcp_clients,
        plan.shm_clients,
        plan.memory,
        plan.value,
        plan.key_budget(),
        plan.kill_every,
        plan.etcd_every
    );

    let transports = std::iter::repeat_n(TransportChoice::Tcp, plan.tcp_clients)
        .chain(std::iter::repeat_n(TransportChoice::Shm, plan.shm_clients));
    let client_url = etcd.lock().client_url.clone();
    let clients: Vec<_> = transports
        .enumerate()
        .map(|(id, transport)| {
            let p = ClientPlan {
                id,
                etcd: client_url.clone(),
                transport,
                value_bytes: plan.value.0 as usize,
                batch: plan.batch,
                put_fraction: plan.put_fraction,
                deadline,
            };
            tokio::spawn(load::client(p, Arc::clone(&shared)))
        })
        .collect();

    let conductor = {
        let (nodes, etcd, shared, plan) = (
            Arc::clone(&nodes),
            Arc::clone(&etcd),
            Arc::clone(&shared),
            plan.clone(),
        );
        std::thread::spawn(move || conduct(&plan, &nodes, &etcd, &shared, begin, deadline))
    };
    let mut client_failure = None;
    for c in clients {
        match c.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => client_failure = Some(format!("a client stopped: {e:#}")),
            Err(e) => client_failure = Some(format!("a client panicked: {e}")),
        }
    }
    shared.stop.store(true, Relaxed);
    let (events, rss) = conductor
        .join()
        .map_err(|_| anyhow::anyhow!("the conductor panicked"))??;
    let ends = node_ends(&nodes.lock(), plan.value.0)?;
    // The nodes stop (and revoke their etcd leases) before etcd does.
    drop(nodes);
    drop(etcd);

    let totals = shared.counters.totals();
    let rss_growth = verdict::rss_growth(&rss);
    let mut failures = verdict::failures(&totals, &rss_growth, &ends);
    failures.extend(client_failure);
    let etcd_restarts = events.iter().filter(|e| e.what == "etcd").count();
    Ok(Report {
        plan: plan.clone(),
        elapsed_s: begin.elapsed().as_secs_f64(),
        key_budget: plan.key_budget(),
        totals,
        node_kills: events.len() - etcd_restarts,
        etcd_restarts,
        events,
        rss_growth,
        ends,
        rss,
        first_failures: shared.failures.lock().clone(),
        failures_by_second: shared.failures_by_second.lock().clone(),
        failures,
    })
}

/// The conductor: samples every node's RSS each second and, every `kill_every` seconds, kills
/// the next node (or etcd), keeps it down past the TTL, restarts it and waits until it is
/// registered and warm again before the next event.
fn conduct(
    plan: &Plan,
    nodes: &Mutex<Vec<Node>>,
    etcd: &Mutex<EtcdProcess>,
    shared: &Shared,
    begin: Instant,
    deadline: Instant,
) -> anyhow::Result<(Vec<Event>, Vec<RssSample>)> {
    let mut rss = Vec::new();
    let mut events = Vec::new();
    let sample = |rss: &mut Vec<RssSample>| {
        let t_s = begin.elapsed().as_secs_f64();
        for (node, n) in nodes.lock().iter().enumerate() {
            if let Some(rss_bytes) = n.rss_bytes() {
                rss.push(RssSample {
                    t_s,
                    node,
                    instance: n.instance,
                    rss_bytes,
                });
            }
        }
    };
    // Sleeps `d` in one-second steps, sampling; false when the run is over.
    let wait = |rss: &mut Vec<RssSample>, d: Duration| {
        let until = Instant::now() + d;
        while Instant::now() < until {
            if Instant::now() >= deadline || shared.stop.load(Relaxed) {
                return false;
            }
            sample(rss);
            std::thread::sleep((until - Instant::now()).min(Duration::from_secs(1)));
        }
        true
    };
    let every = Duration::from_secs_f64(plan.kill_every);
    let (mut k, mut next_node) = (0usize, 0usize);
    // An event starts only if it can end (down, restart, warm) before the clients stop.
    let room = DOWN_FOR + Duration::from_secs(15);
    while wait(&mut rss, every) && Instant::now() + room < deadline {
        let t_s = begin.elapsed().as_secs_f64();
        let etcd_turn = plan.etcd_every > 0 && k % plan.etcd_every == plan.etcd_every - 1;
        let t0 = Instant::now();
        let mut warmed = 0;
        let what = if etcd_turn {
            etcd.lock().kill();
            wait(&mut rss, DOWN_FOR);
            etcd.lock().restart();
            let addrs: Vec<String> = nodes
                .lock()
                .iter()
                .map(|n| n.metrics_addr.clone())
                .collect();
            for a in &addrs {
                nodes::wait_registered_and_warm(a, Duration::from_secs(30))?;
            }
            "etcd".to_string()
        } else {
            let i = next_node % NODES;
            next_node += 1;
            nodes.lock()[i].kill();
            wait(&mut rss, DOWN_FOR);
            let metrics_addr = {
                let mut n = nodes.lock();
                n[i].restart()?;
                n[i].metrics_addr.clone()
            };
            nodes::wait_registered_and_warm(&metrics_addr, Duration::from_secs(60))?;
            warmed = nodes::metric(&metrics_addr, names::CLUSTER_WARMED_BLOCKS_TOTAL)? as u64;
            format!("node {i}")
        };
        let back = t0.elapsed().as_secs_f64();
        eprintln!(
            "soak: {t_s:7.1} s  {what} killed and back after {back:.1} s ({warmed} blocks warmed)"
        );
        events.push(Event {
            t_s,
            what,
            back_after_s: back,
            warmed_blocks: warmed,
        });
        k += 1;
    }
    // Samples until the clients stop, so the last third of every process has readings.
    while wait(&mut rss, Duration::from_secs(1)) {}
    Ok((events, rss))
}

/// Every node's books after the clients left: leases (waited for, up to 10 s, as closing
/// connections release theirs), and pool bytes that no committed block holds.
fn node_ends(nodes: &[Node], value_bytes: u64) -> anyhow::Result<Vec<NodeEnd>> {
    let per_block =
        (kvcache_core::checksum::stored_len(value_bytes as usize) as u64).div_ceil(PAGE) * PAGE;
    let mut ends = Vec::new();
    for n in nodes {
        let until = Instant::now() + Duration::from_secs(10);
        while n.metric(names::ACTIVE_LEASES)? > 0.0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(200));
        }
        let blocks = n.metric(names::BLOCKS_STORED)? as u64;
        let used = n.metric(names::POOL_USED_BYTES)? as u64;
        ends.push(NodeEnd {
            addr: n.addr.clone(),
            blocks,
            used_bytes: used,
            active_leases: n.metric(names::ACTIVE_LEASES)? as u64,
            checksum_failures: n.metric(names::CHECKSUM_FAILURES_TOTAL)? as u64,
            leaked_bytes: used as i64 - (blocks * per_block) as i64,
        });
    }
    Ok(ends)
}

/// The summary printed after the run.
pub fn summary(r: &Report) -> String {
    let t = &r.totals;
    let mut out = format!(
        "soak: {:.0} s, {} node kills, {} etcd restarts\n\
         puts {} ({} new keys, {} refused), gets {} ({} values: {} hits, {} misses), \
         wrong bytes {}, errors {}\n",
        r.elapsed_s,
        r.node_kills,
        r.etcd_restarts,
        t.puts,
        t.puts_new,
        t.puts_refused,
        t.gets,
        t.values_read,
        t.hits,
        t.misses,
        t.wrong_bytes,
        t.errors
    );
    for e in &r.ends {
        out.push_str(&format!(
            "  {}: {} blocks, {} leases left, {} pool bytes held by no block\n",
            e.addr, e.blocks, e.active_leases, e.leaked_bytes
        ));
    }
    for g in &r.rss_growth {
        out.push_str(&format!(
            "  node {} start {}: RSS {} MiB after warm-up, {} MiB at the end ({:+} KiB)\n",
            g.node,
            g.instance,
            g.baseline_bytes >> 20,
            g.last_bytes >> 20,
            g.growth_bytes >> 10
        ));
    }
    if r.failures.is_empty() {
        out.push_str("PASSED\n");
    } else {
        out.push_str(&format!("FAILED:\n  {}\n", r.failures.join("\n  ")));
        for f in &r.first_failures {
            out.push_str(&format!("  seen: {f}\n"));
        }
    }
    out
}
