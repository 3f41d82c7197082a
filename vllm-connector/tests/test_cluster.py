"""The connector against a cluster of real kvcache-server processes found through a real etcd."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from test_engine import LAYERS, PROMPTS

from conftest import BLOCK_SIZE, assert_same_outputs, kv_config, loadable_tokens, run_engine
from kvserver import start_etcd, start_server, stop_server


def test_two_replicas_in_an_etcd_cluster_keep_every_hit_when_a_node_is_killed(tiny_model: Path, tmp_path: Path) -> None:
    etcd = start_etcd(str(tmp_path / "etcd"))
    node_args = ("--memory", "64MiB", "--etcd", etcd.url, "--etcd-ttl", "2", "--replicas", "2")
    nodes = [start_server(*node_args) for _ in range(3)]
    try:
        deadline = time.monotonic() + 10
        while any(n.metric("kvcache_cluster_members") < 3 for n in nodes) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(n.metric("kvcache_cluster_members") == 3 for n in nodes), "every node sees all three"
        kv = kv_config(etcd.url.replace("http://", "etcd://"), replicas=2, timeout_s=1.0)
        baseline = run_engine(tmp_path, tiny_model, PROMPTS, None)
        first = run_engine(tmp_path, tiny_model, PROMPTS, kv)
        assert_same_outputs(first, baseline)
        # Every (block, layer) entry is on two nodes, spread over all three.
        stored = [n.metric("kvcache_blocks_stored") for n in nodes]
        full_blocks = len(PROMPTS[0]) // BLOCK_SIZE + len(PROMPTS[1]) // BLOCK_SIZE
        assert sum(stored) == 2 * full_blocks * LAYERS, stored

        # kill -9 one node: a new instance still loads every loadable block from the replicas.
        nodes[0].proc.send_signal(signal.SIGKILL)
        nodes[0].proc.wait()
        second = run_engine(tmp_path, tiny_model, PROMPTS, kv)
        assert_same_outputs(second, baseline)
        for prompt, out in zip(PROMPTS, second, strict=True):
            assert out["num_cached_tokens"] >= loadable_tokens(prompt), out
    finally:
        for n in nodes[1:]:
            stop_server(n)
        etcd.proc.kill()
        etcd.proc.wait()
