"""The engine's record in etcd, for gateways to find it: which URL serves which model, in which
role, with which block size and lookup namespace (so the gateway asks the cache tier for
exactly the keys this engine loads) and where its KV events are published. Kept alive under a
lease by the `kvcache` module's `Registration` (the same renewal loop as a cache node's)."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import kvcache

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger(__name__)

ENGINES_PREFIX = "/kvcache/engines/"
TTL_S = 10


def _reachable(endpoint: str | None, host: str) -> str | None:
    """A ZMQ endpoint as a gateway connects to it: vLLM binds `tcp://*:PORT` (a wildcard), which
    a gateway reaches at this engine's advertised host."""
    if not endpoint:
        return None
    return endpoint.replace("://*:", f"://{host}:").replace("://0.0.0.0:", f"://{host}:")


def engine_record(vllm_config: VllmConfig, advertise: str, role: str, namespace: bytes) -> dict:
    """What a gateway needs to route to this engine."""
    host = urlparse(advertise).hostname or "127.0.0.1"
    model_config = vllm_config.model_config
    served = model_config.served_model_name
    if isinstance(served, list | tuple):
        served = served[0] if served else None
    events = vllm_config.kv_events_config
    publishing = events is not None and events.enable_kv_cache_events and events.publisher == "zmq"
    return {
        "url": advertise,
        "model": served or model_config.model,
        "role": role,
        "block_size": vllm_config.cache_config.block_size,
        "namespace": namespace.hex(),
        "kv_events": _reachable(events.endpoint, host) if publishing else None,
        "kv_events_replay": _reachable(events.replay_endpoint, host) if publishing else None,
        "kv_events_topic": events.topic if publishing else None,
    }


def register(registry: str, record: dict) -> kvcache.Registration:
    """Starts keeping `record` in etcd under `ENGINES_PREFIX<host:port>`."""
    key = ENGINES_PREFIX + record["url"].removeprefix("http://")
    registration = kvcache.Registration(registry, key, json.dumps(record, sort_keys=True), TTL_S)
    logger.info("kvcache: registering this engine in etcd as %s: %s", key, record)
    return registration
