"""Worker-side CUDA: the KV shared with the server over CUDA IPC (``CudaShare``, server copies), or
this worker's own copies through the server's shared pool (``PoolCopier``, worker copies).

``CudaShare`` exports the allocation under every KV view once (``cuMemGetAddressRange``: usually
ONE buffer for all layers); memory from CUDA's VMM API (vLLM's sleep mode, PyTorch's
``expandable_segments``) cannot be exported and is refused with the setting named. Its events
order the server's copies with the engine's stream: ``before_copy`` marks the stream's work so
far (the server's copy waits on it), ``after_load`` makes the stream wait for the server's copy,
``stores_done`` polls the server's event. ``PoolCopier`` runs the staged copy in this process,
queueing a long store a few chunks at a time (its docstring says why).

Torch is imported here; this module runs inside vLLM (or a test harness), never in the server.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lmcd import cudadrv
from lmcd.cudadrv import CudaError, check, driver
from lmcd.kernels import PageKernel, nvrtc_functions
from lmcd.kernels.staged import CopyEvents, StagedPipeline, StagingMemoryError, stages_for

CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE = 10
IPC_HANDLE_BYTES = 64
log = logging.getLogger("lmcd.connector")
VMM_ADVICE = ("vLLM allocated its KV cache with CUDA's virtual memory API, which legacy CUDA IPC cannot share: "
              "start vLLM without --enable-sleep-mode and without PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, "
              "or start the server with --share-pool (lmcache.mp.mp_transfer_mode auto or lmcache_driven), where "
              "the worker copies itself and no KV memory is shared")


class CudaShareError(ValueError):
    """KV memory this connector cannot share with the server; the message says why and what to do."""


class PoolCopierError(RuntimeError):
    """This worker cannot copy through the shared pool itself; the message says why."""


def ipc_capable(address: int) -> bool:
    """Whether legacy CUDA IPC can export the allocation holding ``address`` (not VMM memory)."""
    capable = ctypes.c_uint32(0)
    check(driver().cuPointerGetAttribute(ctypes.byref(capable), CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
                                         ctypes.c_uint64(address)), "cuPointerGetAttribute", CudaShareError)
    return bool(capable.value & 0xFF)


def allocation_of(address: int) -> tuple[int, int]:
    """(base, size) of the CUDA allocation holding ``address``."""
    base, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
    check(driver().cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(address)),
          "cuMemGetAddressRange", CudaShareError)
    return base.value, size.value


def ipc_handle(base: int) -> bytes:
    handle = (ctypes.c_char * IPC_HANDLE_BYTES)()
    check(driver().cuIpcGetMemHandle(handle, ctypes.c_uint64(base)), "cuIpcGetMemHandle", CudaShareError)
    return bytes(handle)


def device_pci(device: int) -> str:
    props = torch.cuda.get_device_properties(device)
    domain, bus, dev = (int(getattr(props, name)) for name in ("pci_domain_id", "pci_bus_id", "pci_device_id"))
    return f"{domain:04x}:{bus:02x}:{dev:02x}"


def kv_device(kv_caches: Mapping[str, torch.Tensor]) -> int:
    """The one CUDA device of the KV tensors, made current on this thread with its primary context."""
    devices = {t.device for t in kv_caches.values()}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        raise CudaShareError(f"the KV tensors must all be on one CUDA device, found {sorted(map(str, devices))}")
    device = next(iter(devices)).index or 0
    torch.cuda.set_device(device)
    torch.cuda.synchronize(device)  # the primary context is current on this thread from here
    return device


def current_stream(device: int) -> int:
    return int(torch.cuda.current_stream(device).cuda_stream)


class CudaShare:
    """One worker's KV allocations, exported once (``export``), and the two interprocess events."""

    def __init__(self, kv_caches: Mapping[str, torch.Tensor], device: int) -> None:
        self.device = device
        ranges: dict[int, int] = {}
        for tensor in kv_caches.values():
            base, size = allocation_of(tensor.data_ptr())
            ranges[base] = size
        self.starts = sorted(ranges)
        self.sizes = [ranges[b] for b in self.starts]
        self.pci = device_pci(device)
        self.handles: list[bytes] = []
        self.event_handle = b""
        self.server_event: torch.cuda.Event | None = None
        self.stores_pending = False

    def export(self) -> None:
        """The IPC handles of the allocations and of the worker's event; refuses memory legacy IPC cannot
        export, naming the vLLM setting to change."""
        if self.handles:
            return
        if not all(ipc_capable(base) for base in self.starts):
            raise CudaShareError(VMM_ADVICE)
        self.handles = [ipc_handle(b) for b in self.starts]
        self.worker_event = torch.cuda.Event(enable_timing=False, blocking=False, interprocess=True)
        self.worker_event.record(torch.cuda.current_stream(self.device))
        self.event_handle = bytes(self.worker_event.ipc_handle())

    def open_server_event(self, handle: bytes) -> None:
        self.server_event = torch.cuda.Event.from_ipc_handle(self.device, handle)

    def before_copy(self) -> None:
        """Mark the current stream's work so far: the server's copy starts after it. (The driver is
        called directly: this is on the request's critical path.)"""
        cudadrv.event_record(self.worker_event.cuda_event, current_stream(self.device))

    def after_load(self) -> None:
        """Make the current stream (the forward) wait for the server's copy, on the GPU."""
        assert self.server_event is not None
        cudadrv.stream_wait(current_stream(self.device), self.server_event.cuda_event)

    def stores_done(self) -> bool:
        """Whether every store sent so far has finished on the GPU (polls; never blocks)."""
        if self.stores_pending and self.server_event is not None and self.server_event.query():
            self.stores_pending = False
        return not self.stores_pending

    def fence_stores(self) -> None:
        """The current stream waits (on the GPU) for stores in flight: their blocks may be rewritten next."""
        if self.stores_pending and self.server_event is not None:
            cudadrv.stream_wait(current_stream(self.device), self.server_event.cuda_event)


STORE_WINDOW = 1  # chunks of a worker's store queued on the GPU at a time (PoolCopier; measured in vLLM)


@dataclass(slots=True)
class _Store:
    """A store of PoolCopier still being queued: its chunks from ``next`` on are not on the GPU yet."""

    events: CopyEvents
    addresses: list[int]
    blocks: np.ndarray
    next: int = 0


class PoolCopier:
    """This worker's own copies between its KV blocks and the server's shared pool (worker copies on CUDA).

    The pool (mapped from SHM by the caller) is registered with CUDA here, so that a slot is a DMA
    target, and the staged copy runs in this process: lmcd's page kernel, compiled here by NVRTC
    (vLLM has no CuPy), with staging buffers in this GPU's memory. ``store``/``load`` return the
    copy's events; the caller polls ``done`` and reads ``seconds`` once it has.

    A store is queued ``window`` chunks (1) at a time: while a store's copies are queued back to
    back on our DMA stream, the GPU holds back the copies of the engine's own streams in this
    process (vLLM's input and output copies) until none is left, so vLLM's next step waited for a
    whole store, 28 ms at 16K tokens. Measured (benchmarks/worker_copy_overlap.py,
    docs/BENCHMARKS.md): an engine step right after a 2 GiB store queued whole waits 28 ms, on
    every stream and with CUDA_DEVICE_MAX_CONNECTIONS=32 alike; queued 1, 2, 4 or 8 chunks at a
    time, it waits < 1.5 ms (the store runs at 45-52 GB/s rather than 55). The call queues the
    first chunks; a feeder thread queues the next ones once the last queued has left the GPU (it
    waits on its own blocking-sync event without the GIL; queueing a chunk takes microseconds). A
    load is queued whole at once (the forward waits for all of it), between the chunks of a
    store; stores stay in order. One lock covers every queueing.
    """

    def __init__(self, device: int, planes: Sequence[int], num_blocks: int, page_bytes: int, block_stride: int,
                 blocks_per_chunk: int, pool_address: int, pool_bytes: int, window: int = STORE_WINDOW) -> None:
        self.device = device
        self.pool_address = pool_address
        self.pipeline: StagedPipeline | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a store to queue came, or one is fully queued
        self._stores: collections.deque[_Store] = collections.deque()  # partly queued, in order
        self._feeder: threading.Thread | None = None
        self._stopping = False
        # recorded after each chunk of a store, waited on by the feeder (never recorded again while pending)
        self._progress = 0
        self._engine_mark = 0  # a load's mark on the engine's stream, waited for as it is queued
        started = time.monotonic()
        try:
            cudadrv.host_register(pool_address, pool_bytes)
        except CudaError as exc:
            raise PoolCopierError(f"cannot register the shared pool with CUDA: {exc}") from None
        log.info("Registered the server's shared pool (%.1f GiB) with CUDA in %.2f s: this worker copies between "
                 "its KV blocks and the pool itself", pool_bytes / 2**30, time.monotonic() - started)
        try:
            major, minor = torch.cuda.get_device_capability(device)
            kernel = PageKernel(nvrtc_functions(device, f"sm_{major}{minor}"), planes, num_blocks, page_bytes,
                                block_stride, blocks_per_chunk)
            self.pipeline = StagedPipeline(kernel, stages_for(kernel.chunk_bytes))
            self._progress = cudadrv.event_create(cudadrv.CU_EVENT_DISABLE_TIMING | cudadrv.CU_EVENT_BLOCKING_SYNC)
            self._engine_mark = cudadrv.event_create()
        except (CudaError, StagingMemoryError) as exc:
            self.close()
            raise PoolCopierError(f"{exc}; lower vLLM's --gpu-memory-utilization a little if the GPU is full"
                                  if isinstance(exc, StagingMemoryError) else str(exc)) from None
        except BaseException:
            self.close()  # the pool is never left registered with CUDA
            raise
        self.window = max(1, min(window, self.pipeline.stages))
        log.info("Staging %d chunks of %.1f MiB in GPU memory for this worker's own copies (a store goes %d chunks "
                 "ahead of the GPU)", self.pipeline.stages, self.pipeline.chunk_bytes / 2**20, self.window)

    def store(self, slots: Sequence[int], blocks: np.ndarray) -> CopyEvents:
        """Copy the chunks' blocks into the pool ``slots`` (after the engine's work so far)."""
        pipeline = self.pipeline
        assert pipeline is not None
        with self._lock:
            events = pipeline.new_events()
            cudadrv.event_record(events.after, current_stream(self.device))  # the step that wrote the blocks
            store = _Store(events, [self.pool_address + slot for slot in slots], blocks)
            events.queued = False
            if not self._stores:
                self._queue(store, self.window)
                if not events.queued:
                    self._mark_progress()  # every earlier record has been waited for: no store was fed
            if not events.queued:
                self._stores.append(store)
                self._start_feeder()
                self._changed.notify_all()
        return events

    def load(self, slots: Sequence[int], blocks: np.ndarray, skip_blocks: int) -> CopyEvents:
        """Copy the pool ``slots`` into the chunks' blocks, leaving out the first ``skip_blocks`` of the
        first; the engine's stream waits for it (on the GPU) before its next work."""
        pipeline = self.pipeline
        assert pipeline is not None
        engine = current_stream(self.device)
        with self._lock:
            # kernels queued so far use the target blocks (the pool's chunks cross into the buffers meanwhile)
            cudadrv.event_record(self._engine_mark, engine)
            events = pipeline.copy([self.pool_address + slot for slot in slots], blocks, False, skip_blocks,
                                   after=self._engine_mark)
        cudadrv.stream_wait(engine, events.done)  # the forward reads the blocks after the copy
        return events

    def _queue(self, store: _Store, chunks: int) -> None:
        """Queue up to ``chunks`` more chunks of ``store`` (the lock is held); it ends once all are."""
        pipeline = self.pipeline
        assert pipeline is not None
        try:
            if store.next == 0:
                pipeline.begin(store.events, True, store.events.after)
            end = min(len(store.addresses), store.next + chunks)
            for c in range(store.next, end):
                pipeline.chunk(store.addresses[c], store.blocks[c], True)
            store.next = end
            if end == len(store.addresses):
                pipeline.end(store.events, True)
                store.events.queued = True
        except CudaError:
            store.events.failed = store.events.queued = True  # never committed (``failed``)
            raise

    def _mark_progress(self) -> None:
        """Record the feeder's event after the chunks queued so far (the lock is held). A blocking-sync
        event recorded again while its last record is pending makes the host wait, so it is recorded
        only where its last record has been waited for: by the feeder, or while no store is fed."""
        assert self.pipeline is not None
        cudadrv.event_record(self._progress, self.pipeline.dma_stream)

    def _start_feeder(self) -> None:
        if self._feeder is None:
            self._feeder = threading.Thread(target=self._feed, name="lmcd-store-feeder", daemon=True)
            self._feeder.start()

    def _feed(self) -> None:
        """The feeder thread: queues each store's next chunk once the one before has left the GPU;
        a store leaves ``_stores`` once its last chunk has (``_mark_progress``)."""
        pipeline = self.pipeline
        assert pipeline is not None
        cudadrv.set_context(pipeline.context)
        while True:
            with self._lock:
                while not self._stores and not self._stopping:
                    self._changed.wait()
                if not self._stores:
                    return
                store = self._stores[0]
            try:
                cudadrv.event_synchronize(self._progress)  # without the lock and the GIL: loads go on meanwhile
                with self._lock:
                    if store.events.queued:
                        self._stores.popleft()
                        self._changed.notify_all()
                    else:
                        self._queue(store, self.window)
                        self._mark_progress()  # waited for next, also after the last chunk
            except CudaError as exc:
                log.error("Queueing a store on the GPU failed: %s; it is not committed (vLLM recomputes)", exc)
                with self._lock:
                    for failed in self._stores:
                        failed.events.failed = failed.events.queued = True
                    self._stores.clear()
                    self._changed.notify_all()

    def _wait_queued(self, events: CopyEvents) -> None:
        with self._lock:
            while not events.queued:
                self._changed.wait()

    @staticmethod
    def done(events: CopyEvents) -> bool:
        return events.queued and cudadrv.event_done(events.done)

    def seconds(self, *copies: CopyEvents) -> float:
        """From the first copy's start to the last one's end, on the GPU (all of them finished)."""
        assert self.pipeline is not None
        if any(copy.failed for copy in copies):
            return 0.0
        return self.pipeline.seconds(*copies)

    def fence(self, events: CopyEvents) -> None:
        """The current stream waits (on the GPU) for this copy (once it is queued: the host may wait)."""
        self._wait_queued(events)
        cudadrv.stream_wait(current_stream(self.device), events.done)

    def synchronize(self) -> None:
        """Wait until every copy asked for so far has ended."""
        with self._lock:
            while self._stores:
                self._changed.wait()
        torch.cuda.synchronize(self.device)

    def close(self) -> None:
        self.synchronize()
        if self._feeder is not None:
            with self._lock:
                self._stopping = True
                self._changed.notify_all()
            self._feeder.join()
            self._feeder = None
        for event in (self._progress, self._engine_mark):
            if event:
                cudadrv.event_destroy(event)
        self._progress = self._engine_mark = 0
        if self.pipeline is not None:
            self.pipeline.close()
            self.pipeline = None
        if self.pool_address:
            cudadrv.host_unregister(self.pool_address)
            self.pool_address = 0
