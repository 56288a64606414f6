"""deploy/grafana/lmcd.json: every metric its PromQL queries is exported by a real server's /metrics
(after stores, lookups, retrieves and an error reply, so that every labelled series exists),
and every label it groups by is a label of that metric."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmcd import protocol as p
from lmcd.connector.client import ServerError
from lmcd.connector.keys import chunk_keys
from lmcd.connector.shm import CpuKVCache
from tests.conftest import connect, fill_random, namespace

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "lmcd.json"
# Prometheus attaches these to every scraped series; `le` is the bucket label of a histogram
TARGET_LABELS = {"instance", "job"}
METRIC = re.compile(r"\blmcd_[a-zA-Z0-9_]+")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
MATCHERS = re.compile(r"\{([^}]*)\}")


def panels(dashboard: dict) -> Iterator[dict]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def queries(dashboard: dict) -> list[str]:
    exprs = [target["expr"] for panel in panels(dashboard) for target in panel.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def exported_series(text: str) -> dict[str, set[str]]:
    """{series name as Prometheus stores it: its label names}, with each type's suffixes
    (counter X: X_total, X_created; histogram X: X_bucket, X_count, X_sum, X_created; gauge X: X)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "gauge": ("",), "summary": ("", "_count", "_sum", "_created")}
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        labels = {label for sample in family.samples for label in sample.labels}
        for suffix in suffixes.get(family.type, ("",)):
            out[family.name + suffix] = labels
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def make_traffic(url: str) -> None:
    """Stores, a lookup (hits and a miss), a retrieve and one error reply."""
    kv = CpuKVCache(num_layers=2, num_blocks=16, block_size=128, num_kv_heads=2, head_size=32)
    fill_random(kv, 11)
    try:
        with connect(url, namespace()) as client:
            worker = kv.register(client)
            keys = chunk_keys(list(range(8 * client.chunk_size)), client.chunk_size)
            for key in keys:
                client.store(worker.worker_id, [key], [0, 1])
            hit = client.lookup(keys + [b"\0" * p.HASH_BYTES])
            assert hit.num_hit_chunks == len(keys)
            assert client.retrieve(worker.worker_id, keys[:2], [4, 5, 6, 7], hit.lease_id) == 2
            with pytest.raises(ServerError):
                client.retrieve(worker.worker_id + 1000, keys[:1], [8, 9])
    finally:
        kv.close()


def test_dashboard_is_grafana_json_with_queries_everywhere():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dashboard):
        if panel["type"] != "row":
            assert panel.get("targets"), f"panel {panel['title']!r} has no query"
            for target in panel["targets"]:
                assert METRIC.search(target["expr"]), f"{panel['title']!r}: {target['expr']!r} queries no lmcd metric"
    titles = " ".join(panel["title"].lower() for panel in panels(dashboard))
    for topic in ("hit rate", "throughput", "pool usage", "evictions", "errors", "latency", "l2 usage", "l2 hit rate",
                  "l2 queues"):
        assert topic in titles, f"no panel about {topic}"


def test_every_queried_metric_and_label_is_exported(server_factory, tmp_path):
    tier = json.dumps({"type": "fs", "base_path": str(tmp_path / "l2"), "max_capacity_gb": 0.1})
    server = server_factory("--l2-adapter", tier)  # the L2 panels query the tier series
    make_traffic(server.url)
    reply = httpx.get(f"{server.http_url}/metrics", timeout=15)
    assert reply.status_code == 200
    series = exported_series(reply.text)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = queries(dashboard)
    assert len(exprs) >= 20
    missing: list[str] = []
    for expr in exprs:
        names = set(METRIC.findall(expr))
        for name in sorted(names):
            if name not in series:
                missing.append(f"{name} (in {expr!r})")
        grouped = {label.strip() for group in GROUPING.findall(expr) for label in group.split(",") if label.strip()}
        matched = {m.split("=")[0].rstrip("!~").strip() for group in MATCHERS.findall(expr)
                   for m in group.split(",") if m.strip()}
        known = set().union(*(series.get(name, set()) for name in names)) | TARGET_LABELS
        unknown = (grouped | matched) - known
        assert not unknown, f"labels {sorted(unknown)} are not labels of {sorted(names)}: {expr!r}"
    assert not missing, "queried but not exported by the server:\n" + "\n".join(missing)
    # the traffic above makes the labelled series the dashboard breaks down by
    assert {"op", "le"} <= series["lmcd_request_seconds_bucket"]
    assert "code" in series["lmcd_request_errors_total"]
    assert "direction" in series["lmcd_copy_seconds_bucket"]
    assert "tier" in series["lmcd_l2_bytes_in_total"] and "tier" in series["lmcd_l2_used_bytes"]
