"""Records a metric trace from a real `vllm serve` on CPU under a scripted load, for the
autoscaler's replay tests (`tests/replay.rs`). Run with the vLLM venv's python:

    python autoscaler/tests/traces/record.py OUT.jsonl

It starts the tiny test model (scripts/setup-vllm.sh makes it), drives closed-loop clients
through the phases below (each line of the output names the phase and the client count), and
scrapes /metrics every half second: the queue, the running requests, KV usage, the TTFT
histogram's sum and count, the end-to-end latency histogram's (its sum's rate is the mean
number of requests in the engine, by Little's law), and the prompt and generation token counters.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "vllm-connector" / "tests"))
sys.path.insert(0, str(REPO / "pyo3-bindings" / "tests"))

from vllm_serve import Serve, require_model  # noqa: E402

# (phase, seconds, concurrent clients)
PHASES = [
    ("idle", 10, 0),
    ("steady", 20, 2),
    ("spike", 4, 8),
    ("after_spike", 16, 2),
    ("step_up", 40, 6),
    ("step_down", 40, 1),
    ("idle_end", 10, 0),
]
SCRAPE_S = 0.5
NAMES = {
    "vllm:num_requests_waiting": "waiting",
    "vllm:num_requests_running": "running",
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:time_to_first_token_seconds_sum": "ttft_sum",
    "vllm:time_to_first_token_seconds_count": "ttft_count",
    "vllm:e2e_request_latency_seconds_sum": "e2e_sum",
    "vllm:e2e_request_latency_seconds_count": "e2e_count",
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:generation_tokens_total": "generation_tokens",
}


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = dict.fromkeys(NAMES.values(), 0.0)
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in NAMES:
            out[NAMES[name]] += float(line.rsplit(" ", 1)[1])
    return out


def main() -> None:
    out = Path(sys.argv[1])
    model = require_model("tiny")
    engine = Serve(model, None, Path(tempfile.gettempdir()) / "kvcache-trace-vllm.log", core=0)
    wanted = [0]
    stop = threading.Event()

    def client(i: int) -> None:
        rng = random.Random(i)
        while not stop.is_set():
            if i >= wanted[0]:
                time.sleep(0.05)
                continue
            body = {
                "model": "tiny",
                "prompt": [rng.randrange(3, 400) for _ in range(256)],
                "max_tokens": 96,
                "ignore_eos": True,
            }
            request = urllib.request.Request(
                f"{engine.url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=120) as r:
                r.read()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    started = time.monotonic()
    try:
        with out.open("w") as f:
            for phase, seconds, clients in PHASES:
                wanted[0] = clients
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    row = {"t": round(time.monotonic() - started, 2), "phase": phase, "clients": clients}
                    row.update(scrape(engine.url))
                    f.write(json.dumps(row) + "\n")
                    time.sleep(SCRAPE_S)
    finally:
        stop.set()
        engine.stop()


if __name__ == "__main__":
    main()
