"""The HTTP sidecar against real servers: health (and a stalled loop), status, metrics, clear,
bearer auth, no environment dumps, loopback bind by default."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import lmcd
from lmcd import protocol as p
from lmcd.connector.keys import chunk_keys
from lmcd.connector.shm import CpuKVCache
from lmcd.server.config import ServerConfig
from lmcd.server.daemon import CacheServer
from lmcd.server.http import HEALTH_DEADLINE_S
from tests.conftest import connect, fill_random, namespace, routed_ipv4

TIMEOUT = httpx.Timeout(15.0)
CLEAR_PATHS = ("/clear-cache", "/cache/clear")


def small_kv() -> CpuKVCache:
    # 2 layers, 2 blocks of 128 tokens per 256-token chunk, pages of 2*128*64*2 bytes = 32 KiB:
    # one chunk is 2 * 2 * 32 KiB = 128 KiB
    kv = CpuKVCache(num_layers=2, num_blocks=16, block_size=128, num_kv_heads=2, head_size=32)
    fill_random(kv, 7)
    return kv


@pytest.fixture
def kv() -> Iterator[CpuKVCache]:
    cache = small_kv()
    yield cache
    cache.close()


def blocks_for(num_chunks: int) -> list[int]:
    return [0, 1] * num_chunks  # 2 blocks per chunk; the same source pages may back every chunk


def tokens(num_chunks: int, offset: int = 0, chunk_size: int = 256) -> list[int]:
    return list(range(offset, offset + num_chunks * chunk_size))


def get_status(http_url: str, headers: dict[str, str] | None = None) -> dict:
    r = httpx.get(f"{http_url}/status", headers=headers, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


def get_metrics(http_url: str, headers: dict[str, str] | None = None) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}}"""
    r = httpx.get(f"{http_url}/metrics", headers=headers, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


# ------------------------------------------------------------ health


def test_healthcheck_healthy(server):
    r = httpx.get(f"{server.http_url}/healthcheck", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "healthy"
    assert isinstance(body["loop_latency_ms"], int | float) and 0 <= body["loop_latency_ms"] < 2000
    assert r.headers["content-type"].startswith("application/json")


@pytest.fixture
def inprocess_server() -> Iterator[CacheServer]:
    config = ServerConfig(host="127.0.0.1", port=0, http_port=0, l1_size_gb=0.1, touch_pool=False)
    server = CacheServer(config)
    server.startup()
    thread = threading.Thread(target=server.serve_forever, name="test-loop", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(15)
        assert not thread.is_alive(), "the loop did not stop"
        server.shutdown()


def test_healthcheck_reports_a_stalled_loop(inprocess_server):
    server = inprocess_server
    url = f"{server.http_url}/healthcheck"
    with httpx.Client(timeout=TIMEOUT) as http:
        r = http.get(url)
        assert r.status_code == 200 and r.json()["status"] == "healthy", r.text

        stall_s = 4.0
        stall_started = time.monotonic()
        server.post(lambda: time.sleep(stall_s))
        # slow /status calls waiting on the stuck loop must not delay the health verdict
        status_codes: list[int] = []

        def get_status_once() -> None:
            status_codes.append(httpx.get(f"{server.http_url}/status", timeout=TIMEOUT).status_code)

        waiting = [threading.Thread(target=get_status_once) for _ in range(12)]
        for t in waiting:
            t.start()
        time.sleep(0.3)
        stall_started_probe = time.monotonic()
        r = http.get(url)
        probe_s = time.monotonic() - stall_started_probe
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["status"] == "unhealthy"
        assert "loop" in body["reason"]
        # it waits the deadline and no longer: the probe must not hang as long as the loop does
        assert HEALTH_DEADLINE_S - 0.2 <= probe_s < HEALTH_DEADLINE_S + 1.0
        assert time.monotonic() - stall_started < stall_s - 0.5, "the verdict came only after the stall"

        # once the stall is over the loop answers again
        deadline = stall_started + stall_s + 10
        while True:
            r = http.get(url)
            if r.status_code == 200:
                break
            assert r.status_code == 503, r.text
            assert time.monotonic() < deadline, "still unhealthy long after the stall ended"
            time.sleep(0.1)
        assert time.monotonic() - stall_started >= stall_s - 0.1
        assert r.json()["status"] == "healthy"
        for t in waiting:
            t.join(15)
        assert status_codes == [200] * len(waiting)  # they waited out the 4 s stall within their 10 s


# ------------------------------------------------------------ status and metrics


def test_status_and_metrics_after_a_known_sequence(server_factory, kv):
    server = server_factory("--l1-size-gb", "0.01")
    before = get_status(server.http_url)
    assert before["version"] == lmcd.__version__
    assert before["uptime_s"] >= 0
    assert before["pool"]["num_chunks"] == 0 and before["pool"]["used_bytes"] == 0
    assert before["workers"] == [] and before["sessions"] == []
    assert all(before["counters"][k] == 0 for k in
               ("lookups", "lookup_hit_chunks", "lookup_miss_chunks", "stored_chunks", "evicted_chunks"))
    pool = before["pool"]
    capacity = pool["capacity_bytes"]
    assert capacity == pool["slab_bytes"] * pool["num_slabs"] > 0

    ns = namespace(geometry=kv.geometry)
    with connect(server.url, ns, client_name="http-test-worker") as worker, \
            connect(server.url, namespace(ns.model, kv.geometry, rank=None), role=p.Role.SCHEDULER) as sched:
        info = kv.register(worker)
        chunk_bytes = info.chunk_bytes
        assert chunk_bytes == 2 * 2 * kv.page_bytes
        fit = pool["num_slabs"] * (pool["slab_bytes"] // chunk_bytes)  # chunks the pool holds
        assert fit > 3

        first = chunk_keys(tokens(3), worker.chunk_size)
        assert worker.store(info.worker_id, first, blocks_for(3)).num_stored == 3
        status = get_status(server.http_url)
        assert status["pool"]["num_chunks"] == 3
        assert status["pool"]["used_bytes"] == 3 * chunk_bytes
        assert status["counters"]["stored_chunks"] == 3
        assert status["counters"]["stores"] == 1

        # 3 hits then 2 misses; then 2 misses
        assert sched.lookup(chunk_keys(tokens(5), worker.chunk_size), lease=False).num_hit_chunks == 3
        assert sched.lookup(chunk_keys(tokens(2, offset=10**6), worker.chunk_size), lease=False).num_hit_chunks == 0

        # fill the pool with `fit` new chunks: exactly the 3 old (LRU, unpinned) ones are evicted
        second = chunk_keys(tokens(fit, offset=2 * 10**6), worker.chunk_size)
        result = worker.store(info.worker_id, second, blocks_for(fit))
        assert result.num_stored == fit, result

        status = get_status(server.http_url)
        assert status["version"] == lmcd.__version__
        assert status["uptime_s"] >= before["uptime_s"]
        assert status["pool"]["capacity_bytes"] == capacity
        assert status["pool"]["num_chunks"] == fit
        assert status["pool"]["used_bytes"] == fit * chunk_bytes
        counters = status["counters"]
        assert counters["lookups"] == 2
        assert counters["lookup_hit_chunks"] == 3
        assert counters["lookup_miss_chunks"] == 4
        assert counters["stored_chunks"] == 3 + fit
        assert counters["evicted_chunks"] == 3
        assert counters["stores"] == 2
        assert counters["requests"] == {"hello": 2, "registerworker": 1, "store": 2, "lookup": 2}

        assert len(status["workers"]) == 1
        (w,) = status["workers"]
        assert w["worker_id"] == info.worker_id
        assert w["pid"] == os.getpid()
        assert w["num_layers"] == 2
        assert w["chunk_bytes"] == chunk_bytes
        sessions = {s["role"]: s for s in status["sessions"]}
        assert len(status["sessions"]) == 2
        assert set(sessions) == {"worker", "scheduler"}
        assert all(s["pid"] == os.getpid() for s in sessions.values())
        assert sessions["worker"]["client_name"] == "http-test-worker"
        assert w["session_id"] == sessions["worker"]["session_id"]

        # /status went through the loop, so every reply above is already counted in /metrics
        m = get_metrics(server.http_url)
        assert m["lmcd_pool_capacity_bytes"][()] == capacity
        assert m["lmcd_pool_used_bytes"][()] == fit * chunk_bytes
        assert m["lmcd_pool_chunks"][()] == fit
        assert m["lmcd_stored_chunks_total"][()] == 3 + fit
        assert m["lmcd_lookup_hit_chunks_total"][()] == 3
        assert m["lmcd_lookup_miss_chunks_total"][()] == 4
        assert m["lmcd_lookups_total"][()] == 2
        assert m["lmcd_evicted_chunks_total"][()] == 3
        assert m["lmcd_workers"][()] == 1
        assert m["lmcd_sessions"][()] == 2
        requests = {dict(k)["op"]: v for k, v in m["lmcd_requests_total"].items()}
        assert requests == {"hello": 2, "registerworker": 1, "store": 2, "lookup": 2}

        counts = {dict(k)["op"]: v for k, v in m["lmcd_request_seconds_count"].items()}
        assert counts["store"] == 2 and counts["lookup"] == 2 and counts["hello"] == 2
        for op in ("store", "lookup"):
            buckets = sorted(((float(dict(k)["le"]), v) for k, v in m["lmcd_request_seconds_bucket"].items()
                              if dict(k)["op"] == op))
            values = [v for _, v in buckets]
            assert values == sorted(values), f"{op} buckets not cumulative: {buckets}"
            assert buckets[-1][0] == float("inf") and buckets[-1][1] == counts[op]
            assert 0 < m["lmcd_request_seconds_sum"][(("op", op),)] < 60

    # the clients are gone: their sessions and worker go too
    deadline = time.monotonic() + 10
    while (status := get_status(server.http_url))["sessions"] or status["workers"]:
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    assert status["counters"]["disconnects"] == 2
    assert status["pool"]["num_chunks"] == fit  # the chunks stay cached


# ------------------------------------------------------------ clear


@pytest.mark.parametrize("path", CLEAR_PATHS)
def test_clear_cache(server, kv, path):
    ns = namespace(geometry=kv.geometry)
    with connect(server.url, ns) as worker:
        info = kv.register(worker)
        hashes = chunk_keys(tokens(4), worker.chunk_size)
        assert worker.store(info.worker_id, hashes, blocks_for(4)).num_stored == 4
        assert worker.lookup(hashes, lease=False).num_hit_chunks == 4
        status = get_status(server.http_url)
        assert status["pool"]["num_chunks"] == 4 and status["pool"]["used_bytes"] == 4 * info.chunk_bytes

        r = httpx.post(f"{server.http_url}{path}", timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        assert r.json() == {"status": "ok", "num_chunks": 4}

        assert worker.lookup(hashes, lease=False).num_hit_chunks == 0
        status = get_status(server.http_url)
        assert status["pool"]["num_chunks"] == 0
        assert status["pool"]["used_bytes"] == 0
        assert status["pool"]["free_bytes"] == status["pool"]["capacity_bytes"]
        m = get_metrics(server.http_url)
        assert m["lmcd_pool_chunks"][()] == 0 and m["lmcd_pool_used_bytes"][()] == 0

        # clearing an empty cache is fine; the cache keeps working afterwards
        r = httpx.post(f"{server.http_url}{path}", timeout=TIMEOUT)
        assert r.status_code == 200 and r.json() == {"status": "ok", "num_chunks": 0}
        assert worker.store(info.worker_id, hashes, blocks_for(4)).num_stored == 4
        assert worker.lookup(hashes, lease=False).num_hit_chunks == 4


def test_clear_cache_only_by_post(server):
    for path in CLEAR_PATHS:
        r = httpx.get(f"{server.http_url}{path}", timeout=TIMEOUT)
        assert r.status_code == 405, (path, r.status_code, r.text)


# ------------------------------------------------------------ auth


def test_bearer_auth(server_factory, kv):
    token = "s3cret-s3cret-s3cret"  # 16 characters at least: shorter ones are refused at start
    server = server_factory("--l1-size-gb", "0.25", "--auth-token", token)
    good = {"Authorization": f"Bearer {token}"}
    bad_headers = [None, {"Authorization": "Bearer wrong"}, {"Authorization": token},
                   {"Authorization": f"Bearer {token}x"}, {"Authorization": f"Basic {token}"},
                   {"Authorization": "Bearer"}, {"X-Auth-Token": token}]

    ns = namespace(geometry=kv.geometry)
    with connect(server.url, ns, auth_token=token) as worker:
        info = kv.register(worker)
        hashes = chunk_keys(tokens(2), worker.chunk_size)
        assert worker.store(info.worker_id, hashes, blocks_for(2)).num_stored == 2

        with httpx.Client(base_url=server.http_url, timeout=TIMEOUT) as http:
            requests = [("GET", "/status"), ("GET", "/metrics"), ("POST", "/clear-cache"), ("POST", "/cache/clear")]
            for method, path in requests:
                for headers in bad_headers:
                    r = http.request(method, path, headers=headers)
                    assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
                    assert r.headers.get("www-authenticate") == "Bearer"
                    assert token not in r.text
            # the refused clears cleared nothing
            assert worker.lookup(hashes, lease=False).num_hit_chunks == 2

            r = http.get("/healthcheck")
            assert r.status_code == 200 and r.json()["status"] == "healthy"

            r = http.get("/status", headers=good)
            assert r.status_code == 200 and r.json()["pool"]["num_chunks"] == 2
            assert token not in r.text, "the status leaks the auth token"
            r = http.get("/metrics", headers=good)
            assert r.status_code == 200 and "lmcd_pool_chunks 2.0" in r.text
            assert token not in r.text
            r = http.post("/clear-cache", headers=good)
            assert r.status_code == 200 and r.json() == {"status": "ok", "num_chunks": 2}
            r = http.post("/cache/clear", headers=good)
            assert r.status_code == 200 and r.json() == {"status": "ok", "num_chunks": 0}
        assert worker.lookup(hashes, lease=False).num_hit_chunks == 0


# ------------------------------------------------------------ no environment dumps


def test_no_endpoint_dumps_the_environment(server_factory):
    canary = f"canary-{uuid.uuid4().hex}"
    server = server_factory("--l1-size-gb", "0.25", env={"LMCD_SECRET_CANARY": canary})
    with open(f"/proc/{server.proc.pid}/environ", "rb") as f:
        assert canary.encode() in f.read(), "the canary is not in the server's environment"

    with httpx.Client(base_url=server.http_url, timeout=TIMEOUT) as http:
        known = [("GET", "/healthcheck"), ("GET", "/status"), ("GET", "/metrics"), ("POST", "/clear-cache"),
                 ("POST", "/cache/clear")]
        for method, path in known:
            r = http.request(method, path)
            assert r.status_code == 200, (path, r.text)
            assert canary not in r.text and "LMCD_SECRET_CANARY" not in r.text, path
            assert all(canary not in v for v in r.headers.values()), path

        guesses = ["/env", "/environ", "/environment", "/debug", "/debug/vars", "/debug/pprof", "/docs", "/redoc",
                   "/openapi.json", "/docs/oauth2-redirect", "/config", "/settings", "/admin", "/vars", "/info",
                   "/status/env", "/metrics/env", "/healthcheck/env", "/.env", "/nonexistent"]
        for path in guesses:
            for method in ("GET", "POST"):
                r = http.request(method, path)
                assert r.status_code == 404, (method, path, r.status_code, r.text)
                assert canary not in r.text, (method, path)


# ------------------------------------------------------------ bind address


def test_http_binds_loopback_by_default(server):
    assert server.http_url.startswith("http://127.0.0.1:")
    port = int(server.http_url.rsplit(":", 1)[1])
    assert port > 0
    status = get_status(server.http_url)
    assert status["http_url"] == server.http_url

    address = routed_ipv4()
    if address is not None:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{address}:{port}/healthcheck", timeout=5)
