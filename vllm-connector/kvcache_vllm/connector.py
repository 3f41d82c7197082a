"""`KVCacheConnector`: vLLM's v1 KV connector API on top of the `kvcache` client.

vLLM creates the connector twice, in different processes that share nothing in memory:

- the **scheduler side** (EngineCore process) computes each request's chain keys from its
  prompt tokens, asks the cache in one round trip how many leading blocks it holds, tells vLLM
  how many tokens to load, tracks the request's block ids across steps, and writes per step
  the metadata that tells workers which blocks to load and which to save;
- the **worker side** (one per GPU/CPU worker) knows the KV tensors: loads land straight in
  them through `get_many_into`, saves leave layer by layer through `put_many` from an I/O
  thread while the next layer computes, and failed loads are reported so vLLM recomputes.
  KV tensors in device memory (CUDA) move GPU-direct over RDMA where the client can register
  them, and are otherwise staged through pinned host memory (`staging.py`).

Every layer's block is its own cache entry (see `settings.Namespaces`). The scheduler asks
about the last layer's keys: saves go out in layer order, so the last layer arriving means the
block was saved whole. A block that is missing or fails verification on any layer is a load
error for that block and every later block of the request; vLLM recomputes from there when
`kv_load_failure_policy` is `recompute`.

The scheduler computes the engine's model identity (`identity.py`: weights, dtype,
quantization, HF config, KV cache dtype) and each request's LoRA identity, and sends them to
the workers in the metadata, so both sides key blocks from one computation. Models with more
than one KV-cache group (hybrid attention) are refused at start. Requests whose KV does not
follow from their token ids alone (multimodal inputs, prompt embeddings) bypass the cache.

This module is what vLLM loads: `KVCacheConnector` checks the model at start and hands each
call to its role, `scheduler.py` or `worker.py`. The per-step metadata between them is in
`metadata.py`, and the connection to the cache they share in `link.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from .identity import check_kv_scales
from .metadata import BlockRun, KVCacheConnectorMetadata
from .scheduler import _SchedulerSide
from .stats import KVCacheConnectorPromMetrics, KVCacheConnectorStats
from .worker import _WorkerSide

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# `BlockRun` and `KVCacheConnectorMetadata` live in `metadata.py`; re-exported so the names
# this module has always had stay importable from it.
__all__ = ["BlockRun", "KVCacheConnector", "KVCacheConnectorMetadata"]


def _refuse_unsupported_kv_cache(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None) -> None:
    """Raises ValueError unless the KV cache is one group of full attention: block ids of one
    group would land in the wrong blocks of another (hybrid models), and other attention kinds
    free or reuse blocks the connector would save or load into."""
    if kv_cache_config is None:
        return
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    groups = kv_cache_config.kv_cache_groups
    if len(groups) == 1:
        spec = groups[0].kv_cache_spec
        if type(spec) is FullAttentionSpec and not spec.non_causal:
            return
    described = "; ".join(
        f"group {i}: {type(g.kv_cache_spec).__name__}"
        f"{' (non-causal)' if getattr(g.kv_cache_spec, 'non_causal', False) else ''}"
        f", {len(g.layer_names)} layers ({', '.join(g.layer_names[:2])}{', ...' if len(g.layer_names) > 2 else ''})"
        for i, g in enumerate(groups)
    )
    raise ValueError(
        f"kvcache: model {vllm_config.model_config.model!r} has {len(groups)} KV-cache group(s): {described}. "
        "KVCacheConnector supports exactly one group of causal full attention (FullAttentionSpec); "
        "hybrid (sliding-window, Mamba, ...) and other attention kinds are not supported yet. "
        "Serve this model without --kv-transfer-config."
    )


class KVCacheConnector(KVConnectorBase_V1):
    """A vLLM v1 KV connector that loads and saves KV blocks through kvcache nodes.

    Load it with::

        --kv-transfer-config '{"kv_connector": "KVCacheConnector",
            "kv_connector_module_path": "kvcache_vllm", "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"servers": ["127.0.0.1:7400"]}}'

    `kv_connector_extra_config` keys are described on `kvcache_vllm.Settings`.
    """

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        _refuse_unsupported_kv_cache(vllm_config, kv_cache_config)
        check_kv_scales(vllm_config)
        self._scheduler: _SchedulerSide | None = None
        self._worker: _WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = _SchedulerSide(vllm_config, kv_cache_config)
        else:
            self._worker = _WorkerSide(vllm_config, kv_cache_config)

    # -- worker side ---------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVCacheConnectorMetadata)
        self._worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        assert self._worker is not None
        self._worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVCacheConnectorMetadata)
        self._worker.save_kv_layer(layer_name, meta)

    def wait_for_save(self) -> None:
        assert self._worker is not None
        self._worker.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]):
        assert self._worker is not None
        return self._worker.get_finished()

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self._worker is not None
        return self._worker.get_block_ids_with_load_errors()

    def shutdown(self) -> None:
        side = self._worker or self._scheduler
        if side is not None:
            side.shutdown()

    def get_kv_connector_stats(self) -> KVCacheConnectorStats | None:
        side = self._worker or self._scheduler
        return side.stats.take() if side is not None else None

    # -- scheduler side ------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]):
        assert self._scheduler is not None
        return self._scheduler.request_finished(request, block_ids)

    # -- stats ---------------------------------------------------------------------------------

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVCacheConnectorStats | None:
        return KVCacheConnectorStats(data=dict(data)) if data else KVCacheConnectorStats()

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict,
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVCacheConnectorPromMetrics:
        return KVCacheConnectorPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
