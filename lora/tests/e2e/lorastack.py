"""Helpers to run the kvcache-lora binary next to real `vllm serve` instances and the gateway."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO / "gateway" / "tests" / "e2e"))

from gwstack import Answer, call  # noqa: E402
from kvserver import Service  # noqa: E402


class Manager(Service):
    """The kvcache-lora binary on an ephemeral port, configured by a TOML file (kept at
    `self.config`, which the manager watches)."""

    def __init__(self, config: str, workdir: Path):
        super().__init__("kvcache-lora", "KVCACHE_LORA_BIN", config, workdir)
        self.config = workdir / "kvcache-lora.toml"

    def adapters(self) -> dict[str, dict]:
        answer = call("GET", self.url + "/v1/adapters")
        assert answer.status == 200, answer.body
        return {a["name"]: a for a in answer.json()["adapters"]}

    def adapter(self, name: str) -> Answer:
        return call("GET", f"{self.url}/v1/adapters/{name}")

    def post(self, body: dict) -> Answer:
        return call("POST", self.url + "/v1/adapters", body)

    def delete(self, name: str) -> Answer:
        return call("DELETE", f"{self.url}/v1/adapters/{name}")


def listed_adapters(engine_url: str) -> set[str]:
    """The adapters an engine's /v1/models lists (models with a parent)."""
    with urllib.request.urlopen(f"{engine_url}/v1/models", timeout=10) as r:
        return {m["id"] for m in json.loads(r.read())["data"] if m.get("parent")}
