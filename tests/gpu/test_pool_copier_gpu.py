"""``PoolCopier`` (worker copies on a GPU) queueing a long store a few chunks at a time (``-m gpu``).

A store of many more chunks than its window goes onto the GPU from a feeder thread while the
engine's stream is busy; every byte is checked against torch: the store after the engine's write,
a load queued while a store is still being fed, ``fence`` (the engine's next write waits for the
whole store, though most of it was not queued yet), ``done`` only once all of it ended, and
``close`` with a store still being fed. The pool is host memory mapped as the server's is (not
pinned by torch: the copier registers it with CUDA).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import pytest

from tests.gpu.gpu_support import requires_gpu

if TYPE_CHECKING:
    import torch

    from lmcd.connector.cuda import PoolCopier
    from lmcd.kernels.staged import CopyEvents
    from tests.gpu.kv_pages import KV, Pool

pytestmark = [pytest.mark.gpu, requires_gpu]
BPC, SLOTS, CHUNKS = 2, 48, 40  # blocks per chunk; pool slots; chunks of the long store
ENGINE_N, ENGINE_MATMULS = 8192, 20  # the engine's work before a copy: ~30 ms of bf16 matmuls on an H200


def _setup() -> tuple[KV, Pool, np.random.Generator]:
    from tests.gpu import kv_pages as kp

    kv = kp.build_kv(kp.Geometry("LBHNC", num_blocks=2 * CHUNKS * BPC + 8))
    chunk_bytes = kv.layout.num_planes * BPC * kv.layout.page_bytes
    return kv, kp.Pool(SLOTS, chunk_bytes, mapped=True), np.random.default_rng()


def _copier(kv: KV, pool: Pool, window: int) -> PoolCopier:
    import torch

    from lmcd.connector.cuda import PoolCopier

    layout = kv.layout
    return PoolCopier(torch.cuda.current_device(), kv.plane_addresses, layout.num_blocks, layout.page_bytes,
                      layout.block_stride, BPC, pool.address, pool.num_slots * pool.chunk_bytes, window=window)


def _blocks(kv: KV, rng: np.random.Generator, num_chunks: int, exclude: np.ndarray | None = None) -> np.ndarray:
    from lmcd.copyplan import check_blocks

    free = np.setdiff1d(np.arange(kv.layout.num_blocks), exclude if exclude is not None else [])
    return check_blocks(rng.choice(free, num_chunks * BPC, replace=False).tolist(), num_chunks, BPC,
                        kv.layout.num_blocks)


def _engine_work() -> None:
    import torch

    a = torch.randn(ENGINE_N, ENGINE_N, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(a)
    torch.mm(a, a, out=out)
    torch.cuda.synchronize()
    for _ in range(ENGINE_MATMULS):
        torch.mm(a, a, out=out)


def _store_being_fed(kv: KV, pool: Pool, rng: np.random.Generator, copier: PoolCopier
                     ) -> tuple[CopyEvents, list[int], torch.Tensor]:
    """A store of CHUNKS fresh chunks into a poisoned pool, asked for behind the engine's long work (so
    the feeder still has most of it); its events, slots and the pool it must leave."""
    import torch

    from tests.gpu import kv_pages as kp

    blocks, slots = _blocks(kv, rng, CHUNKS), pool.pick(rng, CHUNKS)
    pool.tensor.fill_(kp.POISON)
    kv.fresh()
    torch.cuda.synchronize()
    want = kp.expected_pool(kv, pool, slots, blocks)
    _engine_work()
    events = copier.store(slots, blocks)
    assert not events.queued, "a store of many chunks was queued whole"
    return events, slots, want


@pytest.mark.parametrize("window", [1, 4])
def test_a_long_store_is_fed_in_windows_and_every_byte_arrives(window: int) -> None:
    import torch

    from tests.gpu import kv_pages as kp

    kv, pool, rng = _setup()
    copier = _copier(kv, pool, window)
    try:
        for _ in range(2):
            blocks, slots = _blocks(kv, rng, CHUNKS), pool.pick(rng, CHUNKS)
            pool.tensor.fill_(kp.POISON)
            new = torch.randint_like(kv.buffer, -128, 128)
            torch.cuda.synchronize()
            _engine_work()
            kv.buffer.copy_(new)  # the forward's write, after long work: the store must read this
            events = copier.store(slots, blocks)
            assert not events.queued, f"a store of {CHUNKS} chunks was queued whole; the window is {window}"
            assert not copier.done(events)
            deadline = time.monotonic() + 60
            while not copier.done(events):
                assert time.monotonic() < deadline, "the store did not finish within 60 s"
                time.sleep(0.001)
            kp.assert_pool(pool, kp.expected_pool(kv, pool, slots, blocks), slots,
                           f"store of {CHUNKS} chunks, window {window}")
            assert copier.seconds(events) > 0
            small = _blocks(kv, rng, 1)
            one = pool.pick(rng, 1)
            events = copier.store(one, small)
            assert events.queued, "a store within the window is queued in the call"
            copier.synchronize()
            assert torch.equal(pool.chunk(one[0]).cuda(), kp.gathered(kv, small[0]))
            copier.seconds(events)
    finally:
        copier.close()


def test_a_load_goes_between_the_chunks_of_a_store_being_fed() -> None:
    import torch

    from tests.gpu import kv_pages as kp

    kv, pool, rng = _setup()
    copier = _copier(kv, pool, 1)
    try:
        store_blocks = _blocks(kv, rng, CHUNKS)
        load_blocks = _blocks(kv, rng, 4, exclude=store_blocks.ravel())
        store_slots = pool.pick(rng, CHUNKS)
        load_slots = pool.pick(rng, 4, exclude=store_slots)
        pool.tensor.random_(-128, 128)
        kv.fresh()
        torch.cuda.synchronize()
        want_pool = {slot: kp.gathered(kv, row).cpu() for slot, row in zip(store_slots, store_blocks, strict=True)}
        loaded = kp.expected_kv(kv, pool, load_slots, load_blocks, 0)
        _engine_work()  # the store's first chunk waits for it: the feeder has the rest
        stored = copier.store(store_slots, store_blocks)
        load = copier.load(load_slots, load_blocks, 0)
        assert not stored.queued, "the store was queued whole before the load"
        index = kp.ids(load_blocks.ravel())
        got = [plane[index].clone() for plane in kv.planes]  # on the engine's stream: after the load
        want = [plane[index] for plane in kv.views_of(loaded)]
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), "the load's blocks are wrong"
        copier.synchronize()
        for slot, chunk in want_pool.items():
            assert torch.equal(pool.chunk(slot), chunk), f"the store's chunk in slot {slot} is wrong"
        assert copier.done(load) and copier.done(stored)
        copier.seconds(load)
        copier.seconds(stored)
    finally:
        copier.close()


def test_fence_waits_for_all_of_a_store_still_being_fed() -> None:

    from tests.gpu import kv_pages as kp

    kv, pool, rng = _setup()
    copier = _copier(kv, pool, 1)
    try:
        events, slots, want = _store_being_fed(kv, pool, rng, copier)
        copier.fence(events)  # the engine's stream waits for the whole store (the host waits for its queueing)
        assert events.queued
        kv.buffer.fill_(7)  # the engine rewrites the blocks (a preempted request's) right after
        copier.synchronize()
        kp.assert_pool(pool, want, slots, "store fenced before the blocks were rewritten")
        copier.seconds(events)
    finally:
        copier.close()


def test_close_finishes_a_store_still_being_fed() -> None:

    from tests.gpu import kv_pages as kp

    kv, pool, rng = _setup()
    copier = _copier(kv, pool, 1)
    events, slots, want = _store_being_fed(kv, pool, rng, copier)
    copier.close()
    kp.assert_pool(pool, want, slots, "store still being fed at close")
