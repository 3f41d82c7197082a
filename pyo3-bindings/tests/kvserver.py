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
