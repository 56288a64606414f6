"""The page gather/scatter kernels, bit-exact against a torch reference (``-m gpu``).

KV tensors are built the way vLLM builds them (one int8 buffer, per-layer views) for every
layout and dtype the server must copy; the pool is pinned host memory used in place.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.gpu.gpu_support import requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]

LAYERS, BLOCKS, BLOCK, HEADS = 4, 40, 16, 8


def _dtype(name: str):  # noqa: ANN202
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}[name]


def layer_shape(layout: str, head_dim: int) -> tuple[int, ...]:
    return {
        "LBHNC": (BLOCKS, HEADS, BLOCK, 2 * head_dim),
        "LBNHC": (BLOCKS, BLOCK, HEADS, 2 * head_dim),
        "MLA": (BLOCKS, 1, BLOCK, 576),
        "KV_SPLIT": (2, BLOCKS, BLOCK, HEADS, head_dim),
    }[layout]


def build_kv(layout: str, dtype_name: str, head_dim: int = 64):  # noqa: ANN201
    """One random int8 buffer and per-layer views into it, as vLLM allocates them."""
    import torch

    dtype = _dtype(dtype_name)
    shape = layer_shape(layout, head_dim)
    layer_bytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    buffer = torch.randint(-128, 128, (LAYERS * layer_bytes,), dtype=torch.int8, device="cuda")
    kv = {f"layers.{i}": buffer[i * layer_bytes:(i + 1) * layer_bytes].view(dtype).view(shape)
          for i in range(LAYERS)}
    return buffer, kv


def planes(kv) -> list:  # noqa: ANN001
    """Every plane's pages as an int8 [blocks, page_bytes] view, in the order describe_pages lists them."""
    import torch

    out = []
    for tensor in kv.values():
        raw = tensor.view(torch.int8) if tensor.element_size() == 1 else tensor
        if tensor.shape[0] == 2 and tensor.dim() == 5:
            out += [tensor[0].reshape(BLOCKS, -1).view(torch.int8), tensor[1].reshape(BLOCKS, -1).view(torch.int8)]
        else:
            out.append(raw.reshape(BLOCKS, -1).view(torch.int8))
    return out


def copier_for(kv, buffer, bpc: int, grid: int = 16, staged: bool = False):  # noqa: ANN001, ANN201
    """(layout, copier, launcher): ``launcher`` is the copier itself, or its ``StagedCopier``."""
    from lmcd.connector.worker import describe_pages
    from lmcd.kernels import PageCopier, StagedCopier

    layout = describe_pages(kv, [buffer.data_ptr()], [buffer.nbytes], BLOCKS, BLOCK)
    bases = [buffer.data_ptr() + off for off in layout.layer_offsets]
    copier = PageCopier(0, bases, layout.num_blocks, layout.page_bytes, layout.block_stride, bpc, grid)
    return layout, copier, StagedCopier(copier, grid, stages=2) if staged else copier  # 3 chunks reuse a buffer


def reference_gather(pl, ids, num_chunks: int, bpc: int):  # noqa: ANN001, ANN201
    import torch

    stacked = torch.stack([p[ids] for p in pl])  # [planes, chunks*bpc, page]
    return stacked.view(len(pl), num_chunks, bpc, -1).permute(1, 0, 2, 3).contiguous().view(-1)


@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
@pytest.mark.parametrize("dtype_name", ["bf16", "fp16", "fp8"])
@pytest.mark.parametrize("layout_name", ["LBHNC", "LBNHC", "MLA", "KV_SPLIT"])
def test_gather_scatter_bit_exact(layout_name: str, dtype_name: str, staged: bool) -> None:
    import cupy
    import torch

    rng = np.random.default_rng()
    buffer, kv = build_kv(layout_name, dtype_name)
    bpc = 4
    layout, copier, launcher = copier_for(kv, buffer, bpc, staged=staged)
    pl = planes(kv)
    assert layout.num_layers == len(pl) and layout.page_bytes == pl[0].shape[1]
    assert copier.vec16
    stream = cupy.cuda.Stream(non_blocking=True)
    for num_chunks in (1, 3, 2):  # one chunk (arguments inside the launch), several; fresh ids and data each
        buffer.random_(-128, 128)
        ids = rng.choice(BLOCKS, 2 * num_chunks * bpc, replace=False)
        src, dst = ids[: num_chunks * bpc], ids[num_chunks * bpc:]
        pool = torch.full((num_chunks * copier.chunk_bytes + 4096,), 0x5A, dtype=torch.int8, pin_memory=True)
        slots = pool.data_ptr() + np.arange(num_chunks, dtype=np.int64) * copier.chunk_bytes
        torch.cuda.synchronize()
        launcher.launch(slots, src, True, stream)
        stream.synchronize()
        expected = reference_gather(pl, torch.as_tensor(src, device="cuda"), num_chunks, bpc).cpu()
        assert torch.equal(pool[: num_chunks * copier.chunk_bytes], expected)
        assert bool((pool[num_chunks * copier.chunk_bytes:] == 0x5A).all()), "gather wrote past the last slot"
        before = [p.clone() for p in pl]
        launcher.launch(slots, dst, False, stream)
        stream.synchronize()
        dst_t, src_t = torch.as_tensor(dst, device="cuda"), torch.as_tensor(src, device="cuda")
        others = torch.as_tensor(np.setdiff1d(np.arange(BLOCKS), dst), device="cuda")
        for plane, old in zip(pl, before, strict=True):
            assert torch.equal(plane[dst_t], old[src_t])
            assert torch.equal(plane[others], old[others]), "scatter touched blocks it was not given"


@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
def test_skip_blocks_leaves_the_first_blocks_alone(staged: bool) -> None:
    import cupy
    import torch

    buffer, kv = build_kv("LBHNC", "bf16")
    bpc = 4
    _, copier, launcher = copier_for(kv, buffer, bpc, staged=staged)
    pl = planes(kv)
    pool = torch.empty(2 * copier.chunk_bytes, dtype=torch.int8, pin_memory=True)
    slots = pool.data_ptr() + np.arange(2, dtype=np.int64) * copier.chunk_bytes
    stream = cupy.cuda.Stream(non_blocking=True)
    torch.cuda.synchronize()
    launcher.launch(slots, np.arange(0, 8), True, stream)
    stream.synchronize()
    before = [p.clone() for p in pl]
    dst = np.arange(20, 28)
    launcher.launch(slots, dst, False, stream, skip_blocks=3)
    stream.synchronize()
    for plane, old in zip(pl, before, strict=True):
        assert torch.equal(plane[20:23], old[20:23]), "skipped blocks were written"
        assert torch.equal(plane[23:28], old[3:8])


def test_unaligned_pages_use_the_byte_kernel() -> None:
    import cupy
    import torch

    # fp8, 1 head, head_dim 3: a page of 16 * 6 = 96 bytes would be aligned; use block 5 -> 30 bytes
    from lmcd.kernels import PageCopier

    blocks, page = 12, 30
    buffer = torch.randint(-128, 128, (2 * blocks * page,), dtype=torch.int8, device="cuda")
    copier = PageCopier(0, [buffer.data_ptr(), buffer.data_ptr() + blocks * page], blocks, page, page, 2)
    assert not copier.vec16
    pool = torch.zeros(2 * copier.chunk_bytes, dtype=torch.int8, pin_memory=True)
    slots = pool.data_ptr() + np.arange(2, dtype=np.int64) * copier.chunk_bytes
    stream = cupy.cuda.Stream(non_blocking=True)
    torch.cuda.synchronize()
    ids = np.array([5, 1, 7, 2])
    copier.launch(slots, ids, True, stream)
    stream.synchronize()
    pl = [buffer[: blocks * page].view(blocks, page), buffer[blocks * page:].view(blocks, page)]
    expected = reference_gather(pl, torch.as_tensor(ids, device="cuda"), 2, 2).cpu()
    assert torch.equal(pool, expected)


@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
def test_out_of_range_block_is_refused_before_launch(staged: bool) -> None:
    import cupy
    import torch

    from lmcd.kernels import KernelInputError

    buffer, kv = build_kv("LBHNC", "bf16")
    _, copier, launcher = copier_for(kv, buffer, 4, staged=staged)
    pool = torch.empty(copier.chunk_bytes, dtype=torch.int8, pin_memory=True)
    stream = cupy.cuda.Stream(non_blocking=True)
    before = buffer.clone()
    for bad in ([0, 1, 2, BLOCKS], [-1, 1, 2, 3]):
        with pytest.raises(KernelInputError, match="out of range"):
            launcher.launch(np.array([pool.data_ptr()]), np.array(bad), False, stream)
    with pytest.raises(KernelInputError, match="block ids"):
        launcher.launch(np.array([pool.data_ptr()]), np.array([1, 2, 3]), False, stream)
    stream.synchronize()
    assert torch.equal(buffer, before)


@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
def test_chunks_with_more_block_ids_than_a_launch_carries(staged: bool) -> None:
    """Small blocks (many per chunk): the block ids go through the argument upload instead."""
    import cupy
    import torch

    from lmcd.kernels import MAX_INLINE_BLOCKS, PageCopier, StagedCopier

    blocks, page, bpc = 600, 64, MAX_INLINE_BLOCKS + 6
    buffer = torch.randint(-128, 128, (2 * blocks * page,), dtype=torch.int8, device="cuda")
    copier = PageCopier(0, [buffer.data_ptr(), buffer.data_ptr() + blocks * page], blocks, page, page, bpc)
    assert not copier.inline
    launcher = StagedCopier(copier, 16, stages=2) if staged else copier
    rng = np.random.default_rng()
    stream = cupy.cuda.Stream(non_blocking=True)
    pl = [buffer[: blocks * page].view(blocks, page), buffer[blocks * page:].view(blocks, page)]
    for num_chunks in (1, 3):  # 3 chunks on 2 buffers: one is reused
        ids = rng.choice(blocks, 2 * num_chunks * bpc, replace=False)
        src, dst = ids[: num_chunks * bpc], ids[num_chunks * bpc:]
        pool = torch.zeros(num_chunks * copier.chunk_bytes, dtype=torch.int8, pin_memory=True)
        slots = pool.data_ptr() + np.arange(num_chunks, dtype=np.int64) * copier.chunk_bytes
        torch.cuda.synchronize()
        launcher.launch(slots, src, True, stream)
        stream.synchronize()
        assert torch.equal(pool, reference_gather(pl, torch.as_tensor(src, device="cuda"), num_chunks, bpc).cpu())
        before = [p.clone() for p in pl]
        launcher.launch(slots, dst, False, stream, skip_blocks=2)
        stream.synchronize()
        dst_t, src_t = torch.as_tensor(dst, device="cuda"), torch.as_tensor(src, device="cuda")
        for plane, old in zip(pl, before, strict=True):
            assert torch.equal(plane[dst_t[2:]], old[src_t[2:]])
            assert torch.equal(plane[dst_t[:2]], old[dst_t[:2]]), "skipped blocks were written"


def test_staged_requests_back_to_back_keep_their_buffers() -> None:
    """A staged request's side stream starts only after the previous request has left the staging
    buffers, even when both wait on an event that is already complete (the worker's event)."""
    import cupy
    import torch

    buffer, kv = build_kv("LBHNC", "bf16")
    bpc, n = 4, 4  # 4 chunks on 2 buffers per request, two requests with no host wait in between
    _, copier, launcher = copier_for(kv, buffer, bpc, staged=True)
    pl = planes(kv)
    rng = np.random.default_rng()
    ids = rng.choice(BLOCKS, 2 * n * bpc, replace=False)
    pool = torch.zeros(2 * n * copier.chunk_bytes, dtype=torch.int8, pin_memory=True)
    first = pool.data_ptr() + np.arange(n, dtype=np.int64) * copier.chunk_bytes
    second = first + n * copier.chunk_bytes
    stream = cupy.cuda.Stream(non_blocking=True)
    worker_event = cupy.cuda.Event(disable_timing=True)
    torch.cuda.synchronize()
    worker_event.record(stream)
    for _ in range(3):
        launcher.launch(first, ids[: n * bpc], True, stream, after=worker_event.ptr)
        launcher.launch(second, ids[n * bpc:], True, stream, after=worker_event.ptr)
        stream.synchronize()
        src = torch.as_tensor(ids, device="cuda")
        assert torch.equal(pool, reference_gather(pl, src, 2 * n, bpc).cpu())
