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


class Prometheus:
    """Debian's Prometheus on a free loopback port, scraping `targets` (host:port) every second."""

    def __init__(self, targets: list[str], workdir: Path):
        import shutil
        import time

        from kvserver import free_port

        if shutil.which("prometheus") is None:
            raise RuntimeError("prometheus not found: install Debian's prometheus (scripts/test.sh does)")
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: kvcache\n    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n"
        )
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(workdir / "prometheus.log").open("w"),
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError(f"prometheus not ready in 30 s: {(workdir / 'prometheus.log').read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
