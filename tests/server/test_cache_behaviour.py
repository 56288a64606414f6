"""Cache behaviour against real `lmcache server` processes: eviction, leases, disconnects,
exact copies, tensor parallel, namespaces, concurrency and clean shutdown."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import zmq

from lmcd import protocol as p
from lmcd.connector.client import CacheClient, ServerError
from lmcd.connector.shm import CpuKVCache
from tests.conftest import RunningServer, connect, fill_random, memfd_names, namespace, shm_names

SMALL_POOL = ("--l1-size-gb", "0.0625")  # 64 MiB: one slab


def hashes(n: int, tag: str = "") -> list[bytes]:
    """n distinct 32-byte chunk keys (unique per test run)."""
    salt = os.urandom(8) + tag.encode()
    return [hashlib.blake2b(salt + i.to_bytes(8, "little"), digest_size=32).digest() for i in range(n)]


def snapshot(kv: CpuKVCache) -> list[np.ndarray]:
    return [kv.pages(layer).copy() for layer in range(kv.layout.num_layers)]


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def own_shm_names(pid: int) -> set[str]:
    return shm_names(pid) | memfd_names(pid, f"lmcache_kv_{pid}_")


def server_shm_mappings(server: RunningServer) -> list[str]:
    with open(f"/proc/{server.proc.pid}/maps", encoding="ascii", errors="replace") as maps:
        return [line for line in maps if "/dev/shm/" in line or "/memfd:lmcache_kv" in line]


def scheduler(url: str, ns: p.Namespace, **kwargs: object) -> CacheClient:
    sched_ns = p.Namespace(ns.model, ns.kv_dtype, ns.geometry, ns.world_size, None)
    return connect(url, sched_ns, role=p.Role.SCHEDULER, **kwargs)


def big_chunk_kv() -> CpuKVCache:
    """2 layers x 2 blocks of 128 KiB per chunk of 256 tokens = 512 KiB: 128 chunks fill 64 MiB."""
    return CpuKVCache(num_layers=2, num_blocks=8, block_size=128, num_kv_heads=4, head_size=64)


# ---------------------------------------------------------------- eviction and capacity


def test_eviction_under_pressure_exact_accounting(server_factory) -> None:
    server = server_factory(*SMALL_POOL)
    kv = big_chunk_kv()
    fill_random(kv, 1)
    ns = namespace(geometry=kv.geometry)
    with connect(server.url, ns) as client:
        info = kv.register(client)
        chunk_bytes = info.chunk_bytes
        assert chunk_bytes == 512 << 10
        pool = client.status()["pool"]
        capacity = pool["capacity_bytes"]
        assert capacity == 64 << 20 and pool["used_bytes"] == 0
        fits = capacity // chunk_bytes
        assert fits == 128

        keys = hashes(400)
        statuses: list[p.ChunkStatus] = []
        for start in range(0, len(keys), 50):
            batch = keys[start : start + 50]
            result = client.store(info.worker_id, batch, [0, 1] * len(batch))
            assert len(result.statuses) == len(batch)  # one status per chunk, always
            statuses += result.statuses
            pool = client.status()["pool"]
            assert pool["used_bytes"] == pool["num_chunks"] * chunk_bytes <= capacity
        assert statuses == [p.ChunkStatus.STORED] * len(keys)  # unpinned chunks are always evictable

        status = client.status()
        pool, counters = status["pool"], status["counters"]
        assert pool["num_chunks"] == fits
        assert pool["used_bytes"] == fits * chunk_bytes == capacity
        assert pool["free_bytes"] == 0
        assert counters["stored_chunks"] == len(keys)
        assert counters["evicted_chunks"] == counters["stored_chunks"] - pool["num_chunks"] == len(keys) - fits
        assert counters["store_refused_chunks"] == 0
        assert counters["stored_bytes"] == len(keys) * chunk_bytes

        # exactly the newest `fits` chunks survive
        survivors = [k for k in keys if client.lookup([k], lease=False).num_hit_chunks == 1]
        assert survivors == keys[-fits:]

        # storing them again changes nothing and reports PRESENT
        again = client.store(info.worker_id, keys[-3:], [0, 1] * 3)
        assert again.statuses == [p.ChunkStatus.PRESENT] * 3
        assert client.status()["counters"]["evicted_chunks"] == len(keys) - fits
    kv.close()


def test_lru_recently_looked_up_chunks_survive(server_factory) -> None:
    server = server_factory(*SMALL_POOL)
    kv = big_chunk_kv()
    fill_random(kv, 2)
    ns = namespace(geometry=kv.geometry)
    with connect(server.url, ns) as client:
        info = kv.register(client)
        old = hashes(128, "old")
        assert client.store(info.worker_id, old, [0, 1] * 128).num_stored == 128
        assert client.status()["counters"]["evicted_chunks"] == 0
        # touch the 10 oldest (lookup without lease) and 5 more through a leased lookup + release
        assert client.lookup(old[:10], lease=False).num_hit_chunks == 10
        leased = client.lookup(old[50:55])
        assert leased.num_hit_chunks == 5 and leased.lease_id is not None
        assert client.release(leased.lease_id) == 5
        new = hashes(30, "new")
        assert client.store(info.worker_id, new, [2, 3] * 30).num_stored == 30
        alive = {k for k in old + new if client.lookup([k], lease=False).num_hit_chunks == 1}
        expected_evicted = set(old[10:40])  # the 30 least recently used
        assert alive == set(old + new) - expected_evicted
        assert client.status()["counters"]["evicted_chunks"] == 30
    kv.close()


def test_refused_full_when_everything_is_pinned_then_recovers(server_factory) -> None:
    server = server_factory(*SMALL_POOL, "--lease-timeout", "300")
    kv = big_chunk_kv()
    fill_random(kv, 3)
    ns = namespace(geometry=kv.geometry)
    with connect(server.url, ns) as client, scheduler(server.url, ns) as sched:
        info = kv.register(client)
        keys = hashes(128)
        assert client.store(info.worker_id, keys, [0, 1] * 128).num_stored == 128
        hit = sched.lookup(keys)
        assert hit.num_hit_chunks == 128 and hit.lease_id is not None
        assert client.status()["leases"] == 1

        extra = hashes(3, "extra")
        result = client.store(info.worker_id, extra, [2, 3] * 3)
        assert result.statuses == [p.ChunkStatus.REFUSED_FULL] * 3
        assert result.num_stored == 0
        assert "full" in result.message and "--l1-size-gb" in result.message
        status = client.status()
        assert status["counters"]["store_refused_chunks"] == 3
        assert status["counters"]["evicted_chunks"] == 0
        assert status["pool"]["num_chunks"] == 128
        assert client.lookup(extra, lease=False).num_hit_chunks == 0

        # a partially pinned pool: the store evicts only what is not pinned
        assert sched.release(hit.lease_id) == 128
        assert client.status()["leases"] == 0
        part = sched.lookup(keys[:127])
        assert part.num_hit_chunks == 127
        result = client.store(info.worker_id, extra, [2, 3] * 3)
        assert result.statuses == [p.ChunkStatus.STORED, p.ChunkStatus.REFUSED_FULL, p.ChunkStatus.REFUSED_FULL]
        assert client.lookup(keys[127:], lease=False).num_hit_chunks == 0  # the only unpinned chunk went
        assert part.lease_id is not None
        sched.release(part.lease_id)
        result = client.store(info.worker_id, extra, [2, 3] * 3)
        assert result.statuses == [p.ChunkStatus.PRESENT, p.ChunkStatus.STORED, p.ChunkStatus.STORED]
        assert result.message == ""
        pool = client.status()["pool"]
        assert pool["used_bytes"] == pool["num_chunks"] * info.chunk_bytes == pool["capacity_bytes"]
    kv.close()


def test_too_large_chunk_layout_is_refused_at_registration(server_factory) -> None:
    server = server_factory(*SMALL_POOL, "--chunk-size", "1048576")
    # 3 layers x 65536 blocks per chunk x 512-byte pages = 96 MiB per chunk > the 64 MiB slab
    kv = CpuKVCache(num_layers=3, num_blocks=1, block_size=16, num_kv_heads=1, head_size=8)
    with connect(server.url, namespace(geometry=kv.geometry)) as client:
        with pytest.raises(ServerError) as err:
            kv.register(client)
        assert err.value.code == p.ErrorCode.LAYOUT_MISMATCH
        assert "--chunk-size" in err.value.message
        assert client.status()["workers"] == []
    kv.close()
    assert own_shm_names(os.getpid()) == set()


# ---------------------------------------------------------------- leases


def stored_chunks(server: RunningServer, kv: CpuKVCache, ns: p.Namespace, n: int) -> tuple[CacheClient, int,
                                                                                            list[bytes]]:
    client = connect(server.url, ns)
    info = kv.register(client)
    keys = hashes(n)
    blocks = list(range(n * info.chunk_bytes // (kv.layout.num_layers * kv.page_bytes)))
    assert client.store(info.worker_id, keys, blocks).num_stored == n
    return client, info.worker_id, keys


def small_kv() -> CpuKVCache:
    return CpuKVCache(num_layers=2, num_blocks=16, block_size=128, num_kv_heads=2, head_size=32)


def test_lease_expires(server_factory) -> None:
    server = server_factory("--l1-size-gb", "0.0625", "--lease-timeout", "0.5")
    kv = small_kv()
    fill_random(kv, 4)
    ns = namespace(geometry=kv.geometry)
    client, worker_id, keys = stored_chunks(server, kv, ns, 2)
    with client, scheduler(server.url, ns) as sched:
        hit = sched.lookup(keys)
        assert hit.num_hit_chunks == 2 and hit.lease_id is not None
        assert client.status()["leases"] == 1
        started = time.monotonic()
        assert wait_until(lambda: client.status()["leases"] == 0, 5.0)
        assert time.monotonic() - started >= 0.3  # not before its time
        counters = client.status()["counters"]
        assert counters["expired_leases"] == 1
        with pytest.raises(ServerError) as err:
            client.retrieve(worker_id, keys, [8, 9, 10, 11], lease_id=hit.lease_id)
        assert err.value.code == p.ErrorCode.UNKNOWN_LEASE
        with pytest.raises(ServerError) as err:
            sched.release(hit.lease_id)
        assert err.value.code == p.ErrorCode.UNKNOWN_LEASE
        # the expired lease unpinned its chunks: they are still there and retrievable without a lease
        assert client.retrieve(worker_id, keys, [8, 9, 10, 11]) == 2
        assert client.status()["counters"]["expired_leases"] == 1
    kv.close()


def test_retrieve_consumes_the_lease(server) -> None:
    kv = small_kv()
    fill_random(kv, 5)
    ns = namespace(geometry=kv.geometry)
    client, worker_id, keys = stored_chunks(server, kv, ns, 3)
    with client, scheduler(server.url, ns) as sched:
        hit = sched.lookup(keys + hashes(1, "missing"))
        assert hit.num_hit_chunks == 3 and hit.lease_id is not None
        assert client.status()["leases"] == 1
        before = snapshot(kv)
        assert client.retrieve(worker_id, keys, list(range(8, 14)), lease_id=hit.lease_id) == 3
        assert client.status()["leases"] == 0
        after = snapshot(kv)
        for layer in range(2):
            assert np.array_equal(after[layer][8:14], before[layer][0:6])
        with pytest.raises(ServerError) as err:
            client.retrieve(worker_id, keys, list(range(8, 14)), lease_id=hit.lease_id)
        assert err.value.code == p.ErrorCode.UNKNOWN_LEASE
        assert "look up again" in err.value.message
        # a lease a retrieve took only part of is consumed too: the rest is unpinned
        hit = sched.lookup(keys)
        assert hit.lease_id is not None
        assert client.retrieve(worker_id, keys[:1], [14, 15], lease_id=hit.lease_id) == 1
        assert client.status()["leases"] == 0
        with pytest.raises(ServerError) as err:
            sched.release(hit.lease_id)
        assert err.value.code == p.ErrorCode.UNKNOWN_LEASE
        assert client.status()["counters"]["expired_leases"] == 0
    kv.close()


def test_lease_released_when_scheduler_closes_its_socket(server_factory) -> None:
    server = server_factory("--l1-size-gb", "0.0625", "--lease-timeout", "300")
    kv = small_kv()
    ns = namespace(geometry=kv.geometry)
    client, _, keys = stored_chunks(server, kv, ns, 2)
    with client:
        sched = scheduler(server.url, ns)
        hit = sched.lookup(keys)
        assert hit.num_hit_chunks == 2 and hit.lease_id is not None
        assert client.status()["leases"] == 1
        started = time.monotonic()
        sched.close()
        assert wait_until(lambda: client.status()["leases"] == 0, 3.0)
        assert time.monotonic() - started < 3.0
        server.wait_for_log(rf"Session \d+ \(scheduler, pid {os.getpid()}\) disconnected: released 2 pinned chunks")
        status = client.status()
        assert status["counters"]["expired_leases"] == 0
        assert status["counters"]["disconnects"] >= 1
        assert all(s["role"] != "scheduler" for s in status["sessions"])
        assert status["pool"]["num_chunks"] == 2  # the chunks stay cached, only the pins go
    kv.close()


SCHEDULER_CHILD = """
import sys, time
from lmcd import protocol as p
from lmcd.connector.client import CacheClient
url, model, geometry, keys = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
ns = p.Namespace(model, "bf16", geometry, 1, None)
client = CacheClient(url, ns, role=p.Role.SCHEDULER, timeout_s=10)
hit = client.lookup([bytes.fromhex(k) for k in keys.split(",")])
print("LEASE", hit.num_hit_chunks, hit.lease_id, flush=True)
time.sleep(120)
"""


def start_child(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def stop_child(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def read_line(proc: subprocess.Popen[str], prefix: str, timeout: float = 30.0) -> str:
    assert proc.stdout is not None
    result: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(prefix):
                result.append(line)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert result, f"child did not print {prefix!r} within {timeout} s (exit code {proc.poll()})"
    return result[0]


def test_lease_released_when_scheduler_process_is_killed(server_factory) -> None:
    server = server_factory("--l1-size-gb", "0.0625", "--lease-timeout", "300")
    kv = small_kv()
    ns = namespace(geometry=kv.geometry)
    client, _, keys = stored_chunks(server, kv, ns, 3)
    child = start_child(SCHEDULER_CHILD, server.url, ns.model, ns.geometry, ",".join(k.hex() for k in keys))
    try:
        with client:
            line = read_line(child, "LEASE")
            assert line.split()[1] == "3"
            assert client.status()["leases"] == 1
            started = time.monotonic()
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            assert wait_until(lambda: client.status()["leases"] == 0, 3.0)
            assert time.monotonic() - started < 3.0
            server.wait_for_log(rf"Session \d+ \(scheduler, pid {child.pid}\) disconnected: released 3 pinned chunks")
            assert client.status()["counters"]["expired_leases"] == 0
            assert client.lookup(keys, lease=False).num_hit_chunks == 3
    finally:
        stop_child(child)
        kv.close()


# ---------------------------------------------------------------- workers


WORKER_CHILD = """
import sys, time
from lmcd import protocol as p
from lmcd.connector.client import CacheClient
from lmcd.connector.shm import CpuKVCache
url, model = sys.argv[1], sys.argv[2]
kv = CpuKVCache(num_layers=2, num_blocks=16, block_size=128, num_kv_heads=2, head_size=32, one_segment=False)
client = CacheClient(url, p.Namespace(model, "bf16", kv.geometry, 1, 0), role=p.Role.WORKER, timeout_s=10)
info = kv.register(client)
kv.pages(0)[0] = 7
kv.pages(1)[1] = 9
h = bytes(range(32))
st = client.store(info.worker_id, [h], [0, 1])
print("REGISTERED", info.worker_id, int(st.statuses[0]), flush=True)
time.sleep(120)
"""


def test_worker_killed_is_removed_and_leaves_no_shm(server_factory) -> None:
    server = server_factory("--l1-size-gb", "0.0625")
    model = namespace().model
    child = start_child(WORKER_CHILD, server.url, model)
    try:
        line = read_line(child, "REGISTERED")
        assert line.split()[2] == str(int(p.ChunkStatus.STORED))
        with connect(server.url, namespace(model, "x"), role=p.Role.CLIENT) as client:
            workers = client.status()["workers"]
            assert [w["pid"] for w in workers] == [child.pid]
            mapped = server_shm_mappings(server)
            assert len(mapped) == 2  # the server maps the worker's two segments
            names = own_shm_names(child.pid)
            assert len(names) == 2  # named for the worker's lifetime
            assert all(any(name in line for line in mapped) for name in names)
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            assert wait_until(lambda: client.status()["workers"] == [], 3.0)
            server.wait_for_log(
                rf"Session \d+ \(worker, pid {child.pid}\) disconnected: released 0 pinned chunks, 1 workers")
            assert wait_until(lambda: server_shm_mappings(server) == [], 3.0), server_shm_mappings(server)
            # the owner is dead, so the server unlinks its names (it rechecks the lock for a few seconds)
            assert wait_until(lambda: own_shm_names(child.pid) == set(), 8.0), own_shm_names(child.pid)
            # the chunk it stored outlives it: a new worker of the same namespace reads it back
            kv = small_kv()
            try:
                with connect(server.url, namespace(model, kv.geometry)) as worker:
                    info = kv.register(worker)
                    assert worker.retrieve(info.worker_id, [bytes(range(32))], [4, 5]) == 1
                    assert (kv.pages(0)[4] == 7).all() and (kv.pages(1)[5] == 9).all()
                    assert not kv.pages(0)[5].any() and not kv.pages(1)[4].any()
            finally:
                kv.close()
    finally:
        stop_child(child)


def test_unregister_worker(server) -> None:
    kv = small_kv()
    ns = namespace(geometry=kv.geometry)
    with connect(server.url, ns) as client:
        info = kv.register(client)
        status = client.status()
        assert [w["worker_id"] for w in status["workers"]] == [info.worker_id]
        assert status["workers"][0]["pid"] == os.getpid()
        assert server_shm_mappings(server)
        client.unregister_worker(info.worker_id)
        assert client.status()["workers"] == []
        assert server_shm_mappings(server) == []
        with pytest.raises(ServerError) as err:
            client.store(info.worker_id, hashes(1), [0, 1])
        assert err.value.code == p.ErrorCode.UNKNOWN_WORKER
        with pytest.raises(ServerError) as err:
            client.unregister_worker(info.worker_id)
        assert err.value.code == p.ErrorCode.UNKNOWN_WORKER
        # another session cannot unregister someone else's worker
        info = kv.register(client)
        with connect(server.url, ns) as other:
            with pytest.raises(ServerError) as err:
                other.unregister_worker(info.worker_id)
            assert err.value.code == p.ErrorCode.UNKNOWN_WORKER
        assert len(client.status()["workers"]) == 1
    kv.close()
    assert own_shm_names(os.getpid()) == set()


# ---------------------------------------------------------------- exact copies


@pytest.mark.parametrize("one_segment", [True, False], ids=["one-segment", "per-layer"])
@pytest.mark.parametrize("block_size", [16, 64, 128])
def test_exact_copies_random_blocks(server_factory, one_segment: bool, block_size: int) -> None:
    server = server_factory("--l1-size-gb", "0.0625", "--chunk-size", "256")
    num_layers, num_blocks, num_chunks = 3, 128, 3
    bpc = 256 // block_size
    kv = CpuKVCache(num_layers=num_layers, num_blocks=num_blocks, block_size=block_size, num_kv_heads=2,
                    head_size=16, one_segment=one_segment)
    fill_random(kv, block_size + one_segment)
    rng = np.random.default_rng(block_size * 2 + one_segment)
    perm = rng.permutation(num_blocks)
    src = perm[: num_chunks * bpc].tolist()
    dst = perm[num_chunks * bpc : 2 * num_chunks * bpc].tolist()
    ns = namespace(geometry=kv.geometry)
    with connect(server.url, ns) as client:
        info = kv.register(client)
        assert info.chunk_bytes == num_layers * bpc * kv.page_bytes
        keys = hashes(num_chunks)
        original = snapshot(kv)
        assert client.store(info.worker_id, keys, src).num_stored == num_chunks
        assert snapshot(kv)[0].tobytes() == original[0].tobytes()  # a store never writes the engine
        # overwrite the whole cache: what a retrieve writes can only come from the pool
        fill_random(kv, 1000 + block_size)
        scrambled = snapshot(kv)
        assert client.retrieve(info.worker_id, keys, dst) == num_chunks
        after = snapshot(kv)
        untouched = np.setdiff1d(np.arange(num_blocks), dst)
        for layer in range(num_layers):
            assert np.array_equal(after[layer][dst], original[layer][src]), f"layer {layer}"
            assert np.array_equal(after[layer][untouched], scrambled[layer][untouched]), f"layer {layer}"
        # a partial retrieve (the second key unknown) copies only the leading chunk
        fill_random(kv, 2000 + block_size)
        scrambled = snapshot(kv)
        got = client.retrieve(info.worker_id, [keys[2], hashes(1, "nope")[0], keys[0]], dst)
        assert got == 1
        after = snapshot(kv)
        first, rest = dst[:bpc], dst[bpc:]
        for layer in range(num_layers):
            assert np.array_equal(after[layer][first], original[layer][src[2 * bpc :]])
            assert np.array_equal(after[layer][rest], scrambled[layer][rest])
        counters = client.status()["counters"]
        assert counters["retrieved_chunks"] == num_chunks + 1
        assert counters["retrieved_bytes"] == (num_chunks + 1) * info.chunk_bytes
    kv.close()


# ---------------------------------------------------------------- tensor parallel


def test_tensor_parallel_lookup_all_ranks(server) -> None:
    model = namespace().model
    kvs = [small_kv() for _ in range(2)]
    for rank, kv in enumerate(kvs):
        fill_random(kv, 50 + rank)
    geometry = kvs[0].geometry
    ns = [namespace(model, geometry, rank=rank, world_size=2) for rank in range(2)]
    keys = hashes(3)
    originals = [snapshot(kv) for kv in kvs]
    with connect(server.url, ns[0]) as w0, connect(server.url, ns[1]) as w1, \
            scheduler(server.url, ns[0]) as sched:
        i0, i1 = kvs[0].register(w0), kvs[1].register(w1)
        assert w0.store(i0.worker_id, keys, [0, 1, 2, 3, 4, 5]).num_stored == 3
        assert w1.store(i1.worker_id, keys[:2], [0, 1, 2, 3]).num_stored == 2
        assert w0.lookup(keys, lease=False).num_hit_chunks == 3  # a worker looks up its own rank
        assert w1.lookup(keys, lease=False).num_hit_chunks == 2
        hit = sched.lookup(keys)
        assert hit.num_hit_chunks == 2 and hit.lease_id is not None  # every rank must have a chunk
        assert sched.status()["leases"] == 1
        assert w0.retrieve(i0.worker_id, keys[:2], [8, 9, 10, 11], lease_id=hit.lease_id) == 2
        assert sched.status()["leases"] == 1  # rank 1 has not taken its part yet
        assert w1.retrieve(i1.worker_id, keys[:2], [8, 9, 10, 11], lease_id=hit.lease_id) == 2
        assert sched.status()["leases"] == 0
        for rank, kv in enumerate(kvs):
            for layer in range(2):
                pages = kv.pages(layer)
                assert np.array_equal(pages[8:12], originals[rank][layer][0:4])
        assert not np.array_equal(kvs[0].pages(0)[8:12], kvs[1].pages(0)[8:12])  # ranks keep their own data
        # a world-size-1 scheduler of the same model is another namespace
        with scheduler(server.url, namespace(model, geometry, rank=0, world_size=1)) as other:
            assert other.lookup(keys, lease=False).num_hit_chunks == 0
    for kv in kvs:
        kv.close()


def test_namespaces_isolate(server) -> None:
    kv = small_kv()
    fill_random(kv, 60)
    ns = namespace(geometry=kv.geometry)
    keys = hashes(2)
    with connect(server.url, ns) as client:
        info = kv.register(client)
        assert client.store(info.worker_id, keys, [0, 1, 2, 3]).num_stored == 2
        assert client.lookup(keys, lease=False).num_hit_chunks == 2
        others = [
            p.Namespace(ns.model + "-other", ns.kv_dtype, ns.geometry, 1, 0),
            p.Namespace(ns.model, ns.kv_dtype, ns.geometry + ".other", 1, 0),
            p.Namespace(ns.model, "fp8", ns.geometry, 1, 0),
        ]
        for other_ns in others:
            with connect(server.url, other_ns) as other:
                assert other.lookup(keys).num_hit_chunks == 0
                assert other.lookup(keys).lease_id is None
                other_kv = small_kv()
                try:
                    other_info = other_kv.register(other)
                    assert other.retrieve(other_info.worker_id, keys, [4, 5, 6, 7]) == 0
                    assert not any(other_kv.pages(layer).any() for layer in range(2))
                    # the same keys in another namespace are a separate copy
                    assert other.store(other_info.worker_id, keys, [0, 1, 2, 3]).num_stored == 2
                finally:
                    other_kv.close()
        assert client.status()["pool"]["num_chunks"] == 2 * (1 + len(others))
        assert client.lookup(keys, lease=False).num_hit_chunks == 2
    kv.close()


# ---------------------------------------------------------------- concurrency


def test_concurrent_clients_exact_bytes(server) -> None:
    model = namespace().model
    errors: list[BaseException] = []
    rounds, num_threads = 8, 4

    def work(t: int) -> None:
        kv = small_kv()
        try:
            with connect(server.url, namespace(model, kv.geometry)) as client:
                info = kv.register(client)
                rng = np.random.default_rng(100 + t)
                for r in range(rounds):
                    fill_random(kv, 1000 * t + r)
                    before = snapshot(kv)
                    perm = rng.permutation(16)
                    src, dst = perm[:6].tolist(), perm[6:12].tolist()
                    keys = hashes(3, f"{t}.{r}")
                    assert client.store(info.worker_id, keys, src).num_stored == 3
                    hit = client.lookup(keys)
                    assert hit.num_hit_chunks == 3
                    assert client.retrieve(info.worker_id, keys, dst, lease_id=hit.lease_id) == 3
                    after = snapshot(kv)
                    for layer in range(2):
                        assert np.array_equal(after[layer][dst], before[layer][src])
                        rest = perm[12:]
                        assert np.array_equal(after[layer][rest], before[layer][rest])
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            kv.close()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors, errors
    with connect(server.url, namespace(model, "status"), role=p.Role.CLIENT) as client:
        status = client.status()
        assert status["counters"]["stored_chunks"] == num_threads * rounds * 3
        assert status["counters"]["retrieved_chunks"] == num_threads * rounds * 3
        assert status["leases"] == 0
        assert status["pool"]["num_chunks"] == num_threads * rounds * 3


# ---------------------------------------------------------------- shutdown


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_clean_shutdown(server_factory, sig: int) -> None:
    server = server_factory("--l1-size-gb", "0.0625", "--lease-timeout", "300")
    kv = small_kv()
    fill_random(kv, 70)
    ns = namespace(geometry=kv.geometry)
    port = int(server.url.rsplit(":", 1)[1])
    client, worker_id, keys = stored_chunks(server, kv, ns, 2)
    with client:
        assert client.lookup(keys).lease_id is not None  # an open lease and a registered worker
        assert server_shm_mappings(server)
        assert server.stop(sig) == 0
    log = server.log()
    assert f"Received {signal.Signals(sig).name}" in log
    assert log.rstrip().splitlines()[-1].endswith("LMCache cache server stopped")
    assert "Traceback" not in log
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(f"tcp://127.0.0.1:{port}")  # the port is free again at once
    finally:
        sock.close(0)
        ctx.term()
    kv.close()
    assert own_shm_names(os.getpid()) == set()
    assert own_shm_names(server.proc.pid) == set()


def test_retrieve_skips_the_leading_blocks_the_engine_has(server):
    """skip_blocks leaves the first blocks of the first chunk untouched in every layer."""
    kv = CpuKVCache(num_layers=2, num_blocks=8, block_size=64, num_kv_heads=1, head_size=32)
    fill_random(kv, 3)
    with connect(server.url, namespace(geometry=kv.geometry)) as client:
        info = kv.register(client)
        keys = [bytes([i]) * 32 for i in range(2)]  # 2 chunks of 4 blocks
        assert client.store(info.worker_id, keys, [0, 1, 2, 3, 4, 5, 6, 7]).num_stored == 2
        before = [kv.pages(layer).copy() for layer in range(2)]
        for layer in range(2):
            kv.pages(layer)[:] = 0
        with pytest.raises(ServerError) as err:
            client.retrieve(info.worker_id, keys, list(range(8)), skip_blocks=4)
        assert err.value.code == p.ErrorCode.BAD_REQUEST
        assert client.retrieve(info.worker_id, keys, list(range(8)), skip_blocks=3) == 2
        for layer in range(2):
            pages = kv.pages(layer)
            assert not pages[:3].any()  # skipped: still zero
            assert np.array_equal(pages[3:], before[layer][3:])
    kv.close()
