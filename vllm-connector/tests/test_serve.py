"""`vllm serve` in its real multi-process layout (API server, engine core with the scheduler's
connector, worker with the worker's connector), against a real kvcache-server.

One test, in phases, because each `vllm serve` start costs about half a minute:
1. instance A serves a set of prompts (it saves their blocks);
2. instance B, started after A has stopped, serves them again and loads their prefixes: its
   /metrics count the external hits and its outputs equal A's;
3. the cache node is killed with SIGKILL while B is serving: B keeps answering, correctly,
   with no request held longer than the connector's timeout allows.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from vllm_serve import Serve

from conftest import BLOCK_SIZE, kv_config, loadable_tokens, make_prompts
from kvserver import Server

PROMPTS = make_prompts([300, 420, 260], seed=7)
LATE_PROMPTS = make_prompts([330, 200], seed=8)
FRESH_PROMPTS = make_prompts([280], seed=9)
TIMEOUT_S = 1.0


def assert_close(got: dict, want: dict, what: str) -> None:
    assert got["token_ids"] == want["token_ids"], f"{what}: token ids differ"
    assert abs(got["cumulative_logprob"] - want["cumulative_logprob"]) < 1e-4, (what, got, want)


def test_vllm_serve_reuses_prefixes_across_instances_and_survives_a_dead_cache(
    server: Server, tiny_model: Path, tmp_path: Path
) -> None:
    kv = kv_config(server, timeout_s=TIMEOUT_S)
    a = Serve(tiny_model, kv, tmp_path / "serve-a.log")
    try:
        first = [a.complete(p) for p in PROMPTS + LATE_PROMPTS]
    finally:
        a.stop()
    saved = sum(len(p) // BLOCK_SIZE for p in PROMPTS + LATE_PROMPTS)
    assert server.metric("kvcache_blocks_stored") == 2 * saved, "A saved every full block of both layers"

    b = Serve(tiny_model, kv, tmp_path / "serve-b.log")
    try:
        second = [b.complete(p) for p in PROMPTS]
        for i, (got, want) in enumerate(zip(second, first[: len(PROMPTS)], strict=True)):
            assert_close(got, want, f"B prompt {i}")
        expected_hits = sum(loadable_tokens(p) for p in PROMPTS)
        assert b.metric("vllm:external_prefix_cache_hits_total") >= expected_hits, b.tail()
        assert b.metric("vllm:kvcache_loaded_blocks_total") >= 2 * expected_hits // BLOCK_SIZE

        # Kill the node while B serves: the late prompts' lookups and loads meet a dead cache.
        results: list[dict] = []
        serving = threading.Thread(target=lambda: results.extend(b.complete(p) for p in LATE_PROMPTS + PROMPTS))
        serving.start()
        time.sleep(0.2)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        serving.join(timeout=300)
        assert not serving.is_alive(), "B stopped answering after the cache died"
        for i, (got, want) in enumerate(zip(results, first[len(PROMPTS) :] + first[: len(PROMPTS)], strict=True)):
            assert_close(got, want, f"B after the kill, request {i}")
            assert got["seconds"] < 30, f"request {i} took {got['seconds']:.1f} s"
        # A prompt nobody has seen after the kill: its lookup fails, fast, and it is computed.
        fresh = b.complete(FRESH_PROMPTS[0])
        assert fresh["seconds"] < 30 and len(fresh["token_ids"]) == 16
        assert b.proc.poll() is None, "vllm serve died"
        assert b.metric("vllm:kvcache_lookup_errors_total") >= 1, b.tail()
    finally:
        b.stop()
