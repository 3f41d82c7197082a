"""A real vLLM on CPU with the connector, against a real kvcache-server (single-process engine).

Each run is a fresh engine process; prompts are token ids, decoding is greedy, so runs must
agree token for token.
"""

from __future__ import annotations

import signal
import time
import urllib.request
from pathlib import Path

import kvcache
from conftest import (
    BLOCK_SIZE,
    assert_same_outputs,
    engine_config,
    kv_config,
    loadable_tokens,
    make_prompts,
    run_engine,
)
from kvcache_vllm.identity import model_identity
from kvcache_vllm.settings import Namespaces, Settings
from kvserver import Server

# Two full blocks and a partial one; exactly two blocks (the last token's block is computed);
# a prompt shorter than a block; and one that shares the first's two blocks.
PROMPTS = make_prompts([300, 256, 40])
PROMPTS.append(PROMPTS[0][: 2 * BLOCK_SIZE] + make_prompts([90], seed=2)[0])
LAYERS = 2
LAYER_BLOCK_BYTES = 2 * BLOCK_SIZE * 2 * 64 * 2  # kv heads x tokens x (K,V) x head size x bf16


def namespaces(model: Path) -> Namespaces:
    """The tiny model's namespaces, derived as the connector does from a real vLLM config of the
    engine that engine_run.py starts."""
    config = engine_config(model)
    ns = Namespaces.for_engine(Settings(), config, 0, "cpu", model=model_identity(config))
    assert (ns.kv_dtype, ns.block_size, ns.num_kv_heads, ns.head_size) == ("bfloat16", BLOCK_SIZE, 2, 64)
    return ns


def test_outputs_equal_without_and_with_the_cache_and_a_second_instance_loads(
    server: Server, tiny_model: Path, tmp_path: Path
) -> None:
    baseline = run_engine(tmp_path, tiny_model, PROMPTS, None)
    first = run_engine(tmp_path, tiny_model, PROMPTS, kv_config(server))
    assert_same_outputs(first, baseline)
    # The first instance saved every full prompt block of every layer (the shared prefix once).
    full_blocks = len(PROMPTS[0]) // BLOCK_SIZE + len(PROMPTS[1]) // BLOCK_SIZE
    assert server.metric("kvcache_blocks_stored") == full_blocks * LAYERS

    second = run_engine(tmp_path, tiny_model, PROMPTS, kv_config(server))
    assert_same_outputs(second, baseline)
    for prompt, out in zip(PROMPTS, second, strict=True):
        assert out["num_cached_tokens"] >= loadable_tokens(prompt), out


def test_staged_loads_and_saves_give_the_same_outputs(server: Server, tiny_model: Path, tmp_path: Path) -> None:
    """The staging path CUDA engines take (a buffer between the client and the KV tensors),
    forced on host tensors: what one instance saves through it, another loads through it."""
    baseline = run_engine(tmp_path, tiny_model, PROMPTS, None)
    first = run_engine(tmp_path, tiny_model, PROMPTS, kv_config(server, staging="always"))
    assert_same_outputs(first, baseline)
    full_blocks = len(PROMPTS[0]) // BLOCK_SIZE + len(PROMPTS[1]) // BLOCK_SIZE
    assert server.metric("kvcache_blocks_stored") == full_blocks * LAYERS
    # Stored through the buffer, loaded straight: the bytes are the engine's own.
    second = run_engine(tmp_path, tiny_model, PROMPTS, kv_config(server))
    assert_same_outputs(second, baseline)
    assert all(out["num_cached_tokens"] >= loadable_tokens(p) for p, out in zip(PROMPTS, second, strict=True))
    # And loaded through the buffer.
    third = run_engine(tmp_path, tiny_model, PROMPTS, kv_config(server, staging="always"))
    assert_same_outputs(third, baseline)
    for prompt, out in zip(PROMPTS, third, strict=True):
        assert out["num_cached_tokens"] >= loadable_tokens(prompt), out


def test_async_loads_give_the_same_outputs(server: Server, tiny_model: Path, tmp_path: Path) -> None:
    """Requests that load asynchronously wait a step, so a batch mixes them differently from a
    run without the cache, and bf16 sums differ in the last digits with the batch's makeup.
    Generating each prompt alone fixes the batches on both sides."""
    baseline = run_engine(tmp_path, tiny_model, PROMPTS, None, one_by_one=True)
    run_engine(tmp_path, tiny_model, PROMPTS, kv_config(server))
    second = run_engine(tmp_path, tiny_model, PROMPTS, kv_config(server, load_async=True), one_by_one=True)
    assert_same_outputs(second, baseline)
    for prompt, out in zip(PROMPTS, second, strict=True):
        assert out["num_cached_tokens"] >= loadable_tokens(prompt), out


def test_loaded_kv_is_used_and_keys_match_the_engine(server: Server, tiny_model: Path, tmp_path: Path) -> None:
    """Blocks of zeros stored under the first prompt's keys change its output: the engine computes
    the same keys as `Namespaces` and really attends over what it loads."""
    baseline = run_engine(tmp_path, tiny_model, PROMPTS[:3], None)
    ns = namespaces(tiny_model)
    tokens = PROMPTS[0][: loadable_tokens(PROMPTS[0])]
    with kvcache.Client(server.data, transport="tcp") as client:
        for layer in range(LAYERS):
            for key in ns.keys(layer, tokens, None, None):
                assert client.put(key, bytes(LAYER_BLOCK_BYTES))
    poisoned = run_engine(tmp_path, tiny_model, PROMPTS[:3], kv_config(server))
    assert poisoned[0]["num_cached_tokens"] == loadable_tokens(PROMPTS[0])
    assert (poisoned[0]["token_ids"], poisoned[0]["cumulative_logprob"]) != (
        baseline[0]["token_ids"],
        baseline[0]["cumulative_logprob"],
    )
    assert_same_outputs(poisoned[1:], baseline[1:])


def test_a_corrupted_block_is_recomputed(server: Server, tiny_model: Path, tmp_path: Path) -> None:
    """The request whose load fails is rescheduled to recompute, in a batch of a different
    makeup, so prompts run alone here (see the async test)."""
    baseline = run_engine(tmp_path, tiny_model, PROMPTS[:3], None, one_by_one=True)
    run_engine(tmp_path, tiny_model, PROMPTS[:3], kv_config(server))
    # Flip a byte of the first prompt's second block in the last layer.
    key = namespaces(tiny_model).keys(LAYERS - 1, PROMPTS[0][: 2 * BLOCK_SIZE], None, None)[1]
    request = urllib.request.Request(f"http://{server.metrics}/debug/corrupt/{key.hex()}", method="POST")
    urllib.request.urlopen(request, timeout=5).close()

    second = run_engine(tmp_path, tiny_model, PROMPTS[:3], kv_config(server), one_by_one=True)
    assert_same_outputs(second, baseline)
    # The bad block was detected (by the shared-memory reader, confirmed by the node) and dropped.
    assert server.metric('kvcache_suspect_blocks_total{result="confirmed"}') == 1
    assert second[1]["num_cached_tokens"] >= loadable_tokens(PROMPTS[1])


def test_a_dead_cache_costs_nothing_but_hits(tiny_model: Path, tmp_path: Path) -> None:
    """No node listens at the configured address: every lookup fails fast, outputs are right."""
    baseline = run_engine(tmp_path, tiny_model, PROMPTS[:3], None)
    started = time.monotonic()
    dead = run_engine(tmp_path, tiny_model, PROMPTS[:3], kv_config("127.0.0.1:9", timeout_s=1.0))
    assert_same_outputs(dead, baseline)
    assert all(out["num_cached_tokens"] == 0 for out in dead)
    assert time.monotonic() - started < 120


def test_a_frozen_cache_costs_at_most_a_few_timeouts(server: Server, tiny_model: Path, tmp_path: Path) -> None:
    """A node that accepts connections but never answers (SIGSTOP): each call gives up after
    `timeout_s`, the connector then rests, and the outputs are computed and right."""
    baseline = run_engine(tmp_path, tiny_model, PROMPTS[:3], None)
    run_engine(tmp_path, tiny_model, PROMPTS[:3], kv_config(server))
    server.proc.send_signal(signal.SIGSTOP)
    try:
        frozen = run_engine(tmp_path, tiny_model, PROMPTS[:3], kv_config(server, timeout_s=1.0))
    finally:
        server.proc.send_signal(signal.SIGCONT)
    assert_same_outputs(frozen, baseline)
    # One generate call for the three prompts: the lookup and the save each wait one timeout at
    # most before the connector rests; a client that ignored its timeout would hang here.
    assert frozen[0]["seconds"] < baseline[0]["seconds"] + 10, (frozen[0]["seconds"], baseline[0]["seconds"])
