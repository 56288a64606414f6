"""vLLM's KV tensors as pages: where each page lives (``describe_pages``), and moving them into SHM.

``describe_pages`` turns the tensors into a ``KVLayout``: in each layer's tensor the dimension
whose size is the number of blocks is the block dimension; every index of the dimensions before
it is one *plane* (e.g. K and V in a ``[2, blocks, ...]`` layout), and the dimensions after it
must cover one dense run of memory, in any dim order (one page, ``dense``)::

    layer tensor [outer..., num_blocks, inner...]  ->  planes = product(outer)
    page (plane, block b) = inner bytes at plane_offset + b * block_stride

Offsets count from the start of the memory segment that holds the plane: an SHM segment, a
CUDA allocation, or (a worker that copies itself) the tensor's own storage.

``migrate_to_shm`` gives every backing storage of the KV tensors a shared memory twin (a sealed
memfd, ``lmcd.shm.ShmSegment``; copying what is there) and re-points each tensor at it in place
(``Tensor.set_``), so that every reference vLLM holds reads and writes shared pages. It runs at
registration only, before vLLM has run a step, never later in a run.

Torch is imported here; this module runs inside vLLM, never in the server.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence

import torch

from lmcd import protocol as p
from lmcd.shm import ShmSegment

log = logging.getLogger("lmcd.connector")


class LayoutError(ValueError):
    """KV tensors this connector cannot describe or share; the message says what was found."""


def storages(kv_caches: Mapping[str, torch.Tensor]) -> tuple[list[int], list[int]]:
    """(start address, bytes) of every distinct storage under the KV tensors, in first-seen order."""
    found = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kv_caches.values()}
    return list(found), list(found.values())


def dense(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether dims of ``shape`` with ``strides`` (in elements) cover one gap-free run of
    ``prod(shape)`` elements, in any dim order: a page is copied as bytes, so vLLM may order its
    dims as it likes: vLLM 0.32's GPU FLASH_ATTN layers are ``[blocks, 8, 16, 256]`` views with
    strides ``[32768, 256, 2048, 1]``, heads and tokens swapped over a dense 64 KiB page)."""
    expected = 1
    for size, stride in sorted((d for d in zip(shape, strides, strict=True) if d[0] != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def describe_pages(kv_caches: Mapping[str, torch.Tensor], starts: list[int], sizes: list[int], num_blocks: int,
                   block_size: int) -> p.KVLayout:
    """The page geometry of ``kv_caches``, with every plane's offset into the memory segment
    (starting at ``starts[i]``, ``sizes[i]`` bytes) that holds it."""
    offsets: list[int] = []
    segments: list[int] = []
    page_bytes = block_stride = None
    for name, tensor in kv_caches.items():
        dims = [d for d, size in enumerate(tensor.shape) if size == num_blocks]
        if not dims:
            raise LayoutError(f"{name} has shape {tuple(tensor.shape)}: no dimension of {num_blocks} blocks")
        b = dims[0]
        item = tensor.element_size()
        inner = tensor.shape[b + 1 :]
        if not dense(inner, tensor.stride()[b + 1 :]):
            raise LayoutError(f"{name}: a page (dims after the block dim, shape {tuple(inner)}) is not one "
                              f"dense run of memory: strides {tensor.stride()}")
        this_page, this_stride = math.prod(inner) * item, tensor.stride(b) * item
        if page_bytes is None:
            page_bytes, block_stride = this_page, this_stride
        elif (page_bytes, block_stride) != (this_page, this_stride):
            raise LayoutError(f"{name}: page {this_page} B / stride {this_stride} B differ from other layers'")
        base = tensor.data_ptr()
        segment = next((i for i, start in enumerate(starts) if start <= base < start + sizes[i]), None)
        if segment is None:
            raise LayoutError(f"{name} does not live in the memory segments described (share it first)")
        for outer in itertools.product(*(range(n) for n in tensor.shape[:b])):
            plane = base + sum(i * s for i, s in zip(outer, tensor.stride()[:b], strict=True)) * item
            offsets.append(plane - starts[segment])
            segments.append(segment)
    if page_bytes is None or block_stride is None:
        raise LayoutError("no KV tensors to describe")
    return p.KVLayout(len(kv_caches), num_blocks, block_size, page_bytes, block_stride, offsets, segments)


def migrate_to_shm(kv_caches: Mapping[str, torch.Tensor]) -> list[ShmSegment]:
    """Back every distinct storage of ``kv_caches`` by SHM, re-pointing the tensors in place."""
    segments: dict[int, tuple[ShmSegment, torch.UntypedStorage]] = {}
    for name, tensor in kv_caches.items():
        if tensor.device.type != "cpu":
            raise LayoutError(f"{name} is on {tensor.device}; the CPU shared-memory path needs CPU KV tensors")
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in segments:
            seg = ShmSegment(storage.nbytes())
            shared = torch.frombuffer(seg.mapping, dtype=torch.uint8)
            shared.copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
            segments[key] = (seg, shared.untyped_storage())
            log.info("Migrated CPU KV cache tensor (nbytes=%d) to SHM %s", storage.nbytes(), seg.name)
        _, shared_storage = segments[key]
        with torch.no_grad():
            tensor.set_(shared_storage, tensor.storage_offset(), tensor.size(), tensor.stride())
    return [seg for seg, _ in segments.values()]
