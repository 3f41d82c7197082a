"""The LoRA manager's end-to-end stack: a real kvcache-server, two real `vllm serve` instances on
CPU with LoRA enabled (runtime loading on) and the kvcache connector, the kvcache-lora binary
managing them, and the kvcache-gateway binary routing by the manager's adapter states.

Started once for the module (each vLLM start costs about half a minute). Run with the vLLM venv's
pytest (`scripts/test.sh` does); without the test model the tests skip, unless
KVCACHE_REQUIRE_VLLM=1 (CI), where they fail.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# The gateway's helpers (and through them the server's and vLLM's).
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "gateway" / "tests" / "e2e"))

from adapters import write_adapter, write_broken_adapter  # noqa: E402
from gwstack import FAST_HEALTH, KEY, Gateway, wait_for  # noqa: E402
from kvserver import Server, start_server, stop_server  # noqa: E402
from lorastack import Manager  # noqa: E402
from vllm_serve import Serve, require_model  # noqa: E402

BLOCK_SIZE = 128
# The tiny model's layers: the connector stores one block per layer.
LAYERS = 2
LORA_FLAGS = ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "8"]


@dataclass
class LoraStack:
    cache: Server
    engines: list[Serve]
    manager: Manager
    gateway: Gateway
    adapters: dict[str, Path]
    work: Path

    def engine(self, url: str) -> Serve:
        return next(e for e in self.engines if e.url == url)


def manager_config(engines: list[Serve], adapters: dict[str, Path], declared: list[str]) -> str:
    instances = ", ".join(f'"{e.url}"' for e in engines)
    tables = "".join(
        f"""
[[adapter]]
name = "{name}"
base_model = "tiny"
path = "{adapters[name]}"
replicas = 1
"""
        for name in declared
    )
    return f"""
listen = "127.0.0.1:0"
instances = [{instances}]

[reconcile]
interval_ms = 300
max_attempts = 3
backoff_ms = 300
drain_grace_ms = 500
# A killed instance keeps its placements while it restarts.
down_grace_s = 600
{tables}"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoraStack]:
    model = require_model("tiny")
    work = tmp_path_factory.mktemp("lora-e2e")
    adapters = {
        "sql-lora": write_adapter(work / "adapters" / "sql-lora", model, seed=1),
        "chat-lora": write_adapter(work / "adapters" / "chat-lora", model, seed=2),
        "broken-lora": write_broken_adapter(work / "adapters" / "broken-lora", model),
    }
    # vLLM refuses /v1/load_lora_adapter without it.
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    cache = start_server("--memory", "256MiB")
    engines: list[Serve] = []
    manager = gateway = None
    try:
        for i in range(2):
            kv = {
                "kv_connector": "KVCacheConnector",
                "kv_connector_module_path": "kvcache_vllm",
                "kv_role": "kv_both",
                "kv_load_failure_policy": "recompute",
                "kv_connector_extra_config": {"servers": [cache.data]},
            }
            engines.append(Serve(model, kv, work / f"vllm-{i}.log", extra=LORA_FLAGS, wait=False, core=i))
        for e in engines:
            e.wait_ready()
        (work / "manager").mkdir()
        manager = Manager(manager_config(engines, adapters, ["sql-lora"]), work / "manager")
        backends = "".join(f'\n[[backend]]\nurl = "{e.url}"\n' for e in engines)
        (work / "gateway").mkdir()
        gateway = Gateway(
            f"""
listen = "127.0.0.1:0"
strategy = "cache-aware"
tokenizer = "{model}"
lora = "{manager.url}"
{backends}
{FAST_HEALTH}
[[api_key]]
key = "{KEY}"
""",
            work / "gateway",
        )
        wait_for("both backends up", lambda: gateway.metric("kvcache_gateway_backend_up") == 2)
        yield LoraStack(cache, engines, manager, gateway, adapters, work)
    finally:
        for p in (gateway, manager):
            if p is not None:
                p.stop()
        for e in engines:
            e.stop()
        stop_server(cache)
