"""What the scheduler side sends the worker side each step, and how both name a layer.

The two sides of the connector run in processes that share nothing in memory, so every block a
worker loads or saves travels in `KVCacheConnectorMetadata` as `BlockRun`s: the request's
token prefix, the blocks' chain positions and their block ids. Both sides key a layer's blocks
by the layer index that `_layer_index` reads from vLLM's layer name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass
class BlockRun:
    """Consecutive blocks of one request: chain positions `start..start+len(block_ids)`."""

    req_id: str
    tokens: list[int]
    start: int
    block_ids: list[int]
    lora: str | None
    salt: str | None
    # The cache node to save to as well / read from first (P/D: next to the decode engine).
    prefer: str | None = None


@dataclass
class KVCacheConnectorMetadata(KVConnectorMetadata):
    """What the workers do this step: blocks to load (sync or async) and blocks to save."""

    loads: list[BlockRun] = field(default_factory=list)
    async_loads: list[BlockRun] = field(default_factory=list)
    saves: list[BlockRun] = field(default_factory=list)
    # The engine's model identity (`identity.model_identity`), computed once by the scheduler.
    model: str = ""


def _layer_index(name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(name)
