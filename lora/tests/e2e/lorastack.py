"""Helpers to run the kvcache-lora binary next to real `vllm serve` instances and the gateway."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO / "gateway" / "tests" / "e2e"))

from gwstack import Answer, call  # noqa: E402
from kvserver import find_binary  # noqa: E402


class Manager:
    """The kvcache-lora binary on an ephemeral port, configured by a TOML file (kept at
    `self.config`, which the manager watches)."""

    def __init__(self, config: str, workdir: Path):
        self.config = workdir / "lora.toml"
        self.config.write_text(config)
        self.log = workdir / "lora.log"
        self.proc = subprocess.Popen(
            [str(find_binary("kvcache-lora", "KVCACHE_LORA_BIN")), "--config", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=self.log.open("w"),
            env={**os.environ, "KVCACHE_LOG": "info"},
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("kvcache-lora ready"), f"kvcache-lora did not start: {line!r}\n{self.tail()}"
        self.url = "http://" + line.split("http=", 1)[1].strip()

    def tail(self) -> str:
        return self.log.read_text()[-5000:]

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

    def metric(self, name: str, **labels: str) -> float:
        text = call("GET", self.url + "/metrics").body.decode()
        wanted = [f'{k}="{v}"' for k, v in labels.items()]
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if (line.startswith(name + "{") or line.startswith(name + " ")) and all(w in line for w in wanted)
        )

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def listed_adapters(engine_url: str) -> set[str]:
    """The adapters an engine's /v1/models lists (models with a parent)."""
    with urllib.request.urlopen(f"{engine_url}/v1/models", timeout=10) as r:
        return {m["id"] for m in json.loads(r.read())["data"] if m.get("parent")}
