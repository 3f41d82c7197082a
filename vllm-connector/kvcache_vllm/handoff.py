"""Prefill/decode handoff through the cache: what a prefill engine tells a decode engine.

vLLM's contract for disaggregation, as its routers drive it: the router sends a request to a
prefill engine with `max_tokens=1` and `kv_transfer_params={"do_remote_decode": true, ...}`,
copies the `kv_transfer_params` of that response verbatim into the same request for a decode
engine, and streams the decode engine's answer back. With this connector the KV goes through
the cache, not a point-to-point side channel:

- **prefill** (`kv_role` `kv_producer`, or any saving engine given `do_remote_decode`): every
  full prompt block is saved, those the engine had cached locally too, on the ring owners and
  also on `kvcache_near` (the cache node next to the decode engine, a locality hint the router
  may add). `request_finished` then checks how many leading blocks the cache holds and answers
  `{"do_remote_prefill": true, "do_remote_decode": false, "kvcache": {...}}` (`announce`);
- **decode** (a request carrying that): the usual prefix lookup finds the blocks, loads read
  the `near` node first, and every block that is missing or fails verification is recomputed
  with every later one (vLLM's `recompute` policy), as for any cache miss.

Of the two ways to make sure the decode engine does not look before the blocks are there, this
connector takes the first: the prefill response is not sent before its blocks are committed.
The worker's `wait_for_save` ends the engine step only when the step's saves have returned, and
vLLM sends a request's output after its last step; so the decode engine never waits or polls,
and a handoff costs no more than a normal lookup. `deadline_unix_ms` says until when the decode
side counts the announced blocks as expected (after it, a shortfall is ordinary eviction, not a
lost handoff).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("vllm.kvcache")

# The `kvcache` object's version: a decode engine ignores announcements of another version.
VERSION = 1


@dataclass(frozen=True)
class Produce:
    """A request whose prompt this (prefill) engine saves whole for a decode engine."""

    near: str | None


@dataclass(frozen=True)
class Expect:
    """What a prefill engine announced to this (decode) engine."""

    blocks: int
    near: str | None
    deadline_unix_ms: int

    def expired(self, now_ms: int | None = None) -> bool:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        return now_ms > self.deadline_unix_ms


def _near(value: Any) -> str | None:
    """A `host:port` locality hint, or None for anything else."""
    if isinstance(value, str) and ":" in value and len(value) <= 256:
        return value
    return None


def produce(params: dict[str, Any] | None, producer_role: bool) -> Produce | None:
    """Whether a request's prompt is saved whole for a decode engine, and near which node."""
    params = params or {}
    if not (producer_role or params.get("do_remote_decode") is True):
        return None
    return Produce(near=_near(params.get("kvcache_near")))


def expect(params: dict[str, Any] | None) -> Expect | None:
    """The announcement a decode request carries, or None (absent, or not one of ours)."""
    if not params or params.get("do_remote_prefill") is not True:
        return None
    ours = params.get("kvcache")
    if not isinstance(ours, dict) or ours.get("version") != VERSION:
        return None
    blocks, deadline = ours.get("blocks"), ours.get("deadline_unix_ms")
    if not isinstance(blocks, int) or blocks < 0 or not isinstance(deadline, int):
        logger.warning("kvcache scheduler: ignoring a malformed handoff announcement: %r", ours)
        return None
    return Expect(blocks=blocks, near=_near(ours.get("near")), deadline_unix_ms=deadline)


def announce(
    *, blocks: int, block_size: int, namespace: bytes, near: str | None, prompt_tokens: int, ttl_s: float
) -> dict[str, Any]:
    """The `kv_transfer_params` of a prefill response: `blocks` leading prompt blocks are in
    the cache (checked after the save), keyed in `namespace` (the lookup layer's)."""
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "kvcache": {
            "version": VERSION,
            "blocks": blocks,
            "block_size": block_size,
            "prompt_tokens": prompt_tokens,
            "namespace": namespace.hex(),
            "near": near,
            "deadline_unix_ms": int((time.time() + ttl_s) * 1000),
        },
    }
