"""What a copy between a worker's KV blocks and pool slots moves: block ids checked, then the CPU plan.

Both sides use it: the server for the copies it makes (server copies), a worker for the copies it
makes itself through the shared pool (worker copies), and the GPU pipeline for its block check.

A chunk occupies one slot laid out plane-major, so that a run of consecutive engine blocks of
one plane becomes one copy::

    slot:  | plane 0: page k=0 | k=1 | ... | k=bpc-1 | plane 1: k=0 | ... |   (bpc = blocks per chunk)
    page (chunk j, plane p, k)  <->  KV page (p, blocks[j, k])

``plan`` turns a request into (source, destination, size) triples with numpy, merging
neighbours that are contiguous on both sides; ``split`` cuts a plan into parts of about equal
bytes for several threads; ``run`` executes a plan with ``ctypes.memmove`` (which releases the
GIL) on the calling thread.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lmcd.protocol import KVLayout

memmove = ctypes.memmove


class BlockIdError(ValueError):
    """Block ids a copy must not use; the message says what was wrong and what is registered.
    ``out_of_range``: an id beyond the registered blocks (else the count or ``skip_blocks`` was wrong)."""

    def __init__(self, message: str, out_of_range: bool = False) -> None:
        super().__init__(message)
        self.out_of_range = out_of_range


def check_blocks(block_ids: Sequence[int] | np.ndarray, num_chunks: int, blocks_per_chunk: int, num_blocks: int,
                 skip_blocks: int = 0) -> np.ndarray:
    """The block ids of a copy of ``num_chunks`` chunks as an int64 ``[num_chunks, blocks_per_chunk]``
    array, checked before anything is copied: ``blocks_per_chunk`` per chunk, each in
    0..num_blocks-1, and ``skip_blocks`` below a chunk's."""
    bpc = blocks_per_chunk
    if len(block_ids) != num_chunks * bpc:
        raise BlockIdError(f"{num_chunks} chunks need {num_chunks * bpc} block ids ({bpc} per chunk), "
                           f"got {len(block_ids)}")
    if not 0 <= skip_blocks < bpc:
        raise BlockIdError(f"skip_blocks {skip_blocks} must be in 0..{bpc - 1}")
    if len(block_ids):
        # Python's min/max before numpy sees the ids: faster for a request's few ids, and an id beyond
        # int64 (msgpack carries up to uint64) is caught here instead of overflowing numpy
        low, high = (int(block_ids.min()), int(block_ids.max())) if isinstance(block_ids, np.ndarray) else (
            min(block_ids), max(block_ids))
        if low < 0 or high >= num_blocks:
            bad = low if low < 0 else high
            raise BlockIdError(f"block id {bad} is out of range: {num_blocks} blocks are registered "
                               f"(0..{num_blocks - 1})", out_of_range=True)
    return np.asarray(block_ids, dtype=np.int64).reshape(num_chunks, bpc)


def plane_addresses(layout: KVLayout, segment_addresses: Sequence[int]) -> np.ndarray:
    """The address of page (plane, block 0) of every plane, from where each memory segment starts."""
    starts = np.asarray(segment_addresses, dtype=np.int64)
    return starts[np.asarray(layout.plane_segments, dtype=np.int64)] + np.asarray(layout.plane_offsets, np.int64)


@dataclass(slots=True)
class CopyPlan:
    src: np.ndarray
    dst: np.ndarray
    size: np.ndarray

    @property
    def num_bytes(self) -> int:
        return int(self.size.sum())


def plan(layout: KVLayout, planes: np.ndarray, slot_addresses: Sequence[int], blocks: np.ndarray, to_pool: bool,
         skip_blocks: int = 0) -> CopyPlan:
    """Copy triples for chunks at ``slot_addresses`` and their ``blocks`` (``check_blocks``' array);
    ``planes`` from ``plane_addresses``. ``skip_blocks`` leaves out the first ``skip_blocks`` blocks
    of the first chunk (every plane)."""
    num_chunks, bpc = blocks.shape
    page = layout.page_bytes
    kv = planes.reshape(1, -1, 1) + blocks.reshape(num_chunks, 1, bpc) * layout.block_stride
    within = (np.arange(layout.num_planes, dtype=np.int64).reshape(1, -1, 1) * bpc
              + np.arange(bpc, dtype=np.int64).reshape(1, 1, -1)) * page
    pool = np.asarray(slot_addresses, dtype=np.int64).reshape(-1, 1, 1) + within
    if skip_blocks:
        keep = np.ones(kv.shape, dtype=bool)
        keep[0, :, :skip_blocks] = False
        kv, pool = kv[keep], pool[keep]
    else:
        kv, pool = kv.ravel(), pool.ravel()
    src, dst = (kv, pool) if to_pool else (pool, kv)
    # merge i into i-1 when both sides continue exactly where i-1 ended
    joins = (src[1:] == src[:-1] + page) & (dst[1:] == dst[:-1] + page)
    starts = np.flatnonzero(np.concatenate(([True], ~joins)))
    sizes = np.diff(np.append(starts, len(src))) * page
    return CopyPlan(src[starts], dst[starts], sizes.astype(np.int64))


def split(copy_plan: CopyPlan, num_parts: int) -> list[CopyPlan]:
    """``copy_plan`` in at most ``num_parts`` parts of about equal bytes; runs longer than a part are
    cut, so that one long run can be shared by several threads."""
    total = copy_plan.num_bytes
    if num_parts <= 1 or total == 0:
        return [copy_plan]
    piece = -(-total // num_parts)
    pieces = -(-copy_plan.size // piece)
    if int(pieces.max()) > 1:
        run_of = np.repeat(np.arange(len(pieces)), pieces)
        first = np.repeat(np.cumsum(pieces) - pieces, pieces)
        offset = (np.arange(len(run_of)) - first) * piece
        size = np.minimum(copy_plan.size[run_of] - offset, piece)
        copy_plan = CopyPlan(copy_plan.src[run_of] + offset, copy_plan.dst[run_of] + offset, size)
    ends = np.cumsum(copy_plan.size)
    cuts = np.searchsorted(ends, [total * i // num_parts for i in range(1, num_parts)], side="right")
    bounds = [0, *sorted({int(c) for c in cuts}), len(copy_plan.size)]
    return [CopyPlan(copy_plan.src[a:b], copy_plan.dst[a:b], copy_plan.size[a:b])
            for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def run(copy_plan: CopyPlan) -> None:
    """Execute ``copy_plan`` on the calling thread."""
    for s, d, n in zip(copy_plan.src.tolist(), copy_plan.dst.tolist(), copy_plan.size.tolist(), strict=True):
        memmove(d, s, n)
