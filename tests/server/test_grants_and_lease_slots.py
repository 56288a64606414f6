"""Workers that copy themselves (``Copier.WORKER``, lmcache_driven): granted slots, commits of them,
lookup slots and per-rank ``Loaded``, against a real server with a shared pool and real ZMQ clients.
The test writes and reads the pool's bytes itself through the pool's SHM segment."""

import os
import time

import numpy as np
import pytest

from lmcd import protocol as p
from lmcd.connector.client import CacheClient, LookupResult, PinResult, ServerError
from lmcd.connector.keys import chunk_keys
from tests.conftest import PoolView, connect, namespace

LAYOUT = p.KVLayout(1, 4, 128, 1024, 1024, [0], [0])  # chunk of 256 tokens = 2 blocks = 2048 bytes
CHUNK = 2048
SHARED = ("--l1-size-gb", "0.05", "--share-pool", "true")


def self_copying_worker(url: str, ns: p.Namespace) -> tuple[CacheClient, int]:
    client = connect(url, ns)
    info = client.register_worker(LAYOUT, p.Device.CPU, p.Copier.WORKER, [4096])
    assert (info.chunk_bytes, info.blocks_per_chunk) == (CHUNK, 2)
    return client, info.worker_id


def used_bytes(client: CacheClient) -> int:
    return client.status()["pool"]["used_bytes"]  # type: ignore[index]


def grant(client: CacheClient, worker_id: int, num_slots: int) -> list[int]:
    reply = client.collect(client.post_grant(worker_id, num_slots), 10.0)
    assert isinstance(reply, p.Granted), reply
    return reply.slots


def commit(client: CacheClient, worker_id: int, keys: list[bytes], slots: list[int], want: int = 0,
           seconds: float = 0.0) -> p.Committed:
    reply = client.collect(client.post_commit(worker_id, keys, slots, want, seconds), 10.0)
    assert isinstance(reply, p.Committed), reply
    return reply


def loaded(client: CacheClient, worker_id: int, lease_id: int, keys: list[bytes], skip_blocks: int = 0,
           seconds: float = 0.0) -> p.Released:
    reply = client.collect(client.post_loaded(worker_id, lease_id, keys, skip_blocks, seconds), 10.0)
    assert isinstance(reply, p.Released), reply
    return reply


def test_granted_slots_hold_committed_chunks_byte_for_byte(server_factory):
    srv = server_factory(*SHARED)
    client, wid = self_copying_worker(srv.url, namespace())
    assert client.hello is not None and client.hello.lease_ttl_s == 60.0
    assert "shared-pool" in client.hello.capabilities
    pool = PoolView(client)
    try:
        slots = grant(client, wid, 3)
        assert len(set(slots)) == 3 and all(0 <= s <= pool.array.nbytes - CHUNK for s in slots)
        assert used_bytes(client) == 3 * CHUNK  # granted slots are taken from the pool
        keys = chunk_keys(range(2 * 256), 256)
        data = [np.random.default_rng(i).integers(0, 256, CHUNK, dtype=np.uint8) for i in range(2)]
        for slot, chunk in zip(slots[:2], data, strict=True):
            pool.write(slot, chunk)
        assert client.lookup(keys, lease=False).num_hit_chunks == 0  # not named yet: invisible
        reply = commit(client, wid, keys, slots[:2], want=2)
        assert reply.statuses == [p.ChunkStatus.STORED] * 2
        assert len(reply.granted) == 2 and not set(reply.granted) & set(slots)
        assert used_bytes(client) == 5 * CHUNK  # 2 chunks + 1 old grant + 2 new grants
        pinned = client.pin(wid, keys)
        assert isinstance(pinned, PinResult)
        assert pinned.slots == slots[:2] and pinned.lease_id is not None
        for slot, chunk in zip(pinned.slots, data, strict=True):
            assert np.array_equal(pool.read(slot, CHUNK), chunk)
        assert loaded(client, wid, pinned.lease_id, keys).num_unpinned == 2
        # the same chunk again into another granted slot: PRESENT, and that slot goes back to the pool
        reply = commit(client, wid, keys[:1], [slots[2]])
        assert reply.statuses == [p.ChunkStatus.PRESENT] and reply.granted == []
        assert used_bytes(client) == 4 * CHUNK
        assert np.array_equal(pool.read(slots[0], CHUNK), data[0])  # the cached copy is untouched
    finally:
        pool.close()
        client.close()


def test_bad_commits_are_refused_and_lose_nothing(server_factory):
    srv = server_factory(*SHARED)
    client, wid = self_copying_worker(srv.url, namespace())
    try:
        slots = grant(client, wid, 2)
        assert len(slots) == 2
        keys = chunk_keys(range(2 * 256), 256)
        not_granted = max(slots) + 10 * CHUNK
        used = used_bytes(client)
        assert used == 2 * CHUNK
        for bad, match in ((([keys[0]], [not_granted]), "not a slot granted"),
                           (([keys[0], keys[1]], [slots[0], not_granted]), "not a slot granted"),
                           ((keys, [slots[0]]), "need as many slots"),
                           ((keys[:1], slots), "need as many slots"),
                           ((keys, [slots[0], slots[0]]), "named twice")):
            with pytest.raises(ServerError, match=match) as err:
                commit(client, wid, *bad)
            assert err.value.code == p.ErrorCode.BAD_REQUEST
            assert used_bytes(client) == used  # nothing freed, nothing indexed
            assert client.lookup(keys, lease=False).num_hit_chunks == 0
        reply = commit(client, wid, keys, slots)  # the grants are intact: the real commit works
        assert reply.statuses == [p.ChunkStatus.STORED] * 2
        assert client.lookup(keys, lease=False).num_hit_chunks == 2
        assert used_bytes(client) == used
        with pytest.raises(ServerError, match="not a slot granted"):  # committed: no longer granted
            commit(client, wid, chunk_keys([9] * 256, 256), slots[:1])
        assert used_bytes(client) == used
    finally:
        client.close()


def test_grants_are_bounded_and_freed_when_the_worker_goes(server_factory):
    srv = server_factory(*SHARED)
    watcher = connect(srv.url, role=p.Role.CLIENT)
    client, wid = self_copying_worker(srv.url, namespace())
    try:
        pool_bytes = watcher.status()["pool"]["capacity_bytes"]  # type: ignore[index]
        slots = grant(client, wid, 10**6)
        assert 0 < len(slots) <= pool_bytes // CHUNK  # never more than the pool
        assert len(set(slots)) == len(slots)
        assert used_bytes(watcher) == len(slots) * CHUNK
        client.unregister_worker(wid)  # unregistered: the grants were never committed
        assert used_bytes(watcher) == 0
        wid = client.register_worker(LAYOUT, p.Device.CPU, p.Copier.WORKER, [4096]).worker_id
        assert len(grant(client, wid, 5)) == 5
        assert used_bytes(watcher) == 5 * CHUNK
        client.close()  # disconnect: the same
        deadline = time.monotonic() + 10
        while used_bytes(watcher) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert used_bytes(watcher) == 0
    finally:
        watcher.close()
        client.close()


def test_lookup_reports_every_ranks_slots_and_each_rank_loads_its_part(server_factory):
    srv = server_factory(*SHARED)
    model = f"m-{os.urandom(4).hex()}"
    keys = chunk_keys(range(3 * 256), 256)
    workers = [self_copying_worker(srv.url, namespace(model, rank=r, world_size=2)) for r in range(2)]
    scheduler = connect(srv.url, namespace(model, rank=None, world_size=2), role=p.Role.SCHEDULER)
    try:
        committed: list[list[int]] = []
        for client, wid in workers:
            slots = grant(client, wid, 3)
            assert commit(client, wid, keys, slots).statuses == [p.ChunkStatus.STORED] * 3
            committed.append(slots)
        asked = time.monotonic()
        hit = scheduler.lookup_for_load(keys)
        assert isinstance(hit, LookupResult)
        assert hit.num_hit_chunks == 3 and hit.lease_id is not None and hit.slots == committed
        assert asked + 29 <= hit.slots_valid_until <= time.monotonic() + 30  # half the 60 s lease
        assert scheduler.status()["leases"] == 1
        for rank, (client, wid) in enumerate(workers):
            assert loaded(client, wid, hit.lease_id, keys).num_unpinned == 3
            assert scheduler.status()["leases"] == (1 if rank == 0 else 0)  # gone once every rank copied
        with pytest.raises(ServerError, match="unknown or expired") as err:
            loaded(workers[0][0], workers[0][1], hit.lease_id, keys)
        assert err.value.code == p.ErrorCode.UNKNOWN_LEASE
        srv.wait_for_log(r"Retrieved 768 tokens in ")
        # without slots asked, a lookup says nothing about them
        plain = scheduler.lookup(keys, lease=False)
        assert plain.slots is None and plain.lease_id is None and plain.num_hit_chunks == 3
    finally:
        scheduler.close()
        for client, _ in workers:
            client.close()


def test_a_pin_takes_a_lookups_lease_for_its_rank(server_factory):
    srv = server_factory(*SHARED)
    model = f"m-{os.urandom(4).hex()}"
    keys = chunk_keys(range(3 * 256), 256)
    client, wid = self_copying_worker(srv.url, namespace(model))
    scheduler = connect(srv.url, namespace(model, rank=None), role=p.Role.SCHEDULER)
    try:
        slots = grant(client, wid, 3)
        commit(client, wid, keys, slots)
        hit = scheduler.lookup(keys)  # no slots asked: the worker pins itself
        assert hit.num_hit_chunks == 3 and hit.lease_id is not None and hit.slots is None
        pinned = client.pin(wid, keys[:2], hit.lease_id)
        assert pinned.slots == slots[:2] and pinned.lease_id not in (None, hit.lease_id)
        assert scheduler.status()["leases"] == 1  # the lookup's lease is taken; the Pin's is open
        with pytest.raises(ServerError) as err:
            client.pin(wid, keys, hit.lease_id)
        assert err.value.code == p.ErrorCode.UNKNOWN_LEASE
        assert pinned.lease_id is not None
        assert client.release(pinned.lease_id) == 2  # nobody loads: a Release ends it
        assert scheduler.status()["leases"] == 0
        missing = client.pin(wid, chunk_keys([5] * 256, 256))
        assert missing == PinResult([], None)
    finally:
        scheduler.close()
        client.close()


def test_without_a_shared_pool_there_are_no_slots_or_grants(server_factory):
    srv = server_factory("--l1-size-gb", "0.05")
    worker = connect(srv.url)
    try:
        assert worker.hello is not None and worker.hello.pool_segment == ""
        assert "shared-pool" not in worker.hello.capabilities
        with pytest.raises(ServerError, match="--share-pool") as err:  # a self-copying worker needs the shared pool
            worker.register_worker(LAYOUT, p.Device.CPU, p.Copier.WORKER, [4096])
        assert err.value.code == p.ErrorCode.BAD_REQUEST
        assert worker.status()["workers"] == []
        scheduler = connect(srv.url, namespace(rank=None), role=p.Role.SCHEDULER)
        try:
            assert scheduler.lookup_for_load(chunk_keys(range(256), 256)) == LookupResult(0, None, None, 0.0)
        finally:
            scheduler.close()
    finally:
        worker.close()
