"""CPU transfers: copies between a worker's mapped KV pages and pool slots, off the loop.

A chunk occupies one slot laid out layer-major, so that a run of consecutive engine blocks
of one layer becomes one copy::

    slot:  | layer 0: page k=0 | k=1 | ... | k=bpc-1 | layer 1: k=0 | ... |   (bpc = blocks per chunk)
    page (chunk j, layer l, k)  <->  engine page (l, block_ids[j*bpc + k])

``plan`` turns a request into (source, destination, size) triples with numpy, merging
neighbours that are contiguous on both sides; ``CopyEngine`` splits the triples by bytes
over a few threads that call ``ctypes.memmove`` (which releases the GIL) and reports the
end of the whole request through a callback.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from lmcd.protocol import KVLayout

memmove = ctypes.memmove
MIN_BYTES_PER_THREAD = 4 << 20


@dataclass(slots=True)
class CopyPlan:
    src: np.ndarray
    dst: np.ndarray
    size: np.ndarray

    @property
    def num_bytes(self) -> int:
        return int(self.size.sum())


def plan(
    layout: KVLayout, layer_addresses: np.ndarray, slot_addresses: np.ndarray, block_ids: np.ndarray,
    to_pool: bool, skip_blocks: int = 0,
) -> CopyPlan:
    """Copy triples for chunks at ``slot_addresses`` and their ``block_ids`` (validated by the caller).

    ``skip_blocks`` leaves out the first ``skip_blocks`` blocks of the first chunk (every layer).
    """
    num_chunks = len(slot_addresses)
    bpc = len(block_ids) // num_chunks
    page = layout.page_bytes
    blocks = block_ids.reshape(num_chunks, 1, bpc).astype(np.int64)
    engine = layer_addresses.reshape(1, -1, 1) + blocks * layout.block_stride
    within = (np.arange(layout.num_layers, dtype=np.int64).reshape(1, -1, 1) * bpc
              + np.arange(bpc, dtype=np.int64).reshape(1, 1, -1)) * page
    pool = slot_addresses.reshape(-1, 1, 1).astype(np.int64) + within
    if skip_blocks:
        keep = np.ones(engine.shape, dtype=bool)
        keep[0, :, :skip_blocks] = False
        engine, pool = engine[keep], pool[keep]
    else:
        engine, pool = engine.ravel(), pool.ravel()
    src, dst = (engine, pool) if to_pool else (pool, engine)
    # merge i into i-1 when both sides continue exactly where i-1 ended
    joins = (src[1:] == src[:-1] + page) & (dst[1:] == dst[:-1] + page)
    starts = np.flatnonzero(np.concatenate(([True], ~joins)))
    sizes = np.diff(np.append(starts, len(src))) * page
    return CopyPlan(src[starts], dst[starts], sizes.astype(np.int64))


def _chop(copy_plan: CopyPlan, max_piece: int) -> CopyPlan:
    """Split runs longer than ``max_piece`` so that one long run can be shared by threads."""
    pieces = -(-copy_plan.size // max_piece)
    if int(pieces.max()) <= 1:
        return copy_plan
    run = np.repeat(np.arange(len(pieces)), pieces)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    offset = (np.arange(len(run)) - first) * max_piece
    size = np.minimum(copy_plan.size[run] - offset, max_piece)
    return CopyPlan(copy_plan.src[run] + offset, copy_plan.dst[run] + offset, size)


def _run(src: list[int], dst: list[int], size: list[int]) -> None:
    for s, d, n in zip(src, dst, size, strict=True):
        memmove(d, s, n)


def run_plan(copy_plan: CopyPlan) -> None:
    """Execute ``copy_plan`` on the calling thread (a worker copying itself: vLLM's own threads
    are bound to its cores, so extra copy threads would only compete with them)."""
    _run(copy_plan.src.tolist(), copy_plan.dst.tolist(), copy_plan.size.tolist())


class CopyEngine:
    """A few threads that execute copy plans. ``submit`` returns at once; ``done(error, seconds)``
    is called exactly once per plan, from a copy thread, when every piece has finished."""

    def __init__(self, num_threads: int) -> None:
        self.num_threads = max(1, num_threads)
        self._executor = ThreadPoolExecutor(self.num_threads, thread_name_prefix="lmcd-copy")

    def submit(self, copy_plan: CopyPlan, done: Callable[[BaseException | None, float], None]) -> None:
        started = time.perf_counter()
        parts = self._split(copy_plan)
        remaining = [len(parts)]
        errors: list[BaseException] = []
        lock = threading.Lock()

        def run_part(src: list[int], dst: list[int], size: list[int]) -> None:
            try:
                _run(src, dst, size)
            except BaseException as exc:  # reported through done(); the loop replies with it
                errors.append(exc)
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                done(errors[0] if errors else None, time.perf_counter() - started)

        for part in parts:
            self._executor.submit(run_part, *part)

    def _split(self, copy_plan: CopyPlan) -> list[tuple[list[int], list[int], list[int]]]:
        total = copy_plan.num_bytes
        num_parts = int(min(self.num_threads, max(1, total // MIN_BYTES_PER_THREAD), len(copy_plan.size)))
        if num_parts <= 1:
            return [(copy_plan.src.tolist(), copy_plan.dst.tolist(), copy_plan.size.tolist())]
        copy_plan = _chop(copy_plan, -(-total // num_parts))
        ends = np.cumsum(copy_plan.size)
        cuts = np.searchsorted(ends, [total * i // num_parts for i in range(1, num_parts)], side="right")
        bounds = [0, *sorted(set(int(c) for c in cuts)), len(copy_plan.size)]
        return [
            (copy_plan.src[a:b].tolist(), copy_plan.dst[a:b].tolist(), copy_plan.size[a:b].tolist())
            for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a
        ]

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
