"""Fixtures for the connector's tests: a real kvcache-server and a real vLLM on CPU.

The vLLM venv and tiny models come from `scripts/setup-vllm.sh`; `scripts/test.sh` runs these
tests with that venv's pytest and sets KVCACHE_VLLM_MODELS. Without the models the engine
tests skip with a message, unless KVCACHE_REQUIRE_VLLM=1 (CI), where they fail.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests never use the network; vLLM configs built in this process read local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "pyo3-bindings" / "tests"))

from vllm_serve import engine_env, models_dir, require_model  # noqa: E402

from kvserver import Server, start_server, stop_server  # noqa: E402

# Re-exported for tests and vllm-connector/benches/ttft.py.
__all__ = ["engine_env", "models_dir", "require_model"]

BLOCK_SIZE = 128  # vLLM's default on CPU
ENGINE_TIMEOUT_S = 600


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return require_model("tiny")


@pytest.fixture
def server() -> Iterator[Server]:
    s = start_server("--memory", "256MiB", "--enable-test-hooks")
    yield s
    stop_server(s)


def kv_config(server: Server | str, **extra: object) -> dict:
    """A kv_transfer_config that loads the connector and points it at `server`."""
    addr = server if isinstance(server, str) else server.data
    return {
        "kv_connector": "KVCacheConnector",
        "kv_connector_module_path": "kvcache_vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"servers": [addr], **extra},
    }


def run_engine(
    tmp: Path, model: Path, prompts: list[list[int]], kv: dict | None, env: dict | None = None, **spec
) -> list[dict]:
    """Runs `engine_run.py` in a fresh process (single-process vLLM) and returns its last round.
    `env` adds to `engine_env()`; `spec` adds to the run's spec (see engine_run.py)."""
    spec = {"model": str(model), "prompts": prompts, "kv_transfer_config": kv, **spec}
    n = len(list(tmp.glob("spec-*.json")))
    spec_path, out_path = tmp / f"spec-{n}.json", tmp / f"out-{n}.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(HERE / "engine_run.py"), str(spec_path), str(out_path)],
        env={**engine_env(), "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})},
        capture_output=True,
        text=True,
        timeout=ENGINE_TIMEOUT_S,
    )
    if proc.returncode != 0:
        raise AssertionError(f"vLLM run failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(out_path.read_text())[-1]


def engine_config(model: Path | str, **engine_args: object):
    """The real `VllmConfig` of an engine as engine_run.py starts it, built without starting one
    (no model load, no workers)."""
    from vllm.engine.arg_utils import EngineArgs

    args = dict(model=str(model), max_model_len=2048, enforce_eager=True, dtype="bfloat16", seed=0)
    return EngineArgs(**(args | engine_args), enable_prefix_caching=True).create_engine_config()  # type: ignore[arg-type]


def make_prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    """Token-id prompts of the given lengths (ids inside the tiny tokenizer's 426-token vocabulary)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, 400) for _ in range(n)] for n in lengths]


def loadable_tokens(prompt: list[int]) -> int:
    """Tokens the cache can supply: every full block except one holding the last token."""
    return (len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE


def assert_same_outputs(got: list[dict], want: list[dict]) -> None:
    """Greedy outputs equal: token ids exactly, cumulative logprobs to 1e-4."""
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g["token_ids"] == w["token_ids"], f"prompt {i}: token ids differ"
        assert g["cumulative_logprob"] == pytest.approx(w["cumulative_logprob"], abs=1e-4), (
            f"prompt {i}: cumulative logprob {g['cumulative_logprob']} != {w['cumulative_logprob']}"
        )
