"""Counters of one server, exported to Prometheus and to ``/status`` from one source of truth.

Ownership: ``Stats`` is written only by the request loop thread; scrapes (HTTP thread) read
plain ints, which may be a moment stale but never torn. Each server has its own registry,
so several servers can share a process (tests do).
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(slots=True)
class Stats:
    lookups: int = 0
    lookup_hit_chunks: int = 0
    lookup_miss_chunks: int = 0
    stores: int = 0
    stored_chunks: int = 0
    store_present_chunks: int = 0
    store_refused_chunks: int = 0
    retrieves: int = 0
    retrieved_chunks: int = 0
    stored_bytes: int = 0
    retrieved_bytes: int = 0
    evicted_chunks: int = 0
    expired_leases: int = 0
    bad_frames: int = 0
    disconnects: int = 0
    requests: Tally[str] = field(default_factory=Tally)  # by op
    errors: Tally[str] = field(default_factory=Tally)  # by error code name

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["requests"] = dict(self.requests)
        out["errors"] = dict(self.errors)
        return out


COUNTER_HELP = {
    "lookups": "Lookup requests",
    "lookup_hit_chunks": "Chunks found by lookups",
    "lookup_miss_chunks": "Chunks asked for by lookups but not found",
    "stores": "Store requests",
    "stored_chunks": "Chunks stored",
    "store_present_chunks": "Chunks a store found already cached",
    "store_refused_chunks": "Chunks a store refused (pool full of pinned chunks, or too large)",
    "retrieves": "Retrieve requests",
    "retrieved_chunks": "Chunks retrieved",
    "stored_bytes": "Bytes copied into the pool",
    "retrieved_bytes": "Bytes copied out of the pool",
    "evicted_chunks": "Chunks evicted to make room",
    "expired_leases": "Leases released because they timed out",
    "bad_frames": "Frames that could not be decoded as a request",
    "disconnects": "Client sessions that disconnected",
}


L2_COUNTER_HELP = {
    "hits": "Objects an L2 tier read into L1",
    "misses": "Objects asked of an L2 tier that it did not hold",
    "bytes_in": "Bytes written to an L2 tier",
    "bytes_out": "Bytes read from an L2 tier",
    "writes": "Objects written to an L2 tier",
    "skipped_present": "Writes not done because the L2 tier holds the object already",
    "dropped_writes": "Writes dropped because the L2 tier's write queue was full",
    "errors": "L2 tier calls that failed (I/O, connection, timeout, no space)",
    "corrupt": "Corrupt, truncated or foreign L2 objects detected and dropped",
    "timeouts": "L2 reads still running when their lookup's deadline passed",
}
L2_GAUGE_HELP = {
    "capacity_bytes": "L2 tier capacity (unset: unbounded or unknown)",
    "used_bytes": "L2 tier bytes in use",
    "objects": "Objects in an L2 tier",
    "available": "1 while the L2 tier is reachable",
    "write_queued_bytes": "Bytes queued for writing to an L2 tier",
    "write_queued_objects": "Objects queued for writing to an L2 tier",
    "reads_in_flight": "L2 reads running now",
    "stalled_jobs": "L2 calls past a lookup's deadline, not returned yet (the tier is skipped meanwhile)",
}


class _StatsCollector(Collector):
    def __init__(self, stats: Stats, gauges: Callable[[], dict[str, tuple[str, float]]],
                 tiers: Callable[[], list[dict[str, Any]]]) -> None:
        self.stats = stats
        self.gauges = gauges
        self.tiers = tiers

    def collect(self) -> Iterator[Metric]:
        for name, help_text in COUNTER_HELP.items():
            yield CounterMetricFamily(f"lmcd_{name}", help_text, value=getattr(self.stats, name))
        requests = CounterMetricFamily("lmcd_requests", "Requests handled, by operation", labels=["op"])
        for op, n in sorted(self.stats.requests.items()):
            requests.add_metric([op], n)
        yield requests
        errors = CounterMetricFamily("lmcd_request_errors", "Error replies, by error code", labels=["code"])
        for code, n in sorted(self.stats.errors.items()):
            errors.add_metric([code], n)
        yield errors
        for name, (help_text, value) in self.gauges().items():
            yield GaugeMetricFamily(f"lmcd_{name}", help_text, value=value)
        yield from self._tier_metrics(self.tiers())

    @staticmethod
    def _tier_metrics(tiers: list[dict[str, Any]]) -> Iterator[Metric]:
        """Per L2 tier (label ``tier``): its counters, usage and queues (``Tier.status``)."""
        if not tiers:
            return
        for name, help_text in L2_COUNTER_HELP.items():
            family = CounterMetricFamily(f"lmcd_l2_{name}", help_text, labels=["tier"])
            for tier in tiers:
                family.add_metric([tier["tier"]], tier["counters"][name])
            yield family
        for name, help_text in L2_GAUGE_HELP.items():
            gauge = GaugeMetricFamily(f"lmcd_l2_{name}", help_text, labels=["tier"])
            for tier in tiers:
                value = tier["queues"].get(name, tier.get(name))
                if value is not None:
                    gauge.add_metric([tier["tier"]], float(value))
            yield gauge


class LabelledHistogram:
    """A histogram with one label whose children are looked up once per label value, not per
    observation (``Histogram.labels`` validates and locks on every call). Thread-safe: two
    threads that miss at once get the same child from ``labels``."""

    def __init__(self, name: str, documentation: str, label: str, registry: CollectorRegistry) -> None:
        self.histogram = Histogram(name, documentation, [label], buckets=LATENCY_BUCKETS, registry=registry)
        self._children: dict[str, Histogram] = {}

    def observe(self, value: str, seconds: float) -> None:
        child = self._children.get(value)
        if child is None:
            child = self._children[value] = self.histogram.labels(value)
        child.observe(seconds)


class Metrics:
    def __init__(self, stats: Stats, gauges: Callable[[], dict[str, tuple[str, float]]],
                 tiers: Callable[[], list[dict[str, Any]]] = list) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(stats, gauges, tiers))
        self.latency = LabelledHistogram("lmcd_request_seconds", "Request latency from receipt to reply, by operation",
                                         "op", self.registry)
        self.copy_seconds = LabelledHistogram("lmcd_copy_seconds", "Copy time of one store or retrieve, by direction",
                                              "direction", self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
