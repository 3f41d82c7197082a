"""Gateway benchmarks against real `vllm serve` instances on CPU (not tests; results go to
benches/results/ with the command that produced them).

  replay    a scaled slice of the Mooncake FAST'25 trace through the gateway, once per
            strategy, each on a fresh stack (engines with the kvcache connector and KV events,
            a kvcache-server, the gateway): TTFT p50/p90, throughput, local and external
            prefix-cache hit rates, refused requests, the gateway's CPU per request.
  overhead  what the gateway adds to a short request: the same requests straight to a backend
            and through the gateway, interleaved, p50 and p90 of each and their difference.
  pd        the same replay, cache-aware, on two instances both ways in one sitting:
            aggregated (two `both` engines) and disaggregated (1 prefill + 1 decode): TTFT,
            inter-token latency, and the KV moved through the cache per request (bytes, the
            decode engine's load time, GB/s).

Run with the vLLM venv's python (scripts/setup-vllm.sh), after `cargo build --release -p
kvcache-gateway -p kvcache-server`:

  $VENV/bin/python benches/gateway/replay.py replay --json benches/results/gateway-replay.json
  $VENV/bin/python benches/gateway/replay.py overhead --json benches/results/gateway-overhead.json
  $VENV/bin/python benches/gateway/replay.py pd --json benches/results/gateway-pd.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "gateway" / "tests" / "e2e"))

from gwstack import KEY, Gateway, call, lookup_namespace, wait_for  # noqa: E402
from kvserver import free_port, start_server, stop_server  # noqa: E402
from vllm_serve import Serve, models_dir  # noqa: E402

STRATEGIES = ["random", "round-robin", "least-request", "prefix", "cache-aware"]
TRACE = REPO.parent / "shared" / "traces" / "synthetic_trace.jsonl"
VOCAB = (3, 400)  # token ids inside the tiny model's vocabulary
# The Mooncake paper's Fig. 5 (its cluster, average TTFT, seconds).
PAPER_FIG5 = {
    "random": 19.65,
    "load-balanced": 5.27,
    "local cache-aware": 3.58,
    "global cache-aware": 3.07,
}


def block_tokens(hash_id: int, n: int) -> list[int]:
    """A fixed run of `n` tokens for one trace block: equal ids are equal tokens."""
    rng = random.Random(hash_id * 7919 + 17)
    return [rng.randrange(*VOCAB) for _ in range(n)]


def load_requests(args) -> list[dict]:
    lines = [
        json.loads(line)
        for line in Path(args.trace).read_text().splitlines()
        if line.strip()
    ]
    lines = lines[args.skip : args.skip + args.requests]
    t0 = lines[0]["timestamp"]
    out = []
    for line in lines:
        ids = line["hash_ids"][: args.max_blocks]
        prompt = [t for h in ids for t in block_tokens(h, args.tokens_per_block)]
        out.append(
            {
                "at": (line["timestamp"] - t0) / 1000.0 / args.speedup,
                "prompt": prompt,
                "max_tokens": max(1, min(line["output_length"], args.max_output)),
            }
        )
    return out


KV_ROLES = {"both": "kv_both", "prefill": "kv_producer", "decode": "kv_consumer"}


def stack_up(args, work: Path, strategy: str, roles: list[str] | None = None):
    """A fresh stack: cache node, engines (in parallel), gateway. `roles`: each engine's
    P/D role (default: all `both`)."""
    model = models_dir() / "tiny"
    cache = start_server("--memory", args.cache_memory)
    roles = roles or ["both"] * args.instances
    engines, events = [], []
    for i, role in enumerate(roles):
        kv = {
            "kv_connector": "KVCacheConnector",
            "kv_connector_module_path": "kvcache_vllm",
            "kv_role": KV_ROLES[role],
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"servers": [cache.data]},
        }
        pub = free_port()
        events.append(pub)
        kv_events = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{pub}",
            "topic": "kv",
        }
        extra = [
            "--max-num-batched-tokens",
            str(args.max_batched_tokens),
            "--num-gpu-blocks-override",
            str(args.engine_blocks),
            "--kv-events-config",
            json.dumps(kv_events),
        ]
        # With --pin-engines each engine's threads run on a core of its own (left alone, every
        # engine binds the same first free core).
        engines.append(
            Serve(
                model,
                kv,
                work / f"{strategy}-vllm-{i}.log",
                extra=extra,
                wait=False,
                core=i if args.pin_engines else None,
            )
        )
    for e in engines:
        e.wait_ready()
    ns = lookup_namespace(engines[0].log)
    backends = "".join(
        f'[[backend]]\nurl = "{e.url}"\nkv_events = "tcp://127.0.0.1:{p}"\nkv_events_topic = "kv"\n'
        f'namespace = "{ns}"\nrole = "{role}"\n'
        + (
            f"max_concurrency = {args.prefill_concurrency}\n"
            if role == "prefill" and args.prefill_concurrency
            else ""
        )
        for e, p, role in zip(engines, events, roles, strict=True)
    )
    config = (
        f'listen = "127.0.0.1:0"\nstrategy = "{strategy}"\ntokenizer = "{model}"\ncache = ["{cache.data}"]\n'
        f'{backends}[health]\ninterval_ms = 500\n[[api_key]]\nkey = "{KEY}"\n'
    )
    gwdir = work / strategy
    gwdir.mkdir(exist_ok=True)
    gateway = Gateway(config, gwdir)
    wait_for(
        "backends up",
        lambda: gateway.metric("kvcache_gateway_backend_up") == len(roles),
        timeout=60,
    )
    return cache, engines, gateway


def stack_down(cache, engines, gateway) -> None:
    gateway.stop()
    for e in engines:
        e.stop()
    stop_server(cache)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stream_ttft(url: str, body: dict) -> tuple[int, float, float, float]:
    """Status, seconds to the first streamed event, seconds to the end, and the mean gap
    between events after the first (inter-token latency; NaN with fewer than two)."""
    request = urllib.request.Request(
        url,
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=600) as r:
            seen = []
            for line in r:
                if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                    seen.append(time.monotonic() - started)
            itl = (
                (seen[-1] - seen[0]) / (len(seen) - 1)
                if len(seen) > 1
                else float("nan")
            )
            return (
                r.status,
                seen[0] if seen else float("nan"),
                time.monotonic() - started,
                itl,
            )
    except urllib.error.HTTPError as e:
        print(f"HTTP {e.code}: {e.read()[:300]!r}", file=sys.stderr, flush=True)
        return e.code, float("nan"), time.monotonic() - started, float("nan")
    except OSError:
        return 599, float("nan"), time.monotonic() - started, float("nan")
    except http.client.HTTPException:  # a stream cut mid-way (IncompleteRead, ...)
        return 598, float("nan"), time.monotonic() - started, float("nan")


def pct(values: list[float], p: float) -> float:
    values = sorted(v for v in values if v == v)
    return (
        values[min(len(values) - 1, int(round(p * (len(values) - 1))))]
        if values
        else float("nan")
    )


def replay_one(
    args,
    work: Path,
    strategy: str,
    requests: list[dict],
    roles: list[str] | None = None,
    label: str = "",
) -> dict:
    cache, engines, gateway = stack_up(args, work, strategy, roles)
    try:
        metrics = [
            "vllm:prefix_cache_queries_total",
            "vllm:prefix_cache_hits_total",
            "vllm:external_prefix_cache_hits_total",
            "vllm:kvcache_loaded_bytes_total",
            "vllm:kvcache_load_seconds_sum",
            "vllm:kvcache_saved_bytes_total",
        ]
        before = {m: sum(e.metric(m) for e in engines) for m in metrics}
        cpu0 = cpu_seconds(gateway.proc.pid)
        results: list[tuple[int, float, float]] = [None] * len(requests)  # type: ignore[list-item]
        threads = []
        started = time.monotonic()
        for i, r in enumerate(requests):
            delay = started + r["at"] - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            body = {
                "model": "tiny",
                "prompt": r["prompt"],
                "max_tokens": r["max_tokens"],
                "temperature": 0.0,
            }

            def send(i: int = i, body: dict = body) -> None:
                results[i] = stream_ttft(gateway.url + "/v1/completions", body)

            t = threading.Thread(target=send)
            t.start()
            threads.append(t)
        for t in threads:
            t.join(timeout=900)
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(gateway.proc.pid) - cpu0
        after = {m: sum(e.metric(m) for e in engines) for m in metrics}
        ok = [r for r in results if r and r[0] == 200]
        queries = after[metrics[0]] - before[metrics[0]]
        per_backend = {
            e.url: gateway.metric(
                "kvcache_gateway_routing_decisions_total", backend=e.url
            )
            for e in engines
        }
        moved = {m: after[m] - before[m] for m in metrics[3:]}
        statuses: dict[str, int] = {}
        for r in results:
            key = str(r[0]) if r else "no answer"
            statuses[key] = statuses.get(key, 0) + 1
        row = {
            "strategy": strategy,
            "mode": label or strategy,
            "requests": len(requests),
            "statuses": statuses,
            "ok": len(ok),
            "refused_or_failed": len(requests) - len(ok),
            "ttft_p50_s": pct([r[1] for r in ok], 0.5),
            "ttft_p90_s": pct([r[1] for r in ok], 0.9),
            "ttft_mean_s": statistics.fmean([r[1] for r in ok]) if ok else float("nan"),
            "latency_p50_s": pct([r[2] for r in ok], 0.5),
            "itl_p50_s": pct([r[3] for r in ok], 0.5),
            "itl_mean_s": statistics.fmean(
                [r[3] for r in ok if r[3] == r[3]] or [float("nan")]
            ),
            "loaded_bytes_per_request": moved["vllm:kvcache_loaded_bytes_total"]
            / max(1, len(ok)),
            "saved_bytes_per_request": moved["vllm:kvcache_saved_bytes_total"]
            / max(1, len(ok)),
            "load_seconds_per_request": moved["vllm:kvcache_load_seconds_sum"]
            / max(1, len(ok)),
            "load_gb_per_s": moved["vllm:kvcache_loaded_bytes_total"]
            / moved["vllm:kvcache_load_seconds_sum"]
            / 1e9
            if moved["vllm:kvcache_load_seconds_sum"]
            else float("nan"),
            "pd_requests": {
                path: gateway.metric("kvcache_gateway_pd_requests_total", path=path)
                for path in ("disaggregated", "bypass", "fallback")
            },
            "pd_prefill_mean_s": gateway.metric(
                "kvcache_gateway_pd_prefill_seconds_sum"
            )
            / max(1.0, gateway.metric("kvcache_gateway_pd_prefill_seconds_count")),
            "throughput_rps": len(ok) / elapsed,
            "elapsed_s": elapsed,
            "prompt_tokens_queried": queries,
            "local_hit_rate": (after[metrics[1]] - before[metrics[1]]) / queries
            if queries
            else 0.0,
            "external_hit_rate": (after[metrics[2]] - before[metrics[2]]) / queries
            if queries
            else 0.0,
            "gateway_cpu_ms_per_request": 1000 * cpu / max(1, len(requests)),
            "gateway_routing_p50_hint_s": gateway.metric(
                "kvcache_gateway_routing_seconds_sum"
            )
            / max(1.0, gateway.metric("kvcache_gateway_routing_seconds_count")),
            "requests_per_backend": per_backend,
        }
        print(json.dumps(row), flush=True)
        return row
    finally:
        stack_down(cache, engines, gateway)


def replay(args) -> dict:
    requests = load_requests(args)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = [replay_one(args, work, s, requests) for s in args.strategies]
    by = {r["strategy"]: r for r in rows}
    ratios = {}
    if "cache-aware" in by:
        for s, r in by.items():
            ratios[f"ttft_mean {s} / cache-aware"] = (
                r["ttft_mean_s"] / by["cache-aware"]["ttft_mean_s"]
            )
    paper = {
        "random / global cache-aware": PAPER_FIG5["random"]
        / PAPER_FIG5["global cache-aware"],
        "load-balanced / global cache-aware": PAPER_FIG5["load-balanced"]
        / PAPER_FIG5["global cache-aware"],
        "local cache-aware / global cache-aware": PAPER_FIG5["local cache-aware"]
        / PAPER_FIG5["global cache-aware"],
    }
    return {
        "rows": rows,
        "ratios": ratios,
        "paper_fig5_seconds": PAPER_FIG5,
        "paper_fig5_ratios": paper,
    }


def pd(args) -> dict:
    """Aggregated (two `both` engines) and disaggregated (1P1D), cache-aware, one sitting."""
    requests = load_requests(args)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = [
        replay_one(args, work, "cache-aware", requests, ["both", "both"], "aggregated"),
        replay_one(
            args,
            work,
            "cache-aware",
            requests,
            ["prefill", "decode"],
            "disaggregated-1p1d",
        ),
    ]
    agg, dis = rows
    return {
        "rows": rows,
        "ratios": {
            "ttft_mean 1p1d / aggregated": dis["ttft_mean_s"] / agg["ttft_mean_s"],
            "itl_mean 1p1d / aggregated": dis["itl_mean_s"] / agg["itl_mean_s"],
        },
    }


def overhead(args) -> dict:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    args.instances = 1
    cache, engines, gateway = stack_up(args, work, "cache-aware")
    try:
        backend = engines[0].url
        body = {
            "model": "tiny",
            "prompt": "hello world",
            "max_tokens": 1,
            "temperature": 0.0,
        }
        direct, via = [], []
        for i in range(args.warmup + args.count):
            for target, sink in (
                ((backend, direct), (gateway.url, via))
                if i % 2
                else ((gateway.url, via), (backend, direct))
            ):
                started = time.perf_counter()
                answer = call(
                    "POST",
                    target + "/v1/completions",
                    body,
                    {"Authorization": f"Bearer {KEY}"},
                )
                took = time.perf_counter() - started
                assert answer.status == 200, answer.body
                if i >= args.warmup:
                    sink.append(took)
        cpu = cpu_seconds(gateway.proc.pid)
        routing = gateway.metric(
            "kvcache_gateway_routing_seconds_sum"
        ) / gateway.metric("kvcache_gateway_routing_seconds_count")
        row = {
            "requests_each": args.count,
            "direct_p50_ms": 1000 * pct(direct, 0.5),
            "gateway_p50_ms": 1000 * pct(via, 0.5),
            "added_p50_ms": 1000 * (pct(via, 0.5) - pct(direct, 0.5)),
            "direct_p90_ms": 1000 * pct(direct, 0.9),
            "gateway_p90_ms": 1000 * pct(via, 0.9),
            "gateway_routing_mean_ms": 1000 * routing,
            "gateway_cpu_ms_per_request_incl_startup": 1000
            * cpu
            / (args.warmup + args.count),
        }
        print(json.dumps(row), flush=True)
        return {"rows": [row]}
    finally:
        stack_down(cache, engines, gateway)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser(
        "replay", help="the trace through the gateway, once per strategy"
    )
    rp.add_argument("--strategies", type=lambda s: s.split(","), default=STRATEGIES)
    pp = sub.add_parser("pd", help="the trace aggregated, then 1 prefill + 1 decode")
    for p in (rp, pp):
        p.add_argument("--trace", default=str(TRACE))
        p.add_argument(
            "--requests", type=int, default=200, help="trace requests replayed"
        )
        p.add_argument(
            "--skip", type=int, default=0, help="trace requests skipped first"
        )
        p.add_argument(
            "--speedup", type=float, default=1.0, help="arrival times divided by this"
        )
        p.add_argument(
            "--tokens-per-block",
            type=int,
            default=64,
            help="tokens per 512-token trace block",
        )
        p.add_argument(
            "--max-blocks",
            type=int,
            default=28,
            help="trace blocks kept per prompt (max-model-len)",
        )
        p.add_argument(
            "--max-output", type=int, default=16, help="output tokens at most"
        )
    ov = sub.add_parser("overhead", help="what the gateway adds to a short request")
    ov.add_argument("--count", type=int, default=200)
    ov.add_argument("--warmup", type=int, default=20)
    for p in (rp, pp, ov):
        p.add_argument("--instances", type=int, default=2)
        p.add_argument(
            "--engine-blocks",
            type=int,
            default=96,
            help="each engine's KV cache, in 128-token blocks",
        )
        p.add_argument("--cache-memory", default="512MiB")
        p.add_argument(
            "--pin-engines",
            action="store_true",
            help="bind engine i's threads to core i (VLLM_CPU_OMP_THREADS_BIND)",
        )
        p.add_argument(
            "--prefill-concurrency",
            type=int,
            default=0,
            help="P/D: the prefill backend's max_concurrency (0: the gateway's default)",
        )
        p.add_argument(
            "--max-batched-tokens",
            type=int,
            default=2048,
            help="each engine's --max-num-batched-tokens (2048: one long prompt a step)",
        )
        p.add_argument("--workdir", default="/tmp/kvcache-gateway-bench")
        p.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    results = {"replay": replay, "pd": pd, "overhead": overhead}[args.cmd](args)
    doc = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "results": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
