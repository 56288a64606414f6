"""The staged copy: the one GPU data plane, used by the server (server copies) and by a worker
(worker copies through the shared pool) alike.

Each chunk crosses PCIe as ONE contiguous DMA copy (``cuMemcpyAsync``) between its pool slot and
a staging buffer in GPU memory (contiguous DMA copies are what the link does best), and the page
kernel (``PageKernel``, every SM, microseconds per chunk) moves the chunk's pages between that
buffer and the KV blocks inside GPU memory::

    store   kernel stream:  wait(freed[b]) pages -> buffer b  record(filled[b])
            DMA stream:                      wait(filled[b]) buffer b -> slot  record(freed[b])
    load    DMA stream:     wait(freed[b]) slot -> buffer b   record(filled[b])
            kernel stream:                   wait(filled[b]) buffer b -> pages  record(freed[b])

Up to ``stages`` chunks are in flight (one buffer each, used in turn across requests); under an
engine's compute the kernels wait for time slices, and chunks staged ahead keep the link busy
meanwhile. The host only queues driver calls; nothing here waits.

Ordering with the inference engine: ``after`` (an event the engine recorded after its work so far)
comes before the first step that touches the KV blocks: the first gather of a store, the first
scatter of a load (whose slots cross into the buffers meanwhile). A copy ends with its ``done``
event, recorded on the stream of its last step; the DMA stream then goes on only after it, so
copies end in the order they were queued, and the caller's ``then`` events, recorded there, mark
the end of this copy and of every earlier one. A load's reader waits on either before it reads
the blocks.

Ownership: one pipeline per KV registration and device; ``copy`` is called by one thread at a
time (the server's loop, or the vLLM worker); ``seconds`` may be called from another thread.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lmcd import cudadrv
from lmcd.cudadrv import CudaError
from lmcd.kernels import PageKernel

log = logging.getLogger("lmcd.kernels")
STAGE_BYTES = 256 << 20  # staging memory per registration: chunks in flight = STAGE_BYTES // chunk bytes, 2..8
HEADROOM_BYTES = 256 << 20  # free GPU memory the staging buffers leave alone (or a quarter of it, if less)
TIMED = cudadrv.CU_EVENT_BLOCKING_SYNC  # start/done events: timing on, host waits yield


def stages_for(chunk_bytes: int) -> int:
    """Staging buffers (chunks in flight) for chunks of ``chunk_bytes``: 8 for Llama-3-8B's 32 MiB."""
    return max(2, min(8, STAGE_BYTES // chunk_bytes))


class StagingMemoryError(RuntimeError):
    """Not even one staging buffer fits in the GPU's free memory; the message says how much was needed."""


@dataclass(slots=True)
class CopyEvents:
    """The events of one copy on the GPU: its start and end (timing events), recycled by ``seconds``."""

    start: int
    done: int
    after: int  # no timing: an engine's mark the copy waits for, recorded by a caller that queues it later
    queued: bool = True  # False while a caller still queues its chunks (``done`` is not recorded yet)
    failed: bool = False  # its queueing failed: nothing it copied may be used


class StagedPipeline:
    """The staged copy of one KV registration (module docstring); it owns ``kernel`` from here on, and
    keeps up to ``stages`` staging buffers: fewer where the GPU's free memory, less some headroom for
    the engine, holds fewer; StagingMemoryError where it holds not one."""

    def __init__(self, kernel: PageKernel, stages: int) -> None:
        self.kernel = kernel
        self.chunk_bytes = kernel.chunk_bytes
        self.context = cudadrv.current_context()
        self.buffers: list[cudadrv.DeviceBuffer] = []
        self._streams: list[int] = []
        self._events: list[int] = []
        try:
            self.kernel_stream, self.dma_stream = cudadrv.stream_create(), cudadrv.stream_create()
            self._streams = [self.kernel_stream, self.dma_stream]
            # leave the GPU a quarter of its free memory (at most 256 MiB): what the engine may still need
            free = cudadrv.free_memory()
            fits = (free - min(HEADROOM_BYTES, free // 4)) // self.chunk_bytes
            for _ in range(max(0, min(stages, fits))):
                try:
                    self.buffers.append(cudadrv.DeviceBuffer(self.chunk_bytes))
                except CudaError as exc:  # another process took memory meanwhile
                    if exc.result != cudadrv.CUDA_ERROR_OUT_OF_MEMORY:
                        raise
                    break
            if not self.buffers:
                raise StagingMemoryError(f"the GPU has {free / 2**20:.0f} MiB free, too little for one staging "
                                         f"buffer of {self.chunk_bytes / 2**20:.1f} MiB (one chunk) and headroom")
            for buffer in self.buffers:
                kernel.check_buffer(buffer.address)
            self.stages = len(self.buffers)
            self._filled = [self._event() for _ in self.buffers]
            self._freed = [self._event() for _ in self.buffers]
        except BaseException:
            self.close()
            raise
        self._spare: collections.deque[CopyEvents] = collections.deque()  # recycled by seconds()
        self._next = 0

    def _event(self, flags: int = cudadrv.CU_EVENT_DISABLE_TIMING) -> int:
        event = cudadrv.event_create(flags)
        self._events.append(event)
        return event

    def copy(self, slot_addresses: Sequence[int], blocks: np.ndarray, to_pool: bool, skip_blocks: int = 0,
             after: int = 0, then: Sequence[int] = ()) -> CopyEvents:
        """Queue the copy of ``len(slot_addresses)`` chunks (into the pool if ``to_pool``, else out of
        it); ``blocks``: the chunks' block ids as ``lmcd.copyplan.check_blocks`` returns them;
        ``skip_blocks``: leading blocks of the first chunk left alone. See the module docstring for
        ``after`` and ``then``."""
        events = self.new_events()
        self.begin(events, to_pool, after)
        for c, slot in enumerate(slot_addresses):
            self.chunk(slot, blocks[c], to_pool, skip_blocks if c == 0 else 0, after if c == 0 else 0)
        self.end(events, to_pool, then)
        return events

    # A copy queued in parts (``copy`` is the three in a row): ``begin``, then ``chunk`` per chunk in
    # order, then ``end``; a caller may queue a long copy a chunk at a time (lmcd.connector.cuda).

    def new_events(self) -> CopyEvents:
        try:
            events = self._spare.pop()
        except IndexError:
            return CopyEvents(self._event(TIMED), self._event(TIMED), self._event())
        events.queued, events.failed = True, False
        return events

    def begin(self, events: CopyEvents, to_pool: bool, after: int = 0) -> None:
        """Start a copy: a store's first gather waits for ``after``."""
        first = self.kernel_stream if to_pool else self.dma_stream
        if to_pool and after:
            cudadrv.stream_wait(first, after)  # the gathers read what the engine wrote
        cudadrv.event_record(events.start, first)

    def chunk(self, slot: int, blocks: np.ndarray, to_pool: bool, skip_blocks: int = 0, after: int = 0) -> None:
        """Queue one chunk of the copy begun last; a load's first chunk scatters after ``after``."""
        kernel, chunk_bytes = self.kernel, self.chunk_bytes
        # the first step of each chunk runs on `first`, the second on `second`
        first, second = (self.kernel_stream, self.dma_stream) if to_pool else (self.dma_stream, self.kernel_stream)
        b = self._next
        self._next = (b + 1) % self.stages
        buffer = self.buffers[b].address
        cudadrv.stream_wait(first, self._freed[b])  # the buffer's previous chunk has left it
        if to_pool:
            kernel.launch(buffer, blocks, 0, True, first)
        else:
            cudadrv.memcpy_async(buffer, slot, chunk_bytes, first)
        cudadrv.event_record(self._filled[b], first)
        cudadrv.stream_wait(second, self._filled[b])
        if to_pool:
            cudadrv.memcpy_async(slot, buffer, chunk_bytes, second)
        else:
            if after:
                cudadrv.stream_wait(second, after)  # the scatters write blocks the engine may still read
            kernel.launch(buffer, blocks, skip_blocks, False, second)
        cudadrv.event_record(self._freed[b], second)

    def end(self, events: CopyEvents, to_pool: bool, then: Sequence[int] = ()) -> None:
        second = self.dma_stream if to_pool else self.kernel_stream
        cudadrv.event_record(events.done, second)
        if second != self.dma_stream:  # the DMA stream goes on after the load's end: copies end in order
            cudadrv.stream_wait(self.dma_stream, events.done)
        for event in then:
            cudadrv.event_record(event, self.dma_stream)

    def seconds(self, *copies: CopyEvents) -> float:
        """How long the finished copies took on the GPU, from the first one's start to the last one's
        end (one store queued as several copies); their events go back for reuse."""
        seconds = cudadrv.elapsed_seconds(copies[0].start, copies[-1].done)
        self._spare.extend(copies)
        return seconds

    def close(self) -> None:
        """Wait for copies in flight, then free everything, the kernel's memory too (the context must
        be current)."""
        for stream in self._streams:
            cudadrv.stream_synchronize(stream)
        for buffer in self.buffers:
            buffer.free()
        for stream in self._streams:
            cudadrv.stream_destroy(stream)
        for event in self._events:
            cudadrv.event_destroy(event)
        self.buffers, self._streams, self._events = [], [], []
        self.kernel.close()
