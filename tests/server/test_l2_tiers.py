"""L2 tiers behind real `lmcache server` processes: a disk tier that survives restarts, Redis shared by
two servers, and what a corrupt, full, slow or dead tier costs (a miss, never a stall or garbage)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable

import numpy as np
import pytest

from lmcd import protocol as p
from lmcd.connector.client import CacheClient
from lmcd.connector.shm import CpuKVCache
from tests.conftest import RunningServer, connect, fill_random, namespace
from tests.redis_support import RedisProc
from tests.server.test_cache_behaviour import hashes, scheduler, snapshot, wait_until

POOL = ("--l1-size-gb", "0.0625")  # 64 MiB


def kv_cache() -> CpuKVCache:
    """2 layers x 2 blocks of 64 KiB per 256-token chunk = 256 KiB per chunk; 16 blocks = 8 chunks."""
    return CpuKVCache(num_layers=2, num_blocks=16, block_size=128, num_kv_heads=2, head_size=64)


def fs_adapter(path: os.PathLike[str] | str, capacity_gb: float = 1.0) -> str:
    return json.dumps({"type": "fs", "base_path": str(path), "max_capacity_gb": capacity_gb})


def tier_status(client: CacheClient, label: str | None = None) -> dict:
    tiers = client.status()["l2"]
    assert isinstance(tiers, list) and tiers, "no L2 tier in /status"
    return next(t for t in tiers if label is None or t["tier"] == label)


def wait_written(client: CacheClient, num_objects: int, label: str | None = None, timeout: float = 10.0) -> dict:
    """The tier's status once ``num_objects`` writes ended (or the test fails)."""
    def done() -> bool:
        tier = tier_status(client, label)
        return tier["counters"]["writes"] >= num_objects and tier["queues"]["write_queued_objects"] == 0
    assert wait_until(done, timeout), tier_status(client, label)
    return tier_status(client, label)


def block_ids(chunks: range) -> list[int]:
    return [b for c in chunks for b in (2 * c, 2 * c + 1)]


def store_chunks(server: RunningServer, kv: CpuKVCache, model: str, num_chunks: int,
                 keys: list[bytes]) -> list[np.ndarray]:
    """Store ``num_chunks`` chunks of ``kv`` (blocks 0..) under ``keys``; the pages they came from."""
    with connect(server.url, namespace(model, kv.geometry)) as client:
        info = kv.register(client)
        assert client.store(info.worker_id, keys[:num_chunks], block_ids(range(num_chunks))).num_stored == num_chunks
    return snapshot(kv)


def load_chunks(server: RunningServer, model: str, keys: list[bytes], *, world_size: int = 1) -> tuple[int, CpuKVCache]:
    """A fresh worker (KV zeroed) of ``model`` looks ``keys`` up through a scheduler and retrieves the hit."""
    kv = kv_cache()
    ns = namespace(model, kv.geometry, world_size=world_size)
    with connect(server.url, ns) as worker, scheduler(server.url, ns) as sched:
        info = kv.register(worker)
        hit = sched.lookup(keys)
        if hit.num_hit_chunks:
            assert worker.retrieve(info.worker_id, keys[: hit.num_hit_chunks], block_ids(range(hit.num_hit_chunks)),
                                   hit.lease_id) == hit.num_hit_chunks
    return hit.num_hit_chunks, kv


def same_chunks(original: list[np.ndarray], kv: CpuKVCache, num_chunks: int) -> bool:
    blocks = block_ids(range(num_chunks))
    return all(np.array_equal(snapshot(kv)[layer][blocks], original[layer][blocks]) for layer in range(len(original)))


@pytest.fixture
def model() -> str:
    return f"l2-{os.urandom(4).hex()}"


# ---------------------------------------------------------------- disk


def test_disk_tier_survives_restart_byte_exact(server_factory: Callable[..., RunningServer], tmp_path, model) -> None:
    disk = tmp_path / "disk"
    server = server_factory(*POOL, "--l2-adapter", fs_adapter(disk))
    kv = kv_cache()
    fill_random(kv, 7)
    keys = hashes(8)
    original = store_chunks(server, kv, model, 6, keys)
    with connect(server.url, namespace(model, kv.geometry)) as client:
        tier = wait_written(client, 6)
        assert tier["objects"] == 6 and tier["counters"]["errors"] == 0
    assert server.stop() == 0

    # the restarted server takes the same directory from LMCache's legacy keys
    server = server_factory(*POOL, env={"LMCACHE_LOCAL_DISK": f"file://{disk}/", "LMCACHE_MAX_LOCAL_DISK_SIZE": "1"})
    server.wait_for_log(r"LMCACHE_LOCAL_DISK=file://")
    server.wait_for_log(r"found 6 objects")
    hit, kv2 = load_chunks(server, model, keys)
    assert hit == 6  # every stored chunk, from disk; the two never stored are a miss
    assert same_chunks(original, kv2, 6)
    with connect(server.url, namespace(model, kv.geometry)) as client:
        tier = tier_status(client)
        assert tier["counters"]["hits"] == 6 and tier["counters"]["bytes_out"] == 6 * (256 << 10)
        assert client.status()["pool"]["num_chunks"] == 6  # prefetched into L1
        assert tier["counters"]["writes"] == 0  # what was read from the tier is not written back to it
    # a second lookup is an L1 hit and reads nothing more from the disk
    hit, _ = load_chunks(server, model, keys)
    assert hit == 6
    with connect(server.url, namespace(model, kv.geometry)) as client:
        assert tier_status(client)["counters"]["hits"] == 6


def mib_chunk_kv() -> CpuKVCache:
    return CpuKVCache(num_layers=2, num_blocks=64, block_size=128, num_kv_heads=8, head_size=128)  # 1 MiB chunks


def store_32_chunks(server, model, seed: int) -> tuple[CpuKVCache, list[bytes]]:  # noqa: ANN001
    """A worker's KV of random bytes from ``seed``, its first 32 chunks stored; (the KV, their keys)."""
    kv = mib_chunk_kv()
    fill_random(kv, seed)
    keys = hashes(32)
    with connect(server.url, namespace(model, kv.geometry)) as client:
        info = kv.register(client)
        assert client.store(info.worker_id, keys, block_ids(range(32))).num_stored == 32
    return kv, keys


def test_sigterm_flushes_write_behind(server_factory, tmp_path, model) -> None:
    disk = tmp_path / "disk"
    server = server_factory("--l1-size-gb", "0.25", "--l2-adapter", fs_adapter(disk))
    kv, keys = store_32_chunks(server, model, seed=3)
    assert server.stop() == 0  # at once: the queue is flushed before the exit
    server = server_factory("--l1-size-gb", "0.25", "--l2-adapter", fs_adapter(disk))
    server.wait_for_log(r"found 32 objects")


def test_corrupt_disk_object_is_dropped_never_loaded(server_factory, tmp_path, model) -> None:
    disk = tmp_path / "disk"
    server = server_factory(*POOL, "--l2-adapter", fs_adapter(disk))
    kv = kv_cache()
    fill_random(kv, 11)
    keys = hashes(4)
    original = store_chunks(server, kv, model, 4, keys)
    with connect(server.url, namespace(model, kv.geometry)) as client:
        wait_written(client, 4)
    assert server.stop() == 0
    files = list(disk.rglob("*.kv"))
    assert len(files) == 4
    # flip one payload byte of the third chunk's object: find it by its header's chunk key
    third = next(path for path in files if keys[2] in path.read_bytes()[:200])
    data = bytearray(third.read_bytes())
    data[-100] ^= 0xFF
    third.write_bytes(bytes(data))

    server = server_factory(*POOL, "--l2-adapter", fs_adapter(disk))
    hit, kv2 = load_chunks(server, model, keys)
    assert hit == 2  # the chunks before the corrupt one; never the corrupt one, never the ones after it
    assert same_chunks(original, kv2, 2)
    with connect(server.url, namespace(model, kv.geometry)) as client:
        counters = tier_status(client)["counters"]
        assert counters["corrupt"] == 1
    assert not third.exists()  # dropped
    assert len(server.log().split("dropped corrupt object")) == 2  # logged once


def test_full_write_queue_drops_l2_copies_never_blocks_a_store(server_factory, tmp_path, model) -> None:
    server = server_factory(*POOL, "--l2-adapter", fs_adapter(tmp_path / "disk"), "--l2-write-queue-mb", "1")
    kv = CpuKVCache(num_layers=2, num_blocks=64, block_size=128, num_kv_heads=2, head_size=64)
    fill_random(kv, 5)
    keys = hashes(32)
    with connect(server.url, namespace(model, kv.geometry)) as client:
        info = kv.register(client)
        result = client.store(info.worker_id, keys, block_ids(range(32)))
        assert result.statuses == [p.ChunkStatus.STORED] * 32
        tier = tier_status(client)
        assert tier["queues"]["write_queue_limit_bytes"] == 1 << 20
        assert tier["counters"]["dropped_writes"] > 0
        wait_until(lambda: tier_status(client)["queues"]["write_queued_objects"] == 0, 10)
        tier = tier_status(client)
        assert tier["counters"]["writes"] + tier["counters"]["dropped_writes"] == 32
        assert tier["objects"] == tier["counters"]["writes"]


def test_lookup_without_tier_hit_is_unchanged(server_factory, tmp_path, model) -> None:
    """A configured tier that holds nothing costs a lookup no wait and no hit it cannot load."""
    server = server_factory(*POOL, "--l2-adapter", fs_adapter(tmp_path / "disk"))
    hit, _ = load_chunks(server, model, hashes(4))
    assert hit == 0


# ---------------------------------------------------------------- helpers for the redis tests


def resp_adapter(port: int, **extra: object) -> str:
    return json.dumps({"type": "resp", "host": "127.0.0.1", "port": port, "key_prefix": f"t{os.urandom(3).hex()}:",
                       **extra})


# ---------------------------------------------------------------- redis


def test_two_servers_share_chunks_through_redis(server_factory, redis_server: RedisProc, model, tmp_path) -> None:
    """A stores into Redis; B (its own disk tier first, then the same Redis) loads A's chunks from Redis
    and keeps a copy on its disk."""
    adapter = resp_adapter(redis_server.port)
    a = server_factory(*POOL, "--l2-adapter", adapter)
    b = server_factory(*POOL, "--l2-adapter", fs_adapter(tmp_path / "b-disk"), "--l2-adapter", adapter)
    kv = kv_cache()
    fill_random(kv, 21)
    keys = hashes(6)
    original = store_chunks(a, kv, model, 5, keys)
    with connect(a.url, namespace(model, kv.geometry)) as client:
        wait_written(client, 5)
    hit, kv2 = load_chunks(b, model, keys)
    assert hit == 5
    assert same_chunks(original, kv2, 5)
    with connect(b.url, namespace(model, kv.geometry)) as client:
        redis_tier, disk_tier = tier_status(client, "resp"), tier_status(client, "fs")
        assert redis_tier["counters"]["hits"] == 5 and redis_tier["counters"]["writes"] == 0  # nothing written back
        assert disk_tier["counters"]["misses"] == 6 and disk_tier["counters"]["hits"] == 0  # asked first, lacked them
        wait_written(client, 5, "fs")  # promoted to B's disk
    hit, kv3 = load_chunks(b, model, keys)  # an L1 hit now; nothing more read from either tier
    assert hit == 5 and same_chunks(original, kv3, 5)


def test_redis_killed_then_back(server_factory, redis_server: RedisProc, model) -> None:
    adapter = resp_adapter(redis_server.port, timeout_s=0.5)
    flags = (*POOL, "--l2-adapter", adapter, "--l2-prefetch-load-timeout", "0.5")
    a = server_factory(*flags)
    b = server_factory(*flags)
    kv = kv_cache()
    fill_random(kv, 31)
    keys = hashes(8)
    redis_server.kill()
    # stores answer from L1 at once; lookups on B (nothing in its L1) are misses within the deadline
    started = time.monotonic()
    original = store_chunks(a, kv, model, 4, keys)
    hit, _ = load_chunks(b, model, keys)
    assert hit == 0 and time.monotonic() - started < 5
    for _ in range(5):
        started = time.monotonic()
        hit, _ = load_chunks(b, model, keys)
        assert hit == 0 and time.monotonic() - started < 1.5
    with connect(a.url, namespace(model, kv.geometry)) as client:
        assert wait_until(lambda: tier_status(client)["available"] is False, 5)
    redis_server.restart()
    with connect(a.url, namespace(model, kv.geometry)) as client:
        assert wait_until(lambda: tier_status(client)["available"] is True, 15), tier_status(client)
    # the tier is back: new stores reach Redis and B loads them
    fill_random(kv, 32)
    keys2 = hashes(4)
    original = store_chunks(a, kv, model, 4, keys2)
    with connect(a.url, namespace(model, kv.geometry)) as client:
        wait_written(client, 4)
    hit, kv2 = load_chunks(b, model, keys2)
    assert hit == 4 and same_chunks(original, kv2, 4)


def test_stalled_redis_costs_a_miss_not_a_stall(server_factory, redis_server: RedisProc, model) -> None:
    adapter = resp_adapter(redis_server.port, timeout_s=3.0)
    flags = (*POOL, "--l2-adapter", adapter, "--l2-prefetch-load-timeout", "0.3")
    a = server_factory(*flags)
    b = server_factory(*flags)
    kv = kv_cache()
    fill_random(kv, 41)
    keys = hashes(4)
    store_chunks(a, kv, model, 4, keys)
    with connect(a.url, namespace(model, kv.geometry)) as client:
        wait_written(client, 4)
    redis_server.pause()
    try:
        started = time.monotonic()
        hit, _ = load_chunks(b, model, keys)
        first = time.monotonic() - started
        assert hit == 0 and first < 2.0  # the deadline (0.3 s), not the socket timeout (3 s)
        started = time.monotonic()
        hit, _ = load_chunks(b, model, keys)
        assert hit == 0 and time.monotonic() - started < 1.0  # the stalled tier is skipped
        with connect(b.url, namespace(model, kv.geometry)) as client:
            tier = tier_status(client)
            assert tier["counters"]["timeouts"] >= 1
    finally:
        redis_server.resume()
    with connect(b.url, namespace(model, kv.geometry)) as client:
        assert wait_until(lambda: tier_status(client)["queues"]["stalled_jobs"] == 0, 10)
    assert wait_until(lambda: load_chunks(b, model, keys)[0] == 4, 10)


def test_redis_maxmemory_eviction_keeps_accounting_right(server_factory, redis_factory, model) -> None:
    redis = redis_factory(maxmemory="4mb", policy="allkeys-lru")
    adapter = resp_adapter(redis.port)
    a = server_factory(*POOL, "--l2-adapter", adapter)
    b = server_factory(*POOL, "--l2-adapter", adapter)
    kv = CpuKVCache(num_layers=2, num_blocks=64, block_size=128, num_kv_heads=2, head_size=64)  # 32 chunks
    fill_random(kv, 51)
    keys = hashes(32)
    with connect(a.url, namespace(model, kv.geometry)) as client:
        info = kv.register(client)
        assert client.store(info.worker_id, keys, block_ids(range(32))).num_stored == 32  # 8 MiB: twice maxmemory
        assert wait_until(lambda: tier_status(client)["queues"]["write_queued_objects"] == 0, 10)
        tier = tier_status(client)
        assert tier["counters"]["writes"] + tier["counters"]["errors"] == 32  # written, or refused (OOM): counted
    original = snapshot(kv)
    held = [redis.client().exists(f"{json.loads(adapter)['key_prefix']}{name}".encode()) for name in
            [_name(model, kv, key) for key in keys]]
    assert 0 < sum(held) < 32  # Redis evicted some: the tier must not assume they exist
    # B looks up: the leading chunks Redis still holds, loaded byte-exact; nothing it cannot load
    expected = held.index(0) if 0 in held else 32
    kv_b = CpuKVCache(num_layers=2, num_blocks=64, block_size=128, num_kv_heads=2, head_size=64)
    ns = namespace(model, kv.geometry)
    with connect(b.url, ns) as worker, scheduler(b.url, ns) as sched:
        info = kv_b.register(worker)
        hit = sched.lookup(keys)
        assert hit.num_hit_chunks == expected
        if expected:
            got = worker.retrieve(info.worker_id, keys[:expected], block_ids(range(expected)), hit.lease_id)
            assert got == expected
        status = worker.status()
        assert status["pool"]["num_chunks"] == expected  # no chunk it could not load was kept or counted
        assert tier_status(worker)["counters"]["hits"] == expected
    blocks = block_ids(range(expected))
    assert all(np.array_equal(snapshot(kv_b)[layer][blocks], original[layer][blocks]) for layer in range(2))


def _name(model: str, kv: CpuKVCache, key: bytes, rank: int = 0, world_size: int = 1) -> str:
    from lmcd.server.l2 import ObjectId, namespace_text

    return ObjectId(namespace_text(model, "bf16", kv.geometry, world_size), rank, key).name


def test_two_servers_share_chunks_through_a_redis_cluster(server_factory, redis_cluster, model) -> None:
    adapter = json.dumps({"type": "valkey", "cluster_mode": True, "key_prefix": f"c{os.urandom(3).hex()}:",
                          "startup_nodes": [f"{h}:{p}" for h, p in redis_cluster.startup_nodes]})
    a = server_factory(*POOL, "--l2-adapter", adapter)
    b = server_factory(*POOL, "--l2-adapter", adapter)
    kv = kv_cache()
    fill_random(kv, 61)
    keys = hashes(8)
    original = store_chunks(a, kv, model, 8, keys)
    with connect(a.url, namespace(model, kv.geometry)) as client:
        wait_written(client, 8)
    per_node = [node.client().dbsize() for node in redis_cluster.nodes]
    assert sum(per_node) >= 8 and sum(1 for n in per_node if n) > 1  # spread over the masters
    hit, kv2 = load_chunks(b, model, keys)
    assert hit == 8 and same_chunks(original, kv2, 8)


def test_disk_tier_capacity_is_a_bound(server_factory, tmp_path, model) -> None:
    chunk = 256 << 10
    capacity_gb = 3.5 * chunk / 2**30  # room for 3 objects (each a chunk plus its header)
    server = server_factory(*POOL, "--l2-adapter", fs_adapter(tmp_path / "disk", capacity_gb))
    kv = kv_cache()
    fill_random(kv, 71)
    keys = hashes(8)
    store_chunks(server, kv, model, 8, keys)
    with connect(server.url, namespace(model, kv.geometry)) as client:
        assert wait_until(lambda: tier_status(client)["queues"]["write_queued_objects"] == 0, 10)
        tier = tier_status(client)
        assert tier["objects"] == 3 and tier["used_bytes"] <= tier["capacity_bytes"]
        assert tier["counters"]["writes"] == 8 and tier["counters"]["errors"] == 0
    assert len(list((tmp_path / "disk").rglob("*.kv"))) == 3


def test_tensor_parallel_chunks_come_back_for_every_rank(server_factory, tmp_path, model) -> None:
    """Two ranks store; after a restart a scheduler's lookup prefetches both ranks' chunks, and stops at
    the first chunk one rank lacks."""
    disk = tmp_path / "disk"
    server = server_factory(*POOL, "--l2-adapter", fs_adapter(disk))
    keys = hashes(4)
    originals = []
    for rank in range(2):
        kv = kv_cache()
        fill_random(kv, 80 + rank)
        with connect(server.url, namespace(model, kv.geometry, rank=rank, world_size=2)) as client:
            info = kv.register(client)
            stored = 4 if rank == 0 else 3  # rank 1 lacks the last chunk
            assert client.store(info.worker_id, keys[:stored], block_ids(range(stored))).num_stored == stored
            originals.append(snapshot(kv))
            wait_written(client, 4 + rank * 3)
    assert server.stop() == 0
    server = server_factory(*POOL, "--l2-adapter", fs_adapter(disk))
    kvs = [kv_cache() for _ in range(2)]
    workers = [connect(server.url, namespace(model, kvs[r].geometry, rank=r, world_size=2)) for r in range(2)]
    try:
        infos = [kvs[r].register(workers[r]) for r in range(2)]
        with scheduler(server.url, namespace(model, kvs[0].geometry, world_size=2)) as sched:
            hit = sched.lookup(keys)
            assert hit.num_hit_chunks == 3
            for r in range(2):
                assert workers[r].retrieve(infos[r].worker_id, keys[:3], block_ids(range(3)), hit.lease_id) == 3
                assert same_chunks(originals[r], kvs[r], 3)
            assert tier_status(sched)["counters"]["hits"] == 6
    finally:
        for worker in workers:
            worker.close()


FULL_DISK = """
import json
kv = CpuKVCache(num_layers=2, num_blocks=64, block_size=128, num_kv_heads=2, head_size=64)  # 256 KiB chunks
kv.pages(0)[:] = 7
os.makedirs("/dev/shm/l2")
tier = json.dumps({"type": "fs", "base_path": "/dev/shm/l2", "max_capacity_gb": 1.0, "min_free_gb": 0})
proc, url, lines = start("--l1-size-gb", "0.0625", "--l2-adapter", tier)
out = {"started": url is not None}
if url:
    ns = p.Namespace("full-disk", "bf16", kv.geometry, 1, 0)
    with CacheClient(url, ns, timeout_s=10) as client:
        info = kv.register(client)
        keys = [bytes([i]) * 32 for i in range(32)]  # 8 MiB of chunks: more than the 8 MiB tmpfs holds
        statuses = client.store(info.worker_id, keys, list(range(64))).statuses
        out["stored"] = sum(s == p.ChunkStatus.STORED for s in statuses)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            tier = client.status()["l2"][0]
            if tier["queues"]["write_queued_objects"] == 0:
                break
            time.sleep(0.05)
        out["tier"] = {"writes": tier["counters"]["writes"], "errors": tier["counters"]["errors"]}
        out["hits"] = client.lookup(keys, lease=False).num_hit_chunks
        out["again"] = sum(s == p.ChunkStatus.PRESENT for s in client.store(info.worker_id, keys[:4],
                                                                             list(range(8))).statuses)
    out["temp_files"] = [n for _, _, names in os.walk("/dev/shm/l2") for n in names if n.endswith(".tmp")]
    out["exit"] = stop(proc)
print("RESULT " + json.dumps(out))
"""


def test_a_full_filesystem_stops_disk_writes_not_the_server() -> None:
    from tests.conftest import PRELUDE, run_in_private_shm

    result = run_in_private_shm(PRELUDE + FULL_DISK)
    assert result["started"]
    assert result["stored"] == 32 and result["hits"] == 32 and result["again"] == 4  # L1 serves everything
    tier = result["tier"]
    assert tier["errors"] > 0 and 0 < tier["writes"] < 32  # what fit was written; the rest refused, counted
    assert result["temp_files"] == [] and result["exit"] == 0


def test_server_killed_mid_write_behind_leaves_no_torn_object(server_factory, tmp_path, model) -> None:
    """kill -9 while the write-behind queue is busy: the restarted server finds only whole objects
    (a torn write is a temp file, removed at start), and every chunk it reports loads byte-exact."""
    disk = tmp_path / "disk"
    flags = ("--l1-size-gb", "0.25", "--l2-adapter", fs_adapter(disk))
    server = server_factory(*flags)
    kv, keys = store_32_chunks(server, model, seed=91)
    original = snapshot(kv)
    server.stop(signal.SIGKILL)  # the writes behind the store are cut wherever they are
    server = server_factory(*flags)
    found = int(server.wait_for_log(r"found (\d+) objects").group(1))
    kv2 = mib_chunk_kv()
    ns = namespace(model, kv.geometry)
    with connect(server.url, ns) as worker, scheduler(server.url, ns) as sched:
        info = kv2.register(worker)
        hit = sched.lookup(keys).num_hit_chunks
        if hit:
            assert worker.retrieve(info.worker_id, keys[:hit], block_ids(range(hit))) == hit
        counters = tier_status(worker)["counters"]
    assert counters["corrupt"] == 0 and counters["errors"] == 0
    assert hit <= found and same_chunks(original, kv2, hit)
    assert not list(disk.rglob("*.tmp"))
