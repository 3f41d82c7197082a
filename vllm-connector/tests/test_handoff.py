"""The P/D handoff's parameters (`handoff.py`), without an engine: what a prefill engine
announces and what a decode engine accepts."""

from __future__ import annotations

import time

from kvcache_vllm import handoff
from kvcache_vllm.settings import Settings


def test_a_producer_saves_for_a_remote_decode_by_role_or_by_request() -> None:
    assert handoff.produce(None, producer_role=False) is None
    assert handoff.produce({"do_remote_decode": False}, producer_role=False) is None
    assert handoff.produce(None, producer_role=True) == handoff.Produce(near=None)
    asked = handoff.produce({"do_remote_decode": True, "kvcache_near": "10.0.0.2:7400"}, producer_role=False)
    assert asked == handoff.Produce(near="10.0.0.2:7400")
    # A hint that is not host:port is dropped, not passed to the client.
    assert handoff.produce({"do_remote_decode": True, "kvcache_near": 7}, producer_role=False).near is None


def test_an_announcement_round_trips_to_the_decode_side() -> None:
    params = handoff.announce(
        blocks=3, block_size=128, namespace=bytes(range(16)), near="10.0.0.2:7400", prompt_tokens=400, ttl_s=30
    )
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["kvcache"]["namespace"] == bytes(range(16)).hex()
    expect = handoff.expect(params)
    assert expect is not None
    assert (expect.blocks, expect.near) == (3, "10.0.0.2:7400")
    assert not expect.expired()
    assert expect.expired(now_ms=int(time.time() * 1000) + 31_000)


def test_a_decode_engine_ignores_what_is_not_an_announcement_of_ours() -> None:
    assert handoff.expect(None) is None
    assert handoff.expect({"do_remote_prefill": False}) is None
    # Another connector's parameters (NIXL's), or another version of ours.
    assert handoff.expect({"do_remote_prefill": True, "remote_block_ids": [1, 2]}) is None
    assert handoff.expect({"do_remote_prefill": True, "kvcache": {"version": 99, "blocks": 1}}) is None
    malformed = {"do_remote_prefill": True, "kvcache": {"version": handoff.VERSION, "blocks": "3"}}
    assert handoff.expect(malformed) is None


def test_the_deadline_setting_is_checked() -> None:
    assert Settings.from_extra_config({}).handoff_ttl_s == 30.0
    assert Settings.from_extra_config({"handoff_ttl_s": 5}).handoff_ttl_s == 5.0
    try:
        Settings.from_extra_config({"handoff_ttl_s": 0})
    except ValueError as err:
        assert "handoff_ttl_s" in str(err)
    else:
        raise AssertionError("a zero handoff_ttl_s was accepted")
