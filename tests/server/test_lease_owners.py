"""Leases belong to the instance that took them (issue 13, item 6), against real servers: only the
instance's sessions take, release or consume a lease (anyone else is told it does not exist), ids
are random and never name a lease of a restarted server, and an instance's leases outlive its
scheduler's session while its workers are connected."""

from __future__ import annotations

import time

import pytest

from lmcd import protocol as p
from lmcd.connector.client import CacheClient, ServerError
from lmcd.connector.shm import CpuKVCache
from tests.conftest import RunningServer, connect, fill_random, namespace
from tests.server.test_cache_behaviour import hashes, small_kv, wait_until

pytestmark = pytest.mark.timeout(120)


def scheduler(url: str, ns: p.Namespace, instance_id: str = "") -> CacheClient:
    return connect(url, p.Namespace(ns.model, ns.kv_dtype, ns.geometry, ns.world_size, None), role=p.Role.SCHEDULER,
                   instance_id=instance_id)


def worker_with_chunks(server: RunningServer, kv: CpuKVCache, ns: p.Namespace, n: int,
                       instance_id: str = "") -> tuple[CacheClient, int, list[bytes]]:
    client = connect(server.url, ns, instance_id=instance_id)
    info = kv.register(client)
    keys = hashes(n)
    if n:
        assert client.store(info.worker_id, keys, list(range(2 * n))).num_stored == n
    return client, info.worker_id, keys


def unknown_lease(call) -> None:  # noqa: ANN001
    with pytest.raises(ServerError) as err:
        call()
    assert err.value.code == p.ErrorCode.UNKNOWN_LEASE


def test_a_lease_answers_only_the_sessions_of_its_instance(server_factory) -> None:
    server = server_factory("--l1-size-gb", "0.0625")
    kv, other_kv = small_kv(), small_kv()
    fill_random(kv, 1)
    ns = namespace(geometry=kv.geometry)
    worker, worker_id, keys = worker_with_chunks(server, kv, ns, 2, instance_id="engine-a")
    stranger, stranger_id, _ = worker_with_chunks(server, other_kv, ns, 0, instance_id="engine-b")
    anonymous = connect(server.url, ns)  # same namespace, no instance
    elsewhere = scheduler(server.url, namespace(geometry=kv.geometry), instance_id="engine-a")  # other namespace
    with worker, stranger, anonymous, elsewhere, scheduler(server.url, ns, "engine-a") as sched:
        hit = sched.lookup(keys)
        assert hit.num_hit_chunks == 2 and hit.lease_id is not None
        unknown_lease(lambda: stranger.retrieve(stranger_id, keys, [4, 5, 6, 7], lease_id=hit.lease_id))
        for other in (stranger, anonymous, elsewhere):
            unknown_lease(lambda other=other: other.release(hit.lease_id))
        assert worker.status()["leases"] == 1  # nobody else ended it
        assert worker.retrieve(worker_id, keys, [8, 9, 10, 11], lease_id=hit.lease_id) == 2  # its worker consumes
        assert worker.status()["leases"] == 0
        hit = sched.lookup(keys)
        assert hit.lease_id is not None and sched.release(hit.lease_id) == 2  # its scheduler releases
    kv.close()
    other_kv.close()


def test_lease_ids_are_random_and_a_restart_does_not_revive_them(server_factory) -> None:
    ids: list[int] = []
    for _ in range(2):  # the same server twice: before and after a restart
        server = server_factory("--l1-size-gb", "0.0625")
        kv = small_kv()
        ns = namespace(geometry=kv.geometry)
        worker, _, keys = worker_with_chunks(server, kv, ns, 1)
        with worker, scheduler(server.url, ns) as sched:
            lease_ids = [sched.lookup(keys).lease_id for _ in range(20)]
            assert all(lease_id is not None and lease_id > 2**32 for lease_id in lease_ids)  # 1 in 2**31 is below
            assert len(set(lease_ids)) == 20
            for stale in ids:  # the ids of the server before the restart name none of this one's leases
                unknown_lease(lambda stale=stale: sched.release(stale))
            assert sched.status()["leases"] == 20
            ids += [lease_id for lease_id in lease_ids if lease_id is not None]
        server.stop()
        kv.close()


def test_an_instances_leases_outlive_its_schedulers_session_while_its_workers_are_there(server_factory) -> None:
    server = server_factory("--l1-size-gb", "0.0625", "--lease-timeout", "300")
    kv = small_kv()
    fill_random(kv, 2)
    ns = namespace(geometry=kv.geometry)
    watcher = connect(server.url, role=p.Role.CLIENT)
    worker, worker_id, keys = worker_with_chunks(server, kv, ns, 2, instance_id="engine")
    with watcher:
        sched = scheduler(server.url, ns, "engine")
        first, second = sched.lookup(keys).lease_id, sched.lookup(keys).lease_id
        sched.close()  # the scheduler's session goes (a reconnect, say) while the worker is about to load
        assert wait_until(lambda: watcher.status()["counters"]["disconnects"] >= 1, 10.0)  # the server saw it go
        assert watcher.status()["leases"] == 2
        assert worker.retrieve(worker_id, keys, [8, 9, 10, 11], lease_id=first) == 2
        assert watcher.status()["leases"] == 1
        started = time.monotonic()
        worker.close()  # the instance's last session: its leases go at once
        assert wait_until(lambda: watcher.status()["leases"] == 0, 3.0)
        assert time.monotonic() - started < 3.0 and second is not None
        assert watcher.status()["counters"]["expired_leases"] == 0
    kv.close()
