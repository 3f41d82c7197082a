"""Helpers to run the kvcache-gateway binary next to real `vllm serve` instances: shared by the
end-to-end tests (conftest.py) and the routing benchmark (benches/gateway/replay.py)."""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO / "pyo3-bindings" / "tests"))
sys.path.insert(0, str(REPO / "vllm-connector" / "tests"))

from kvserver import Server, Service, find_binary  # noqa: E402
from vllm_serve import Serve  # noqa: E402

KEY = "sk-e2e-main"
# Probes and ejection fast enough for a test to see a backend go and come back.
FAST_HEALTH = """
[health]
interval_ms = 300
failures = 1
eject_s = 1.0
"""


def gateway_binary() -> Path:
    return find_binary("kvcache-gateway", "KVCACHE_GATEWAY_BIN")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def call(
    method: str, url: str, body: object = None, headers: dict[str, str] | None = None, raw: bytes | None = None
) -> Answer:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return Answer(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
    except urllib.error.HTTPError as e:
        return Answer(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


class Gateway(Service):
    """The kvcache-gateway binary on an ephemeral port, configured by a TOML file."""

    def __init__(self, config: str, workdir: Path):
        super().__init__("kvcache-gateway", "KVCACHE_GATEWAY_BIN", config, workdir, "info,kvcache_gateway=debug")

    def post(self, path: str, body: object, key: str | None = KEY, **kw) -> Answer:
        headers = dict(kw.pop("headers", {}))
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return call("POST", self.url + path, body, headers, **kw)

    def get(self, path: str, key: str | None = KEY) -> Answer:
        return call("GET", self.url + path, headers={"Authorization": f"Bearer {key}"} if key else None)

    def explain(self, body: dict, chat: bool = False) -> dict:
        answer = self.post("/explain/v1/chat/completions" if chat else "/explain/v1/completions", body)
        assert answer.status == 200, answer.body
        return answer.json()


@dataclass
class Stack:
    cache: Server
    engines: list[Serve]
    events: list[tuple[int, int]]
    gateway: Gateway
    namespace: str
    # A second gateway with no backends configured: it finds the engines in etcd.
    discovering: Gateway

    def engine(self, url: str) -> Serve:
        return next(e for e in self.engines if e.url == url)

    def posts_seen(self) -> int:
        """OpenAI POSTs the engines' own access logs recorded, all engines together."""
        return sum(e.log.read_text().count('"POST /v1/') for e in self.engines)


def wait_for(what: str, check, timeout: float = 30.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def lookup_namespace(log: Path) -> str:
    m = re.search(r"lookup namespace ([0-9a-f]{32})", log.read_text())
    assert m, f"the connector did not log its lookup namespace:\n{log.read_text()[-3000:]}"
    return m.group(1)
