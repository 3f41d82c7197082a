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
"""

from __future__ import annotations

import inspect
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

import kvcache

from .fingerprint import FileDigests
from .identity import check_kv_scales, lora_identity, model_identity
from .layout import BlockLayout, LayoutError
from .settings import Namespaces, Settings
from .staging import Staging
from .stats import KVCacheConnectorPromMetrics, KVCacheConnectorStats, Recorder

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# A child of vLLM's logger, so lines come out in vLLM's format and honour its log level.
logger = logging.getLogger("vllm.kvcache")

_CACHE_ERRORS = (ConnectionError, TimeoutError, OSError, kvcache.KvcacheError)


@dataclass
class BlockRun:
    """Consecutive blocks of one request: chain positions `start..start+len(block_ids)`."""

    req_id: str
    tokens: list[int]
    start: int
    block_ids: list[int]
    lora: str | None
    salt: str | None


@dataclass
class KVCacheConnectorMetadata(KVConnectorMetadata):
    """What the workers do this step: blocks to load (sync or async) and blocks to save."""

    loads: list[BlockRun] = field(default_factory=list)
    async_loads: list[BlockRun] = field(default_factory=list)
    saves: list[BlockRun] = field(default_factory=list)
    # The engine's model identity (`identity.model_identity`), computed once by the scheduler.
    model: str = ""


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


def _client_takes_token() -> bool | None:
    """Whether this `kvcache` module's Client takes `token=`; None if it cannot tell."""
    try:
        params = inspect.signature(kvcache.Client).parameters
    except (TypeError, ValueError):
        return None
    return "token" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


_NO_TOKEN_SUPPORT = (
    "kv_connector_extra_config sets a token, but the installed kvcache module's Client takes no "
    "token= keyword: install a kvcache module with authentication (pip install ./pyo3-bindings)"
)


def _layer_index(name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(name)


class _Link:
    """The connection to the cache: made on first use, and rested after a failure.

    After a failed call the cache counts as empty for `retry_s` (doubling while it keeps
    failing, at most 30 s), so a dead or hung node costs one timeout, not one per request.
    """

    def __init__(self, settings: Settings, side: str, stats: Recorder, on_connect=None):
        if settings.token is not None and _client_takes_token() is False:
            raise ValueError(_NO_TOKEN_SUPPORT)
        self._settings = settings
        self._side = side
        self._stats = stats
        self._on_connect = on_connect
        self._client: kvcache.Client | None = None
        self._rest_s = 0.0
        self._down_until = 0.0
        self._cluster_seen = (0, 0)

    def call(self, what: str, fn):
        """`fn(client)`, or None if the cache is resting or the call failed."""
        now = time.monotonic()
        if now < self._down_until:
            return None
        try:
            if self._client is None:
                self._client = self._connect()
                if self._on_connect is not None:
                    self._on_connect(self._client)
            result = fn(self._client)
            if self._settings.is_cluster():
                self._count_cluster(self._client)
        except _CACHE_ERRORS as err:
            self._rest_s = min(max(2 * self._rest_s, self._settings.retry_s), 30.0)
            self._down_until = time.monotonic() + self._rest_s
            logger.warning(
                "kvcache %s: %s failed (%s); treating the cache as empty for %.1f s",
                self._side,
                what,
                err,
                self._rest_s,
            )
            self._close()
            return None
        if self._rest_s:
            logger.info("kvcache %s: the cache answers again", self._side)
            self._rest_s = 0.0
        return result

    def _connect(self) -> kvcache.Client:
        settings = self._settings
        kwargs: dict[str, Any] = {
            "replicas": settings.replicas,
            "transport": settings.transport,
            "timeout_s": settings.timeout_s,
        }
        if settings.token is not None:
            # Only when set: a module without authentication has no such keyword.
            kwargs["token"] = settings.token
        try:
            return kvcache.Client(settings.server_arg(), **kwargs)
        except TypeError as err:
            if settings.token is not None and "token" in str(err):
                raise ValueError(_NO_TOKEN_SUPPORT) from err
            raise

    def _count_cluster(self, client: kvcache.Client) -> None:
        """Adds the cluster client's new replica reads and failovers to the stats (a cluster
        call masks a lost node; these counters show it)."""
        stats = client.stats()
        now = (int(stats.get("replica_reads", 0)), int(stats.get("failovers", 0)))
        reads, failovers = (max(0, n - seen) for n, seen in zip(now, self._cluster_seen, strict=True))
        self._cluster_seen = now
        if reads or failovers:
            self._stats.add(replica_reads=reads, failovers=failovers)

    def _close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
            self._cluster_seen = (0, 0)

    def close(self) -> None:
        self._close()


@dataclass
class _Tracked:
    """Scheduler-side state of one request: what to save, and where it lives."""

    prompt: list[int]
    lora: str | None
    salt: str | None
    local_blocks: int = 0
    hit_blocks: int = 0
    saved_blocks: int = 0
    block_ids: list[int] = field(default_factory=list)


class _SchedulerSide:
    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig):
        transfer = vllm_config.kv_transfer_config
        self.settings = Settings.from_extra_config(transfer.kv_connector_extra_config)
        self.block_size = vllm_config.cache_config.block_size
        self.loads_enabled = transfer.kv_role in ("kv_both", "kv_consumer")
        self.saves_enabled = transfer.kv_role in ("kv_both", "kv_producer")
        from vllm.platforms import current_platform

        self.vllm_config = vllm_config
        self.digests = FileDigests()
        self.model = model_identity(vllm_config, self.settings.model_id, self.digests)
        self.namespaces = Namespaces.for_engine(
            self.settings, vllm_config, 0, current_platform.device_type, model=self.model
        )
        # Why requests were not cached, each said once per process (a bounded set), and the
        # requests now bypassing (counted once each, though vLLM may ask again).
        self.bypass_said: set[str] = set()
        self.bypassed: set[str] = set()
        layer_names = [n for g in kv_cache_config.kv_cache_groups for n in g.layer_names]
        self.lookup_layer = max(_layer_index(n) for n in layer_names)
        self.stats = Recorder()
        self.link = _Link(self.settings, "scheduler", self.stats)
        self.requests: dict[str, _Tracked] = {}
        self.pending_loads: list[BlockRun] = []
        self.pending_async: list[BlockRun] = []
        if self.loads_enabled and transfer.kv_load_failure_policy != "recompute":
            logger.warning(
                "kvcache: kv_load_failure_policy is %r: a block that fails to load (evicted, "
                'corrupt, node down) fails its request. Set "kv_load_failure_policy": '
                '"recompute" in --kv-transfer-config to recompute it instead.',
                transfer.kv_load_failure_policy,
            )
        logger.info(
            "kvcache scheduler: servers=%s transport=%s layout=%s block_size=%d role=%s model identity %s",
            ",".join(self.settings.servers),
            self.settings.transport,
            self.namespaces.layout.name,
            self.block_size,
            transfer.kv_role,
            self.model,
        )

    def _bypass(self, request: Request) -> tuple[bool, str | None]:
        """Whether `request` bypasses the cache (saying why once), and its LoRA identity."""
        reason = None
        if request.mm_features:
            reason = (
                "requests with multimodal inputs bypass the cache (no lookups, loads or saves): "
                "their placeholder tokens do not say which image or audio they stand for, and "
                "multimodal keys are not tested yet"
            )
        elif request.prompt_embeds is not None:
            reason = "requests with prompt embeddings bypass the cache: their token ids are placeholders"
        lora = None
        if reason is None and request.lora_request is not None:
            lora = lora_identity(request.lora_request, self.vllm_config, self.digests)
            if lora is None:
                reason = (
                    f"requests with LoRA adapter {request.lora_request.lora_name!r} bypass the cache: its "
                    f"files ({request.lora_request.lora_path}) are not on this machine to fingerprint"
                )
        if reason is None:
            return False, lora
        if request.request_id not in self.bypassed:
            self.bypassed.add(request.request_id)
            self.stats.add(bypassed_requests=1)
        if reason not in self.bypass_said and len(self.bypass_said) < 64:
            self.bypass_said.add(reason)
            logger.info("kvcache scheduler: %s; counted in bypassed_requests", reason)
        return True, None

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int):
        bypass, lora = self._bypass(request)
        if bypass:
            # Untracked: no load is planned and no block is queued for saving.
            return 0, False
        prompt = list(request.prompt_token_ids or [])
        tracked = _Tracked(prompt, lora, request.cache_salt)
        tracked.local_blocks = num_computed_tokens // self.block_size
        tracked.saved_blocks = tracked.local_blocks
        self.requests[request.request_id] = tracked
        # vLLM must compute at least the prompt's last token itself.
        loadable = (len(prompt) - 1) // self.block_size if prompt else 0
        skip_reading = getattr(request, "skip_reading_prefix_cache", False)
        if not self.loads_enabled or loadable <= tracked.local_blocks or skip_reading:
            return 0, False
        keys = self.namespaces.keys(self.lookup_layer, prompt[: loadable * self.block_size], lora, request.cache_salt)
        hit = self.link.call("lookup", lambda c: c.prefix_match(keys[tracked.local_blocks :]))
        self.stats.add(lookups=1, lookup_errors=int(hit is None))
        if not hit:
            return 0, False
        tracked.hit_blocks = hit
        tracked.saved_blocks = tracked.local_blocks + hit
        return hit * self.block_size, self.settings.load_async

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int):
        tracked = self.requests.get(request.request_id)
        if num_external_tokens == 0 or tracked is None:
            return
        count = num_external_tokens // self.block_size
        start = tracked.local_blocks
        block_ids = list(blocks.get_block_ids()[0])
        run = BlockRun(
            req_id=request.request_id,
            tokens=tracked.prompt[: (start + count) * self.block_size],
            start=start,
            block_ids=block_ids[start : start + count],
            lora=tracked.lora,
            salt=tracked.salt,
        )
        (self.pending_async if self.settings.load_async else self.pending_loads).append(run)
        self.stats.add(hit_tokens=num_external_tokens)

    def build_connector_meta(self, out: SchedulerOutput) -> KVCacheConnectorMetadata:
        meta = KVCacheConnectorMetadata(loads=self.pending_loads, async_loads=self.pending_async, model=self.model)
        self.pending_loads, self.pending_async = [], []
        if not self.saves_enabled:
            return meta
        for new in out.scheduled_new_reqs:
            tracked = self.requests.get(new.req_id)
            if tracked is None:
                continue
            tracked.block_ids = list(new.block_ids[0])
            done = new.num_computed_tokens + out.num_scheduled_tokens.get(new.req_id, 0)
            self._queue_save(new.req_id, tracked, done, meta)
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self.requests.get(req_id)
            if tracked is None or tracked.saved_blocks * self.block_size >= len(tracked.prompt):
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids and new_ids is not None:
                tracked.block_ids = list(new_ids[0])
            elif new_ids is not None:
                tracked.block_ids.extend(new_ids[0])
            done = cached.num_computed_tokens[i] + out.num_scheduled_tokens.get(req_id, 0)
            self._queue_save(req_id, tracked, done, meta)
        return meta

    def _queue_save(self, req_id: str, tracked: _Tracked, computed: int, meta: KVCacheConnectorMetadata):
        full = min(computed, len(tracked.prompt)) // self.block_size
        full = min(full, len(tracked.block_ids))
        if full <= tracked.saved_blocks:
            return
        meta.saves.append(
            BlockRun(
                req_id=req_id,
                tokens=tracked.prompt[: full * self.block_size],
                start=tracked.saved_blocks,
                block_ids=tracked.block_ids[tracked.saved_blocks : full],
                lora=tracked.lora,
                salt=tracked.salt,
            )
        )
        tracked.saved_blocks = full

    def request_finished(self, request: Request, block_ids: list[int]):
        self.requests.pop(request.request_id, None)
        self.bypassed.discard(request.request_id)
        return False, None

    def shutdown(self) -> None:
        self.link.close()


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
        """Loads `runs` into `layers` in one call; records every block that did not land."""
        keys, segments = [], []
        for layer in layers:
            k, s = self._plan(layer, runs, model)
            keys += k
            segments += s
        started = time.perf_counter()
        try:
            hits = self.link.call("load", lambda c: self._fetch(c, keys, segments))
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

    def _fetch(self, client: kvcache.Client, keys: list[bytes], segments: list) -> list[bool]:
        """Loads into the KV tensors: GPU-direct, straight into host tensors, or staged."""
        if self.gpu_direct:
            return client.get_many_into_gpu(keys, segments)
        staging = self.staging
        into = segments if staging is None else staging.host_segments(segments)
        hits = client.get_many_into(keys, into)
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
        keys, segments = self._plan(layer, runs, model)
        started = time.perf_counter()
        stored = self.link.call("save", lambda c: self._store(c, keys, segments, computed))
        self.stats.observe("save_seconds", time.perf_counter() - started)
        stored = stored or [False] * len(keys)
        saved = sum(stored)
        saved_bytes = sum(length for ok, segs in zip(stored, segments, strict=True) if ok for _, length in segs)
        self.stats.add(saved_blocks=saved, saved_bytes=saved_bytes, save_failed_blocks=len(keys) - saved)

    def _store(self, client: kvcache.Client, keys: list[bytes], segments: list, computed: Any) -> list[bool]:
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
        return client.put_many(keys, source)

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
