//! kvcache-bench: benchmarks that compare kvcache with its ceilings and peers in one run.

mod cluster;
mod compare;
mod cuda;
mod disk;
#[cfg(feature = "gateway")]
mod gateway_index;
mod index_memory;
mod soak;
mod systems;
mod trace;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kvcache_core::ByteSize;
use kvcache_store::eviction::PolicyKind;

#[global_allocator]
static ALLOC: index_memory::Counting = index_memory::Counting;

/// Benchmarks for kvcache. Every system compared is started and stopped by the benchmark itself.
#[derive(Parser)]
#[command(name = "kvcache-bench", version, about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Put/get throughput and latency of kvcache over TCP, Redis and a raw TCP ceiling.
    Compare {
        /// Measured seconds per row and system (plus a short warm-up per slice).
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Interleaved slices each row's seconds are split into, alternating between systems.
        #[arg(long, default_value_t = 4)]
        rounds: usize,
        /// Value sizes.
        #[arg(long, value_delimiter = ',', default_value = "256KiB,1MiB,4MiB")]
        sizes: Vec<ByteSize>,
        /// Concurrent clients (one connection each).
        #[arg(long, value_delimiter = ',', default_value = "1,4")]
        concurrency: Vec<usize>,
        /// Operations to measure.
        #[arg(long, value_delimiter = ',', default_value = "put,get", value_parser = ["put", "get"])]
        ops: Vec<String>,
        /// Values per get call: one request for all of them where the system has one
        /// (kvcache's get_many_into, Redis MGET), as the vLLM connector loads a request's
        /// blocks. Throughput counts values, latency is per call. Puts store one value a call.
        #[arg(long, value_delimiter = ',', default_value = "1")]
        batch: Vec<usize>,
        /// Systems to measure.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "kvcache-shm,kvcache-tcp,redis,tcp-ceiling,memcpy-ceiling"
        )]
        systems: Vec<compare::SystemKind>,
        /// Memory budget of each store (kvcache pool, Redis maxmemory).
        #[arg(long, default_value = "2GiB")]
        memory: ByteSize,
        /// Memory each client's values rotate through, one call's values after another
        /// (default: one call's worth, reused every call). An engine reads into and writes
        /// from a KV cache far larger than the CPU's caches; a size well beyond the L3 models
        /// that. Applies to every system but Mooncake, whose driver processes keep their own
        /// buffers.
        #[arg(long, value_name = "SIZE")]
        client_buffers: Option<ByteSize>,
        /// A venv with PyPI's mooncake-transfer-engine-non-cuda 0.3.13: adds Mooncake Store
        /// (its master, a holder process with the pool, and driver processes with no segment,
        /// so every value crosses its TCP transport) to the same interleaved run. Without it
        /// Mooncake is not measured, and the run says so.
        #[arg(long, value_name = "DIR", env = "KVCACHE_MOONCAKE_VENV")]
        mooncake_venv: Option<PathBuf>,
        /// Also write the results as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// Aggregate get throughput of 1 and 3 nodes at the same total memory, and the fraction of
    /// keys that move when a fourth node joins three.
    Cluster {
        /// Total memory, split evenly over the nodes.
        #[arg(long, default_value = "1GiB")]
        memory: ByteSize,
        /// Value size.
        #[arg(long, default_value = "1MiB")]
        value: ByteSize,
        /// Concurrent client tasks.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Keys per get call.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Measured seconds per node count.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Blocks written to measure how many move on a join.
        #[arg(long, default_value_t = 20_000)]
        move_blocks: usize,
        /// Also write the results as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// Get throughput from the disk tier after a restart, against a sequential file read of
    /// the same bytes (needs a build with `--features disk`).
    Disk {
        /// Directory for the tier and the comparison file (on the disk to measure).
        #[arg(long, default_value = "/var/tmp/kvcache-bench-disk")]
        dir: PathBuf,
        /// The server's memory pool.
        #[arg(long, default_value = "256MiB")]
        memory: ByteSize,
        /// Bytes written, and read back from disk.
        #[arg(long, default_value = "2GiB")]
        total: ByteSize,
        /// Value size.
        #[arg(long, default_value = "1MiB")]
        value: ByteSize,
        /// Concurrent client tasks.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Also write the results as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// KV blocks saved from GPU memory into the cache and loaded back, against plain cuMemcpy
    /// of the same slices in the same run (needs a build with `--features cuda` and a GPU).
    Cuda(cuda::Plan),
    /// Heap bytes per indexed block in the server's index.
    IndexMemory {
        /// Blocks to index.
        #[arg(long, default_value_t = 1_000_000)]
        blocks: usize,
        /// Index shards (as the server's --shards).
        #[arg(long, default_value_t = 64)]
        shards: usize,
    },
    /// The gateway's prefix index under its budget while a whole trace is replayed into it:
    /// bytes per entry (allocator-measured) and lookup latency.
    GatewayIndex {
        /// A Mooncake-format trace (`{"hash_ids": [...]}` a line).
        #[arg(long, value_name = "FILE")]
        trace: PathBuf,
        /// Engines the blocks are spread over.
        #[arg(long, default_value_t = 3)]
        engines: u32,
        /// The index budget, in (engine, block) entries.
        #[arg(long, default_value_t = 100_000)]
        budget: usize,
        /// Tokens per block (the trace's block is 512 tokens).
        #[arg(long, default_value_t = 512)]
        block_tokens: usize,
        /// Also write the results as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// The Mooncake trace replayed against a kvcache server per eviction policy and pool size
    /// (in blocks): block hit rate beside a simulation of the same store, throughput, latency.
    Trace(trace::Plan),
    /// Many clients over TCP and shared memory against three nodes found through etcd (R=2)
    /// while nodes are killed and restarted in a loop and etcd is restarted: fails on any
    /// error, wrong byte, miss of a stored key, leaked lease or page, or RSS growth.
    Soak(soak::Plan),
    /// Runs a kvcache server (used by `compare`; takes kvcache-server's flags).
    #[command(hide = true)]
    ServeKvcache(Box<kvcache_server::config::settings::Settings>),
    /// Runs the raw TCP ceiling server (used by `compare`).
    #[command(hide = true)]
    ServeCeiling {
        #[arg(long)]
        listen: String,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Compare {
            seconds,
            rounds,
            sizes,
            concurrency,
            ops,
            batch,
            mut systems,
            memory,
            client_buffers,
            mooncake_venv,
            json,
        } => {
            check_seconds(seconds)?;
            match &mooncake_venv {
                Some(_) if !systems.contains(&compare::SystemKind::Mooncake) => {
                    systems.push(compare::SystemKind::Mooncake)
                }
                Some(_) => {}
                None => {
                    anyhow::ensure!(
                        !systems.contains(&compare::SystemKind::Mooncake),
                        "--systems mooncake needs --mooncake-venv DIR, a venv made with: {}",
                        systems::mooncake::VENV_HINT
                    );
                    eprintln!(
                        "mooncake: not measured (no --mooncake-venv DIR; make one with: {})",
                        systems::mooncake::VENV_HINT
                    );
                }
            }
            anyhow::ensure!(
                batch.iter().all(|&b| (1..=64).contains(&b)),
                "--batch must be 1..=64"
            );
            anyhow::ensure!(
                concurrency.iter().all(|&c| (1..=64).contains(&c)),
                "--concurrency must be 1..=64"
            );
            anyhow::ensure!(
                sizes.iter().all(|s| s.0 >= 16 && s.0 <= 64 << 20),
                "--sizes must be 16B..=64MiB"
            );
            anyhow::ensure!(
                client_buffers.is_none_or(|b| b.0 <= 1 << 30),
                "--client-buffers must be at most 1GiB (it is per client)"
            );
            let plan = compare::Plan {
                systems,
                sizes,
                concurrency,
                ops,
                batches: batch,
                seconds,
                rounds,
                memory,
                client_buffers: client_buffers.map_or(0, |b| b.0 as usize),
                mooncake_venv,
            };
            let rows = block_on(compare::run(&plan))?;
            println!("{}", compare::report(&rows));
            write_json(json, serde_json::to_value(&rows)?)
        }
        Cmd::Cluster {
            memory,
            value,
            concurrency,
            batch,
            seconds,
            move_blocks,
            json,
        } => {
            check_seconds(seconds)?;
            anyhow::ensure!(
                (1..=64).contains(&concurrency) && (1..=64).contains(&batch),
                "--concurrency and --batch must be 1..=64"
            );
            anyhow::ensure!(
                value.0 >= 16 && value.0 * 8 <= memory.0 && move_blocks > 0,
                "--value must be at least 16B and an eighth of --memory at most"
            );
            let plan = cluster::Plan {
                memory,
                value,
                concurrency,
                batch,
                seconds,
                move_blocks,
            };
            let results = block_on(cluster::run(&plan))?;
            write_json(json, results)
        }
        Cmd::Disk {
            dir,
            memory,
            total,
            value,
            concurrency,
            json,
        } => {
            anyhow::ensure!(
                (1..=64).contains(&concurrency) && value.0 >= 16 && total.0 >= value.0,
                "--concurrency must be 1..=64 and --total at least one --value"
            );
            let plan = disk::Plan {
                dir,
                memory,
                total,
                value,
                concurrency,
            };
            let results = block_on(disk::run(&plan))?;
            write_json(json, results)
        }
        Cmd::Cuda(plan) => {
            plan.check()?;
            let results = block_on(cuda::run(&plan))?;
            write_json(plan.json, results)
        }
        Cmd::IndexMemory { blocks, shards } => {
            anyhow::ensure!(
                blocks > 0 && shards > 0,
                "--blocks and --shards must be positive"
            );
            for policy in [PolicyKind::Lru, PolicyKind::S3fifo] {
                let (measured, reported) = index_memory::measure(blocks, shards, policy);
                println!(
                    "index memory, {blocks} blocks, {shards} shards, {policy:?}: {measured:.1} bytes/block \
                     (allocator-measured), {reported:.1} bytes/block (index's own accounting)"
                );
            }
            Ok(())
        }
        Cmd::GatewayIndex {
            trace,
            engines,
            budget,
            block_tokens,
            json,
        } => {
            anyhow::ensure!(
                engines > 0 && budget > 0 && block_tokens > 0,
                "--engines, --budget and --block-tokens must be positive"
            );
            #[cfg(feature = "gateway")]
            {
                let report = gateway_index::run(&trace, engines, budget, block_tokens)?;
                println!("{report:#?}");
                write_json(json, serde_json::to_value(&report)?)
            }
            #[cfg(not(feature = "gateway"))]
            {
                let _ = (trace, json);
                anyhow::bail!(
                    "this kvcache-bench was built without the gateway: \
                     cargo build --release -p kvcache-bench --features gateway"
                )
            }
        }
        Cmd::Trace(plan) => {
            plan.check()?;
            let report = block_on(trace::run(&plan))?;
            println!("{}", trace::render(&report));
            write_json(plan.json.clone(), serde_json::to_value(&report)?)
        }
        Cmd::Soak(plan) => {
            plan.check()?;
            let report = block_on(soak::run(&plan))?;
            println!("{}", soak::summary(&report));
            let failed = !report.failures.is_empty();
            write_json(plan.json.clone(), serde_json::to_value(&report)?)?;
            anyhow::ensure!(!failed, "the soak failed: {}", report.failures.join("; "));
            Ok(())
        }
        Cmd::ServeKvcache(settings) => kvcache_server::cli::run(*settings),
        Cmd::ServeCeiling { listen } => systems::ceiling::serve(&listen),
    }
}

/// Runs one benchmark's async part on a fresh multi-threaded runtime.
fn block_on<T>(f: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Runtime::new()?.block_on(f)
}

fn check_seconds(seconds: f64) -> anyhow::Result<()> {
    anyhow::ensure!(
        seconds > 0.0 && seconds <= 600.0,
        "--seconds must be in (0, 600]"
    );
    Ok(())
}

/// Writes `results` with the command line and the machine to `path`, if one was given.
fn write_json(path: Option<PathBuf>, results: serde_json::Value) -> anyhow::Result<()> {
    let Some(path) = path else { return Ok(()) };
    let command: Vec<String> = std::env::args().collect();
    let doc = serde_json::json!({
        "command": command.join(" "),
        "machine": machine(),
        "results": results,
    });
    std::fs::write(&path, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
    });
    serde_json::json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_string()),
    })
}
