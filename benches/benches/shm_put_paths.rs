//! Can a shared-memory put copy the bytes once? Each way a 1 MiB block can get from a client's
//! memory into the node's pool, checksummed, timed in CPU-seconds per GB.
//!
//! Today a put copies twice: the client into its staging window, the node from there into the
//! pool while it hashes each chunk (`Allocation::fill_chunk`). One copy needs either the node
//! to read the client's memory or the client to write pool pages. The paths measured:
//!
//! - `one-copy-bound`: the node's copy-and-hash straight from the client's buffer, as if it
//!   could read it for free: what any one-copy path could cost at best.
//! - `staged`: today's two copies (the client's `memcpy` into a window it reuses, then the
//!   node's copy-and-hash into the pool).
//! - `process_vm_readv`: the node reads the client's memory (another process) straight into
//!   the pool, then hashes each chunk there.
//! - `vmsplice`: the client hands its pages to a pipe, the node reads them into the pool and
//!   hashes each chunk.
//! - `sealed-memfd`: a fresh memfd per put, mapped and written by the client, unmapped, sealed
//!   against writes by the node (the seal fails while any writable mapping exists, so it
//!   proves the client let go) and hashed: the only way found to give a client pages it can
//!   write only until it commits. Reused pages cannot be taken back from a client that still
//!   maps them, so every put needs new ones.
//!
//! Run: `cargo bench -p kvcache-bench --bench shm_put_paths -- --json FILE` (cargo runs it in
//! benches/, so `--json results/shm-put-one-copy.json` lands beside the other results).
//! One thread, sequential; the pool is a 256 MiB memfd written round-robin (beyond the L3), the
//! client's block is one reused 1 MiB buffer (hot, as an engine's KV block just written is).

use std::time::Instant;

use kvcache_core::checksum::{self, CHUNK, Scatter};
use kvcache_transport::{LockMode, MemoryRegion, ShmRegion};

const BLOCK: usize = 1 << 20;
const POOL: usize = 256 << 20;
const PUTS: usize = 2000;
const REPEATS: usize = 3;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1));
    let src: Vec<u8> = (0..BLOCK).map(|i| (i * 7 + i / 4096) as u8).collect();
    let mut huge = HugeBlock::new()?;
    huge.bytes().copy_from_slice(&src);
    let huge = huge.bytes();
    // The same kinds of memory as the node's pool and a client's staging window, touched once
    // so that no run pays for the first faults.
    let mut pool = ShmRegion::new("kvcache-bench-put-paths", POOL, LockMode::Off)?;
    let mut staging =
        ShmRegion::new_writable_by_peers("kvcache-bench-staging", BLOCK, LockMode::Off)?;
    bytes(&mut pool).fill(1);
    bytes(&mut staging).fill(1);
    let client = Client::fork()?;
    let pipe = Pipe::new()?;
    let mut results = Vec::new();
    let mut bound = 0.0;
    println!("path                     GB/s   CPU-s per GB   vs one-copy bound");
    for path in PATHS {
        let mut runs = Vec::new();
        for _ in 0..REPEATS {
            let (t0, c0) = (Instant::now(), thread_cpu());
            let mut sink = 0u64;
            for put in 0..PUTS {
                let at = (put * (BLOCK + 4096)) % (POOL - 2 * BLOCK);
                let dst = &mut bytes(&mut pool)[at..at + BLOCK];
                sink ^= match path {
                    "one-copy-bound" => copy_hashed(&src, dst),
                    "staged" => {
                        let window = bytes(&mut staging);
                        window.copy_from_slice(&src);
                        copy_hashed(window, dst)
                    }
                    "process_vm_readv" => client.pull(src.as_ptr() as usize, dst)?,
                    "process_vm_readv, huge" => client.pull(huge.as_ptr() as usize, dst)?,
                    "vmsplice" => pipe.splice_through(&src, dst)?,
                    "vmsplice, huge" => pipe.splice_through(huge, dst)?,
                    "sealed-memfd" => sealed_memfd_put(&src)?,
                    _ => unreachable!(),
                };
            }
            std::hint::black_box(sink);
            let gb = (PUTS * BLOCK) as f64 / 1e9;
            runs.push((gb / t0.elapsed().as_secs_f64(), (thread_cpu() - c0) / gb));
        }
        runs.sort_by(|a, b| a.1.total_cmp(&b.1));
        let (gbps, cpu) = runs[REPEATS / 2];
        if path == "one-copy-bound" {
            bound = cpu;
        }
        println!("{path:22} {gbps:6.2}   {cpu:12.4}   {:.2}x", bound / cpu);
        results.push(serde_json::json!({
            "path": path, "gb_per_s": gbps, "cpu_s_per_gb": cpu, "vs_one_copy_bound": bound / cpu,
        }));
    }
    if let Some(file) = json {
        let out = serde_json::json!({
            "command": "cargo bench -p kvcache-bench --bench shm_put_paths -- --json ".to_string() + file,
            "block_bytes": BLOCK, "pool_bytes": POOL, "puts_per_run": PUTS, "runs": REPEATS,
            "note": "median of the runs by CPU-s per GB; one thread, sequential",
            "machine": machine(),
            "results": results,
        });
        std::fs::write(file, serde_json::to_string_pretty(&out)? + "\n")?;
    }
    Ok(())
}

const PATHS: [&str; 7] = [
    "one-copy-bound",
    "staged",
    "process_vm_readv",
    "process_vm_readv, huge",
    "vmsplice",
    "vmsplice, huge",
    "sealed-memfd",
];

/// The node's step of every path: copies `src` into the pool chunk by chunk, hashing each
/// chunk on the way, with stores that bypass the caches.
fn copy_hashed(src: &[u8], dst: &mut [u8]) -> u64 {
    let mut sum = 0;
    for i in 0..checksum::chunk_count(src.len()) {
        let r = checksum::chunk_range(src.len(), i);
        let mut segs = [&mut dst[r.clone()]];
        sum ^= checksum::copy_chunk_checked_streaming(&src[r], &mut Scatter::new(&mut segs))
            .unwrap_or_default();
    }
    sum
}

/// Hashes every chunk of a block already in place.
fn hashed(block: &[u8]) -> u64 {
    (0..checksum::chunk_count(block.len()))
        .map(|i| checksum::chunk_checksum(&block[checksum::chunk_range(block.len(), i)]))
        .fold(0, |a, b| a ^ b)
}

/// What the figures depend on: the CPU, the kernel and its transparent huge pages setting.
fn machine() -> serde_json::Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string());
    serde_json::json!({
        "cpu": cpu,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "transparent_hugepage": read("/sys/kernel/mm/transparent_hugepage/enabled").trim(),
    })
}

fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn os_err(what: &str) -> anyhow::Error {
    anyhow::anyhow!("{what}: {}", std::io::Error::last_os_error())
}

/// All of `region`'s bytes.
fn bytes(region: &mut ShmRegion) -> &mut [u8] {
    // SAFETY: the mapping is live and `len` long; `&mut` to the region makes this the only view.
    unsafe { std::slice::from_raw_parts_mut(region.base(), region.len()) }
}

/// The client's block in private anonymous memory, 2 MiB-aligned and advised into a huge page
/// (it stays in 4 KiB pages where the host's transparent huge pages are `never`).
struct HugeBlock {
    map: *mut libc::c_void,
    block: *mut u8,
}

impl HugeBlock {
    const MAP: usize = 4 << 20;
    const HUGE: usize = 2 << 20;

    fn new() -> anyhow::Result<Self> {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        // SAFETY: a fresh anonymous mapping, checked; the block is the 2 MiB-aligned part of it.
        unsafe {
            let map = libc::mmap(std::ptr::null_mut(), Self::MAP, prot, flags, -1, 0);
            if map == libc::MAP_FAILED {
                return Err(os_err("mmap"));
            }
            let block = (map as usize).next_multiple_of(Self::HUGE) as *mut u8;
            libc::madvise(block.cast(), Self::HUGE, libc::MADV_HUGEPAGE);
            Ok(Self { map, block })
        }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: BLOCK bytes from the aligned start lie inside the live mapping.
        unsafe { std::slice::from_raw_parts_mut(self.block, BLOCK) }
    }
}

impl Drop for HugeBlock {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; no view outlives `self`.
        unsafe { libc::munmap(self.map, Self::MAP) };
    }
}

/// A forked copy of this process standing for the client: it holds the same block at the same
/// address, and the node reads it from there.
struct Client {
    pid: libc::pid_t,
}

impl Client {
    fn fork() -> anyhow::Result<Self> {
        // SAFETY: the child only waits to be killed; it touches no lock or allocator.
        match unsafe { libc::fork() } {
            -1 => Err(os_err("fork")),
            0 => loop {
                // SAFETY: pause has no preconditions.
                unsafe { libc::pause() };
            },
            pid => Ok(Self { pid }),
        }
    }

    /// `process_vm_readv` of the client's block at `addr` into `dst` in chunks, each hashed
    /// where it landed.
    fn pull(&self, addr: usize, dst: &mut [u8]) -> anyhow::Result<u64> {
        let mut sum = 0;
        for i in 0..checksum::chunk_count(dst.len()) {
            let r = checksum::chunk_range(dst.len(), i);
            let local = libc::iovec {
                iov_base: dst[r.clone()].as_mut_ptr().cast(),
                iov_len: r.len(),
            };
            let remote = libc::iovec {
                iov_base: (addr + r.start) as *mut _,
                iov_len: r.len(),
            };
            // SAFETY: `local` is our own writable memory of that length; the kernel checks
            // the remote range.
            let n = unsafe { libc::process_vm_readv(self.pid, &local, 1, &remote, 1, 0) };
            if n != r.len() as isize {
                return Err(os_err("process_vm_readv"));
            }
            sum ^= checksum::chunk_checksum(&dst[r]);
        }
        Ok(sum)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // SAFETY: our own child; reaped after the kill.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// A pipe for `vmsplice`, with room for a chunk that straddles one more page than it fills.
struct Pipe {
    rd: libc::c_int,
    wr: libc::c_int,
}

impl Pipe {
    fn new() -> anyhow::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into the array it is given.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            return Err(os_err("pipe"));
        }
        // SAFETY: a descriptor we own; an unprivileged process may grow a pipe to 1 MiB.
        if unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 2 * CHUNK as libc::c_int) } < 0 {
            return Err(os_err("F_SETPIPE_SZ"));
        }
        Ok(Self {
            rd: fds[0],
            wr: fds[1],
        })
    }

    /// The client `vmsplice`s each chunk of `src` (its pages, not a copy); the node reads it
    /// into `dst` and hashes it there.
    fn splice_through(&self, src: &[u8], dst: &mut [u8]) -> anyhow::Result<u64> {
        let mut sum = 0;
        for i in 0..checksum::chunk_count(src.len()) {
            let r = checksum::chunk_range(src.len(), i);
            let iov = libc::iovec {
                iov_base: src[r.clone()].as_ptr() as *mut _,
                iov_len: r.len(),
            };
            // SAFETY: the iovec names `src`, which outlives the read below that drains the
            // pipe; the pipe holds one chunk, so this does not block.
            if unsafe { libc::vmsplice(self.wr, &iov, 1, 0) } != r.len() as isize {
                return Err(os_err("vmsplice"));
            }
            let mut got = 0;
            while got < r.len() {
                let to = &mut dst[r.start + got..r.end];
                // SAFETY: reads into our own writable slice of that length.
                let n = unsafe { libc::read(self.rd, to.as_mut_ptr().cast(), to.len()) };
                if n <= 0 {
                    return Err(os_err("read from the pipe"));
                }
                got += n as usize;
            }
            sum ^= checksum::chunk_checksum(&dst[r]);
        }
        Ok(sum)
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        // SAFETY: descriptors we own, closed once.
        unsafe {
            libc::close(self.rd);
            libc::close(self.wr);
        }
    }
}

/// A put through a fresh memfd: the client maps it, writes the block and unmaps it; the node
/// seals it (which fails while a writable mapping exists), maps it read-only and hashes it.
fn sealed_memfd_put(src: &[u8]) -> anyhow::Result<u64> {
    // SAFETY: a fresh memfd, sized before it is mapped; every mapping is checked and unmapped
    // before the descriptor closes.
    unsafe {
        let fd = libc::memfd_create(c"kvcache-bench-grant".as_ptr(), libc::MFD_ALLOW_SEALING);
        if fd < 0 || libc::ftruncate(fd, src.len() as i64) != 0 {
            return Err(os_err("memfd"));
        }
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let w = libc::mmap(
            std::ptr::null_mut(),
            src.len(),
            prot,
            libc::MAP_SHARED,
            fd,
            0,
        );
        if w == libc::MAP_FAILED {
            return Err(os_err("mmap"));
        }
        std::ptr::copy_nonoverlapping(src.as_ptr(), w.cast(), src.len());
        libc::munmap(w, src.len());
        let seals = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        if libc::fcntl(fd, libc::F_ADD_SEALS, seals) != 0 {
            return Err(os_err("F_ADD_SEALS"));
        }
        let flags = libc::MAP_SHARED | libc::MAP_POPULATE;
        let r = libc::mmap(
            std::ptr::null_mut(),
            src.len(),
            libc::PROT_READ,
            flags,
            fd,
            0,
        );
        if r == libc::MAP_FAILED {
            return Err(os_err("mmap"));
        }
        let sum = hashed(std::slice::from_raw_parts(r.cast(), src.len()));
        libc::munmap(r, src.len());
        libc::close(fd);
        Ok(sum)
    }
}
