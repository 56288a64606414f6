"""The page kernel (``PageKernel``) and the staged pipeline (``StagedPipeline``), bit-exact against
torch (``-m gpu``), with the kernel functions of both loaders: ``cupy_functions`` (the server) and
``nvrtc_functions`` (NVRTC through ctypes, a vLLM worker).

KV is built as vLLM builds it (tests/gpu/kv_pages.py: one int8 buffer, per-layer views) in the
layouts LBHNC, LBNHC, MLA, a K/V split and padded pages, for bf16, fp16 and fp8; the pool is
pinned host memory used through its address. Every copy gets fresh random ids, slots and data,
its destination is poisoned first, and every byte of the destination is checked: the pages
copied, and everything else untouched. The torch helpers are imported inside the tests, so that
this module collects (and skips) where there is no GPU.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from typing import TYPE_CHECKING

import numpy as np
import pytest

from lmcd import cudadrv
from lmcd.copyplan import BlockIdError, check_blocks
from lmcd.kernels import MAX_LAUNCH_BLOCKS, KernelFunctions, KernelInputError, PageKernel
from lmcd.kernels.staged import StagedPipeline, StagingMemoryError
from tests.gpu.gpu_support import requires_gpu

if TYPE_CHECKING:
    import torch

pytestmark = [pytest.mark.gpu, requires_gpu]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYOUTS = ("LBHNC", "LBNHC", "MLA", "KV_SPLIT", "STRIDED")
ENGINE_N, ENGINE_MATMULS = 8192, 20  # the "engine's" work before a copy: ~30 ms of bf16 matmuls on an H200


@pytest.fixture(params=["cupy", "nvrtc"])
def functions(request: pytest.FixtureRequest) -> KernelFunctions:
    """The kernel's entries from one loader, with GPU 0's primary context current on this thread."""
    import torch

    from lmcd.kernels import cupy_functions, nvrtc_functions

    torch.cuda.set_device(0)
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    if request.param == "cupy":
        return cupy_functions(0)
    major, minor = torch.cuda.get_device_capability(0)
    return nvrtc_functions(0, f"sm_{major}{minor}")


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp8"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_store_and_load_bit_exact(functions: KernelFunctions, layout: str, dtype: str) -> None:
    from tests.gpu import kv_pages as kp

    kv = kp.build_kv(kp.Geometry(layout, dtype))
    with kp.rig_for(functions, kv, blocks_per_chunk=4, stages=2, num_slots=8) as rig:
        assert rig.pipeline.stages == 2 and rig.pipeline.kernel.vec16
        for num_chunks in (1, 5):  # one chunk; more chunks than stages: buffers reused within a request
            rig.store(num_chunks)
            rig.load(num_chunks)


@pytest.mark.parametrize("layout", ["LBHNC", "KV_SPLIT"])
def test_requests_back_to_back_without_a_host_sync(functions: KernelFunctions, layout: str) -> None:
    """A chain queued with no host wait: store A -> slots X, load X -> B, store B -> slots Y, load Y
    -> C. Each request takes the staging buffers the previous one used (3 chunks on 2 buffers), so a
    buffer overwritten before its last chunk left it, or a load that overtakes the store before
    it, shows in B, C or the slots."""
    import torch

    from tests.gpu import kv_pages as kp

    kv = kp.build_kv(kp.Geometry(layout))
    n = 3
    with kp.rig_for(functions, kv, blocks_per_chunk=4, stages=2, num_slots=2 * n + 2) as rig:
        pool = rig.pool
        for _ in range(2):
            a = rig.blocks(n)
            b = rig.blocks(n, exclude=a.ravel())
            c = rig.blocks(n, exclude=np.concatenate([a.ravel(), b.ravel()]))
            x = pool.pick(rig.rng, n)
            y = pool.pick(rig.rng, n, exclude=x)
            kv.fresh()
            pool.tensor.fill_(kp.POISON)
            want_kv = kv.buffer.clone()
            for view, plane in zip(kv.views_of(want_kv), kv.planes, strict=True):
                view[kp.ids(b.ravel())] = plane[kp.ids(a.ravel())]
                view[kp.ids(c.ravel())] = plane[kp.ids(a.ravel())]
            want_pool = torch.full_like(pool.tensor, kp.POISON, device="cpu")
            for slot_x, slot_y, row in zip(x, y, a, strict=True):
                chunk = kp.gathered(kv, row).cpu()
                want_pool[slot_x : slot_x + pool.chunk_bytes] = chunk
                want_pool[slot_y : slot_y + pool.chunk_bytes] = chunk
            torch.cuda.synchronize()
            copies = [rig.pipeline.copy(pool.addresses(x), a, True), rig.pipeline.copy(pool.addresses(x), b, False),
                      rig.pipeline.copy(pool.addresses(y), b, True), rig.pipeline.copy(pool.addresses(y), c, False)]
            cudadrv.event_synchronize(copies[-1].done)  # copies end in the order they were queued
            assert all(cudadrv.event_done(events.done) for events in copies)
            kp.assert_kv(kv, want_kv, "chained store/load/store/load")
            kp.assert_pool(pool, want_pool, x + y, "chained store/load/store/load")
            assert rig.pipeline.seconds(*copies) > 0


def test_load_skip_blocks_leaves_the_first_blocks_alone(functions: KernelFunctions) -> None:
    from tests.gpu import kv_pages as kp

    kv = kp.build_kv(kp.Geometry("LBHNC"))
    with kp.rig_for(functions, kv, blocks_per_chunk=4, stages=2, num_slots=4) as rig:
        for skip in (1, 3):
            rig.load(3, skip)  # the expected image keeps the skipped blocks' old bytes


def test_chunks_of_more_blocks_than_one_launch_carries(functions: KernelFunctions) -> None:
    """Block size 4 and 80 blocks per chunk: each chunk takes two launches (64 + 16 block ids), and
    skip_blocks may end inside the first launch, at its end, or inside the second."""
    from tests.gpu import kv_pages as kp

    bpc = 80
    assert bpc > MAX_LAUNCH_BLOCKS
    kv = kp.build_kv(kp.Geometry("LBHNC", num_blocks=500, block_size=4, heads=2))
    with kp.rig_for(functions, kv, blocks_per_chunk=bpc, stages=2, num_slots=4) as rig:
        rig.store(3)
        rig.store(1)
        for skip in (0, 5, 63, 64, 70, 79):
            rig.load(3, skip)
        rig.load(1, 70)


def test_page_kernel_launches_one_chunk_on_any_stream(functions: KernelFunctions) -> None:
    """``PageKernel.launch`` alone, on torch's stream, into a GPU buffer: gather, then scatter with
    skip_blocks past the first launch's 64 blocks; nothing beyond the chunk is written."""
    import torch

    from tests.gpu import kv_pages as kp

    bpc = 80
    kv = kp.build_kv(kp.Geometry("LBNHC", num_blocks=300, block_size=4, heads=2))
    rng = np.random.default_rng()
    stream = torch.cuda.current_stream().cuda_stream
    with kp.page_kernel(functions, kv, bpc) as kernel:
        staging = torch.full((kernel.chunk_bytes + kp.TAIL,), kp.POISON, dtype=torch.int8, device=kp.DEVICE)
        kernel.check_buffer(staging.data_ptr())
        for _ in range(3):
            src, dst = check_blocks(rng.choice(300, 2 * bpc, replace=False).tolist(), 2, bpc, 300)
            kv.fresh()
            staging.fill_(kp.POISON)
            kernel.launch(staging.data_ptr(), src, 0, True, stream)
            assert torch.equal(staging[: kernel.chunk_bytes], kp.gathered(kv, src)), "gather"
            assert bool((staging[kernel.chunk_bytes :] == kp.POISON).all()), "the gather wrote past the chunk"
            want = kv.buffer.clone()
            data = staging[: kernel.chunk_bytes].view(kv.layout.num_planes, bpc, -1)
            for plane, view in enumerate(kv.views_of(want)):
                view[kp.ids(dst[70:])] = data[plane, 70:]
            kernel.launch(staging.data_ptr(), dst, 70, False, stream)
            kp.assert_kv(kv, want, "scatter with skip_blocks 70")


def test_unaligned_pages_use_the_byte_kernel(functions: KernelFunctions) -> None:
    """fp8 with head_dim 36, 3 heads and blocks of 5 tokens: pages of 1080 bytes (not a multiple of
    16), so planes and pages are unaligned and the byte entry copies."""
    from tests.gpu import kv_pages as kp

    g = kp.Geometry("LBHNC", "fp8", block_size=5, heads=3, head_dim=36)
    assert g.page_bytes == 1080 and g.page_bytes % 16
    kv = kp.build_kv(g)
    with kp.rig_for(functions, kv, blocks_per_chunk=3, stages=2, num_slots=6) as rig:
        assert rig.pipeline.kernel.vec16 is False
        for num_chunks in (1, 5):
            rig.store(num_chunks)
            rig.load(num_chunks)
            rig.load(num_chunks, 2)


def _engine_work(a: torch.Tensor, out: torch.Tensor) -> None:
    import torch

    for _ in range(ENGINE_MATMULS):
        torch.mm(a, a, out=out)


def test_after_orders_the_copies_behind_the_engine(functions: KernelFunctions) -> None:
    """``after``: a store's gathers read the KV the engine wrote just before (after long work on its
    stream, no host sync), and a load's scatters wait for the engine's reads of the target blocks;
    the reader after the load waits on ``done`` on the GPU, as PoolCopier makes vLLM's stream wait."""
    import torch

    from tests.gpu import kv_pages as kp

    kv = kp.build_kv(kp.Geometry("LBHNC"))
    a = torch.randn(ENGINE_N, ENGINE_N, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(a)
    torch.mm(a, a, out=out)
    torch.cuda.synchronize()  # cuBLAS is ready: the work below is queued at once
    engine = torch.cuda.current_stream().cuda_stream
    mark = cudadrv.event_create()
    n = 5
    try:
        with kp.rig_for(functions, kv, blocks_per_chunk=4, stages=2, num_slots=8) as rig:
            pool = rig.pool
            for _ in range(2):
                # store: the forward writes the KV after long work; the copy is queued at once
                src, slots = rig.blocks(n), pool.pick(rig.rng, n)
                new = torch.randint_like(kv.buffer, -128, 128)
                pool.tensor.fill_(kp.POISON)
                torch.cuda.synchronize()
                _engine_work(a, out)
                kv.buffer.copy_(new)
                cudadrv.event_record(mark, engine)
                assert not cudadrv.event_done(mark), "the engine's work ended before the copy was queued"
                events = rig.pipeline.copy(pool.addresses(slots), src, True, after=mark)
                cudadrv.event_synchronize(events.done)
                kp.assert_pool(pool, kp.expected_pool(kv, pool, slots, src), slots, "store after the engine's write")
                # load: the engine reads the target blocks after long work; the scatters come after it
                dst, slots = rig.blocks(n), pool.pick(rig.rng, n)
                kv.fresh()
                pool.tensor.random_(-128, 128)
                want = kp.expected_kv(kv, pool, slots, dst, 0)
                index = kp.ids(dst.ravel())
                before = [plane[index] for plane in kv.planes]
                torch.cuda.synchronize()
                _engine_work(a, out)
                seen = [plane[index] for plane in kv.planes]  # what the engine's step reads
                cudadrv.event_record(mark, engine)
                assert not cudadrv.event_done(mark), "the engine's work ended before the copy was queued"
                events = rig.pipeline.copy(pool.addresses(slots), dst, False, after=mark)
                cudadrv.stream_wait(engine, events.done)  # the next step reads the loaded blocks
                kp.assert_kv(kv, want, "load, read on the engine's stream after done")
                assert all(torch.equal(s, b) for s, b in zip(seen, before, strict=True)), \
                    "the load overwrote blocks before the engine's queued reads of them"
                assert rig.pipeline.seconds(events) > 0
    finally:
        cudadrv.event_destroy(mark)


def test_then_events_mark_the_end_of_each_copy(functions: KernelFunctions) -> None:
    """``then`` events are recorded once the copy has ended, also when the pipeline's kernel stream is
    held up (it waits for the engine's long work: a load's slots cross long before its scatters run,
    a store's gathers come late): when the host wakes on one, ``done`` is complete and every byte is
    there, and a reader that waits on one sees every byte. ``seconds`` is the copy's positive GPU
    time, ending no later than ``then``."""
    import torch

    from tests.gpu import kv_pages as kp

    kv = kp.build_kv(kp.Geometry("LBHNC"))
    a = torch.randn(ENGINE_N, ENGINE_N, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(a)
    torch.mm(a, a, out=out)
    torch.cuda.synchronize()
    engine = torch.cuda.current_stream().cuda_stream
    then = [cudadrv.event_create(cudadrv.CU_EVENT_BLOCKING_SYNC) for _ in range(2)]  # timing on
    mark = cudadrv.event_create()
    n = 5  # on 8 buffers: the slots' side never waits for the (held) kernel stream to free a buffer
    try:
        with kp.rig_for(functions, kv, blocks_per_chunk=4, stages=8, num_slots=8) as rig:
            pool = rig.pool

            def hold_kernel_stream() -> None:
                _engine_work(a, out)
                cudadrv.event_record(mark, engine)
                cudadrv.stream_wait(rig.pipeline.kernel_stream, mark)

            for hold in (False, True):
                # load: the host waits on then[1]; the engine's stream waits on then[0] (as a server-copies
                # worker waits on the server's event)
                dst, slots = rig.blocks(n), pool.pick(rig.rng, n)
                kv.fresh()
                pool.tensor.random_(-128, 128)
                want = kp.expected_kv(kv, pool, slots, dst, 0)
                torch.cuda.synchronize()
                if hold:
                    hold_kernel_stream()
                events = rig.pipeline.copy(pool.addresses(slots), dst, False, then=then)
                cudadrv.event_synchronize(then[1])
                assert cudadrv.event_done(events.done), f"a then event completed before the load ended (held: {hold})"
                cudadrv.stream_wait(engine, then[0])
                kp.assert_kv(kv, want, f"load read after a then event (kernel stream held: {hold})")
                to_then = cudadrv.elapsed_seconds(events.start, then[1])  # raises unless then[1] was recorded
                seconds = rig.pipeline.seconds(events)
                assert 0 < seconds <= to_then + 1e-5
                # store: the host waits on a then event, then reads the pool
                src, slots = rig.blocks(n), pool.pick(rig.rng, n)
                kv.fresh()
                pool.tensor.fill_(kp.POISON)
                torch.cuda.synchronize()
                if hold:
                    hold_kernel_stream()
                events = rig.pipeline.copy(pool.addresses(slots), src, True, then=then)
                cudadrv.event_synchronize(then[1])
                assert cudadrv.event_done(then[0]) and cudadrv.event_done(events.done)
                kp.assert_pool(pool, kp.expected_pool(kv, pool, slots, src), slots,
                               f"store read after a then event (kernel stream held: {hold})")
                to_then = cudadrv.elapsed_seconds(events.start, then[0])
                seconds = rig.pipeline.seconds(events)
                assert 0 < seconds <= to_then + 1e-5
    finally:
        torch.cuda.synchronize()
        for event in [*then, mark]:
            cudadrv.event_destroy(event)


def test_more_stages_than_fit_keep_fewer_buffers(functions: KernelFunctions) -> None:
    """Asked for more staging buffers than the GPU holds, the pipeline keeps those that fit (chunks
    of 4 GiB here, never launched), raises nothing, and frees them all on close."""
    import torch

    from tests.gpu import kv_pages as kp

    kv = kp.build_kv(kp.Geometry("LBHNC"))
    page, chunk = 64 << 20, 4 << 30
    free, _ = torch.cuda.mem_get_info()
    if free < 2 * chunk:
        pytest.skip(f"needs 8 GiB of free GPU memory, {free / 2**30:.1f} GiB are free")
    wanted = free // chunk + 2
    kernel = PageKernel(functions, [kv.buffer.data_ptr()], 1, page, page, chunk // page)  # one plane
    assert kernel.chunk_bytes == chunk
    pipeline = StagedPipeline(kernel, wanted)  # owns the kernel from here on
    try:
        assert 1 <= pipeline.stages < wanted and len(pipeline.buffers) == pipeline.stages
    finally:
        pipeline.close()
    assert torch.cuda.mem_get_info()[0] > free - (256 << 20), "closing the pipeline did not free its buffers"


def test_no_room_for_one_staging_buffer_is_a_staging_memory_error(functions: KernelFunctions) -> None:
    """Another process fills GPU 0 (this one keeps its memory); then not one buffer of a 256 MiB chunk
    fits, and the pipeline says so with StagingMemoryError, leaving nothing allocated."""
    import torch

    from tests.gpu import kv_pages as kp

    kv = kp.build_kv(kp.Geometry("LBHNC"))
    page = 64 << 20
    kernel = PageKernel(functions, [kv.buffer.data_ptr()], 1, page, page, 4)  # chunk 256 MiB, before the GPU is full
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    filler = subprocess.Popen([sys.executable, "-m", "tests.gpu.gpu_fill", "--device", "0"], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": path}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert filler.stdout is not None
        for line in filler.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    output: list[str] = []
    try:
        while True:
            line = lines.get(timeout=180)
            if line is None:
                raise AssertionError(f"the filler exited before GPU 0 was full: {''.join(output)[-3000:]}")
            output.append(line)
            if line.startswith("FULL "):
                break
        free = torch.cuda.mem_get_info()[0]
        assert free < kernel.chunk_bytes, f"{free / 2**20:.0f} MiB are still free on GPU 0"
        with pytest.raises(StagingMemoryError, match="too little for one staging buffer of 256.0 MiB"):
            StagedPipeline(kernel, 4)
    finally:
        assert filler.stdin is not None
        filler.stdin.close()  # the filler frees its memory and exits
        try:
            filler.wait(60)
        except subprocess.TimeoutExpired:
            filler.kill()
            filler.wait(10)
        kernel.close()  # the failed pipeline closed it already; closing again does nothing


def test_block_ids_are_checked_before_any_launch(functions: KernelFunctions) -> None:
    """``check_blocks`` (the server's and the worker's check) refuses ids out of range, a wrong count
    and a bad skip_blocks with BlockIdError; a request checked first never reaches the GPU."""
    import torch

    from tests.gpu import kv_pages as kp

    kv = kp.build_kv(kp.Geometry("LBHNC"))
    with kp.rig_for(functions, kv, blocks_per_chunk=4, stages=2, num_slots=2) as rig:
        before_kv, before_pool = kv.buffer.clone(), rig.pool.tensor.clone()
        torch.cuda.synchronize()

        def request(block_ids: object, to_pool: bool, skip_blocks: int = 0) -> None:  # as the server does
            blocks = check_blocks(block_ids, 1, 4, kp.BLOCKS, skip_blocks)  # type: ignore[arg-type]
            rig.pipeline.copy(rig.pool.addresses([0]), blocks, to_pool, skip_blocks)

        for bad in ([0, 1, 2, kp.BLOCKS], [-1, 1, 2, 3], [0, 1, 2, 2**64 - 1], np.array([5, kp.BLOCKS + 7, 1, 2])):
            for to_pool in (True, False):
                with pytest.raises(BlockIdError, match="out of range: 40 blocks are registered") as err:
                    request(bad, to_pool)
                assert err.value.out_of_range
        with pytest.raises(BlockIdError, match="1 chunks need 4 block ids") as err:
            request([1, 2, 3], False)
        assert not err.value.out_of_range
        with pytest.raises(BlockIdError, match="skip_blocks 4 must be in 0..3"):
            request([1, 2, 3, 4], False, 4)
        torch.cuda.synchronize()
        assert torch.equal(kv.buffer, before_kv) and torch.equal(rig.pool.tensor, before_pool)


def test_page_kernel_refuses_what_it_cannot_copy(functions: KernelFunctions) -> None:
    from tests.gpu import kv_pages as kp

    kv = kp.build_kv(kp.Geometry("LBHNC"))
    address = kv.buffer.data_ptr()
    for args, match in [(([], 4, 64, 64, 2), "no KV planes"), (([address], 0, 64, 64, 2), "must be positive"),
                        (([address], 4, 0, 64, 2), "must be positive"), (([address], 4, 64, 64, 0), "must be positive"),
                        (([address], 4, 64, 32, 2), "block_stride 32 is smaller than page_bytes 64")]:
        with pytest.raises(KernelInputError, match=match):
            PageKernel(functions, *args)  # type: ignore[arg-type]
    kernel = PageKernel(functions, [address], 4, 64, 64, 2)
    try:
        assert kernel.vec16 and kernel.chunk_bytes == 128
        with pytest.raises(KernelInputError, match="16-byte aligned"):
            kernel.check_buffer(address + 8)
    finally:
        kernel.close()
