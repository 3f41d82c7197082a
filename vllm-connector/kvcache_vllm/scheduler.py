"""The scheduler side of the connector (EngineCore process): lookups, and the per-step plan.

It computes the engine's model identity once and each request's LoRA identity, asks the cache
how many leading prompt blocks it holds, tracks each request's block ids across steps, and
writes the metadata that tells the workers which blocks to load and which to save. Requests
whose KV does not follow from their token ids alone bypass the cache here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import handoff
from .fingerprint import FileDigests
from .identity import lora_identity, model_identity
from .link import _Link
from .metadata import BlockRun, KVCacheConnectorMetadata, _layer_index
from .registry import engine_record, register
from .settings import Namespaces, Settings
from .stats import Recorder

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# A child of vLLM's logger, so lines come out in vLLM's format and honour its log level.
logger = logging.getLogger("vllm.kvcache")


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
    # P/D: this (prefill) engine saves the whole prompt for a decode engine...
    produce: handoff.Produce | None = None
    # ...or this (decode) engine loads what a prefill engine announced.
    expect: handoff.Expect | None = None

    @property
    def prefer(self) -> str | None:
        """The cache node to save to and read from first (a locality hint), if any."""
        if self.produce is not None:
            return self.produce.near
        return self.expect.near if self.expect is not None else None


class _SchedulerSide:
    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig):
        transfer = vllm_config.kv_transfer_config
        self.settings = Settings.from_extra_config(transfer.kv_connector_extra_config)
        self.block_size = vllm_config.cache_config.block_size
        # Every role loads (a prefill engine computes only what the cache lacks of a prompt);
        # only saving depends on the role.
        self.saves_enabled = transfer.kv_role in ("kv_both", "kv_producer")
        self.producer_role = transfer.kv_role == "kv_producer"
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
        if transfer.kv_load_failure_policy != "recompute":
            logger.warning(
                "kvcache: kv_load_failure_policy is %r: a block that fails to load (evicted, "
                'corrupt, node down) fails its request. Set "kv_load_failure_policy": '
                '"recompute" in --kv-transfer-config to recompute it instead.',
                transfer.kv_load_failure_policy,
            )
        logger.info(
            "kvcache scheduler: servers=%s transport=%s layout=%s block_size=%d role=%s model identity %s "
            "lookup namespace %s (a gateway routing to this engine sets it as its backend's `namespace`)",
            ",".join(self.settings.servers),
            self.settings.transport,
            self.namespaces.layout.name,
            self.block_size,
            transfer.kv_role,
            self.model,
            self.namespaces.get(self.lookup_layer).hex(),
        )
        self.registration = None
        if self.settings.advertise and self.settings.registry:
            record = engine_record(
                vllm_config, self.settings.advertise, transfer.kv_role, self.namespaces.get(self.lookup_layer)
            )
            self.registration = register(self.settings.registry, record)

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
        self._say_once(f"{reason}; counted in bypassed_requests", logging.INFO)
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
        self._handoff(request, tracked)
        self.requests[request.request_id] = tracked
        # vLLM must compute at least the prompt's last token itself.
        loadable = (len(prompt) - 1) // self.block_size if prompt else 0
        skip_reading = getattr(request, "skip_reading_prefix_cache", False)
        if loadable <= tracked.local_blocks or skip_reading:
            return 0, False
        keys = self.namespaces.keys(self.lookup_layer, prompt[: loadable * self.block_size], lora, request.cache_salt)
        hit = self.link.call("lookup", lambda c: c.prefix_match(keys[tracked.local_blocks :]))
        self.stats.add(lookups=1, lookup_errors=int(hit is None))
        tracked.hit_blocks = hit or 0
        self._count_missing(tracked, loadable)
        if not hit:
            return 0, False
        if tracked.produce is None:
            tracked.saved_blocks = tracked.local_blocks + hit
        return hit * self.block_size, self.settings.load_async

    def _handoff(self, request: Request, tracked: _Tracked) -> None:
        """Reads a request's P/D role from its `kv_transfer_params` (`handoff.py`)."""
        params = getattr(request, "kv_transfer_params", None)
        produce = handoff.produce(params, self.producer_role)
        if produce is not None and not self.saves_enabled:
            self._say_once(
                "a request asked this engine to prefill for a remote decode (do_remote_decode), but its "
                "kv_role is kv_consumer, which saves nothing: the decode engine will recompute the prompt"
            )
            produce = None
        if produce is not None:
            # Every prompt block goes to the cache, those this engine had cached too.
            tracked.produce = produce
            tracked.saved_blocks = 0
        tracked.expect = handoff.expect(params)

    def _count_missing(self, tracked: _Tracked, loadable: int) -> None:
        """Counts announced blocks the cache no longer holds (a lost handoff, not eviction,
        while the announcement's deadline holds)."""
        expect = tracked.expect
        if expect is None or expect.expired():
            return
        wanted = min(expect.blocks, loadable)
        missing = wanted - (tracked.local_blocks + tracked.hit_blocks)
        if missing > 0:
            self.stats.add(handoff_missing_blocks=missing)

    def _say_once(self, reason: str, level: int = logging.WARNING) -> None:
        """Logs `reason` the first time only (a bounded set of reasons per process)."""
        if reason not in self.bypass_said and len(self.bypass_said) < 64:
            self.bypass_said.add(reason)
            logger.log(level, "kvcache scheduler: %s", reason)

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
            prefer=tracked.prefer,
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
                prefer=tracked.prefer,
            )
        )
        tracked.saved_blocks = full

    def request_finished(self, request: Request, block_ids: list[int]):
        tracked = self.requests.pop(request.request_id, None)
        self.bypassed.discard(request.request_id)
        if tracked is None or tracked.produce is None:
            return False, None
        return False, self._announce(tracked)

    def _announce(self, tracked: _Tracked) -> dict:
        """The prefill response's `kv_transfer_params`: how many leading prompt blocks the cache
        holds now. The step's saves returned before vLLM finished the request (the worker's
        `wait_for_save`), so one lookup tells what the decode engine will find."""
        full = len(tracked.prompt) // self.block_size
        keys = self.namespaces.keys(
            self.lookup_layer, tracked.prompt[: full * self.block_size], tracked.lora, tracked.salt
        )
        held = self.link.call("handoff lookup", lambda c: c.prefix_match(keys)) if keys else 0
        held = held or 0
        self.stats.add(handoff_requests=1, handoff_announced_blocks=held)
        if held < full:
            logger.info(
                "kvcache scheduler: handoff of %d prompt blocks: the cache holds the first %d "
                "(the decode engine recomputes the rest)",
                full,
                held,
            )
        return handoff.announce(
            blocks=held,
            block_size=self.block_size,
            namespace=self.namespaces.get(self.lookup_layer, tracked.lora, tracked.salt),
            near=tracked.prefer,
            prompt_tokens=len(tracked.prompt),
            ttl_s=self.settings.handoff_ttl_s,
        )

    def shutdown(self) -> None:
        if self.registration is not None:
            self.registration.close()
        self.link.close()
