"""Connector counters, reported through vLLM's stats path into its log line and /metrics."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)
from vllm.v1.metrics.utils import create_metric_per_engine

COUNTERS = {
    "lookups": "Prefix lookups the scheduler sent to the cache.",
    "lookup_errors": "Prefix lookups that failed (node down or timed out); counted as misses.",
    "hit_tokens": "Prompt tokens the cache supplied (external prefix hits), per lookup.",
    "loaded_blocks": "Layer blocks loaded from the cache into the KV tensors.",
    "loaded_bytes": "Bytes loaded from the cache into the KV tensors.",
    "load_failed_blocks": "Layer blocks whose load failed (miss, bad block, node down); vLLM recomputes them.",
    "saved_blocks": "Layer blocks saved to the cache.",
    "saved_bytes": "Bytes saved to the cache.",
    "save_failed_blocks": "Layer blocks the cache did not store (refused, node down).",
    "replica_reads": "Blocks a cluster answered from a replica because their primary missed or was down.",
    "failovers": "Times a cluster node failed a call and was routed around for a while.",
    "handoff_requests": "Prefill requests whose prompt this engine saved whole for a decode engine (P/D).",
    "handoff_announced_blocks": "Prompt blocks a prefill engine announced to decode engines, as the cache held them.",
    "handoff_missing_blocks": (
        "Blocks a prefill engine announced that this decode engine did not find before the deadline (recomputed)."
    ),
    "bypassed_requests": (
        "Requests the cache left alone (no lookup, load or save): multimodal inputs, prompt "
        "embeddings, or a LoRA adapter whose files are not on this machine."
    ),
}
LATENCIES = {
    "load_seconds": "Time of one load call (one layer, or one request when loads are async).",
    "save_seconds": "Time of one save call (one layer of a step's new blocks).",
}


@dataclass
class KVCacheConnectorStats(KVConnectorStats):
    """Counters since the last report; latencies as lists of seconds. Picklable."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {name: 0 for name in COUNTERS} | {name: [] for name in LATENCIES}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name in COUNTERS:
            self.data[name] = self.data.get(name, 0) + other.data.get(name, 0)
        for name in LATENCIES:
            self.data[name] = list(self.data.get(name, [])) + list(other.data.get(name, []))
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {name: self.data.get(name, 0) for name in COUNTERS}
        for name in LATENCIES:
            samples = self.data.get(name, [])
            if samples:
                out[f"avg_{name.removesuffix('_seconds')}_ms"] = round(1000 * sum(samples) / len(samples), 3)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.get(n, 0) for n in COUNTERS) and not any(self.data.get(n) for n in LATENCIES)


class Recorder:
    """Thread-safe accumulation of `KVCacheConnectorStats`, taken and reset once per step."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = KVCacheConnectorStats()

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                self._stats.data[name] += value

    def observe(self, name: str, seconds: float) -> None:
        with self._lock:
            self._stats.data[name].append(seconds)

    def take(self) -> KVCacheConnectorStats | None:
        with self._lock:
            if self._stats.is_empty():
                return None
            taken, self._stats = self._stats, KVCacheConnectorStats()
            return taken


class KVCacheConnectorPromMetrics(KVConnectorPromMetrics):
    """`vllm:kvcache_*` counters and latency histograms in vLLM's own /metrics."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {
            name: create_metric_per_engine(
                self._counter_cls(name=f"vllm:kvcache_{name}", documentation=doc, labelnames=labelnames),
                per_engine_labelvalues,
            )
            for name, doc in COUNTERS.items()
        }
        buckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
        self._histograms = {
            name: create_metric_per_engine(
                self._histogram_cls(
                    name=f"vllm:kvcache_{name}",
                    documentation=doc,
                    labelnames=labelnames,
                    buckets=buckets,
                ),
                per_engine_labelvalues,
            )
            for name, doc in LATENCIES.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, per_engine in self._counters.items():
            value = transfer_stats_data.get(name, 0)
            if value:
                per_engine[engine_idx].inc(value)
        for name, per_engine in self._histograms.items():
            for seconds in transfer_stats_data.get(name, ()):
                per_engine[engine_idx].observe(seconds)
