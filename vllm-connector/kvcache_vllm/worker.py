"""The worker side of the connector (one per GPU/CPU worker): loads and saves of KV blocks.

It describes each layer's KV tensor with a layout descriptor, loads blocks straight into the
tensors (GPU-direct over RDMA where the client can register them, else staged through pinned
host memory for device tensors), saves them layer by layer from an I/O thread while the next
layer computes, and reports the blocks that failed to load so vLLM recomputes them.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import kvcache

from .layout import BlockLayout, LayoutError
from .link import _Link
from .metadata import BlockRun, KVCacheConnectorMetadata, _layer_index
from .settings import Namespaces, Settings
from .staging import Staging
from .stats import Recorder

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

# A child of vLLM's logger, so lines come out in vLLM's format and honour its log level.
logger = logging.getLogger("vllm.kvcache")


@dataclass
class _Layer:
    name: str
    index: int
    layout: BlockLayout


class _WorkerSide:
    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig):
        transfer = vllm_config.kv_transfer_config
        self.settings = Settings.from_extra_config(transfer.kv_connector_extra_config)
        self.vllm_config = vllm_config
        self.num_blocks = kv_cache_config.num_blocks
        self.stats = Recorder()
        self.link = _Link(self.settings, "worker", self.stats, on_connect=self._connected)
        # One I/O thread: loads run in layer order, saves after them; the forward pass only
        # waits for a layer's load (wait_for_layer_load) and for the step's saves (wait_for_save).
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvcache-io")
        self.layers: dict[str, _Layer] = {}
        self.namespaces: Namespaces | None = None
        self.layer_loads: dict[str, Future] = {}
        self.saves: list[Future] = []
        self.async_loads: dict[str, Future] = {}
        self.failed_blocks: set[int] = set()
        self.staging: Staging | None = None
        # CUDA KV tensors to register for GPU-direct RDMA on every new client (staging auto),
        # and whether the current client moves blocks that way.
        self.gpu_tensors: list[torch.Tensor] = []
        self.gpu_direct = False
        self.gpu_direct_logged = False

    def _connected(self, client: kvcache.Client) -> None:
        """Registers the KV tensors for GPU-direct on a new client; stages if that fails."""
        self.gpu_direct = False
        if not self.gpu_tensors:
            return
        storages = {t.untyped_storage().data_ptr(): t for t in self.gpu_tensors}
        try:
            methods = {
                client.register_gpu_memory(t.device.index or 0, ptr, t.untyped_storage().nbytes())
                for ptr, t in storages.items()
            }
        except (kvcache.KvcacheError, ValueError) as err:
            if not self.gpu_direct_logged:
                logger.info("kvcache worker: no GPU-direct (%s); staging through pinned host memory", err)
                self.gpu_direct_logged = True
            return
        self.gpu_direct = True
        logger.info(
            "kvcache worker: GPU-direct RDMA, %d KV allocations registered (%s)",
            len(storages),
            ", ".join(sorted(methods)),
        )

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        first = next(iter(kv_caches.values()))
        # The model identity comes with each step's metadata (`_for_model`).
        self.namespaces = Namespaces.for_engine(
            self.settings, self.vllm_config, get_tensor_model_parallel_rank(), first.device.type, model=""
        )
        ns = self.namespaces
        spec = ns.layout
        expected = spec.expected_shape(self.num_blocks, ns.num_kv_heads, ns.block_size, ns.head_size)
        for name, tensor in sorted(kv_caches.items(), key=lambda kv: _layer_index(kv[0])):
            if tuple(tensor.shape) != expected:
                raise LayoutError(
                    f"KV tensor {name} has shape {list(tensor.shape)}, but layout "
                    f"{spec.name!r} ({spec.shape}) expects {list(expected)}; set "
                    "kv_connector_extra_config.layout to this backend's layout"
                )
            self.layers[name] = _Layer(name, _layer_index(name), BlockLayout.of(tensor, spec, self.num_blocks))
        host = first.device.type == "cpu"
        staging = self.settings.staging
        if not host and staging == "never":
            raise ValueError(
                f"KV tensors on {first.device} are not host memory; kv_connector_extra_config.staging "
                "must be auto or always"
            )
        if staging == "always" or (staging == "auto" and not host):
            self.staging = Staging(first.device)
            for tensor in kv_caches.values():
                self.staging.add_tensor(tensor)
        if staging == "auto" and first.device.type == "cuda":
            self.gpu_tensors = list(kv_caches.values())
        block_bytes = next(iter(self.layers.values())).layout.block_bytes
        logger.info(
            "kvcache worker: %d layers, layout %s, %d bytes per layer block, servers=%s, %s",
            len(self.layers),
            spec.name,
            block_bytes,
            ",".join(self.settings.servers),
            "staged through pinned host memory" if self.staging else "straight into the KV tensors",
        )

    # -- loads ---------------------------------------------------------------------------------

    def _for_model(self, model: str) -> Namespaces:
        """This rank's namespaces for the model identity the scheduler sent."""
        assert self.namespaces is not None and model, "metadata without a model identity"
        if self.namespaces.model != model:
            self.namespaces = self.namespaces.with_model(model)
        return self.namespaces

    def _plan(self, layer: _Layer, runs: list[BlockRun], model: str):
        """Keys and destination runs of `layer` for the blocks in `runs`."""
        namespaces = self._for_model(model)
        keys, segments = [], []
        for run in runs:
            chain = namespaces.keys(layer.index, run.tokens, run.lora, run.salt)
            keys.extend(chain[run.start : run.start + len(run.block_ids)])
            segments.extend(layer.layout.segments(b) for b in run.block_ids)
        return keys, segments

    def _load(self, layers: list[_Layer], runs: list[BlockRun], model: str) -> None:
        """Loads `runs` into `layers`, one call per locality hint (almost always one)."""
        for prefer, group in _by_prefer(runs):
            self._load_group(layers, group, model, prefer)

    def _load_group(self, layers: list[_Layer], runs: list[BlockRun], model: str, prefer: str | None) -> None:
        """Loads `runs` into `layers` in one call; records every block that did not land."""
        keys, segments = [], []
        for layer in layers:
            k, s = self._plan(layer, runs, model)
            keys += k
            segments += s
        started = time.perf_counter()
        try:
            hits = self.link.call("load", lambda c: self._fetch(c, keys, segments, prefer))
        except ValueError as err:
            logger.error("kvcache worker: a stored block has the wrong size (%s)", err)
            hits = None
        self.stats.observe("load_seconds", time.perf_counter() - started)
        hits = hits or [False] * len(keys)
        # Mark the first block that failed on any layer, and every later block of its run.
        position = 0
        for _ in layers:
            for run in runs:
                n = len(run.block_ids)
                for j, hit in enumerate(hits[position : position + n]):
                    if not hit:
                        self.failed_blocks.update(run.block_ids[j:])
                        break
                position += n
        loaded = sum(hits)
        failed = len(keys) - loaded
        loaded_bytes = sum(length for hit, segs in zip(hits, segments, strict=True) if hit for _, length in segs)
        self.stats.add(loaded_blocks=loaded, loaded_bytes=loaded_bytes, load_failed_blocks=failed)

    def _fetch(self, client: kvcache.Client, keys: list[bytes], segments: list, prefer: str | None) -> list[bool]:
        """Loads into the KV tensors: GPU-direct, straight into host tensors, or staged."""
        if self.gpu_direct:
            return client.get_many_into_gpu(keys, segments)
        staging = self.staging
        into = segments if staging is None else staging.host_segments(segments)
        hits = client.get_many_into(keys, into, prefer=prefer)
        if staging is not None and any(hits):
            staging.to_device(segments, into, hits)
        return hits

    def start_load_kv(self, meta: KVCacheConnectorMetadata) -> None:
        if meta.loads:
            for layer in self.layers.values():
                self.layer_loads[layer.name] = self.io.submit(self._load, [layer], meta.loads, meta.model)
        for run in meta.async_loads:
            self.async_loads[run.req_id] = self.io.submit(self._load, list(self.layers.values()), [run], meta.model)

    def wait_for_layer_load(self, layer_name: str) -> None:
        future = self.layer_loads.pop(layer_name, None)
        if future is not None:
            future.result()

    def _drain_loads(self) -> None:
        for future in self.layer_loads.values():
            future.result()
        self.layer_loads.clear()

    # -- saves ---------------------------------------------------------------------------------

    def _save(self, layer: _Layer, runs: list[BlockRun], model: str, computed: Any = None) -> None:
        for prefer, group in _by_prefer(runs):
            self._save_group(layer, group, model, computed, prefer)

    def _save_group(self, layer: _Layer, runs: list[BlockRun], model: str, computed: Any, prefer: str | None) -> None:
        keys, segments = _unique_keys(*self._plan(layer, runs, model))
        started = time.perf_counter()
        try:
            stored = self.link.call("save", lambda c: self._store(c, keys, segments, computed, prefer))
        except ValueError as err:
            # A save that cannot be described never reaches the engine: it is counted as failed.
            logger.error("kvcache worker: a save was refused before sending (%s)", err)
            stored = None
        self.stats.observe("save_seconds", time.perf_counter() - started)
        stored = stored or [False] * len(keys)
        saved = sum(stored)
        saved_bytes = sum(length for ok, segs in zip(stored, segments, strict=True) if ok for _, length in segs)
        self.stats.add(saved_blocks=saved, saved_bytes=saved_bytes, save_failed_blocks=len(keys) - saved)

    def _store(
        self, client: kvcache.Client, keys: list[bytes], segments: list, computed: Any, prefer: str | None
    ) -> list[bool]:
        """Saves from the KV tensors once the step computed them: GPU-direct, from host
        tensors, or staged."""
        if self.gpu_direct:
            if computed is not None:
                computed.synchronize()
            return client.put_many_from_gpu(keys, segments)
        source = segments
        if self.staging is not None:
            source = self.staging.host_segments(segments)
            self.staging.from_device(segments, source, computed)
        return client.put_many(keys, source, prefer=prefer)

    def save_kv_layer(self, layer_name: str, meta: KVCacheConnectorMetadata) -> None:
        layer = self.layers.get(layer_name)
        if meta.saves and layer is not None:
            computed = self.staging.mark() if self.staging is not None else None
            self.saves.append(self.io.submit(self._save, layer, meta.saves, meta.model, computed))

    def wait_for_save(self) -> None:
        self._drain_loads()
        for future in self.saves:
            future.result()
        self.saves.clear()

    # -- completion ----------------------------------------------------------------------------

    def get_finished(self) -> tuple[set[str] | None, set[str] | None]:
        done = {req for req, future in self.async_loads.items() if future.done()}
        for req in done:
            self.async_loads.pop(req).result()
        return None, done or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        self._drain_loads()
        failed, self.failed_blocks = self.failed_blocks, set()
        return failed

    def shutdown(self) -> None:
        self.io.shutdown(wait=True, cancel_futures=True)
        self.link.close()


def _by_prefer(runs: list[BlockRun]) -> list[tuple[str | None, list[BlockRun]]]:
    """`runs` grouped by locality hint, in first-seen order."""
    groups: dict[str | None, list[BlockRun]] = {}
    for run in runs:
        groups.setdefault(run.prefer, []).append(run)
    return list(groups.items())


def _unique_keys(keys: list[bytes], segments: list) -> tuple[list[bytes], list]:
    """`keys` and their segments with each key once: requests of one step that share a prefix
    (vLLM's prefix cache gives them the same blocks) would otherwise save one block twice in one
    call, and the client refuses overlapping segments."""
    seen: set[bytes] = set()
    out_keys, out_segments = [], []
    for key, segs in zip(keys, segments, strict=True):
        if key not in seen:
            seen.add(key)
            out_keys.append(key)
            out_segments.append(segs)
    return out_keys, out_segments
