"""The real kvcache-server binary on ephemeral loopback ports, for Python tests.

Shared by this package's tests and the vLLM connector's (`vllm-connector/tests`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def find_binary(name: str, env: str) -> Path:
    """A workspace binary: `$env`, else `$CARGO_TARGET_DIR/debug/NAME`, else `target/debug/NAME`."""
    explicit = os.environ.get(env)
    candidates = [Path(explicit)] if explicit else []
    target = os.environ.get("CARGO_TARGET_DIR")
    if target:
        candidates.append(Path(target) / "debug" / name)
    candidates.append(REPO / "target" / "debug" / name)
    for c in candidates:
        if c.is_file():
            return c
    raise RuntimeError(f"{name} binary not found: build it (cargo build -p {name}) and set {env} or CARGO_TARGET_DIR")


def server_binary() -> Path:
    return find_binary("kvcache-server", "KVCACHE_SERVER_BIN")


@dataclass
class Server:
    proc: subprocess.Popen[str]
    data: str
    metrics: str
    shm: str  # the shared-memory socket's path, or "off"

    def metric(self, sample: str) -> float:
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(sample + " "):
                    return float(line.split()[-1])
        raise KeyError(sample)


def start_server(*args: str) -> Server:
    proc = subprocess.Popen(
        [str(server_binary()), "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--mlock", "off", *args],
        stdout=subprocess.PIPE,
        env={**os.environ, "KVCACHE_LOG": "error"},
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    fields = dict(w.split("=", 1) for w in line.split() if "=" in w)
    return Server(proc, fields["data"], fields["metrics"], fields["shm"])


def stop_server(s: Server) -> None:
    s.proc.send_signal(signal.SIGTERM)
    s.proc.wait(timeout=15)


@dataclass
class Etcd:
    proc: subprocess.Popen[bytes]
    url: str
    data_dir: str


def free_port() -> int:
    """A loopback TCP port nobody listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_etcd(data_dir: str) -> Etcd:
    """A real etcd (Debian's etcd-server) on free loopback ports; fails if it does not answer."""
    import shutil
    import time

    if shutil.which("etcd") is None:
        raise RuntimeError("etcd not found: install Debian's etcd-server (scripts/test.sh does)")
    client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        ["etcd", "--name", "t", "--data-dir", data_dir, "--listen-client-urls", client,
         "--advertise-client-urls", client, "--listen-peer-urls", peer,
         "--initial-advertise-peer-urls", peer, "--initial-cluster", f"t={peer}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(f"{client}/v3/kv/range", data=b'{"key":"AA=="}', method="POST")
            urllib.request.urlopen(request, timeout=1).close()
            return Etcd(proc, client, data_dir)
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("etcd did not start in 20 s")


def sample_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` in Prometheus text whose labels include `labels`."""
    import re

    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{.*\})? (\S+)( \S+)?$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


class Service:
    """A kvcache binary started with `--config FILE` on an ephemeral port: it prints
    `NAME ready http=ADDR` when it serves (the gateway, the LoRA manager, the autoscaler)."""

    def __init__(self, binary: str, env: str, config: str, workdir: Path, log_filter: str = "info"):
        path = workdir / f"{binary}.toml"
        path.write_text(config)
        self.log = workdir / f"{binary}.log"
        self.proc = subprocess.Popen(
            [str(find_binary(binary, env)), "--config", str(path)],
            stdout=subprocess.PIPE,
            stderr=self.log.open("w"),
            env={**os.environ, "KVCACHE_LOG": log_filter},
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith(f"{binary} ready"), f"{binary} did not start: {line!r}\n{self.tail()}"
        self.url = "http://" + line.split("http=", 1)[1].strip()

    def tail(self) -> str:
        return self.log.read_text()[-5000:]

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` on its /metrics whose labels include `labels`."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as r:
            return sample_sum(r.read().decode(), name, **labels)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Prometheus:
    """Debian's Prometheus on a free loopback port, scraping `targets` (host:port) every second."""

    def __init__(self, targets: list[str], workdir: Path):
        import json
        import shutil
        import time

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
