"""Helpers to run the kvcache-autoscaler binary in the end-to-end tests."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO / "gateway" / "tests" / "e2e"))

from kvserver import Service  # noqa: E402


class Autoscaler(Service):
    """The kvcache-autoscaler binary on an ephemeral port, configured by a TOML file."""

    def __init__(self, config: str, workdir: Path):
        super().__init__("kvcache-autoscaler", "KVCACHE_AUTOSCALER_BIN", config, workdir)

    def status(self, name: str) -> dict:
        with urllib.request.urlopen(f"{self.url}/status", timeout=10) as r:
            targets = json.loads(r.read())["targets"]
        return next(t for t in targets if t["name"] == name)
