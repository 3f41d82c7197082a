#!/usr/bin/env python3
"""Mooncake Store as a comparison system for `kvcache-bench compare`.

Mooncake is driven only through the public Python API of the PyPI package
`mooncake-transfer-engine-non-cuda` (module `mooncake.store`, class `MooncakeDistributedStore`) and the
`mooncake_master` executable it installs. No Mooncake code is copied here.

Topology (all on 127.0.0.1):

* `mooncake_master`: object metadata and space allocation; with `--enable_http_metadata_server` it also
  serves the transfer-engine metadata (`http://127.0.0.1:PORT/metadata`), so no etcd is needed.
  `P2PHANDSHAKE` (no metadata server at all) also works with 0.3.13 and can be chosen instead.
* one *holder* process: a store client that mounts a segment of `--segment-bytes` (the memory pool that
  holds every value) and then only stays alive.
* the *driver*: `C` worker processes (separate processes, so the GIL serialises nothing), each its own
  store client set up with `global_segment_size=0`, protocol `tcp`. A row's workers are started once
  (`RowDriver`) and kept across its slices, as `compare` keeps its connections across a row's slices.

Modes: `serve` is how `kvcache-bench compare --mooncake-venv DIR` runs it (master and holder for the
whole run, then rows and slices on stdin, one JSON answer a line, so Mooncake's slices interleave
with the other systems'); `run-all` measures a grid alone; `drive` one row; `holder` is internal.

Why the driver mounts no segment: a client that owns a segment can be handed a replica in its own
memory, and then put/get are served by a local memcpy instead of the transfer engine. With no segment
in the driver, every replica lives in the holder, so each value really crosses Mooncake's TCP transport
(driver -> holder for put, holder -> driver for get), which is what the other `compare` systems pay too.
`run-all` records the loopback byte counter around each drive as evidence (`lo_bytes` vs `moved_bytes`:
a ratio of about 1.0 means every value put or read crossed a TCP socket). `MC_TCP_BIND_ADDRESS=127.0.0.1`
keeps the transfer connections on 127.0.0.1.

What is measured, per (op, value size, batch, concurrency):

* put: distinct new keys, `B` values per call (`batch_put_from` when B > 1, `put_from` when B = 1),
  from a buffer registered once with `register_buffer` (Mooncake's zero-copy path). Each value is a
  fixed pseudo-random pattern with the key id stamped in its first and last 8 bytes. A full pool makes
  Mooncake refuse puts (its eviction runs in the background and does not keep up), so each worker keeps
  at most pool/2/C bytes of its own keys: past that it removes its oldest half, with the clock paused.
* get: a working set prepared before the clock starts (as many values as fit in a quarter of the pool,
  at least one per value in flight, at most 256 unless more are in flight, like `compare`), read in
  rotation with `batch_get_into` / `get_into` into a registered buffer. Every value read is checked
  in full (stamps and body, by memcmp); the stamps are poisoned before each call, so a call that writes
  nothing cannot pass. Verification runs inside the measured loop but outside the per-call latency.
* clock: per slice, all workers start together after setup; a warm-up of min(S/4, 0.1 s) is not
  measured, then each worker runs for S seconds. `ops_per_s` = values completed without error / the longest worker span,
  `gb_per_s` = ops_per_s * value_bytes / 1e9, `p50_us`/`p99_us` are per-call latencies (one call moves
  `batch` values). `errors` counts values whose call returned an error; `wrong` counts bytes that differ
  from what was put. Setup, buffer registration, working-set preparation and clean-up are not timed.

Every loop is bounded in count and time; every child process is terminated on exit, including on errors.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import glob
import json
import mmap
import multiprocessing as mp
import os
import queue
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

SYSTEM = "mooncake"
# Calls per worker and row, whatever the clock says (as `compare`'s MAX_OPS_PER_TASK).
MAX_CALLS_PER_WORKER = 2_000_000
# Working set for gets, as `compare`: a quarter of the pool, clamped to [in_flight, max(in_flight, 256)].
WORKING_SET_CAP = 256
PATTERN_SEED = 0x6B7663  # "kvc"
STAMP = struct.Struct("<Q")
# Seconds to wait for a process to come up / go down.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
# A worker whose parent sends nothing for this long cleans up and leaves (rows are never this long).
IDLE_TIMEOUT_S = 900.0


# --------------------------------------------------------------------------------------------------
# Loading the Mooncake module
# --------------------------------------------------------------------------------------------------


def _cudart_dirs() -> list[str]:
    """Folders holding libcudart.so.12 from the `nvidia-cuda-runtime-cu12` wheel, if installed."""
    found = []
    for p in sys.path:
        found += glob.glob(os.path.join(p, "nvidia", "cuda_runtime", "lib", "libcudart.so.12"))
    return sorted({os.path.dirname(f) for f in found})


def load_store_class() -> Any:
    """Imports `MooncakeDistributedStore`.

    The 0.3.13 non-CUDA wheel still links `store.so` against libcudart.so.12 (Mooncake issue #3314);
    when the import fails for that reason, the library from the `nvidia-cuda-runtime-cu12` wheel is
    loaded first (no GPU is used or needed).
    """
    try:
        from mooncake.store import MooncakeDistributedStore
    except ImportError as e:
        if "libcudart" not in str(e):
            raise
        dirs = _cudart_dirs()
        if not dirs:
            raise ImportError(f"{e}; install nvidia-cuda-runtime-cu12 into this environment") from e
        ctypes.CDLL(os.path.join(dirs[0], "libcudart.so.12"), mode=ctypes.RTLD_GLOBAL)
        from mooncake.store import MooncakeDistributedStore
    return MooncakeDistributedStore


# Mooncake's TCP transport otherwise connects to the host's first non-loopback address (seen: eth0),
# even with local_hostname=127.0.0.1; with this it connects over 127.0.0.1. Its listeners stay on 0.0.0.0.
MOONCAKE_ENV = {"MC_LOG_LEVEL": "WARNING", "MC_TCP_BIND_ADDRESS": "127.0.0.1"}


def child_env() -> dict[str, str]:
    """Environment for child processes: loopback transport, quiet logs, libcudart findable by the master."""
    env = dict(os.environ)
    for k, v in MOONCAKE_ENV.items():
        env.setdefault(k, v)
    dirs = _cudart_dirs()
    if dirs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(dirs + [p for p in [env.get("LD_LIBRARY_PATH", "")] if p])
    return env


def setup_store(master: str, metadata: str, segment_bytes: int, local_buffer_bytes: int) -> Any:
    """A store client on 127.0.0.1 using the TCP transport."""
    store = load_store_class()()
    rc = store.setup("127.0.0.1", metadata, segment_bytes, local_buffer_bytes, "tcp", "", master)
    if rc != 0:
        raise RuntimeError(f"MooncakeDistributedStore.setup returned {rc}")
    return store


# --------------------------------------------------------------------------------------------------
# Buffers and patterns
# --------------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.memcmp.restype = ctypes.c_int


def mmap_addr(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


class Slots:
    """`batch` value slots in one anonymous mapping, registered with the store once.

    The expected value for key `k` is the shared pattern with `k` stamped in its first and last 8 bytes.
    """

    def __init__(self, store: Any, size: int, batch: int) -> None:
        if size < 16:
            raise ValueError("values must be at least 16 bytes (two stamps)")
        self.store, self.size, self.batch = store, size, batch
        self.map = mmap.mmap(-1, size * batch)
        self.base = mmap_addr(self.map)
        self.pattern = mmap.mmap(-1, size)
        self.pattern[:] = random.Random(PATTERN_SEED).randbytes(size)
        self.pattern_addr = mmap_addr(self.pattern)
        for j in range(batch):
            self.map[j * size : (j + 1) * size] = self.pattern[:]
        rc = store.register_buffer(self.base, size * batch)
        if rc != 0:
            raise RuntimeError(f"register_buffer returned {rc}")
        self.ptrs = [self.base + j * size for j in range(batch)]
        self.sizes = [size] * batch

    def stamp(self, j: int, key_id: int) -> None:
        off, s = j * self.size, STAMP.pack(key_id)
        self.map[off : off + 8] = s
        self.map[off + self.size - 8 : off + self.size] = s

    def poison(self, j: int) -> None:
        self.stamp(j, 0xFFFF_FFFF_FFFF_FFFF)

    def wrong_bytes(self, j: int, key_id: int) -> int:
        """Bytes of slot `j` that differ from the value put under `key_id` (0 when it matches)."""
        off, n = j * self.size, self.size
        s = STAMP.pack(key_id)
        body_ok = _libc.memcmp(self.base + off + 8, self.pattern_addr + 8, n - 16) == 0
        if body_ok and self.map[off : off + 8] == s and self.map[off + n - 8 : off + n] == s:
            return 0
        want = bytearray(self.pattern[:])
        want[:8], want[n - 8 :] = s, s
        got = self.map[off : off + n]
        return sum(1 for a, b in zip(got, want, strict=True) if a != b)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.store.unregister_buffer(self.base)


# --------------------------------------------------------------------------------------------------
# Driver workers
# --------------------------------------------------------------------------------------------------


def _call(store: Any, slots: Slots, op: str, keys: list[str]) -> list[int]:
    """One put or get call of len(keys) values; returns Mooncake's per-value result codes."""
    b = len(keys)
    if op == "put":
        if b == 1:
            return [store.put_from(keys[0], slots.ptrs[0], slots.size)]
        return list(store.batch_put_from(keys, slots.ptrs[:b], slots.sizes[:b]))
    if b == 1:
        return [store.get_into(keys[0], slots.ptrs[0], slots.size)]
    return list(store.batch_get_into(keys, slots.ptrs[:b], slots.sizes[:b]))


def _ok(op: str, rc: int, size: int) -> bool:
    # put/put_from return 0 on success; get_into returns the bytes read.
    return rc == 0 if op == "put" else rc == size


def _prepare(store: Any, slots: Slots, cfg: dict[str, Any], prefix: str) -> list[tuple[str, int]]:
    """The worker's share of a get row's working set, put before any clock starts."""
    size, batch, conc = cfg["size"], cfg["batch"], cfg["concurrency"]
    in_flight = conc * batch
    total = min(max(cfg["pool_bytes"] // 4 // size, in_flight), max(in_flight, WORKING_SET_CAP))
    n = max(batch, -(-total // conc))
    working = [(f"{prefix}{i + 1}", i + 1) for i in range(n)]
    for i in range(0, n, batch):
        chunk = working[i : i + batch]
        for j, (_, kid) in enumerate(chunk):
            slots.stamp(j, kid)
        rcs = _call(store, slots, "put", [k for k, _ in chunk])
        if not all(rc == 0 for rc in rcs):
            raise RuntimeError(f"preparing the working set: put returned {rcs}")
    return working


class _WorkerState:
    """What a worker keeps across the slices of its row: its keys, the next key id, the bytes moved."""

    def __init__(self, prefix: str, working: list[tuple[str, int]]) -> None:
        self.prefix, self.working = prefix, working
        self.own_keys = [k for k, _ in working]
        self.next_id = len(working) + 1
        self.moved = 0


def _measure(store: Any, slots: Slots, cfg: dict[str, Any], st: _WorkerState, seconds: float) -> dict[str, Any]:
    """One slice: a warm-up of min(seconds/4, 0.1 s), then `seconds` of calls back to back."""
    size, batch, op, conc = cfg["size"], cfg["batch"], cfg["op"], cfg["concurrency"]
    warmup = min(seconds / 4, 0.1)
    begin = time.monotonic()
    warm_end, end = begin + warmup, begin + warmup + seconds
    lat_ns: list[int] = []
    good = errors = wrong = 0
    first_err = ""
    measured_start = measured_end = paused_s = 0.0
    put_budget = max(cfg["pool_bytes"] // 2 // conc, 2 * batch * size)
    working = st.working
    for i in range(MAX_CALLS_PER_WORKER):
        now = time.monotonic()
        if now >= end:
            break
        measured = now >= warm_end
        if measured and not measured_start:
            measured_start = now
        if op == "put":
            ids = list(range(st.next_id, st.next_id + batch))
            st.next_id += batch
            for j, kid in enumerate(ids):
                slots.stamp(j, kid)
            keys = [f"{st.prefix}{kid}" for kid in ids]
        else:
            picks = [working[(i * batch + j) % len(working)] for j in range(batch)]
            for j in range(batch):
                slots.poison(j)
            keys, ids = [k for k, _ in picks], [kid for _, kid in picks]
        t0 = time.perf_counter_ns()
        try:
            rcs = _call(store, slots, op, keys)
        except Exception as e:  # a binding error counts like an error code
            rcs = [-1] * batch
            first_err = first_err or repr(e)
        dt = time.perf_counter_ns() - t0
        if op == "put":
            st.own_keys += keys
            if len(st.own_keys) * size > put_budget:
                # Untimed: drop this worker's oldest half, so puts never meet a full pool.
                t_pause = time.monotonic()
                half = len(st.own_keys) // 2
                for k in range(0, half, 512):
                    store.batch_remove(st.own_keys[k : min(k + 512, half)], True)
                del st.own_keys[:half]
                paused = time.monotonic() - t_pause
                end += paused
                if measured:
                    paused_s += paused
                else:
                    warm_end += paused
        n_ok = 0
        for j, rc in enumerate(rcs):
            if not _ok(op, rc, size):
                if measured:
                    errors += 1
                first_err = first_err or f"{op} {keys[j]} -> {rc}"
                continue
            n_ok += 1
            if op == "get":
                w = slots.wrong_bytes(j, ids[j])
                if w and measured:
                    wrong += w
                first_err = first_err or (f"get {keys[j]}: {w} wrong bytes" if w else "")
        st.moved += n_ok * size
        if measured:
            lat_ns.append(dt)
            good += n_ok
            measured_end = time.monotonic()
    return {
        "lat_ns": lat_ns,
        "values": good,
        "span_s": max(measured_end - measured_start - paused_s, 0.0),
        "errors": errors,
        "wrong": wrong,
        "first_error": first_err,
    }


def _worker(idx: int, cfg: dict[str, Any], commands: Any, results: Any) -> None:
    """One driver process: its own store client (no segment) and keys. It answers ("ready", ...) once
    set up, then one result per ("slice", seconds) command, until ("end",) (or the parent goes quiet)."""
    store = None
    slots = None
    st: _WorkerState | None = None
    try:
        store = setup_store(cfg["master"], cfg["metadata"], 0, cfg["local_buffer_bytes"])
        slots = Slots(store, cfg["size"], cfg["batch"])
        prefix = f"{cfg['run_id']}-{cfg['op']}-s{cfg['size']}-b{cfg['batch']}-w{idx}-"
        working = _prepare(store, slots, cfg, prefix) if cfg["op"] == "get" else []
        st = _WorkerState(prefix, working)
        results.put({"idx": idx, "ready": True})
        while True:
            cmd = commands.get(timeout=IDLE_TIMEOUT_S)
            if cmd[0] != "slice":
                break
            moved_before = st.moved
            out = _measure(store, slots, cfg, st, cmd[1])
            results.put({"idx": idx, "moved_bytes": st.moved - moved_before, **out})
    except queue.Empty:
        pass  # the parent is gone or stuck: clean up and leave
    except Exception as e:
        results.put({"idx": idx, "fatal": repr(e)})
    finally:
        # Clean-up is untimed: drop this worker's keys so the next row starts from an empty pool.
        if store is not None and st is not None:
            with contextlib.suppress(Exception):
                for i in range(0, len(st.own_keys), 512):
                    store.batch_remove(st.own_keys[i : i + 512], True)
        if slots is not None:
            slots.close()
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()


def _pct(sorted_ns: Sequence[int], p: float) -> float:
    if not sorted_ns:
        return 0.0
    return sorted_ns[min(int(len(sorted_ns) * p), len(sorted_ns) - 1)] / 1e3


class RowDriver:
    """`concurrency` worker processes for one row (op, value size, batch), kept across the row's slices
    as `compare` keeps its connections, so no slice pays process start, client setup or registration."""

    def __init__(
        self,
        master: str,
        metadata: str,
        op: str,
        size: int,
        batch: int,
        concurrency: int,
        pool_bytes: int,
        local_buffer_bytes: int = 0,
    ) -> None:
        if op not in ("put", "get"):
            raise ValueError(f"op must be put or get, not {op!r}")
        self.label = f"{op} {size} b{batch} x{concurrency}"
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(concurrency)]
        cfg = dict(
            master=master,
            metadata=metadata,
            size=size,
            batch=batch,
            concurrency=concurrency,
            op=op,
            pool_bytes=pool_bytes,
            local_buffer_bytes=local_buffer_bytes,
            run_id=f"mcb{os.getpid()}-{time.time_ns()}",
        )
        self.procs = [
            ctx.Process(target=_worker, args=(i, cfg, self.commands[i], self.results), daemon=True)
            for i in range(concurrency)
        ]
        try:
            for p in self.procs:
                p.start()
            self._collect(START_TIMEOUT_S + 30)
        except BaseException:
            self.close()
            raise

    def _collect(self, timeout: float) -> list[dict[str, Any]]:
        """One message from every worker; raises on a worker's fatal error or silence."""
        deadline = time.monotonic() + timeout
        outs = []
        try:
            for _ in self.procs:
                outs.append(self.results.get(timeout=max(deadline - time.monotonic(), 0.1)))
        except queue.Empty:
            raise RuntimeError(f"{self.label}: workers did not answer in time") from None
        fatal = [o["fatal"] for o in outs if "fatal" in o]
        if fatal:
            raise RuntimeError(f"{self.label}: {fatal[0]}")
        return outs

    def slice(self, seconds: float) -> dict[str, Any]:
        """Every worker measures one slice at once; their latencies and counts, merged."""
        for q in self.commands:
            q.put(("slice", seconds))
        outs = self._collect(seconds * 2 + START_TIMEOUT_S)
        return {
            "lat_ns": [ns for o in outs for ns in o["lat_ns"]],
            "span_s": max(o["span_s"] for o in outs),
            "values": sum(o["values"] for o in outs),
            "errors": sum(o["errors"] for o in outs),
            "wrong": sum(o["wrong"] for o in outs),
            "moved_bytes": sum(o["moved_bytes"] for o in outs),
            "first_error": next((o["first_error"] for o in outs if o["first_error"]), ""),
        }

    def close(self) -> None:
        """Ends the workers (they remove their keys first); the ones that do not leave are killed."""
        for q in self.commands:
            with contextlib.suppress(Exception):
                q.put(("end",))
        for p in self.procs:
            if p.pid is not None:
                p.join(STOP_TIMEOUT_S)
            if p.is_alive():
                p.terminate()
                p.join(STOP_TIMEOUT_S)
            if p.is_alive():
                p.kill()
                p.join(STOP_TIMEOUT_S)

    def __enter__(self) -> RowDriver:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def drive(
    master: str,
    metadata: str,
    size: int,
    batch: int,
    concurrency: int,
    seconds: float,
    op: str,
    pool_bytes: int,
    local_buffer_bytes: int = 0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Runs one row as one slice with `concurrency` worker processes; returns (row, evidence)."""
    with RowDriver(master, metadata, op, size, batch, concurrency, pool_bytes, local_buffer_bytes) as r:
        lo_before = loopback_bytes()
        m = r.slice(seconds)
        lo_after = loopback_bytes()
    lat = sorted(m["lat_ns"])
    span = m["span_s"]
    ops_per_s = m["values"] / span if span > 0 else 0.0
    row = {
        "system": SYSTEM,
        "op": op,
        "value_bytes": size,
        "batch": batch,
        "concurrency": concurrency,
        "ops_per_s": ops_per_s,
        "gb_per_s": ops_per_s * size / 1e9,
        "p50_us": _pct(lat, 0.50),
        "p99_us": _pct(lat, 0.99),
        "errors": m["errors"],
        "wrong": m["wrong"],
    }
    evidence = {
        "op": op,
        "value_bytes": size,
        "batch": batch,
        "concurrency": concurrency,
        "calls": len(lat),
        "moved_bytes": m["moved_bytes"],
        "lo_bytes": (lo_after - lo_before) if lo_before is not None and lo_after is not None else None,
        "first_error": m["first_error"],
    }
    return row, evidence


def loopback_bytes() -> int | None:
    """Bytes received on `lo` so far (each loopback packet is counted once), or None off Linux."""
    try:
        for line in Path("/proc/net/dev").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[0])
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------------------------------
# Holder
# --------------------------------------------------------------------------------------------------


def holder(master: str, metadata: str, segment_bytes: int, ready_file: str, max_seconds: float) -> None:
    """Mounts the pool segment, writes `ready_file`, then stays alive until SIGTERM/SIGINT (or max_seconds)."""
    stop = False

    def on_signal(_sig: int, _frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    store = setup_store(master, metadata, segment_bytes, 16 << 20)
    try:
        tmp = f"{ready_file}.tmp"
        Path(tmp).write_text(json.dumps({"pid": os.getpid(), "segment_bytes": segment_bytes}))
        os.replace(tmp, ready_file)
        end = time.monotonic() + max_seconds
        while not stop and time.monotonic() < end:
            time.sleep(0.2)
    finally:
        store.close()


# --------------------------------------------------------------------------------------------------
# run-all: master + holder + grid
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            hint = ""
            if proc.returncode == 127:
                # The dynamic loader's exit code: Mooncake's binaries link libibverbs and
                # librdmacm even in the non-CUDA wheel.
                hint = " (a shared library is missing: `ldd` it; Debian: apt-get install libibverbs1 librdmacm1)"
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}{hint}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"port {port} did not open in {timeout}s")


def master_binary() -> str:
    here = Path(sys.executable).parent / "mooncake_master"
    found = str(here) if here.exists() else shutil.which("mooncake_master")
    if not found:
        raise FileNotFoundError("mooncake_master not found next to this Python or on PATH")
    return found


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)


@contextlib.contextmanager
def cluster(segment_bytes: int, metadata_mode: str, workdir: str) -> Iterator[tuple[str, str, int]]:
    """Starts master and holder; yields (master addr, metadata url, holder pid); stops both on exit."""
    env = child_env()
    rpc, metrics, http = free_port(), free_port(), free_port()
    master = f"127.0.0.1:{rpc}"
    cmd = [
        master_binary(),
        "--rpc_address=127.0.0.1",
        f"--rpc_port={rpc}",
        "--metrics_host=127.0.0.1",
        f"--metrics_port={metrics}",
        "--rpc_thread_num=4",
    ]
    if metadata_mode == "http":
        cmd += [
            "--enable_http_metadata_server=true",
            "--http_metadata_server_host=127.0.0.1",
            f"--http_metadata_server_port={http}",
        ]
        metadata = f"http://127.0.0.1:{http}/metadata"
    else:
        metadata = "P2PHANDSHAKE"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(os.path.join(workdir, "master.log"), "wb") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
        wait_port(rpc, procs[0], START_TIMEOUT_S)
        if metadata_mode == "http":
            wait_port(http, procs[0], START_TIMEOUT_S)
        ready = os.path.join(workdir, "holder.ready")
        hcmd = [sys.executable, os.path.abspath(__file__), "holder", "--master", master, "--metadata", metadata]
        hcmd += ["--segment-bytes", str(segment_bytes), "--ready-file", ready]
        with open(os.path.join(workdir, "holder.log"), "wb") as log:
            procs.append(subprocess.Popen(hcmd, stdout=log, stderr=subprocess.STDOUT, env=env))
        end = time.monotonic() + START_TIMEOUT_S
        while not os.path.exists(ready):
            if procs[1].poll() is not None or time.monotonic() > end:
                # The work directory goes when this fails, so the log's end goes in the error.
                with open(os.path.join(workdir, "holder.log"), "rb") as log:
                    tail = log.read().decode(errors="replace").strip().splitlines()[-15:]
                raise RuntimeError("holder did not become ready; its log ends:\n" + "\n".join(tail))
            time.sleep(0.1)
        yield master, metadata, procs[1].pid
    finally:
        for p in reversed(procs):
            stop_process(p)


def _sizes(text: str) -> list[int]:
    units = {"k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30, "": 1}
    out = []
    for part in text.split(","):
        p = part.strip().lower()
        num = p.rstrip("kimgb")
        out.append(int(float(num) * units[p[len(num) :]]))
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def format_row(r: dict[str, Any]) -> str:
    return (
        f"{r['system']:<14} {r['op']:<4} {r['value_bytes']:>8} x{r['concurrency']:<3} b{r['batch']:<3} "
        f"{r['ops_per_s']:>10.0f} ops/s {r['gb_per_s']:>7.2f} GB/s  p50 {r['p50_us']:>9.1f} us  "
        f"p99 {r['p99_us']:>9.1f} us  errors {r['errors']} wrong {r['wrong']}"
    )


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows, evidence = [], []
    workdir = tempfile.mkdtemp(prefix="mooncake-bench-")
    try:
        with cluster(args.segment_bytes, args.metadata_mode, workdir) as (master, metadata, _holder_pid):
            logs = f", logs in {workdir}" if args.keep_logs else ""
            print(f"# master {master}, metadata {metadata}{logs}", file=sys.stderr)
            for size in _sizes(args.sizes):
                for conc in _ints(args.concurrency):
                    shapes = [("put", b) for b in _ints(args.put_batches)] + [("get", b) for b in _ints(args.batches)]
                    for op, batch in shapes:
                        row, ev = drive(master, metadata, size, batch, conc, args.seconds, op, args.segment_bytes)
                        rows.append(row)
                        evidence.append(ev)
                        print(format_row(row), file=sys.stderr)
                        lo = ev["lo_bytes"]
                        ratio = f"{lo / ev['moved_bytes']:.2f}" if lo is not None and ev["moved_bytes"] else "n/a"
                        print(f"#   moved {ev['moved_bytes']} B, loopback {lo} B (x{ratio})", file=sys.stderr)
    finally:
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
    _write(args.json, rows, evidence)
    return rows


def serve(args: argparse.Namespace) -> None:
    """Mooncake as a system of `kvcache-bench compare`, which interleaves its slices with the other
    systems': starts master and holder, says `{"ready": ...}` on stdout, then answers one JSON line per
    command line on stdin until stdin closes:

    - `{"cmd": "row", "op", "size", "batch", "concurrency"}`: starts the row's workers (and, for gets,
      puts its working set); the previous row's workers end first;
    - `{"cmd": "slice", "seconds"}`: one measured slice of the row: `lat_ns` (per call), `span_s`,
      `values`, `errors`, `wrong`, `moved_bytes`, `lo_bytes`, `first_error`;
    - `{"cmd": "end"}`: ends the row's workers.

    A failed command answers `{"error": "..."}` and the server stays up for the next one."""
    workdir = tempfile.mkdtemp(prefix="mooncake-serve-")
    row: RowDriver | None = None

    def answer(doc: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()

    try:
        with cluster(args.segment_bytes, args.metadata_mode, workdir) as (master, metadata, _holder_pid):
            answer({"ready": True, "master": master, "metadata": metadata, "logs": workdir})
            for line in sys.stdin:
                if not line.strip():
                    continue
                try:
                    cmd = json.loads(line)
                    if cmd["cmd"] in ("row", "end") and row is not None:
                        row.close()
                        row = None
                    if cmd["cmd"] == "row":
                        row = RowDriver(
                            master,
                            metadata,
                            cmd["op"],
                            int(cmd["size"]),
                            int(cmd["batch"]),
                            int(cmd["concurrency"]),
                            args.segment_bytes,
                        )
                        answer({"ok": True})
                    elif cmd["cmd"] == "slice":
                        if row is None:
                            raise ValueError("`slice` before `row`")
                        lo_before = loopback_bytes()
                        m = row.slice(float(cmd["seconds"]))
                        lo_after = loopback_bytes()
                        lo = lo_after - lo_before if lo_before is not None and lo_after is not None else None
                        answer({"ok": True, "lo_bytes": lo, **m})
                    elif cmd["cmd"] == "end":
                        answer({"ok": True})
                    else:
                        raise ValueError(f"unknown command {cmd['cmd']!r}")
                except Exception as e:
                    answer({"error": f"{type(e).__name__}: {e}"})
    finally:
        if row is not None:
            row.close()
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)


def _write(path: str | None, rows: list[dict[str, Any]], evidence: list[dict[str, Any]]) -> None:
    doc = {"command": " ".join(sys.argv), "results": rows, "evidence": evidence}
    text = json.dumps(doc, indent=2)
    print(json.dumps(rows))
    if path:
        Path(path).write_text(text + "\n")


def _exit_on_signal(sig: int, _frame: Any) -> None:
    raise SystemExit(128 + sig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    h = sub.add_parser("holder", help="mount the pool segment and stay alive until SIGTERM")
    h.add_argument("--master", required=True)
    h.add_argument("--metadata", required=True, help="http://127.0.0.1:PORT/metadata or P2PHANDSHAKE")
    h.add_argument("--segment-bytes", type=int, required=True)
    h.add_argument("--ready-file", required=True)
    h.add_argument("--max-seconds", type=float, default=3600.0, help="exit after this long even without SIGTERM")

    d = sub.add_parser("drive", help="measure one row (op, size, batch, concurrency)")
    d.add_argument("--master", required=True)
    d.add_argument("--metadata", required=True)
    d.add_argument("--size", type=int, required=True, help="value bytes")
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("--concurrency", type=int, default=1)
    d.add_argument("--seconds", type=float, default=2.0)
    d.add_argument("--op", choices=["put", "get"], required=True)
    d.add_argument("--pool-bytes", type=int, default=1 << 30, help="the holder's segment size (sizes the working set)")
    d.add_argument("--local-buffer-bytes", type=int, default=0)
    d.add_argument("--json", help="write {command, results, evidence} here")

    r = sub.add_parser("run-all", help="start master + holder, run the grid, stop everything")
    r.add_argument("--sizes", default="256KiB,1MiB")
    r.add_argument("--concurrency", default="1,4")
    r.add_argument("--batches", default="1,8", help="values per get call")
    r.add_argument("--put-batches", default="1", help="values per put call (compare puts one value per call)")
    r.add_argument("--seconds", type=float, default=2.0)
    r.add_argument("--segment-bytes", type=int, default=1 << 30)
    r.add_argument("--metadata-mode", choices=["http", "p2p"], default="http")
    r.add_argument("--keep-logs", action="store_true")
    r.add_argument("--json")

    v = sub.add_parser("serve", help="for `kvcache-bench compare`: master + holder, then rows and slices on stdin")
    v.add_argument("--segment-bytes", type=int, default=1 << 30)
    v.add_argument("--metadata-mode", choices=["http", "p2p"], default="http")
    v.add_argument("--keep-logs", action="store_true")

    args = ap.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every `finally` stops its children.
    if args.cmd != "holder":
        signal.signal(signal.SIGTERM, _exit_on_signal)
    for k, v in MOONCAKE_ENV.items():  # inherited by the holder and every driver worker
        os.environ.setdefault(k, v)
    if args.cmd == "holder":
        holder(args.master, args.metadata, args.segment_bytes, args.ready_file, args.max_seconds)
    elif args.cmd == "drive":
        row, ev = drive(
            args.master,
            args.metadata,
            args.size,
            args.batch,
            args.concurrency,
            args.seconds,
            args.op,
            args.pool_bytes,
            args.local_buffer_bytes,
        )
        print(format_row(row), file=sys.stderr)
        _write(args.json, [row], [ev])
    elif args.cmd == "serve":
        serve(args)
    else:
        run_all(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
