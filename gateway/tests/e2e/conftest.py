"""The gateway's end-to-end stack: a real kvcache-server, two real `vllm serve` instances on CPU
with the kvcache connector and KV events, and the real kvcache-gateway binary in front.

Started once for the whole module (each vLLM start costs about half a minute). Run with the
vLLM venv's pytest (`scripts/test.sh` does); without the test model the tests skip, unless
KVCACHE_REQUIRE_VLLM=1 (CI), where they fail.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from gwstack import FAST_HEALTH, KEY, Gateway, Stack, call, lookup_namespace, wait_for
from kvserver import free_port, start_etcd, start_server, stop_server
from vllm_serve import Serve, require_model

__all__ = ["KEY", "Stack", "call", "wait_for"]
LIMITED_KEY = "sk-e2e-limited"
OTHER_MODEL_KEY = "sk-e2e-other"
BLOCK_SIZE = 128
# A small KV cache (blocks of 128 tokens), so an engine evicts within a test.
ENGINE_BLOCKS = 48


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    model = require_model("tiny")
    work = tmp_path_factory.mktemp("gateway-e2e")
    cache = start_server("--memory", "256MiB")
    etcd = start_etcd(str(work / "etcd"))
    registry = etcd.url.replace("http://", "etcd://")
    events = [(free_port(), free_port()) for _ in range(2)]
    ports = [free_port() for _ in range(2)]
    engines = []
    try:
        for i, (pub, replay) in enumerate(events):
            # Each engine registers itself in etcd, for the discovering gateway.
            kv = {
                "kv_connector": "KVCacheConnector",
                "kv_connector_module_path": "kvcache_vllm",
                "kv_role": "kv_both",
                "kv_load_failure_policy": "recompute",
                "kv_connector_extra_config": {
                    "servers": [cache.data],
                    "advertise": f"http://127.0.0.1:{ports[i]}",
                    "registry": registry,
                },
            }
            kv_events = {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                # vLLM binds only a wildcard endpoint (with a host it connects out instead).
                "endpoint": f"tcp://*:{pub}",
                "replay_endpoint": f"tcp://*:{replay}",
                "topic": "kv",
            }
            extra = ["--num-gpu-blocks-override", str(ENGINE_BLOCKS), "--kv-events-config", json.dumps(kv_events)]
            engines.append(Serve(model, kv, work / f"vllm-{i}.log", extra=extra, port=ports[i], wait=False))
        for e in engines:
            e.wait_ready()
        namespace = lookup_namespace(engines[0].log)
        assert lookup_namespace(engines[1].log) == namespace, "two engines of one model share a namespace"
        backends = "".join(
            f"""
[[backend]]
url = "{e.url}"
kv_events = "tcp://127.0.0.1:{pub}"
kv_events_replay = "tcp://127.0.0.1:{replay}"
kv_events_topic = "kv"
namespace = "{namespace}"
"""
            for e, (pub, replay) in zip(engines, events, strict=True)
        )
        config = f"""
listen = "127.0.0.1:0"
strategy = "cache-aware"
tokenizer = "{model}"
cache = ["{cache.data}"]
{backends}
[limits]
max_body_bytes = 262144
{FAST_HEALTH}
[routing]
cache_lookup_timeout_ms = 200

[[api_key]]
key = "{KEY}"
name = "main"

[[api_key]]
key = "{LIMITED_KEY}"
name = "limited"
requests_per_minute = 2

[[api_key]]
key = "{OTHER_MODEL_KEY}"
name = "other"
models = ["some-other-model"]
"""
        gateway = Gateway(config, work)
        (work / "discovering").mkdir()
        discovering = Gateway(
            f"""
listen = "127.0.0.1:0"
tokenizer = "{model}"
cache = ["{cache.data}"]
discover = "{registry}"

[health]
interval_ms = 300
failures = 1

[[api_key]]
key = "{KEY}"
""",
            work / "discovering",
        )
        try:
            wait_for("both backends up", lambda: gateway.metric("kvcache_gateway_backend_up") == 2)
            yield Stack(cache, engines, events, gateway, namespace, discovering)
        finally:
            gateway.stop()
            discovering.stop()
    finally:
        for e in engines:
            e.stop()
        stop_server(cache)
        etcd.proc.kill()
        etcd.proc.wait()
