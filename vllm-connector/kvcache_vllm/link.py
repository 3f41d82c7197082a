"""The connection to the cache that both sides of the connector use, with back-off.

A cache node that is down or hung must never reach the engine: a failed call counts as a miss
and the cache then rests (counts as empty) for a while, so the node costs one timeout and not
one per request. The client is made on first use, with the settings' token where one is set.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any

import kvcache

from .settings import Settings
from .stats import Recorder

# A child of vLLM's logger, so lines come out in vLLM's format and honour its log level.
logger = logging.getLogger("vllm.kvcache")

_CACHE_ERRORS = (ConnectionError, TimeoutError, OSError, kvcache.KvcacheError)


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
