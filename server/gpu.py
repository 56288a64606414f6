"""The server's CUDA side: GPUs found by PCI address, the pinned pool, and per-worker copies.

Imported only when CuPy is installed and a GPU is visible; the server never imports torch.

- ``CudaHost`` finds the GPUs and registers the pool with the CUDA driver once, at start
  (``cudaHostRegister``, portable and mapped: every GPU's kernels read and write the pool in
  place, through the same address as the host).
- ``GpuWorker`` is one registered worker's KV memory: its CUDA IPC handles opened once (on
  the worker's own device), a non-blocking stream, the worker's interprocess event (opened)
  and the server's own interprocess event (its handle goes back in ``Registered``).

A copy (``--copy-engine``): staged (the default; ``lmcd.kernels.StagedCopier``: every chunk crosses
PCIe as one contiguous copy-engine copy through a staging buffer in GPU memory, a kernel moves
the pages between that buffer and the KV blocks), kernel (one kernel over every plane and block
of the request, reading or writing the pinned pool in place) or dma (one batch of copy-engine
copies of the page runs). Ordering: the copy waits on the worker's event (recorded after the
step that produced the KV, or before the forward that will read it) before it touches the
worker's blocks -> the server's event is recorded -> the request is answered at once. The worker
waits on the server's event on its own stream (load) or polls it before its blocks may be reused
(store): no host waits on the hot path. A per-worker completion thread waits for each copy's
own event and hands the bookkeeping (chunk ready, pins released) back to the loop.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from lmcd.cudadrv import check, driver, fast_driver
from lmcd.kernels import DEFAULT_GRID, PageCopier, StagedCopier
from lmcd.protocol import KVLayout
from lmcd.server.transfer import plan

log = logging.getLogger("lmcd.gpu")

HOST_REGISTER_PORTABLE = 1
HOST_REGISTER_MAPPED = 2
IPC_LAZY_ENABLE_PEER_ACCESS = 1
PIN_PIECE_BYTES = 1 << 30

Done = Callable[[BaseException | None, float], None]


class CudaSupport(NamedTuple):
    host: CudaHost | None  # None: GPU workers are refused with ``problem``
    problem: str


def pci_id(domain: int, bus: int, device: int) -> str:
    """The PCI address both sides name a GPU by (CUDA_VISIBLE_DEVICES may number them differently)."""
    return f"{domain:04x}:{bus:02x}:{device:02x}"


class MemcpyAttributes(ctypes.Structure):
    """CUmemcpyAttributes: one set for every copy of a batch."""

    _fields_ = [("srcAccessOrder", ctypes.c_int), ("srcLocHint_type", ctypes.c_int), ("srcLocHint_id", ctypes.c_int),
                ("dstLocHint_type", ctypes.c_int), ("dstLocHint_id", ctypes.c_int), ("flags", ctypes.c_uint)]


MEMCPY_SRC_ACCESS_ORDER_STREAM = 1


@functools.cache
def _batch_memcpy() -> tuple[Any, bool]:
    """cuMemcpyBatchAsync from the driver: (function, takes_fail_index). CUDA 13 names the form
    without the fail index ``_v2``; CUDA 12.8/12.9 export only the form with it."""
    for name, with_fail_index in (("cuMemcpyBatchAsync_v2", False), ("cuMemcpyBatchAsync", True)):
        fn = getattr(driver(), name, None)
        if fn is not None:
            return fn, with_fail_index
    raise RuntimeError("this CUDA driver has no cuMemcpyBatchAsync (needs CUDA 12.8 or newer); "
                       "use --copy-engine kernel")


def batch_memcpy(dst: np.ndarray, src: np.ndarray, size: np.ndarray, stream_ptr: int) -> None:
    """Queue ``len(size)`` copies (device or pinned host addresses) on the copy engines, in one call."""
    fn, with_fail_index = _batch_memcpy()
    count = len(size)
    dsts = np.ascontiguousarray(dst, dtype=np.uint64)
    srcs = np.ascontiguousarray(src, dtype=np.uint64)
    sizes = np.ascontiguousarray(size, dtype=np.uint64)
    attrs = MemcpyAttributes(MEMCPY_SRC_ACCESS_ORDER_STREAM, 0, 0, 0, 0, 0)
    attr_index = ctypes.c_size_t(0)
    args: list[Any] = [dsts.ctypes.data_as(ctypes.c_void_p), srcs.ctypes.data_as(ctypes.c_void_p),
                       sizes.ctypes.data_as(ctypes.c_void_p), ctypes.c_size_t(count), ctypes.byref(attrs),
                       ctypes.byref(attr_index), ctypes.c_size_t(1)]
    if with_fail_index:
        fail_index = ctypes.c_size_t(0)
        args.append(ctypes.byref(fail_index))
    args.append(ctypes.c_void_p(stream_ptr))
    check(fn(*args), "cuMemcpyBatchAsync")


def event_synchronize(event_ptr: int) -> None:
    """cuEventSynchronize through ctypes, which releases the GIL while it waits: the request loop
    keeps answering (and launching) while a completion thread waits for a copy."""
    check(driver().cuEventSynchronize(ctypes.c_void_p(event_ptr)), "cuEventSynchronize (the GPU copy)")


class CudaHost:
    def __init__(self) -> None:
        import cupy

        self.cupy = cupy
        self.runtime = cupy.cuda.runtime
        self.devices: dict[str, int] = {}
        self.names: dict[int, str] = {}
        for index in range(self.runtime.getDeviceCount()):
            props = self.runtime.getDeviceProperties(index)
            self.devices[pci_id(props["pciDomainID"], props["pciBusID"], props["pciDeviceID"])] = index
            self.names[index] = props["name"].decode()
        self._pinned: list[int] = []
        self._current = -1  # the device the request loop made current last (use())

    @staticmethod
    def probe() -> tuple[CudaHost | None, str]:
        """A CudaHost if CuPy and at least one GPU are usable, else None and why not."""
        try:
            import cupy  # noqa: F401
        except ImportError:
            return None, "CuPy is not installed (pip install 'lmcd[cuda12]' or 'lmcd[cuda13]')"
        try:
            host = CudaHost()
        except Exception as exc:  # no driver, no device, broken install: the CPU path still works
            return None, f"CUDA is not usable: {exc}"
        if not host.devices:
            return None, "no CUDA device is visible"
        return host, ""

    def pin(self, address: int, nbytes: int, progress: Callable[[int, int], None]) -> None:
        """Register [address, address+nbytes) with the driver in 1 GiB pieces, reporting progress."""
        flags = HOST_REGISTER_PORTABLE | HOST_REGISTER_MAPPED
        done = 0
        while done < nbytes:
            piece = min(PIN_PIECE_BYTES, nbytes - done)
            self.runtime.hostRegister(address + done, piece, flags)
            self._pinned.append(address + done)
            if self.runtime.pointerGetAttributes(address + done).devicePointer != address + done:
                raise RuntimeError("this GPU cannot use pinned host memory at its host address (no unified "
                                   "addressing); lmcd needs a 64-bit Linux host with UVA")
            done += piece
            progress(done, nbytes)

    def use(self, device: int) -> None:
        """Make ``device`` current on the calling thread (the request loop), skipping the runtime call
        when it already is (CuPy's ``Device`` blocks restore the device they found on exit)."""
        if device != self._current:
            self.runtime.setDevice(device)
            self._current = device

    def unpin(self) -> None:
        for address in self._pinned:
            try:
                self.runtime.hostUnregister(address)
            except Exception as exc:  # at exit: say so, and go on
                log.warning("cudaHostUnregister failed: %s", exc)
        self._pinned.clear()

    def device_index(self, device_pci: str) -> int:
        index = self.devices.get(device_pci.lower())
        if index is None:
            raise LookupError(
                f"the worker's GPU (PCI {device_pci}) is not visible to the server, which sees "
                f"{sorted(self.devices) or 'none'}: run the server with every GPU of the node visible "
                "(docker: --gpus all; kubernetes: no GPU limit on the server, NVIDIA_VISIBLE_DEVICES=all)"
            )
        return index


class GpuWorker:
    def __init__(self, host: CudaHost, device_pci: str, ipc_handles: Sequence[bytes], layout: KVLayout,
                 blocks_per_chunk: int, worker_event: bytes, grid: int = DEFAULT_GRID,
                 engine: str = "staged") -> None:
        self.host = host
        self.layout = layout
        self.engine = engine
        cupy, runtime = host.cupy, host.runtime
        self.device = host.device_index(device_pci)
        self.bases: list[int] = []
        self.closed = False
        with cupy.cuda.Device(self.device):
            try:
                for handle in ipc_handles:
                    self.bases.append(runtime.ipcOpenMemHandle(bytes(handle), IPC_LAZY_ENABLE_PEER_ACCESS))
                self.worker_event = runtime.ipcOpenEventHandle(bytes(worker_event)) if worker_event else None
                self.stream = cupy.cuda.Stream(non_blocking=True)
                self.event = cupy.cuda.Event(block=False, disable_timing=True, interprocess=True)
                self.event_handle = bytes(runtime.ipcGetEventHandle(self.event.ptr))
                bases = np.asarray(self.bases, dtype=np.int64)[np.asarray(layout.layer_segments, dtype=np.int64)]
                self.layer_addresses = bases + np.asarray(layout.layer_offsets, dtype=np.int64)
                self.copier = PageCopier(self.device, self.layer_addresses.tolist(), layout.num_blocks,
                                         layout.page_bytes, layout.block_stride, blocks_per_chunk, grid)
                self.staged = self._staged_copier() if engine == "staged" else None
            except BaseException:
                self._close_handles()
                raise
        self._idle_events: collections.deque[Any] = collections.deque()  # completion events to reuse
        self._completions: queue.SimpleQueue[tuple[Any, float, Done] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._complete, name=f"lmcd-gpu{self.device}", daemon=True)
        self._thread.start()

    def _staged_copier(self) -> StagedCopier | None:
        """The staging buffers in this GPU's memory, or None (the kernel engine) where vLLM left too
        little free memory for them: copies still work, at the zero-copy kernel's speed."""
        try:
            staged = StagedCopier(self.copier)
        except self.host.cupy.cuda.memory.OutOfMemoryError as exc:
            self.host.cupy.get_default_memory_pool().free_all_blocks()  # the buffers it did get go back to vLLM
            log.warning("GPU %d has too little free memory for the staging buffers of staged copies (%s); this "
                        "worker's copies use the kernel engine instead. Lower vLLM's --gpu-memory-utilization a "
                        "little (a few hundred MiB) to get them", self.device, exc)
            self.engine = "kernel"
            return None
        log.info("GPU %d: %d staging buffers of %.1f MiB for staged copies (kernel on %d CTAs)", self.device,
                 staged.stages, self.copier.chunk_bytes / 2**20, staged.grid)
        return staged

    def submit(self, slot_addresses: np.ndarray, block_ids: np.ndarray, to_pool: bool, done: Done,
               skip_blocks: int = 0) -> None:
        """Launch one copy (after the worker's event) and record the server's event; ``done`` runs
        on the completion thread once the copy has finished on the GPU. The CUDA calls here go
        straight to the driver (``fast_driver``): a few microseconds from request to launch."""
        started = time.perf_counter()
        lib = fast_driver()
        self.host.use(self.device)  # this worker's context is current for the calls below
        stream = self.stream.ptr
        if self.staged is not None:  # it waits on the worker's event before touching the worker's blocks
            self.staged.launch(slot_addresses, block_ids, to_pool, stream, skip_blocks, after=self.worker_event)
        else:
            if self.worker_event is not None:  # the copy starts after the worker's recorded work
                check(lib.cuStreamWaitEvent(stream, self.worker_event, 0), "cuStreamWaitEvent (worker's event)")
            if self.engine == "dma":  # the copy engines (no SMs), one batched call of merged runs
                self.copier.check(slot_addresses, block_ids, skip_blocks)
                runs = plan(self.layout, self.layer_addresses, slot_addresses, block_ids, to_pool, skip_blocks)
                batch_memcpy(runs.dst, runs.src, runs.size, stream)
            else:
                self.copier.launch(slot_addresses, block_ids, to_pool, stream, skip_blocks)
        check(lib.cuEventRecord(self.event.ptr, stream), "cuEventRecord (server's event)")
        try:
            finished = self._idle_events.pop()
        except IndexError:
            finished = self.host.cupy.cuda.Event(block=True, disable_timing=True)
        check(lib.cuEventRecord(finished.ptr, stream), "cuEventRecord (completion)")
        self._completions.put((finished, started, done))

    def _complete(self) -> None:
        while True:
            item = self._completions.get()
            if item is None:
                return
            finished, started, done = item
            try:
                event_synchronize(finished.ptr)
            except BaseException as exc:  # a CUDA error: the copy is not trusted
                done(exc, time.perf_counter() - started)
                continue
            self._idle_events.append(finished)  # reused by a later submit (deque: thread-safe)
            done(None, time.perf_counter() - started)

    def close(self) -> None:
        """Wait for copies in flight (the caller ensures none are pending), then close the mappings."""
        if self.closed:
            return
        self.closed = True
        self._completions.put(None)
        self._thread.join()
        with self.host.cupy.cuda.Device(self.device):
            self.stream.synchronize()
            if self.staged is not None:
                self.staged.close()
            self._close_handles()

    def _close_handles(self) -> None:
        runtime = self.host.runtime
        for base in self.bases:
            try:
                runtime.ipcCloseMemHandle(base)
            except Exception as exc:
                log.warning("cudaIpcCloseMemHandle failed: %s", exc)
        self.bases = []
        event = getattr(self, "worker_event", None)
        if event is not None:
            try:
                runtime.eventDestroy(event)
            except Exception as exc:
                log.warning("cudaEventDestroy failed: %s", exc)
            self.worker_event = None
