"""The connector at start and on the scheduler side, driven with real vLLM objects (engine
configs, KV-cache configs, requests, scheduler outputs) against a real node, without an engine:
what a model or a request that the connector must not cache gets.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
from vllm.sampling_params import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, SlidingWindowSpec
from vllm.v1.request import Request

import kvcache
from conftest import BLOCK_SIZE, engine_config, kv_config, make_prompts
from kvcache_vllm import KVCacheConnector
from kvcache_vllm.identity import model_identity
from kvcache_vllm.settings import Namespaces, Settings
from kvserver import Server

LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
SHAPE = dict(block_size=BLOCK_SIZE, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
LAYER_BLOCK_BYTES = 2 * BLOCK_SIZE * 2 * 64 * 2


def kv_cache_config(*groups: KVCacheGroupSpec) -> KVCacheConfig:
    return KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=list(groups))


def connector_config(model: Path, server: Server | str):
    return engine_config(model, kv_transfer_config=KVTransferConfig(**kv_config(server)))


def test_a_model_with_two_kv_cache_groups_is_refused_at_start_naming_the_model_and_groups(tiny_model: Path) -> None:
    config = connector_config(tiny_model, "127.0.0.1:9")
    hybrid = kv_cache_config(
        KVCacheGroupSpec([LAYERS[0]], FullAttentionSpec(**SHAPE)),
        KVCacheGroupSpec([LAYERS[1]], SlidingWindowSpec(**SHAPE, sliding_window=256)),
    )
    for role in (KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER):
        with pytest.raises(ValueError) as refused:
            KVCacheConnector(config, role, hybrid)
        message = str(refused.value)
        assert repr(str(tiny_model)) in message
        assert (
            "has 2 KV-cache group(s): group 0: FullAttentionSpec, 1 layers (model.layers.0.self_attn.attn); "
            "group 1: SlidingWindowSpec, 1 layers (model.layers.1.self_attn.attn)"
        ) in message
        assert "supports exactly one group of causal full attention" in message


def test_a_single_group_that_is_not_causal_full_attention_is_refused(tiny_model: Path) -> None:
    config = connector_config(tiny_model, "127.0.0.1:9")
    for spec in (SlidingWindowSpec(**SHAPE, sliding_window=256), FullAttentionSpec(**SHAPE, non_causal=True)):
        with pytest.raises(ValueError, match="has 1 KV-cache group"):
            KVCacheConnector(config, KVConnectorRole.SCHEDULER, kv_cache_config(KVCacheGroupSpec(LAYERS, spec)))


def request(req_id: str, tokens: list[int] | None, **kw: object) -> Request:
    return Request(req_id, tokens, SamplingParams(max_tokens=4), None, **kw)  # type: ignore[arg-type]


def blocks(ids: list[int]) -> KVCacheBlocks:
    return KVCacheBlocks(([KVCacheBlock(i) for i in ids],))


def test_multimodal_and_prompt_embedding_requests_neither_look_up_nor_load_nor_save(
    server: Server, tiny_model: Path
) -> None:
    config = connector_config(tiny_model, server)
    connector = KVCacheConnector(
        config, KVConnectorRole.SCHEDULER, kv_cache_config(KVCacheGroupSpec(LAYERS, FullAttentionSpec(**SHAPE)))
    )
    try:
        ns = Namespaces.for_engine(Settings(), config, 0, "cpu", model=model_identity(config))
        cached, fresh = make_prompts([300, 300], seed=11)
        # The node holds both blocks of `cached` on the last layer (what lookups ask about).
        with kvcache.Client(server.data, transport="tcp") as client:
            for key in ns.keys(len(LAYERS) - 1, cached[: 2 * BLOCK_SIZE], None, None):
                assert client.put(key, bytes(LAYER_BLOCK_BYTES))
        image = MultiModalFeatureSpec(
            data=None, modality="image", identifier="image-1", mm_position=PlaceholderRange(offset=10, length=64)
        )
        text_hit, text_new = request("text-hit", cached), request("text-new", fresh)
        with_image = request("image", cached, mm_features=[image])
        with_embeds = request("embeds", None, prompt_embeds=torch.zeros(300, 256))

        assert connector.get_num_new_matched_tokens(text_hit, 0) == (2 * BLOCK_SIZE, False)
        assert connector.get_num_new_matched_tokens(text_new, 0) == (0, False)
        for r in (with_image, with_embeds):
            # Asked twice, as vLLM does for a request it could not schedule at once.
            assert connector.get_num_new_matched_tokens(r, 0) == (0, False)
            assert connector.get_num_new_matched_tokens(r, 0) == (0, False)

        allocated = {"text-hit": [1, 2, 3], "text-new": [4, 5, 6], "image": [7, 8, 9], "embeds": [10, 11, 12]}
        connector.update_state_after_alloc(text_hit, blocks(allocated["text-hit"]), 2 * BLOCK_SIZE)
        for r in (text_new, with_image, with_embeds):
            connector.update_state_after_alloc(r, blocks(allocated[r.request_id]), 0)
        text_hit.num_computed_tokens = 2 * BLOCK_SIZE
        out = SchedulerOutput.make_empty()
        out.scheduled_new_reqs = [
            NewRequestData.from_request(r, (allocated[r.request_id],))
            for r in (text_hit, text_new, with_image, with_embeds)
        ]
        out.num_scheduled_tokens = {"text-hit": 300 - 2 * BLOCK_SIZE, "text-new": 300, "image": 300, "embeds": 300}
        out.total_num_scheduled_tokens = sum(out.num_scheduled_tokens.values())
        meta = connector.build_connector_meta(out)

        assert [(r.req_id, r.block_ids) for r in meta.loads] == [("text-hit", [1, 2])]
        assert [(r.req_id, r.block_ids) for r in meta.saves] == [("text-new", [4, 5])]
        assert meta.model == ns.model
        stats = connector.get_kv_connector_stats()
        assert stats is not None
        assert (stats.data["lookups"], stats.data["bypassed_requests"]) == (2, 2)
    finally:
        connector.shutdown()
