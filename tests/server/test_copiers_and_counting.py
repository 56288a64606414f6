"""Who copies (``Copier``) and how copies are counted, against real servers, real ZMQ and real SHM.

A worker names its copier at registration; the server refuses the other copier's operations with
BAD_REQUEST naming it. Counting is one way in every mode: a store counts (``stores``,
``stored_chunks``, ``stored_bytes``) when its bytes are in the pool, a retrieve (``retrieves``,
``retrieved_chunks``, ``retrieved_bytes``) when its bytes are in the worker's blocks, and each
store or retrieve logs one ``Stored/Retrieved N tokens in S seconds (G GB/s, M MiB)`` line whose
seconds are the copy's own (the copy threads' clock, or the seconds a worker that copies itself
sent). Worker copies here are made by the test itself, through the pool's SHM segment.
"""

from __future__ import annotations

import os
import re
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmcd import protocol as p
from lmcd.connector.client import CacheClient, ServerError
from lmcd.connector.keys import chunk_keys
from lmcd.connector.shm import CpuKVCache
from lmcd.shm import ShmSegment
from tests.conftest import PoolView, RunningServer, connect, counters, fill_random, namespace

SHARED = ("--l1-size-gb", "0.1", "--share-pool", "true", "--max-workers", "2", "--log-level", "DEBUG")
PLAIN = ("--l1-size-gb", "0.1", "--max-workers", "2", "--log-level", "DEBUG")
PAGE = 64 << 10
# 2 layers whose K and V are separate planes: 4 planes of 8 blocks of 128 tokens, 64 KiB pages, in one
# 2 MiB segment; a chunk of 256 tokens is 2 blocks of every plane: 4 * 2 * 64 KiB = 512 KiB
KV_SPLIT = p.KVLayout(2, 8, 128, PAGE, PAGE, [i * 8 * PAGE for i in range(4)], [0, 0, 0, 0])
KV_SPLIT_BYTES = 32 * PAGE
CHUNK = 4 * 2 * PAGE
COPY_LINE = re.compile(r"(Stored|Retrieved) (\d+) tokens in ([\d.]+) seconds \(([\d.]+) GB/s, ([\d.]+) MiB\)")
COUNTED = ("stores", "stored_chunks", "stored_bytes", "retrieves", "retrieved_chunks", "retrieved_bytes")


def copy_counts(client: CacheClient) -> dict[str, int]:
    got = counters(client)
    return {name: got[name] for name in COUNTED}  # type: ignore[misc]


def expect_counts(client: CacheClient, **want: int) -> None:
    assert copy_counts(client) == {name: want.get(name, 0) for name in COUNTED}


def copy_lines(server: RunningServer, client: CacheClient) -> list[tuple[str, int, float, float, float]]:
    """Every Stored/Retrieved line so far, once the server has logged everything before a Ping
    (the server runs with --log-level DEBUG, so each reply is logged after the lines of its request)."""
    pings = server.log().count("Replied to ping")
    client.ping()
    deadline = time.monotonic() + 10
    while server.log().count("Replied to ping") <= pings:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.02)
    return [(m.group(1), int(m.group(2)), float(m.group(3)), float(m.group(4)), float(m.group(5)))
            for m in COPY_LINE.finditer(server.log())]


def expected_line(verb: str, num_chunks: int, num_bytes: int, seconds: float,
                  skipped_tokens: int = 0) -> tuple[str, int, float, float, float]:
    """What a line says, rounded as it prints: 256 tokens per chunk (the default chunk size), less the
    tokens of the blocks a retrieve left out."""
    return (verb, num_chunks * 256 - skipped_tokens, float(f"{seconds:.4f}"), float(f"{num_bytes / seconds / 1e9:.2f}"),
            float(f"{num_bytes / 2**20:.1f}"))


def copy_seconds_counts(server: RunningServer, name: str = "lmcd_copy_seconds_count") -> dict[str, float]:
    """The copy-time histogram's ``name`` sample (count or sum) by direction, from /metrics."""
    text = httpx.get(f"{server.http_url}/metrics", timeout=10).text
    return {sample.labels["direction"]: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name}


def worker_copier(url: str, ns: p.Namespace) -> tuple[CacheClient, int]:
    client = connect(url, ns)
    info = client.register_worker(KV_SPLIT, p.Device.CPU, p.Copier.WORKER, [KV_SPLIT_BYTES])
    assert (info.chunk_bytes, info.blocks_per_chunk) == (CHUNK, 2)
    return client, info.worker_id


def collect(client: CacheClient, rid: int) -> p.Reply:
    reply = client.collect(rid, 10.0)
    assert reply is not None, "no reply within 10 s"
    return reply


def grant(client: CacheClient, worker_id: int, num_slots: int) -> list[int]:
    reply = collect(client, client.post_grant(worker_id, num_slots))
    assert isinstance(reply, p.Granted) and len(reply.slots) == num_slots, reply
    return reply.slots


def commit(client: CacheClient, worker_id: int, keys: list[bytes], slots: list[int], seconds: float) -> p.Committed:
    reply = collect(client, client.post_commit(worker_id, keys, slots, 0, seconds))
    assert isinstance(reply, p.Committed), reply
    return reply


def loaded(client: CacheClient, worker_id: int, lease_id: int, keys: list[bytes], skip_blocks: int,
           seconds: float) -> p.Released:
    reply = collect(client, client.post_loaded(worker_id, lease_id, keys, skip_blocks, seconds))
    assert isinstance(reply, p.Released), reply
    return reply


def random_chunk(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, CHUNK, dtype=np.uint8)


# ---------------------------------------------------------------- who copies


def test_each_copier_gets_only_its_own_operations(server_factory) -> None:
    server = server_factory(*SHARED)
    kv = CpuKVCache(num_layers=2, num_blocks=8, block_size=128, num_kv_heads=1, head_size=32)
    model = namespace().model
    keys = chunk_keys(range(512), 256)
    try:
        with connect(server.url, namespace(model, kv.geometry)) as sc, \
                connect(server.url, namespace(model, "worker-copies")) as wc:
            sid = kv.register(sc).worker_id
            wid = wc.register_worker(KV_SPLIT, p.Device.CPU, p.Copier.WORKER, [KV_SPLIT_BYTES]).worker_id
            refusals = [
                lambda: collect(sc, sc.post_grant(sid, 2)),
                lambda: collect(sc, sc.post_commit(sid, keys[:1], [0], 0, 0.1)),
                lambda: sc.pin(sid, keys),
                lambda: collect(sc, sc.post_loaded(sid, 1, keys, 0, 0.1)),
            ]
            for refused in refusals:
                with pytest.raises(ServerError) as err:
                    refused()
                assert err.value.code == p.ErrorCode.BAD_REQUEST
                assert (f"worker {sid} registered for server copies; Grant, Commit, Pin and Loaded are for workers "
                        "registered for worker copies") in err.value.message
            for refused in (lambda: wc.store(wid, keys, [0, 1, 2, 3]), lambda: wc.retrieve(wid, keys, [0, 1, 2, 3])):
                with pytest.raises(ServerError) as err:
                    refused()
                assert err.value.code == p.ErrorCode.BAD_REQUEST
                assert (f"worker {wid} registered for worker copies; Store and Retrieve are for workers registered "
                        "for server copies") in err.value.message
            status = sc.status()
            assert status["pool"]["used_bytes"] == 0  # no slot was granted, nothing was stored
            assert {w["worker_id"]: w["copier"] for w in status["workers"]} == {sid: "server", wid: "worker"}
            expect_counts(sc)
            # each still does its own operations
            assert sc.store(sid, keys, [0, 1, 2, 3]).num_stored == 2
            assert len(grant(wc, wid, 1)) == 1
    finally:
        kv.close()


def test_registrations_whose_memory_does_not_match_the_copier_are_refused(server_factory) -> None:
    server = server_factory(*PLAIN)
    segment = ShmSegment(KV_SPLIT_BYTES)
    other = ShmSegment(KV_SPLIT_BYTES)
    try:
        with connect(server.url) as client:
            with pytest.raises(ServerError) as err:  # a worker that copies itself needs the shared pool
                client.register_worker(KV_SPLIT, p.Device.CPU, p.Copier.WORKER, [KV_SPLIT_BYTES])
            assert err.value.code == p.ErrorCode.BAD_REQUEST and "--share-pool" in err.value.message
            for fds, sizes in (([], [KV_SPLIT_BYTES]),  # no memory
                               ([segment.fd, other.fd], [KV_SPLIT_BYTES]),  # more fds than sizes
                               ([segment.fd], [KV_SPLIT_BYTES, KV_SPLIT_BYTES])):  # fewer
                with pytest.raises(ServerError) as err:
                    client.register_worker(KV_SPLIT, p.Device.CPU, p.Copier.SERVER, sizes, segment_fds=fds)
                assert err.value.code == p.ErrorCode.SEGMENT_ERROR, fds
                assert "one handed-over memory fd per segment size" in err.value.message
                assert f"got {len(fds)} fds for {len(sizes)} sizes" in err.value.message
            with pytest.raises(ServerError) as err:  # CUDA IPC handles with CPU memory
                client.register_worker(KV_SPLIT, p.Device.CPU, p.Copier.SERVER, [KV_SPLIT_BYTES],
                                       segment_fds=[segment.fd], ipc_handles=[b"h" * 64])
            assert err.value.code == p.ErrorCode.SEGMENT_ERROR and "no CUDA IPC handles" in err.value.message
            assert client.status()["workers"] == []
            info = client.register_worker(KV_SPLIT, p.Device.CPU, p.Copier.SERVER, [KV_SPLIT_BYTES],
                                          segment_fds=[segment.fd])  # the right one registers
            assert info.chunk_bytes == CHUNK
    finally:
        segment.close()
        other.close()
    shared = server_factory(*SHARED)
    segment = ShmSegment(KV_SPLIT_BYTES)
    try:
        with connect(shared.url) as client, pytest.raises(ServerError) as err:
            client.register_worker(KV_SPLIT, p.Device.CPU, p.Copier.WORKER, [KV_SPLIT_BYTES],
                                   segment_fds=[segment.fd])
        assert err.value.code == p.ErrorCode.SEGMENT_ERROR and "shares no KV memory" in err.value.message
    finally:
        segment.close()


# ---------------------------------------------------------------- layers and planes


def test_registered_line_counts_layers_not_planes(server_factory) -> None:
    """A K/V split layout: 2 layers in 4 planes. The server copies it exactly, plane by plane."""
    server = server_factory(*PLAIN)
    segment = ShmSegment(KV_SPLIT_BYTES)
    try:
        segment.array[:] = np.random.default_rng(3).integers(0, 256, KV_SPLIT_BYTES, dtype=np.uint8)
        before = segment.array.copy()
        with connect(server.url, namespace(geometry="kv-split")) as client:
            info = client.register_worker(KV_SPLIT, p.Device.CPU, p.Copier.SERVER, [KV_SPLIT_BYTES],
                                          segment_fds=[segment.fd])
            line = server.wait_for_log(r"Registered KV cache for CPU ID (\d+) with (\d+) layers \((.*)\)")
            assert (int(line.group(1)), int(line.group(2))) == (os.getpid(), 2)
            assert line.group(3) == "8 blocks of 128 tokens, 2.0 MiB in 1 SHM segments, rank 0"
            (worker,) = client.status()["workers"]
            assert (worker["num_layers"], worker["num_planes"], worker["chunk_bytes"], worker["copier"]) == (
                2, 4, CHUNK, "server")
            keys = chunk_keys(range(512), 256)
            assert client.store(info.worker_id, keys, [0, 1, 2, 3]).num_stored == 2
            assert client.retrieve(info.worker_id, keys, [4, 5, 6, 7]) == 2
        pages = segment.array.reshape(4, 8, PAGE)
        old = before.reshape(4, 8, PAGE)
        assert np.array_equal(pages[:, 4:8], old[:, 0:4])  # every plane, K and V alike
        assert np.array_equal(pages[:, 0:4], old[:, 0:4])
    finally:
        segment.close()
    shared = server_factory(*SHARED)
    client, _ = worker_copier(shared.url, namespace())
    try:
        line = shared.wait_for_log(r"Registered KV cache for CPU ID \d+ with (\d+) layers \(.*in (.*), rank 0\)")
        assert line.group(1) == "2" and line.group(2) == "the worker's own memory; it copies through the shared pool"
        (worker,) = client.status()["workers"]
        assert (worker["num_layers"], worker["num_planes"], worker["copier"]) == (2, 4, "worker")
    finally:
        client.close()


# ---------------------------------------------------------------- counting: server copies


def test_server_copies_count_when_the_bytes_are_in_place(server_factory) -> None:
    server = server_factory(*PLAIN)
    kv = CpuKVCache(num_layers=2, num_blocks=16, block_size=128, num_kv_heads=2, head_size=32)
    fill_random(kv, 11)
    ns = namespace(geometry=kv.geometry)
    chunk, page = 2 * 2 * kv.page_bytes, kv.page_bytes
    try:
        with connect(server.url, ns) as client, \
                connect(server.url, namespace(ns.model, kv.geometry, rank=None), role=p.Role.SCHEDULER) as sched:
            wid = kv.register(client).worker_id
            keys = chunk_keys(range(4 * 256), 256)
            expect_counts(client)
            assert client.store(wid, keys[:3], [0, 1, 2, 3, 4, 5]).num_stored == 3
            expect_counts(client, stores=1, stored_chunks=3, stored_bytes=3 * chunk)
            assert client.store(wid, keys[:3], [0, 1, 2, 3, 4, 5]).num_stored == 0  # all PRESENT: nothing copied
            result = client.store(wid, keys, [0, 1, 2, 3, 4, 5, 6, 7])  # 3 PRESENT, 1 copied
            assert result.statuses == [p.ChunkStatus.PRESENT] * 3 + [p.ChunkStatus.STORED]
            expect_counts(client, stores=2, stored_chunks=4, stored_bytes=4 * chunk)
            with pytest.raises(ServerError):
                client.store(wid, chunk_keys([7] * 256, 256), [0, 99])  # refused before any copy
            hit = sched.lookup(keys)  # a lookup copies nothing
            assert hit.num_hit_chunks == 4 and hit.lease_id is not None
            assert sched.release(hit.lease_id) == 4  # nor does a release
            expect_counts(client, stores=2, stored_chunks=4, stored_bytes=4 * chunk)
            assert client.retrieve(wid, chunk_keys([8] * 256, 256), [8, 9]) == 0  # a miss copies nothing
            with pytest.raises(ServerError):
                client.retrieve(wid, keys, [8, 9, 10])
            hit = sched.lookup(keys[:3])
            assert hit.lease_id is not None
            assert client.retrieve(wid, keys[:3], list(range(8, 14)), hit.lease_id, skip_blocks=1) == 3
            retrieved = 3 * chunk - 1 * 2 * page  # the first block of the first chunk in both planes stayed
            expect_counts(client, stores=2, stored_chunks=4, stored_bytes=4 * chunk, retrieves=1, retrieved_chunks=3,
                          retrieved_bytes=retrieved)
            lines = copy_lines(server, client)
        # the retrieve left out the first block (128 tokens) of its first chunk
        assert [line[:2] for line in lines] == [("Stored", 768), ("Stored", 256), ("Retrieved", 640)]
        for (verb, _, seconds, gbps, mib), num_bytes in zip(lines, (3 * chunk, chunk, retrieved), strict=True):
            assert 0 <= seconds < 5, (verb, seconds)  # the copy threads' own clock (a small copy prints 0.0000)
            assert mib == float(f"{num_bytes / 2**20:.1f}")
            if seconds >= 0.001:  # printed to 4 decimals: the rate follows from them
                assert gbps == pytest.approx(num_bytes / seconds / 1e9, rel=0.1)
        assert copy_seconds_counts(server) == {"store": 2.0, "retrieve": 1.0}
        sums = copy_seconds_counts(server, "lmcd_copy_seconds_sum")
        assert 0 < sums["store"] < 5 and 0 < sums["retrieve"] < 5  # measured, never left at zero
    finally:
        kv.close()


# ---------------------------------------------------------------- counting: worker copies


def test_worker_copies_count_when_the_worker_says_its_bytes_are_in_place(server_factory) -> None:
    server = server_factory(*SHARED)
    model = namespace().model
    client, wid = worker_copier(server.url, namespace(model))
    sched = connect(server.url, namespace(model, rank=None), role=p.Role.SCHEDULER)
    assert client.hello is not None
    pool = PoolView(client)
    keys = chunk_keys(range(2 * 256), 256)
    data = [random_chunk(i) for i in range(2)]
    try:
        # a store needing a Grant in the middle: two grants, one Commit, one count, one line
        first, second = grant(client, wid, 1), grant(client, wid, 1)
        slots = first + second
        for slot, chunk in zip(slots, data, strict=True):
            pool.write(slot, chunk)
        expect_counts(client)  # granted and written, but not committed: not in the cache yet
        assert sched.lookup(keys, lease=False).num_hit_chunks == 0
        assert commit(client, wid, keys, slots, 0.0005).statuses == [p.ChunkStatus.STORED] * 2
        expect_counts(client, stores=1, stored_chunks=2, stored_bytes=2 * CHUNK)
        used = client.status()["pool"]["used_bytes"]
        assert used == 2 * CHUNK
        # a Commit of a cached chunk counts nothing and gives its slot back
        again = grant(client, wid, 1)
        assert client.status()["pool"]["used_bytes"] == used + CHUNK
        assert commit(client, wid, keys[:1], again, 0.5).statuses == [p.ChunkStatus.PRESENT]
        assert client.status()["pool"]["used_bytes"] == used
        expect_counts(client, stores=1, stored_chunks=2, stored_bytes=2 * CHUNK)

        # a Pin counts nothing; the Loaded after the copy counts the chunks it names
        pinned = client.pin(wid, keys)
        assert pinned.slots == slots and pinned.lease_id is not None
        for slot, chunk in zip(pinned.slots, data, strict=True):
            assert np.array_equal(pool.read(slot, CHUNK), chunk)
        expect_counts(client, stores=1, stored_chunks=2, stored_bytes=2 * CHUNK)
        unknown = chunk_keys([3] * 256, 256)[0]
        released = loaded(client, wid, pinned.lease_id, [keys[0], unknown], 1, 0.0002)
        assert released.num_unpinned == 2  # the whole rank part ends; only the named, leased chunk counts
        first_load = CHUNK - 1 * 4 * PAGE  # skip_blocks * planes * page_bytes stayed out
        expect_counts(client, stores=1, stored_chunks=2, stored_bytes=2 * CHUNK, retrieves=1, retrieved_chunks=1,
                      retrieved_bytes=first_load)
        with pytest.raises(ServerError) as err:  # the lease is over
            loaded(client, wid, pinned.lease_id, keys, 0, 0.1)
        assert err.value.code == p.ErrorCode.UNKNOWN_LEASE
        with pytest.raises(ServerError) as err:
            loaded(client, wid, 987654, keys, 0, 0.1)
        assert err.value.code == p.ErrorCode.UNKNOWN_LEASE and "987654" in err.value.message

        # a lookup with slots counts nothing either; the Loaded does
        hit = sched.lookup_for_load(keys)
        assert hit.lease_id is not None and hit.slots == [slots]
        assert np.array_equal(pool.read(hit.slots[0][1], CHUNK), data[1])
        expect_counts(client, stores=1, stored_chunks=2, stored_bytes=2 * CHUNK, retrieves=1, retrieved_chunks=1,
                      retrieved_bytes=first_load)
        assert loaded(client, wid, hit.lease_id, keys, 0, 0.001).num_unpinned == 2
        totals = dict(stores=1, stored_chunks=2, stored_bytes=2 * CHUNK, retrieves=2, retrieved_chunks=3,
                      retrieved_bytes=first_load + 2 * CHUNK)
        expect_counts(client, **totals)
        # a lease nobody loads from ends with a Release: nothing counted
        hit = sched.lookup(keys)
        assert hit.lease_id is not None and sched.release(hit.lease_id) == 2
        expect_counts(client, **totals)

        lines = copy_lines(server, client)
        assert lines == [expected_line("Stored", 2, 2 * CHUNK, 0.0005),
                         expected_line("Retrieved", 1, first_load, 0.0002, skipped_tokens=128),
                         expected_line("Retrieved", 2, 2 * CHUNK, 0.001)]
        assert copy_seconds_counts(server) == {"store": 1.0, "retrieve": 2.0}
        sums = copy_seconds_counts(server, "lmcd_copy_seconds_sum")  # the seconds the worker sent
        assert sums == {"store": pytest.approx(0.0005), "retrieve": pytest.approx(0.0012)}
    finally:
        pool.close()
        sched.close()
        client.close()


def test_loaded_with_more_skip_blocks_than_a_chunk_has_is_refused(server_factory) -> None:
    server = server_factory(*SHARED)
    client, wid = worker_copier(server.url, namespace())
    try:
        keys = chunk_keys(range(256), 256)
        commit(client, wid, keys, grant(client, wid, 1), 0.001)
        pinned = client.pin(wid, keys)
        assert pinned.lease_id is not None
        before = copy_counts(client)
        with pytest.raises(ServerError) as err:
            loaded(client, wid, pinned.lease_id, keys, 10, 0.001)  # 2 blocks per chunk
        assert err.value.code == p.ErrorCode.BAD_REQUEST and "skip_blocks" in err.value.message
        assert copy_counts(client) == before
    finally:
        client.close()
