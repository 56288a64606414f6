"""Workers that copy themselves (lmcache_driven): granted slots, commits of them, lookup slot offsets
and per-rank releases, against a real server with a shared pool and real ZMQ clients."""

import os
import time

import numpy as np
import pytest

from lmcd import protocol as p
from lmcd.connector.client import CacheClient, LmcdError, ServerError
from lmcd.connector.keys import chunk_hashes
from lmcd.connector.worker import SharedPool
from tests.conftest import connect, namespace

LAYOUT = p.KVLayout(1, 4, 128, 1024, 1024, [0], [0])  # chunk of 256 tokens = 2 blocks = 2048 bytes
CHUNK = 2048


def self_copying_worker(url: str, ns: p.Namespace) -> tuple[CacheClient, int]:
    client = connect(url, ns)
    return client, client.register_worker(LAYOUT, [], [4096], "cuda").worker_id  # cuda, no IPC: copies itself


def used_bytes(client: CacheClient) -> int:
    return client.status()["pool"]["used_bytes"]  # type: ignore[index]


def commit(client: CacheClient, worker_id: int, hashes: list[bytes], slots: list[int], want: int = 0,
           ok: bool = True) -> p.Committed:
    reply = client.collect(client.post_commit_granted(worker_id, hashes, slots, want, ok), 10.0)
    assert isinstance(reply, p.Committed)
    return reply


def test_granted_slots_hold_committed_chunks_byte_for_byte(server_factory):
    srv = server_factory("--l1-size-gb", "0.05", "--share-pool", "true")
    ns = namespace()
    client, wid = self_copying_worker(srv.url, ns)
    assert client.hello is not None and client.hello.lease_ttl_s == 60.0
    pool = SharedPool(client.hello.pool_segment)
    try:
        slots = client.grant(wid, 3)
        assert len(set(slots)) == 3 and all(0 <= s <= pool.array.nbytes - CHUNK for s in slots)
        assert used_bytes(client) == 3 * CHUNK  # granted slots are taken from the pool
        keys = chunk_hashes(range(2 * 256), 256)
        data = [np.random.default_rng(i).integers(0, 256, CHUNK, dtype=np.uint8) for i in range(2)]
        for slot, chunk in zip(slots[:2], data, strict=True):
            pool.array[slot : slot + CHUNK] = chunk
        assert client.lookup(keys, lease=False).num_hit_chunks == 0  # not named yet: invisible
        reply = commit(client, wid, keys, slots[:2], want=2)
        assert reply.num_chunks == 2 and reply.statuses == [p.ChunkStatus.STORED] * 2
        assert len(reply.granted) == 2 and not set(reply.granted) & set(slots)
        assert used_bytes(client) == 5 * CHUNK  # 2 chunks + 1 old grant + 2 new grants
        offsets, pin_id = client.pin(wid, keys)
        assert offsets == slots[:2] and pin_id is not None
        for slot, chunk in zip(offsets, data, strict=True):
            assert np.array_equal(pool.array[slot : slot + CHUNK], chunk)
        client.release(pin_id)
        # the same chunk again into another granted slot: PRESENT, and that slot goes back to the pool
        reply = commit(client, wid, keys[:1], [slots[2]])
        assert reply.statuses == [p.ChunkStatus.PRESENT] and reply.num_chunks == 0
        assert used_bytes(client) == 4 * CHUNK
    finally:
        pool.close()
        client.close()


def test_bad_commits_are_refused_and_lose_nothing(server_factory):
    srv = server_factory("--l1-size-gb", "0.05", "--share-pool", "true")
    client, wid = self_copying_worker(srv.url, namespace())
    try:
        slots = client.grant(wid, 2)
        keys = chunk_hashes(range(2 * 256), 256)
        not_granted = max(slots) + 10 * CHUNK
        for bad, match in ((([keys[0]], [not_granted]), "not a slot granted"),
                           ((keys, [slots[0]]), "need as many slot offsets"),
                           ((keys, [slots[0], slots[0]]), "named twice")):
            with pytest.raises(ServerError, match=match) as err:
                commit(client, wid, *bad)
            assert err.value.code == p.ErrorCode.BAD_REQUEST
        reply = commit(client, wid, keys, slots)  # the grants are intact: the real commit works
        assert reply.statuses == [p.ChunkStatus.STORED] * 2
        with pytest.raises(ServerError, match="not a slot granted"):  # committed: no longer granted
            commit(client, wid, keys[:1], slots[:1])
        # an abandoned copy (ok=False) gives its slots back
        more = client.grant(wid, 1)
        before = used_bytes(client)
        assert commit(client, wid, chunk_hashes([9] * 256, 256), more, ok=False).statuses == [p.ChunkStatus.FAILED]
        assert used_bytes(client) == before - CHUNK
    finally:
        client.close()


def test_grants_are_bounded_and_freed_when_the_worker_goes(server_factory):
    srv = server_factory("--l1-size-gb", "0.05", "--share-pool", "true")
    watcher = connect(srv.url, role=p.Role.CLIENT)
    client, wid = self_copying_worker(srv.url, namespace())
    try:
        pool_bytes = watcher.status()["pool"]["capacity_bytes"]  # type: ignore[index]
        slots = client.grant(wid, 10**6)
        assert 0 < len(slots) <= pool_bytes // CHUNK  # never more than the pool
        assert used_bytes(watcher) == len(slots) * CHUNK
        client.close()  # disconnect: the grants were never committed
        for _ in range(200):
            if used_bytes(watcher) == 0:
                break
            time.sleep(0.05)
        assert used_bytes(watcher) == 0
    finally:
        watcher.close()
        client.close()


def test_lookup_reports_every_ranks_slots_and_each_rank_releases_its_part(server_factory):
    srv = server_factory("--l1-size-gb", "0.05", "--share-pool", "true")
    model = f"m-{os.urandom(4).hex()}"
    keys = chunk_hashes(range(3 * 256), 256)
    workers = [self_copying_worker(srv.url, namespace(model, rank=r, world_size=2)) for r in range(2)]
    scheduler = connect(srv.url, namespace(model, rank=None, world_size=2), role=p.Role.SCHEDULER)
    try:
        committed: list[list[int]] = []
        for client, wid in workers:
            slots = client.grant(wid, 3)
            commit(client, wid, keys, slots)
            committed.append(slots)
        hits, lease_id, offsets, valid_until = scheduler.lookup_for_load(keys)
        assert hits == 3 and lease_id is not None and offsets == committed
        assert time.monotonic() + 25 < valid_until <= time.monotonic() + 30  # half the 60 s lease
        assert scheduler.status()["leases"] == 1
        for rank, (client, _) in enumerate(workers):
            reply = client.collect(client.post_release_rank(lease_id, rank), 10.0)
            assert isinstance(reply, p.Released) and reply.num_unpinned == 3
            assert scheduler.status()["leases"] == (1 if rank == 0 else 0)  # gone once every rank copied
        with pytest.raises(ServerError, match="unknown or already over"):
            workers[0][0].collect(workers[0][0].post_release_rank(lease_id, 0), 10.0)
        srv.wait_for_log(r"Retrieved 768 tokens in ")
        # without slots asked, a lookup says nothing about them
        assert scheduler.lookup(keys, lease=False).slot_offsets is None
    finally:
        scheduler.close()
        for client, _ in workers:
            client.close()


def test_without_a_shared_pool_there_are_no_slots_or_grants(server_factory):
    srv = server_factory("--l1-size-gb", "0.05")
    worker = connect(srv.url)
    try:
        with pytest.raises(LmcdError, match="--share-pool"):  # a self-copying worker needs the shared pool
            worker.register_worker(LAYOUT, [], [4096], "cuda")
        scheduler = connect(srv.url, namespace(rank=None), role=p.Role.SCHEDULER)
        try:
            assert scheduler.lookup_for_load(chunk_hashes(range(256), 256)) == (0, None, None, 0.0)
        finally:
            scheduler.close()
    finally:
        worker.close()


def test_reserve_then_commit_still_serves_older_workers(server_factory):
    """The first lmcache_driven protocol (Reserve, copy, Commit by hash), which our connector no longer
    uses, keeps working for peers that speak it."""
    srv = server_factory("--l1-size-gb", "0.05", "--share-pool", "true")
    client, wid = self_copying_worker(srv.url, namespace())
    assert client.hello is not None
    pool = SharedPool(client.hello.pool_segment)
    try:
        keys = chunk_hashes(range(2 * 256), 256)
        statuses, offsets = client.reserve(wid, keys)
        assert statuses == [p.ChunkStatus.STORED] * 2 and len(set(offsets)) == 2
        data = np.random.default_rng(7).integers(0, 256, 2 * CHUNK, dtype=np.uint8)
        for i, slot in enumerate(offsets):
            pool.array[slot : slot + CHUNK] = data[i * CHUNK : (i + 1) * CHUNK]
        assert client.lookup(keys, lease=False).num_hit_chunks == 0  # reserved, not yet written
        assert client.commit(wid, keys) == 2
        assert client.reserve(wid, keys)[0] == [p.ChunkStatus.PRESENT] * 2
        pinned, pin_id = client.pin(wid, keys)
        assert pinned == offsets and pin_id is not None
        assert np.array_equal(np.concatenate([pool.array[s : s + CHUNK] for s in pinned]), data)
        client.release(pin_id)
        srv.wait_for_log(r"Stored 512 tokens in [0-9.]+ seconds")
    finally:
        pool.close()
        client.close()
