"""The autoscaler end to end with real processes: a kvcache-server, etcd, one `vllm serve` on CPU
registered through the connector, the gateway discovering engines in etcd, and the autoscaler
(KPA on the engines' concurrency, the command actuator running `scale_engines.py`). Load from
closed-loop clients makes it start a second instance, which registers and takes traffic through
the gateway; when the load stops, the second instance is stopped after the cooldown. Every
request during both changes succeeds, and /status and /metrics say what happened at each step.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gwstack import KEY, Gateway, call, wait_for
from kvserver import free_port, start_etcd, start_server, stop_server
from scalerstack import Autoscaler
from vllm_serve import Serve, engine_env, require_model

HERE = Path(__file__).resolve().parent


# Probes that outlast a busy engine: while the second instance starts (torch import, model load)
# and four clients keep the first prefilling, two cores answer /health late. A request that fails
# still ejects its backend at once; only a stopped instance's probes need to fail three times.
SCALING_HEALTH = """
[health]
interval_ms = 300
failures = 3
timeout_ms = 5000
eject_s = 1.0
"""


@dataclass
class ScaleStack:
    engine: Serve
    gateway: Gateway
    scaler: Autoscaler
    state: Path
    second_url: str


def metric_of(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.split("{")[0].split(" ")[0] == name)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScaleStack]:
    model = require_model("tiny")
    work = tmp_path_factory.mktemp("autoscaler-e2e")
    cache = start_server("--memory", "256MiB")
    etcd = start_etcd(str(work / "etcd"))
    registry = etcd.url.replace("http://", "etcd://")
    kv = {
        "kv_connector": "KVCacheConnector",
        "kv_connector_module_path": "kvcache_vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"servers": [cache.data], "registry": registry},
    }
    port0, port1 = free_port(), free_port()
    first = {
        **kv,
        "kv_connector_extra_config": {**kv["kv_connector_extra_config"], "advertise": f"http://127.0.0.1:{port0}"},
    }
    state = work / "instances"
    state.mkdir()
    base = dict(os.environ)
    (state / "config.json").write_text(
        json.dumps(
            {
                "vllm": str(Path(sys.executable).with_name("vllm")),
                "model": str(model),
                "ports": [port0, port1],
                "kv": kv,
                "env": {k: v for k, v in engine_env().items() if base.get(k) != v} | {"VLLM_LOGGING_LEVEL": "INFO"},
            }
        )
    )
    engine = Serve(model, first, work / "vllm-0.log", port=port0, core=0)
    gateway = scaler = None
    try:
        (work / "gateway").mkdir()
        gateway = Gateway(
            f"""
listen = "127.0.0.1:0"
tokenizer = "{model}"
discover = "{registry}"
{SCALING_HEALTH}
[[api_key]]
key = "{KEY}"
""",
            work / "gateway",
        )
        wait_for("the gateway to find the first engine", lambda: gateway.metric("kvcache_gateway_backend_up") == 1, 60)
        (work / "scaler").mkdir()
        scaler = Autoscaler(
            f"""
listen = "127.0.0.1:0"
interval_s = 0.5

[[target]]
name = "engines"
discover = "{registry}"
algorithm = "kpa"
min_replicas = 1
max_replicas = 2
initial_replicas = 1
stable_window_s = 10
panic_window_s = 3
scale_down_cooldown_s = 8
actuator = "command"
scale_command = "{sys.executable} {HERE / "scale_engines.py"} {state} {{replicas}}"
scale_timeout_s = 120

# Requests in the engine, by Little's law: the end-to-end latency's sum grows by that many
# seconds per second. (vllm:num_requests_running read once a second misses short requests.)
[[target.metrics]]
name = "vllm:e2e_request_latency_seconds_sum"
kind = "rate"
target_value = 1.5
""",
            work / "scaler",
        )
        yield ScaleStack(engine, gateway, scaler, state, f"http://127.0.0.1:{port1}")
    finally:
        if scaler is not None:
            scaler.stop()
        if gateway is not None:
            gateway.stop()
        os.system(f"{sys.executable} {HERE / 'scale_engines.py'} {state} 1 >/dev/null 2>&1")
        engine.stop()
        stop_server(cache)
        etcd.proc.kill()
        etcd.proc.wait()


def test_load_starts_a_second_instance_and_its_end_stops_it(stack: ScaleStack):
    scaler = stack.scaler
    idle = wait_for(
        "a decision on the idle engine",
        lambda: (s := scaler.status("engines"))["ready"] == 1 and not s["frozen"] and s,
        30,
    )
    assert (idle["current"], idle["desired"]) == (1, 1), idle
    assert idle["source_ok"] and idle["sources"][0]["url"].endswith("/metrics"), idle
    assert scaler.metric("kvcache_autoscaler_current_replicas", target="engines") == 1

    stop = threading.Event()
    statuses: list[int] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        deadline = time.monotonic() + 300
        while not stop.is_set() and time.monotonic() < deadline:
            body = {
                "model": "tiny",
                "prompt": [rng.randrange(3, 400) for _ in range(200)],
                "max_tokens": 64,
                "ignore_eos": True,
            }
            answer = stack.gateway.post("/v1/completions", body)
            with lock:
                statuses.append(answer.status)

    clients = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for c in clients:
        c.start()
    try:
        up = wait_for("a scale-up decision", lambda: (s := scaler.status("engines"))["current"] == 2 and s, 60)
        assert up["last_scale"]["from"] == 1 and up["last_scale"]["to"] == 2, up
        assert "kpa up" in up["last_scale"]["reason"], up
        assert scaler.metric("kvcache_autoscaler_desired_replicas", target="engines") == 2
        # The second instance starts, registers in etcd, and the gateway sends it requests.
        wait_for(
            "the gateway to route to two engines", lambda: stack.gateway.metric("kvcache_gateway_backend_up") == 2, 300
        )
        wait_for(
            "the second instance to serve requests",
            lambda: metric_of(stack.second_url, "vllm:request_success_total") >= 3,
            60,
        )
        both = wait_for(
            "both engines observed", lambda: (s := scaler.status("engines"))["ready"] == 2 and not s["frozen"] and s, 60
        )
        assert both["current"] == 2 and len(both["sources"]) == 2, both
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=150)
    with lock:
        served = list(statuses)
    assert served and all(s == 200 for s in served), (
        f"{len(served)} requests, failures: {[s for s in served if s != 200]}"
    )

    down = wait_for(
        "the scale-down after the cooldown", lambda: (s := scaler.status("engines"))["current"] == 1 and s, 120
    )
    assert down["last_scale"]["from"] == 2 and down["last_scale"]["to"] == 1, down
    assert "kpa" in down["last_scale"]["reason"], down
    assert not (stack.state / "1.pid").exists(), "the script stopped the second instance"
    assert scaler.metric("kvcache_autoscaler_current_replicas", target="engines") == 1
    # Requests after the scale-down still succeed (the gateway drops the stopped instance).
    for i in range(3):
        assert (
            stack.gateway.post("/v1/completions", {"model": "tiny", "prompt": [5, 6, 7 + i], "max_tokens": 4}).status
            == 200
        )
    assert call("GET", scaler.url + "/health").status == 200
