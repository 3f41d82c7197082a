"""The Python API against a real kvcache-server over loopback."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import kvcache
from kvserver import REPO, Server, start_etcd, start_server, stop_server


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_round_trip_exists_and_prefix_match(server: Server, transport: str) -> None:
    c = kvcache.Client(server.data, transport=transport)
    assert c.put(key(1), b"hello kv") is True
    assert c.put(key(1), b"hello kv") is True  # immutable: an existing key is a no-op
    assert c.put(key(2), bytearray(b"x" * 100_000)) is True
    assert c.put(key(3), memoryview(b"abc")) is True
    assert c.get(key(1)) == b"hello kv"
    assert c.get(key(2)) == b"x" * 100_000
    assert c.get(key(99)) is None
    assert c.exists([key(1), key(99), key(3)]) == [True, False, True]
    assert c.prefix_match([key(1), key(2), key(99), key(3)]) == 2
    stats = c.stats()
    assert stats["transport"] == transport and stats["puts"] == 4 and stats["get_hits"] == 2
    op = "shm_get" if transport == "shm" else "get"
    assert server.metric(f'kvcache_hit_blocks_total{{op="{op}"}}') == 2
    assert server.metric(f'kvcache_bytes_sent_total{{transport="{transport}"}}') == 100_008


def test_auto_picks_shared_memory_on_the_same_host(server: Server) -> None:
    assert kvcache.Client(server.data).stats()["transport"] == "shm"


def test_auto_falls_back_to_tcp_with_a_log_line_and_shm_fails_clearly(caplog: pytest.LogCaptureFixture) -> None:
    s = start_server("--memory", "16MiB", "--shm-socket", "off")
    try:
        with caplog.at_level(logging.INFO, logger="kvcache"):
            c = kvcache.Client(s.data)
        assert c.stats()["transport"] == "tcp"
        assert any("shared memory unavailable" in r.getMessage() for r in caplog.records), caplog.records
        assert c.put(key(1), b"v") and c.get(key(1)) == b"v"
        with pytest.raises(kvcache.KvcacheError, match="shared memory unavailable: the node has shared memory off"):
            kvcache.Client(s.data, transport="shm")
    finally:
        stop_server(s)


def test_a_corrupted_block_is_a_miss_through_shared_memory(server: Server) -> None:
    c = kvcache.Client(server.data, transport="shm")
    blob = bytes(range(256)) * 4096  # 1 MiB
    assert c.put(key(42), blob) and c.put(key(43), blob)
    with urllib.request.urlopen(
        urllib.request.Request(f"http://{server.metrics}/debug/corrupt/{key(42).hex()}", method="POST"), timeout=5
    ) as r:
        assert r.status == 200
    dest = np.zeros((2, len(blob)), dtype=np.uint8)
    segs = [[(dest.ctypes.data + i * len(blob), len(blob))] for i in range(2)]
    assert c.get_many_into([key(42), key(43)], segs) == [False, True]
    assert dest[1].tobytes() == blob
    assert c.get(key(42)) is None and c.exists([key(42)]) == [False]


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_gpu_direct_without_rdma_raises_saying_to_stage(server: Server, transport: str) -> None:
    c = kvcache.Client(server.data, transport=transport)
    with pytest.raises(kvcache.KvcacheError, match="stage GPU memory through pinned host memory"):
        c.register_gpu_memory(0, 0x7F00_0000_0000, 1 << 20)
    spans = [[(0x7F00_0000_0000, 4096)]]
    with pytest.raises(ValueError, match=f"needs an RDMA connection.*uses {transport}"):
        c.get_many_into_gpu([key(70)], spans)
    with pytest.raises(ValueError, match="needs an RDMA connection"):
        c.put_many_from_gpu([key(70)], spans)
    assert c.exists([key(70)]) == [False]
    cluster = kvcache.Client([server.data], transport=transport)
    with pytest.raises(kvcache.KvcacheError, match="not a cluster"):
        cluster.register_gpu_memory(0, 0x7F00_0000_0000, 1 << 20)


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_zero_copy_put_many_and_get_many_into_numpy(server: Server, transport: str) -> None:
    c = kvcache.Client(server.data, transport=transport)
    # Eight "layers" of KV, each (blocks, 1024) float16: one block's bytes are spread over all
    # layers, as in vLLM's paged KV tensors.
    layers = [np.random.default_rng(i).standard_normal((4, 1024)).astype(np.float16) for i in range(8)]
    keys = [key(100 + b) for b in range(4)]
    segs = [[(layer.ctypes.data + b * layer.strides[0], layer.strides[0]) for layer in layers] for b in range(4)]
    assert c.put_many(keys, segs) == [True] * 4
    dest = [np.zeros_like(layer) for layer in layers]
    dsegs = [[(d.ctypes.data + b * d.strides[0], d.strides[0]) for d in dest] for b in range(4)]
    absent = np.zeros(16, dtype=np.uint8)
    assert c.get_many_into(keys + [key(555)], dsegs + [[(absent.ctypes.data, 16)]]) == [True] * 4 + [False]
    assert not absent.any(), "a miss leaves its destination untouched"
    for src, dst in zip(layers, dest, strict=True):
        assert np.array_equal(src, dst)


def test_wrong_input_raises_documented_exceptions(server: Server) -> None:
    c = kvcache.Client(server.data)
    with pytest.raises(ValueError, match="16 bytes"):
        c.put(b"short", b"v")
    with pytest.raises(ValueError, match="16 bytes"):
        c.exists([key(1), b"x" * 15])
    c.put(key(7), b"x" * 1000)
    buf = np.zeros(999, dtype=np.uint8)
    with pytest.raises(ValueError, match="stored with 1000 bytes but its segments hold 999"):
        c.get_many_into([key(7)], [[(buf.ctypes.data, 999)]])
    assert not buf.any(), "a wrong-size destination is left untouched"
    big = np.zeros(64, dtype=np.uint8)
    with pytest.raises(ValueError, match="overlap"):
        c.get_many_into([key(7), key(8)], [[(big.ctypes.data, 32)], [(big.ctypes.data + 16, 32)]])
    with pytest.raises(ValueError, match="invalid segment"):
        c.get_many_into([key(7)], [[(0, 1000)]])
    with pytest.raises(ValueError, match="segment lists"):
        c.put_many([key(7)], [])
    with pytest.raises(ValueError, match="transport must be"):
        kvcache.Client(server.data, transport="carrier-pigeon")
    with pytest.raises(ConnectionError):
        kvcache.Client("127.0.0.1:1", timeout_s=2)
    with kvcache.Client(server.data) as scoped:
        assert scoped.get(key(7)) == b"x" * 1000
    with pytest.raises(kvcache.KvcacheError, match="closed"):
        scoped.get(key(7))


def test_a_node_that_stops_answering_raises_timeout_within_the_limit(server: Server) -> None:
    import signal

    c = kvcache.Client(server.data, timeout_s=0.3)
    c.put(key(1), b"v")
    server.proc.send_signal(signal.SIGSTOP)
    try:
        while Path(f"/proc/{server.proc.pid}/stat").read_text().split(") ")[1][0] != "T":
            time.sleep(0.005)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            c.get(key(1))
        assert time.monotonic() - started < 1.5
    finally:
        server.proc.send_signal(signal.SIGCONT)
    assert c.get(key(1)) == b"v"


def test_chain_keys_match_the_golden_vectors() -> None:
    golden = json.loads((REPO / "kvcache-core/tests/golden/key_chain_v1.json").read_text())
    assert golden["key_scheme_version"] == 1
    for case in golden["cases"]:
        ns = case["namespace"]
        tp = ns["tp"]
        nsid = kvcache.namespace_id(
            ns["model"],
            ns["kv_dtype"],
            ns["block_size"],
            layout=ns["layout"],
            tp_world_size=tp.get("world_size", 1),
            tp_rank=tp.get("rank", 0),
            rank_agnostic=tp["kind"] == "rank_agnostic",
            lora=ns["lora"],
            salt=ns["salt"],
        )
        assert nsid.hex() == case["namespace_id"], case["name"]
        keys = kvcache.chain_keys(nsid, case["tokens"], case["block_size"])
        assert [k.hex() for k in keys] == case["keys"], case["name"]


def test_chain_keys_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="16-byte"):
        kvcache.chain_keys(b"ns", [1, 2, 3], 16)
    with pytest.raises(ValueError, match="block_size"):
        kvcache.chain_keys(b"\0" * 16, [1, 2, 3], 0)
    with pytest.raises(OverflowError):
        kvcache.chain_keys(b"\0" * 16, [-1], 1)
    with pytest.raises(ValueError, match="tp_rank"):
        kvcache.namespace_id("m", "bfloat16", 16, tp_world_size=2, tp_rank=2)


KILLED_CLIENT = """
import sys, numpy as np, kvcache
c = kvcache.Client(sys.argv[1])
assert c.stats()["transport"] == "shm"
keys = [i.to_bytes(16, "big") for i in range(1000, 1032)]
dest = np.zeros((32, 1 << 20), dtype=np.uint8)
segs = [[(dest.ctypes.data + i * (1 << 20), 1 << 20)] for i in range(32)]
print("ready", flush=True)
while True:
    c.get_many_into(keys, segs)
"""


def test_a_killed_client_frees_its_leases(server: Server) -> None:
    c = kvcache.Client(server.data)
    keys = [key(1000 + i) for i in range(32)]
    blob = np.random.default_rng(0).integers(0, 255, 1 << 20, dtype=np.uint8).tobytes()
    for k in keys:
        assert c.put(k, blob)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, server.data], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while server.metric("kvcache_active_leases") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("kvcache_active_leases") == 0
    assert all(c.get(k) == blob for k in keys)


def test_a_static_cluster_with_replicas_survives_a_dead_member() -> None:
    servers = [start_server("--memory", "64MiB") for _ in range(3)]
    try:
        members = [s.data for s in servers]
        two = kvcache.Client(members, replicas=2, timeout_s=1)
        one = kvcache.Client(members, replicas=1, timeout_s=1)
        keys2 = [key(5000 + i) for i in range(200)]
        keys1 = [key(9000 + i) for i in range(200)]
        for k in keys2:
            assert two.put(k, k * 64)
        for k in keys1:
            assert one.put(k, k * 64)
        assert two.exists(keys2) == [True] * 200
        assert sum(s.metric("kvcache_blocks_stored") for s in servers) == 2 * 200 + 200
        servers[0].proc.kill()
        servers[0].proc.wait()
        assert all(two.get(k) == k * 64 for k in keys2), "R=2: no misses after a member dies"
        assert two.prefix_match(keys2) == 200
        dest = np.zeros((200, 1024), dtype=np.uint8)
        segs = [[(dest.ctypes.data + i * 1024, 1024)] for i in range(200)]
        assert two.get_many_into(keys2, segs) == [True] * 200
        assert all(bytes(dest[i]) == k * 64 for i, k in enumerate(keys2))
        got = [one.get(k) for k in keys1]  # R=1: misses, never an exception
        assert any(v is None for v in got) and all(v is None or v == k * 64 for v, k in zip(got, keys1, strict=True))
        assert "replicas=2" in repr(two)
    finally:
        for s in servers:
            s.proc.kill()
            s.proc.wait()


def test_cluster_arguments_are_checked(server: Server) -> None:
    with pytest.raises(kvcache.KvcacheError, match="cannot read the cluster membership"):
        kvcache.Client("etcd://127.0.0.1:9", timeout_s=1.0)  # nothing listens there
    with pytest.raises(ValueError, match="bad etcd URL"):
        kvcache.Client("etcd://no-port")
    with pytest.raises(ValueError, match="list of members"):
        kvcache.Client(server.data, replicas=2)
    with pytest.raises(ValueError, match="at least one member"):
        kvcache.Client([])


def test_a_cluster_found_through_etcd_survives_a_killed_node(tmp_path: Path) -> None:
    etcd = start_etcd(str(tmp_path / "etcd"))
    servers = [start_server("--memory", "64MiB", "--etcd", etcd.url, "--etcd-ttl", "2") for _ in range(3)]
    try:
        c = kvcache.Client(etcd.url.replace("http://", "etcd://"), replicas=2, timeout_s=1.0)
        deadline = time.monotonic() + 5
        while len(c.stats()["members"]) < 3:
            assert time.monotonic() < deadline, c.stats()
            time.sleep(0.05)
        values = {key(i): bytes([i % 251]) * (1000 + i) for i in range(300)}
        assert all(c.put(k, v) for k, v in values.items())
        servers[0].proc.kill()  # SIGKILL
        servers[0].proc.wait()
        assert all(c.get(k) == v for k, v in values.items()), "R=2: every block survives one loss"
        deadline = time.monotonic() + 4
        while servers[0].data in c.stats()["members"]:
            assert time.monotonic() < deadline, "the dead node stays in the ring past its TTL"
            time.sleep(0.05)
        assert c.stats()["ring_version"] >= 2
    finally:
        for s in servers[1:]:
            stop_server(s)
        etcd.proc.kill()
        etcd.proc.wait()


def test_a_locality_hint_keeps_a_copy_on_the_named_member() -> None:
    servers = [start_server("--memory", "64MiB") for _ in range(3)]
    try:
        c = kvcache.Client([s.data for s in servers], timeout_s=1.0)
        near = servers[2].data
        src = np.arange(200 * 512, dtype=np.uint8).reshape(200, 512)
        keys = [key(i) for i in range(200)]
        segs = [[(src[i].ctypes.data, 512)] for i in range(200)]
        assert all(c.put_many(keys, segs, prefer=near))
        assert servers[2].metric("kvcache_blocks_stored") == 200
        servers[0].proc.kill()  # a ring owner dies; the nearby copy still serves every block
        servers[0].proc.wait()
        dst = np.zeros_like(src)
        assert all(c.get_many_into(keys, [[(dst[i].ctypes.data, 512)] for i in range(200)], prefer=near))
        assert np.array_equal(src, dst)
    finally:
        for s in servers[1:]:
            stop_server(s)
