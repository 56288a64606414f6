"""Worker-side CUDA: the KV shared with the server over CUDA IPC (``CudaShare``, server copies), or
this worker's own copies through the server's shared pool (``PoolCopier``, worker copies).

``CudaShare`` exports the allocation under every KV view once (``cuMemGetAddressRange``: usually
ONE buffer for all layers); memory from CUDA's VMM API (vLLM's sleep mode, PyTorch's
``expandable_segments``) cannot be exported and is refused with the setting named. Its events
order the server's copies with the engine's stream: ``before_copy`` marks the stream's work so
far (the server's copy waits on it), ``after_load`` makes the stream wait for the server's copy,
``stores_done`` polls the server's event. ``PoolCopier`` runs the staged copy in this process.

Torch is imported here; this module runs inside vLLM (or a test harness), never in the server.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Mapping, Sequence

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


class PoolCopier:
    """This worker's own copies between its KV blocks and the server's shared pool (worker copies on CUDA).

    The pool (mapped from SHM by the caller) is registered with CUDA here, so that a slot is a DMA
    target, and the staged copy runs in this process: lmcd's page kernel, compiled here by NVRTC
    (vLLM has no CuPy), with staging buffers in this GPU's memory. ``store``/``load`` return the
    copy's events; the caller polls ``done`` and reads ``seconds`` once it has.
    """

    def __init__(self, device: int, planes: Sequence[int], num_blocks: int, page_bytes: int, block_stride: int,
                 blocks_per_chunk: int, pool_address: int, pool_bytes: int) -> None:
        self.device = device
        self.pool_address = pool_address
        self.pipeline: StagedPipeline | None = None
        self.engine_mark = 0
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
            self.engine_mark = cudadrv.event_create()
        except (CudaError, StagingMemoryError) as exc:
            self.close()
            raise PoolCopierError(f"{exc}; lower vLLM's --gpu-memory-utilization a little if the GPU is full"
                                  if isinstance(exc, StagingMemoryError) else str(exc)) from None
        except BaseException:
            self.close()  # the pool is never left registered with CUDA
            raise
        log.info("Staging %d chunks of %.1f MiB in GPU memory for this worker's own copies", self.pipeline.stages,
                 self.pipeline.chunk_bytes / 2**20)

    def _copy(self, slots: Sequence[int], blocks: np.ndarray, to_pool: bool, skip_blocks: int) -> CopyEvents:
        assert self.pipeline is not None
        engine = current_stream(self.device)
        # store: the step that wrote these blocks comes first; load: kernels queued so far that use
        # the target blocks (the pool's chunks cross into the buffers meanwhile)
        cudadrv.event_record(self.engine_mark, engine)
        addresses = [self.pool_address + slot for slot in slots]
        events = self.pipeline.copy(addresses, blocks, to_pool, skip_blocks, after=self.engine_mark)
        if not to_pool:
            cudadrv.stream_wait(engine, events.done)  # the forward reads the blocks after the copy
        return events

    def store(self, slots: Sequence[int], blocks: np.ndarray) -> CopyEvents:
        """Copy the chunks' blocks into the pool ``slots``."""
        return self._copy(slots, blocks, True, 0)

    def load(self, slots: Sequence[int], blocks: np.ndarray, skip_blocks: int) -> CopyEvents:
        """Copy the pool ``slots`` into the chunks' blocks, leaving out the first ``skip_blocks`` of the first."""
        return self._copy(slots, blocks, False, skip_blocks)

    @staticmethod
    def done(events: CopyEvents) -> bool:
        return cudadrv.event_done(events.done)

    def seconds(self, *copies: CopyEvents) -> float:
        """From the first copy's start to the last one's end, on the GPU (all of them finished)."""
        assert self.pipeline is not None
        return self.pipeline.seconds(*copies)

    def fence(self, events: CopyEvents) -> None:
        """The current stream waits (on the GPU) for this copy."""
        cudadrv.stream_wait(current_stream(self.device), events.done)

    def synchronize(self) -> None:
        """Wait until every copy queued so far has ended."""
        torch.cuda.synchronize(self.device)

    def close(self) -> None:
        self.synchronize()
        if self.pipeline is not None:
            self.pipeline.close()
            self.pipeline = None
        if self.engine_mark:
            cudadrv.event_destroy(self.engine_mark)
            self.engine_mark = 0
        if self.pool_address:
            cudadrv.host_unregister(self.pool_address)
            self.pool_address = 0
