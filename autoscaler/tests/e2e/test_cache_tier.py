"""The cache tier's target end to end: two real kvcache-server nodes, one written to far faster
than its pool can hold (blocks evicted seconds after they were written), one idle, and the
autoscaler (dry-run) with a target on each. The metric is the pool's turnover,
`rate(kvcache_evicted_bytes_total) / kvcache_pool_capacity_bytes`: by Little's law its inverse
is how long a block lives in the pool."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from gwstack import wait_for
from kvserver import Prometheus, start_server, stop_server
from scalerstack import Autoscaler


def target(name: str, metrics_url: str) -> str:
    return f"""
[[target]]
name = "{name}"
sources = ["http://{metrics_url}/metrics"]
algorithm = "kpa"
min_replicas = 1
max_replicas = 4
initial_replicas = 1
stable_window_s = 6
panic_window_s = 2
scale_down_cooldown_s = 30
actuator = "dry-run"
[[target.metrics]]
name = "kvcache_evicted_bytes_total"
kind = "rate"
per = "kvcache_pool_capacity_bytes"
# A block should live at least 20 s in the pool: it turns over at most once in 20 s.
target_value = 0.05
"""


def test_a_node_evicting_what_it_just_stored_asks_for_more_nodes_and_an_idle_one_does_not(tmp_path: Path):
    import kvcache

    hot, idle = start_server("--memory", "64MiB"), start_server("--memory", "64MiB")
    scaler = None
    stop = threading.Event()
    try:
        scaler = Autoscaler(
            'listen = "127.0.0.1:0"\ninterval_s = 0.5\n'
            + target("cache-hot", hot.metrics)
            + target("cache-idle", idle.metrics),
            tmp_path,
        )
        client = kvcache.Client(hot.data, transport="tcp")
        block = os.urandom(256 * 1024)
        written = [0]

        def writer() -> None:
            # Bounded: at most 60 s or 40 000 blocks (10 GiB through a 64 MiB pool).
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline and written[0] < 40_000:
                key = written[0].to_bytes(16, "little")
                assert client.put(key, block)
                written[0] += 1

        w = threading.Thread(target=writer)
        w.start()
        hot_status = wait_for(
            "the hot node's target to scale up",
            lambda: (s := scaler.status("cache-hot"))["desired"] > 1 and s,
            timeout=45,
        )
        assert "kvcache_evicted_bytes_total" in hot_status["reason"] and "up" in hot_status["reason"], hot_status
        assert hot_status["metric_value"] > 0.05 and hot_status["source_ok"], hot_status
        assert hot_status["last_scale"]["to"] == hot_status["desired"]
        # Its own loop decides once its windows hold the panic window's worth of data.
        idle_status = wait_for(
            "the idle node's decision", lambda: (s := scaler.status("cache-idle")) and not s["frozen"] and s
        )
        assert idle_status["source_ok"], idle_status
        assert (idle_status["current"], idle_status["desired"]) == (1, 1), idle_status
        assert idle_status["metric_value"] == 0.0 and idle_status["last_scale"] is None, idle_status
        assert scaler.metric("kvcache_autoscaler_desired_replicas", target="cache-hot") > 1
        assert scaler.metric("kvcache_autoscaler_desired_replicas", target="cache-idle") == 1
        assert scaler.metric("kvcache_autoscaler_current_replicas", target="cache-idle") == 1
        assert hot.metric("kvcache_evictions_total") > 0 and idle.metric("kvcache_evictions_total") == 0
    finally:
        stop.set()
        if scaler is not None:
            scaler.stop()
        stop_server(hot)
        stop_server(idle)


def test_a_prometheus_servers_query_drives_a_target_and_a_broken_query_freezes_one(tmp_path: Path):
    import kvcache

    node = start_server("--memory", "64MiB")
    prometheus = scaler = None
    try:
        prometheus = Prometheus([node.metrics], tmp_path)
        turnover = "sum(rate(kvcache_evicted_bytes_total[5s])) / sum(kvcache_pool_capacity_bytes)"
        common = """
algorithm = "kpa"
min_replicas = 1
max_replicas = 4
initial_replicas = 1
stable_window_s = 6
panic_window_s = 2
scale_down_cooldown_s = 30
actuator = "dry-run"
"""
        scaler = Autoscaler(
            f"""
listen = "127.0.0.1:0"
interval_s = 0.5
[[target]]
name = "cache"
prometheus = "{prometheus.url}"
{common}
[[target.metrics]]
name = "turnover"
query = "{turnover}"
target_value = 0.05

[[target]]
name = "broken"
prometheus = "{prometheus.url}"
{common}
[[target.metrics]]
name = "typo"
query = "sum(rate(kvcache_evicted_bytes_total[5s]"
target_value = 0.05
""",
            tmp_path,
        )
        client = kvcache.Client(node.data, transport="tcp")
        block = os.urandom(256 * 1024)
        deadline = time.monotonic() + 60
        n = 0
        # Bounded: 60 s or 40 000 blocks, until the target scales up.
        while time.monotonic() < deadline and n < 40_000 and scaler.status("cache")["desired"] == 1:
            for _ in range(200):
                assert client.put(n.to_bytes(16, "little"), block)
                n += 1
        status = scaler.status("cache")
        assert status["desired"] > 1, (n, status)
        assert "turnover" in status["reason"] and status["source_ok"], status
        assert status["sources"][0]["url"] == prometheus.url
        broken = scaler.status("broken")
        assert broken["frozen"] and not broken["source_ok"] and broken["desired"] == 1, broken
        assert "parse error" in broken["reason"], broken["reason"]
    finally:
        for p in (scaler, prometheus):
            if p is not None:
                p.stop()
        stop_server(node)
