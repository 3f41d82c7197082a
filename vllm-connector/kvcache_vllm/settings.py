"""The connector's settings (from `kv_connector_extra_config`) and its block-key namespaces."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kvcache

from .layout import default_layout_name, layout_spec

if TYPE_CHECKING:
    from vllm.config import VllmConfig

_KNOWN_KEYS = {
    "servers",
    "replicas",
    "transport",
    "timeout_s",
    "layout",
    "model_id",
    "load_async",
    "retry_s",
    "staging",
    "token",
    "token_file",
    "advertise",
    "registry",
    "handoff_ttl_s",
}


@dataclass(frozen=True)
class Settings:
    """What `kv_connector_extra_config` may set; every field has a default.

    - `servers`: cache nodes: `"host:port"`, a list of them (a static cluster), or
      `"etcd://host:port"` (members registered in etcd by `kvcache-server --etcd`).
    - `replicas`: owners per block in a cluster (the nodes' `--replicas`); with 2 or more a
      lost node costs no hits.
    - `transport`: `auto` (shared memory when the node is on this host, then RDMA when both
      ends have a device and the client was built with it, else TCP), `shm`, `rdma`, `tcp`.
    - `timeout_s`: the longest any cache call may hold the engine.
    - `layout`: the KV tensor layout (`cpu`, `flash_attn`, `flashinfer`); default by device.
    - `model_id`: vouches for the weights: block keys name it instead of the weight files'
      content fingerprint (see `identity.py`). Set it when the weights are not on this machine
      as files (streamed from object storage), e.g. to `org/model@<commit>`. Everything else
      that changes KV bytes (dtype, quantization, HF config, KV cache dtype) still counts.
    - `load_async`: load between engine steps (the request waits) instead of inside the step.
    - `staging`: how blocks reach KV tensors that are not in host memory (CUDA): `auto` moves
      them with GPU-direct RDMA when the client uses RDMA to a single node and the `kvcache`
      module was built with it (features `rdma` and `cuda`), and otherwise stages them through
      pinned host memory with copies on a side stream; `always` stages, host tensors too (the
      same code path, testable without a GPU); `never` hands the tensors' own addresses to the
      client (host memory only).
    - `retry_s`: after a failed call, the cache is treated as empty for this long (doubling up
      to 30 s while it keeps failing), so a dead node costs one timeout, not one per request.
    - `token` / `token_file`: the credential the client presents to nodes started with
      `--auth`; `token_file` names a file whose stripped content is the token. At most one of
      them. Without either, the `kvcache` module reads `KVCACHE_TOKEN` from the environment.
    - `advertise`: this engine's URL as gateways reach it (`http://host:port`). With it the
      scheduler registers the engine in etcd (`registry.py`): URL, served model, role, block
      size, lookup namespace and KV-event endpoints, under a lease, for `kvcache-gateway
      --discover etcd://...` to find.
    - `registry`: the etcd to register in (`etcd://host:port`); default: `servers` when that is
      an etcd URL.
    - `handoff_ttl_s`: P/D: how long after a prefill a decode engine counts the announced
      blocks as expected (`handoff.py`); a shortfall after it is ordinary eviction.
    """

    servers: tuple[str, ...] = ("127.0.0.1:7400",)
    replicas: int = 1
    transport: str = "auto"
    timeout_s: float = 2.0
    layout: str | None = None
    model_id: str | None = None
    load_async: bool = False
    retry_s: float = 1.0
    staging: str = "auto"
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    advertise: str | None = None
    registry: str | None = None
    handoff_ttl_s: float = 30.0

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None) -> Settings:
        """Reads and checks the settings; raises ValueError naming a bad or unknown key."""
        extra = dict(extra or {})
        unknown = sorted(set(extra) - _KNOWN_KEYS)
        if unknown:
            raise ValueError(
                f"unknown kv_connector_extra_config keys for KVCacheConnector: {unknown}; known: {sorted(_KNOWN_KEYS)}"
            )
        servers = extra.get("servers", cls.servers)
        if isinstance(servers, str):
            servers = (servers,)
        servers = tuple(str(s) for s in servers)
        if not servers:
            raise ValueError("kv_connector_extra_config.servers must name at least one node")
        replicas = int(extra.get("replicas", cls.replicas))
        if replicas < 1:
            raise ValueError("replicas must be at least 1")
        if replicas > 1 and not cls(servers=servers).is_cluster():
            raise ValueError("replicas > 1 needs a cluster: several servers or etcd://host:port")
        transport = str(extra.get("transport", cls.transport))
        if transport not in ("auto", "shm", "rdma", "tcp"):
            raise ValueError(f"transport must be auto, shm, rdma or tcp, not {transport!r}")
        staging = str(extra.get("staging", cls.staging))
        if staging not in ("auto", "always", "never"):
            raise ValueError(f"staging must be auto, always or never, not {staging!r}")
        layout = extra.get("layout")
        if layout is not None:
            layout_spec(str(layout))
        timeout_s = float(extra.get("timeout_s", cls.timeout_s))
        retry_s = float(extra.get("retry_s", cls.retry_s))
        if timeout_s <= 0 or retry_s < 0:
            raise ValueError("timeout_s must be positive and retry_s not negative")
        handoff_ttl_s = float(extra.get("handoff_ttl_s", cls.handoff_ttl_s))
        if handoff_ttl_s <= 0:
            raise ValueError("handoff_ttl_s must be positive")
        token, token_file = _token(extra)
        advertise = extra.get("advertise")
        if advertise is not None and not str(advertise).startswith("http://"):
            raise ValueError(
                f"advertise must be the engine's URL as gateways reach it (http://host:port), not {advertise!r}"
            )
        registry = extra.get("registry")
        if registry is None and advertise is not None and servers[0].startswith("etcd://"):
            registry = servers[0]
        if advertise is not None and registry is None:
            raise ValueError(
                "advertise needs an etcd to register in: set registry (etcd://host:port) or etcd:// servers"
            )
        return cls(
            servers=servers,
            replicas=replicas,
            transport=transport,
            timeout_s=timeout_s,
            layout=None if layout is None else str(layout),
            model_id=extra.get("model_id"),
            load_async=bool(extra.get("load_async", False)),
            retry_s=retry_s,
            staging=staging,
            token=token,
            token_file=token_file,
            advertise=None if advertise is None else str(advertise).rstrip("/"),
            registry=None if registry is None else str(registry),
            handoff_ttl_s=handoff_ttl_s,
        )

    def is_cluster(self) -> bool:
        """Whether the client is a cluster's (several members, or members from etcd)."""
        return len(self.servers) > 1 or self.servers[0].startswith("etcd://")

    def server_arg(self) -> str | list[str]:
        """What `kvcache.Client` takes: one address, an etcd URL, or a cluster's member list."""
        return self.servers[0] if len(self.servers) == 1 else list(self.servers)


def _token(extra: dict[str, Any]) -> tuple[str | None, str | None]:
    """The token from `token` or `token_file` (read now, so a bad file fails at start)."""
    token, token_file = extra.get("token"), extra.get("token_file")
    if token is not None and token_file is not None:
        raise ValueError("kv_connector_extra_config: set token or token_file, not both")
    if token_file is not None:
        try:
            token = Path(str(token_file)).read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"kv_connector_extra_config.token_file {str(token_file)!r} cannot be read: {err}") from err
        if not token:
            raise ValueError(f"kv_connector_extra_config.token_file {str(token_file)!r} is empty")
        return token, str(token_file)
    if token is not None and (not isinstance(token, str) or not token):
        raise ValueError("kv_connector_extra_config.token must be a non-empty string")
    return token, None


def kv_dtype_name(vllm_config: VllmConfig) -> str:
    """The KV cache dtype as a stable name (`bfloat16`, `fp8_e4m3`, ...)."""
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype and cache_dtype != "auto":
        return str(cache_dtype)
    return str(vllm_config.model_config.dtype).removeprefix("torch.")


class Namespaces:
    """Block-key namespaces of one tensor-parallel rank: one per (layer, LoRA, cache salt).

    Every attention layer has its own namespace, so a layer's block is a cache entry of its own
    and saves can leave layer by layer. The layout string names the layout, the per-rank KV head
    count and head size, and the layer; `model` is the engine's model identity string and
    `lora` a request's adapter identity string (`identity.py`), so two engines share blocks
    only when their bytes agree.
    """

    def __init__(
        self,
        *,
        model: str,
        kv_dtype: str,
        block_size: int,
        layout: str,
        num_kv_heads: int,
        head_size: int,
        tp_size: int = 1,
        tp_rank: int = 0,
    ):
        self.model = model
        self.kv_dtype = kv_dtype
        self.block_size = block_size
        self.layout = layout_spec(layout)
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.tp_size = tp_size
        self.tp_rank = tp_rank
        self._layout_prefix = f"vllm/{layout}/kv_heads={num_kv_heads}/head_size={head_size}"

    @classmethod
    def for_engine(
        cls, settings: Settings, vllm_config: VllmConfig, tp_rank: int, device: str, *, model: str
    ) -> Namespaces:
        """The namespaces of `tp_rank` in the engine `vllm_config` describes, whose model
        identity is `model` (`identity.model_identity`)."""
        model_config = vllm_config.model_config
        parallel_config = vllm_config.parallel_config
        return cls(
            model=model,
            kv_dtype=kv_dtype_name(vllm_config),
            block_size=vllm_config.cache_config.block_size,
            layout=settings.layout or default_layout_name(device),
            num_kv_heads=model_config.get_num_kv_heads(parallel_config),
            head_size=model_config.get_head_size(),
            tp_size=parallel_config.tensor_parallel_size,
            tp_rank=tp_rank,
        )

    def with_model(self, model: str) -> Namespaces:
        """The same namespaces for another model identity."""
        return Namespaces(
            model=model,
            kv_dtype=self.kv_dtype,
            block_size=self.block_size,
            layout=self.layout.name,
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            tp_size=self.tp_size,
            tp_rank=self.tp_rank,
        )

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (one instance per process)
    def get(self, layer: int, lora: str | None = None, salt: str | None = None) -> bytes:
        """The namespace id of `layer` for a request with this LoRA adapter and cache salt."""
        return kvcache.namespace_id(
            self.model,
            self.kv_dtype,
            self.block_size,
            layout=f"{self._layout_prefix}/layer={layer}",
            tp_world_size=self.tp_size,
            tp_rank=self.tp_rank,
            lora=lora,
            salt=salt,
        )

    def keys(self, layer: int, tokens: list[int], lora: str | None, salt: str | None):
        """The chain keys of every full block of `tokens` in `layer`'s namespace."""
        return kvcache.chain_keys(self.get(layer, lora, salt), tokens, self.block_size)
