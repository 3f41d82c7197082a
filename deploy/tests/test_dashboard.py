"""deploy/grafana/kvcache.json: every metric its queries name is one the binaries export (or a
lower tier's, from kvcache-core's list, or vLLM's), and a real Prometheus (Debian's) scraping a
real kvcache-server under a little traffic, the gateway, the LoRA manager and the autoscaler
answers every query: each one parses, and each one whose components run here returns data. The
queries that need a component this test does not start say which (NEEDS: vLLM engines, P/D,
the disk and GPU tiers, a backend failing); they must still parse."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from components import (
    DASHBOARD,
    Prometheus,
    declared_names,
    exported_names,
    free_port,
    prometheus_query,
    queries,
    small_configs,
    start_server,
    start_services,
    stop_server,
    tier_names,
)

# Metrics (by prefix) the test's components do not produce, and what would.
NEEDS = {
    "kvcache_disk_": "a node with --disk",
    "kvcache_gpu_": "a node with --gpu-tier",
    "kvcache_gateway_time_to_first_byte": "a backend that answers (vllm serve)",
    "kvcache_gateway_predicted_": "a backend that answers (vllm serve)",
    "kvcache_gateway_prompt_blocks": "a backend that answers (vllm serve)",
    "kvcache_gateway_ejections": "a backend that fails a request after passing its probes",
    "kvcache_gateway_pd_": "a P/D gateway with prefill and decode backends",
    "vllm:": "vllm serve",
}


def needs(expr: str) -> list[str]:
    return sorted({why for prefix, why in NEEDS.items() if prefix in expr})


def test_the_dashboard_is_well_formed_and_names_only_exported_metrics(tmp_path: Path):
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and all(p["targets"] for p in dash["panels"])
    known = exported_names(tmp_path) | declared_names() | tier_names()
    used = {n for _, e in queries() for n in re.findall(r"\b(kvcache_[a-z_]+)", e)}
    missing = sorted(used - known)
    assert not missing, f"the dashboard names metrics no binary exports: {missing}"


def test_a_real_prometheus_answers_every_query_with_data(tmp_path: Path):
    if shutil.which("prometheus") is None:
        if os.environ.get("KVCACHE_REQUIRE_PROMETHEUS") == "1":
            pytest.fail("prometheus not found: install Debian's prometheus")
        pytest.skip("prometheus not found: install Debian's prometheus (scripts/test.sh does)")
    import kvcache

    server = start_server("--memory", "64MiB")
    prometheus = None
    services: dict = {}
    try:
        configs = small_configs(f"http://127.0.0.1:{free_port()}")
        configs["gateway"] = f'cache = ["{server.data}"]\n' + configs["gateway"]
        services = start_services(configs, tmp_path)
        urls = {name: s.url for name, s in services.items()}
        targets = [server.metrics] + [u.removeprefix("http://") for u in urls.values()]
        prometheus = Prometheus(targets, tmp_path)
        prom = prometheus.url
        # A little traffic, bounded: puts, hits, misses, one refused put; requests the gateway
        # refuses (its backend is down).
        client = kvcache.Client(server.data, transport="tcp")
        block = os.urandom(64 * 1024)
        deadline = time.monotonic() + 60
        answered: dict[str, list] = {}
        pending = queries()
        while pending and time.monotonic() < deadline:
            for i in range(20):
                key = (i % 200).to_bytes(16, "little")
                client.put(key, block)
                client.get(key)
                client.get(os.urandom(16))
            client.put(os.urandom(16), bytes(65 << 20))
            try:
                urllib.request.urlopen(
                    urllib.request.Request(
                        f"{urls['gateway']}/v1/completions",
                        data=json.dumps({"model": "m", "prompt": "x"}).encode(),
                        headers={"Content-Type": "application/json"},
                    ),
                    timeout=5,
                )
            except urllib.error.HTTPError:
                pass
            time.sleep(0.5)
            still = []
            for title, expr in pending:
                answer = prometheus_query(prom, expr)
                assert answer.get("status") == "success", f"{title}: {expr}: {answer}"
                if answer["data"]["result"] or needs(expr):
                    answered[expr] = answer["data"]["result"]
                else:
                    still.append((title, expr))
            pending = still
        assert not pending, f"queries without data after 60 s: {pending}"
        for title, expr in queries():
            assert answered[expr] or needs(expr), (title, expr)
    finally:
        if prometheus is not None:
            prometheus.stop()
        for s in services.values():
            s.stop()
        stop_server(server)
