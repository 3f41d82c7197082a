"""Per-call cost of kvcache.Client.get_many_into for 64 blocks, against a real kvcache-server.

Rows, in one run on one server: 64 keys that all miss (no payload: the fixed per-call cost of
argument conversion, segment checks, releasing the GIL, one request and its reply), then 64
blocks of 4 KiB, 256 KiB and 1 MiB landing in a numpy array (every byte checked after the
run). Usage:

    python get_many_into_overhead.py [--server-bin PATH] [--calls N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

import kvcache


def start_server(binary: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [binary, "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--memory", "512MiB"],
        stdout=subprocess.PIPE,
        env={**os.environ, "KVCACHE_LOG": "error"},
        text=True,
    )
    assert proc.stdout is not None
    fields = dict(w.split("=", 1) for w in proc.stdout.readline().split() if "=" in w)
    return proc, fields["data"]


def measure(client: kvcache.Client, block: int, calls: int, *, present: bool = True) -> dict[str, float]:
    keys = [(block << 32 | i | (0 if present else 1 << 31)).to_bytes(16, "big") for i in range(64)]
    src = np.random.default_rng(block).integers(0, 255, (64, block), dtype=np.uint8)
    if present:
        assert all(client.put_many(keys, [[(src.ctypes.data + i * block, block)] for i in range(64)]))
    dst = np.zeros_like(src)
    segs = [[(dst.ctypes.data + i * block, block)] for i in range(64)]
    for _ in range(min(50, calls)):
        client.get_many_into(keys, segs)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        hits = client.get_many_into(keys, segs)
        times.append(time.perf_counter() - t0)
    assert all(hits) == present and (np.array_equal(src, dst) or not present)
    times.sort()
    return {
        "keys_present": present,
        "block_bytes": block,
        "blocks_per_call": 64,
        "calls": calls,
        "p50_us": statistics.median(times) * 1e6,
        "p99_us": times[int(len(times) * 0.99) - 1] * 1e6,
        "per_block_p50_us": statistics.median(times) * 1e6 / 64,
        "gb_per_s": 64 * block / statistics.median(times) / 1e9 if present else 0.0,
    }


def main() -> None:
    repo = Path(__file__).resolve().parents[2]
    default_bin = Path(os.environ.get("CARGO_TARGET_DIR", repo / "target")) / "release" / "kvcache-server"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server-bin", default=str(default_bin))
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    proc, addr = start_server(args.server_bin)
    try:
        client = kvcache.Client(addr)
        rows = [measure(client, 4096, args.calls, present=False)]
        rows += [
            measure(client, block, args.calls if block < 1 << 20 else max(50, args.calls // 20))
            for block in (4096, 256 * 1024, 1 << 20)
        ]
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    for r in rows:
        what = f"64 x {r['block_bytes'] // 1024:>5} KiB" if r["keys_present"] else "64 misses      "
        print(
            f"get_many_into {what}: p50 {r['p50_us']:9.1f} us  "
            f"p99 {r['p99_us']:9.1f} us  ({r['per_block_p50_us']:.2f} us/key, {r['gb_per_s']:.2f} GB/s)"
        )
    if args.json:
        args.json.write_text(json.dumps({"transport": "tcp", "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
