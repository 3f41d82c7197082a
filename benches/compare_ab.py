"""A/B of two kvcache-bench binaries (e.g. before and after a change) on a shared VM whose speed
drifts by more than the change: `compare` runs one (size, concurrency) at a time, alternating
the two binaries (A then B, then B then A, ...), and each kvcache row is divided by its own
run's ceiling (TCP loopback for kvcache-tcp, memcpy for kvcache-shm), so drift between runs
cancels. Reports per row the median over repetitions of each side's share of its ceiling, and
B's median over A's.

  python3 benches/compare_ab.py --a /var/tmp/kvcache-bench-before --b /var/tmp/kvcache-bench-after \\
      --json benches/results/redesign-ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CEILING = {"kvcache-tcp": "tcp-ceiling", "kvcache-shm": "memcpy-ceiling"}


def run(binary: str, size: str, conc: int, args, out: Path) -> list[dict]:
    cmd = [
        binary, "compare",
        "--systems", "kvcache-tcp,kvcache-shm,tcp-ceiling,memcpy-ceiling",
        "--sizes", size, "--concurrency", str(conc),
        "--seconds", str(args.seconds), "--rounds", str(args.rounds),
        "--memory", "1GiB", "--json", str(out),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())["results"]


def shares(rows: list[dict]) -> dict[tuple[str, str], float]:
    """Each kvcache row's GB/s over its own run's ceiling, by (system, op)."""
    by = {(r["system"], r["op"]): r["gb_per_s"] for r in rows}
    return {(s, op): by[(s, op)] / by[(c, op)] for (s, op) in by if s in CEILING for c in [CEILING[s]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, help="the baseline kvcache-bench binary")
    p.add_argument("--b", required=True, help="the changed kvcache-bench binary")
    p.add_argument("--sizes", default="256KiB,1MiB")
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    samples: dict[tuple, dict[str, list[float]]] = {}
    raw = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for size in args.sizes.split(","):
                for conc in (int(c) for c in args.concurrency.split(",")):
                    order = [("a", args.a), ("b", args.b)]
                    if rep % 2:
                        order.reverse()
                    for side, binary in order:
                        rows = run(binary, size, conc, args, Path(tmp) / "out.json")
                        raw.append({"repeat": rep, "side": side, "size": size, "concurrency": conc, "rows": rows})
                        for (system, op), share in shares(rows).items():
                            samples.setdefault((system, op, size, conc), {"a": [], "b": []})[side].append(share)
                    print(f"repeat {rep + 1}/{args.repeats} {size} x{conc} done", file=sys.stderr, flush=True)
    table = []
    for (system, op, size, conc), s in sorted(samples.items(), key=lambda kv: (kv[0][2], kv[0][3], kv[0][1], kv[0][0])):
        a, b = statistics.median(s["a"]), statistics.median(s["b"])
        row = {
            "system": system,
            "op": op,
            "size": size,
            "concurrency": conc,
            "a_share_of_ceiling": s["a"],
            "b_share_of_ceiling": s["b"],
            "a_median": a,
            "b_median": b,
            "b_over_a": b / a,
        }
        table.append(row)
        print(f"{system:12} {op:4} {size:>7} x{conc}  A {a:.2f}  B {b:.2f}  B/A {b / a:.2f}   A {s['a']}  B {s['b']}")
    doc = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "a": args.a,
        "b": args.b,
        "table": table,
        "raw": raw,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
