"""The server's CUDA side: GPUs found by PCI address, the pinned pool, and server copies for GPU workers.

Imported only where CuPy is installed and a GPU is visible; the server never imports torch.
``CudaHost`` registers the pool with the CUDA driver once, at start (``cudaHostRegister``, portable
and mapped), so that a slot is a DMA target on every GPU. ``GpuWorker`` is one registered
worker's KV memory: its CUDA IPC handles and interprocess event opened on its own GPU, the
server's interprocess event (its handle goes back in ``Registered``), and the staged copy
(``lmcd.kernels.staged``, kernel compiled by CuPy). A copy waits on the worker's event, the
server's event is recorded after it, and the request is answered at once; a completion thread
per worker waits for each copy's ``done`` event and hands the bookkeeping back to the loop.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from lmcd import cudadrv
from lmcd.copyplan import plane_addresses
from lmcd.kernels import PageKernel, cupy_functions
from lmcd.kernels.staged import CopyEvents, StagedPipeline, StagingMemoryError, stages_for
from lmcd.protocol import KVLayout

log = logging.getLogger("lmcd.gpu")

HOST_REGISTER_PORTABLE = 1
HOST_REGISTER_MAPPED = 2
IPC_LAZY_ENABLE_PEER_ACCESS = 1
PIN_PIECE_BYTES = 1 << 30

Done = Callable[[BaseException | None, float], None]  # (error, seconds the copy took on the GPU)


class CudaSupport(NamedTuple):
    host: CudaHost | None  # None: GPU workers are refused with ``problem``
    problem: str


def pci_id(domain: int, bus: int, device: int) -> str:
    """The PCI address both sides name a GPU by (CUDA_VISIBLE_DEVICES may number them differently)."""
    return f"{domain:04x}:{bus:02x}:{device:02x}"


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


class GpuSetupError(RuntimeError):
    """Server copies cannot be set up for a GPU worker; the message names the step and what to do."""


class GpuWorker:
    """One GPU worker's mapped KV memory and its server copies (module docstring). Touched by the loop
    thread, except ``_complete`` (its own thread), which only waits for events and calls back.
    ``pool_shared``: the server runs with --share-pool (what an error may suggest differs)."""

    def __init__(self, host: CudaHost, device_pci: str, ipc_handles: Sequence[bytes], layout: KVLayout,
                 blocks_per_chunk: int, worker_event: bytes, pool_shared: bool) -> None:
        self.host = host
        runtime = host.runtime
        self.device = host.device_index(device_pci)
        self.bases: list[int] = []
        self.worker_event: int | None = None
        self.event: Any = None
        self.pipeline: StagedPipeline | None = None
        host.use(self.device)
        try:
            try:
                for handle in ipc_handles:
                    self.bases.append(runtime.ipcOpenMemHandle(bytes(handle), IPC_LAZY_ENABLE_PEER_ACCESS))
                self.worker_event = runtime.ipcOpenEventHandle(bytes(worker_event))
            except Exception as exc:  # CUDA refused a handle: say which and why
                raise GpuSetupError(f"cannot open the worker's CUDA IPC memory on GPU {device_pci}: {exc}; the worker "
                                    "and the server must run on the same host and see the same GPU (docker: --ipc "
                                    "host --gpus all)") from None
            self.event = host.cupy.cuda.Event(block=False, disable_timing=True, interprocess=True)
            self.event_handle = bytes(runtime.ipcGetEventHandle(self.event.ptr))
            planes = plane_addresses(layout, self.bases).tolist()
            kernel = PageKernel(cupy_functions(self.device), planes, layout.num_blocks, layout.page_bytes,
                                layout.block_stride, blocks_per_chunk)
            self.pipeline = self._pipeline(kernel, pool_shared)
        except GpuSetupError:
            self._close_handles()
            raise
        except Exception as exc:
            self._close_handles()
            raise GpuSetupError(f"cannot set up server copies on GPU {self.device}: {type(exc).__name__}: {exc}") \
                from None
        self._completions: queue.SimpleQueue[tuple[CopyEvents, Done] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._complete, name=f"lmcd-gpu{self.device}", daemon=True)
        self._thread.start()

    def _pipeline(self, kernel: PageKernel, pool_shared: bool) -> StagedPipeline:
        wanted = stages_for(kernel.chunk_bytes)
        try:
            pipeline = StagedPipeline(kernel, wanted)
        except StagingMemoryError as exc:
            raise GpuSetupError(
                f"GPU {self.device} has too little free memory for server copies: {exc}. Lower vLLM's "
                "--gpu-memory-utilization a little (a few hundred MiB)" + ("" if pool_shared else
                ", or start the server with --share-pool so that each worker copies itself")) from None
        if pipeline.stages < wanted:
            log.warning("GPU %d had room for %d of the %d staging buffers (%.1f MiB each) server copies use: this "
                        "worker's copies keep fewer chunks in flight. Lower vLLM's --gpu-memory-utilization a "
                        "little to give them room", self.device, pipeline.stages, wanted, kernel.chunk_bytes / 2**20)
        else:
            log.info("GPU %d: %d staging buffers of %.1f MiB for this worker's copies", self.device, pipeline.stages,
                     kernel.chunk_bytes / 2**20)
        return pipeline

    def submit(self, slot_addresses: Sequence[int], blocks: np.ndarray, to_pool: bool, skip_blocks: int,
               done: Done) -> None:
        """Queue one copy (after the worker's event; the server's event after it); ``done`` runs on the
        completion thread once the copy has finished on the GPU."""
        assert self.pipeline is not None and self.worker_event is not None
        self.host.use(self.device)
        events = self.pipeline.copy(slot_addresses, blocks, to_pool, skip_blocks, after=self.worker_event,
                                    then=(self.event.ptr,))
        self._completions.put((events, done))

    def _complete(self) -> None:
        assert self.pipeline is not None
        cudadrv.set_context(self.pipeline.context)
        while True:
            item = self._completions.get()
            if item is None:
                return
            events, done = item
            try:
                cudadrv.event_synchronize(events.done)
                seconds = self.pipeline.seconds(events)
            except BaseException as exc:  # a CUDA error: the copy is not trusted
                done(exc, 0.0)
                continue
            done(None, seconds)

    def close(self) -> None:
        """Wait for copies in flight (the caller ensures none are pending), then close the mappings."""
        if self.pipeline is None:
            return
        self._completions.put(None)
        self._thread.join()
        self.host.use(self.device)
        self._close_handles()

    def _close_handles(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()
            self.pipeline = None
        runtime = self.host.runtime
        for base in self.bases:
            try:
                runtime.ipcCloseMemHandle(base)
            except Exception as exc:
                log.warning("cudaIpcCloseMemHandle failed: %s", exc)
        self.bases = []
        if self.worker_event is not None:
            try:
                runtime.eventDestroy(self.worker_event)
            except Exception as exc:
                log.warning("cudaEventDestroy failed: %s", exc)
            self.worker_event = None
