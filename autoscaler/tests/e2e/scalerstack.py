"""Helpers to run the kvcache-autoscaler binary in the end-to-end tests."""

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

from kvserver import find_binary  # noqa: E402


class Autoscaler:
    """The kvcache-autoscaler binary on an ephemeral port, configured by a TOML file."""

    def __init__(self, config: str, workdir: Path):
        path = workdir / "autoscaler.toml"
        path.write_text(config)
        self.log = workdir / "autoscaler.log"
        self.proc = subprocess.Popen(
            [str(find_binary("kvcache-autoscaler", "KVCACHE_AUTOSCALER_BIN")), "--config", str(path)],
            stdout=subprocess.PIPE,
            stderr=self.log.open("w"),
            env={**os.environ, "KVCACHE_LOG": "info"},
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("kvcache-autoscaler ready"), f"autoscaler did not start: {line!r}\n{self.tail()}"
        self.url = "http://" + line.split("http=", 1)[1].strip()

    def tail(self) -> str:
        return self.log.read_text()[-5000:]

    def status(self, name: str) -> dict:
        with urllib.request.urlopen(f"{self.url}/status", timeout=10) as r:
            targets = json.loads(r.read())["targets"]
        return next(t for t in targets if t["name"] == name)

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as r:
            text = r.read().decode()
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
