"""Worker-side CUDA: share vLLM's KV allocations with the server over CUDA IPC, order copies with events.

vLLM allocates its KV cache as int8 buffers and hands the connector per-layer views into
them. ``CudaShare`` finds the allocation under every view (``cuMemGetAddressRange``: usually
ONE buffer for all layers), exports each allocation once with ``cuIpcGetMemHandle``, and
describes every page relative to its allocation's base; the server opens the handles once.

Memory from CUDA's virtual memory management API (``cuMemCreate``: vLLM's cumem allocator,
used with ``--enable-sleep-mode``, or PyTorch's ``expandable_segments``) cannot be exported
with legacy CUDA IPC; it is refused at registration with a message that names the setting.

Ordering (no host waits on the hot path):
  store: ``record`` the worker event on the current stream after the step that wrote the KV,
         send Store; the server's stream waits on it, copies, records the server event.
         Before the blocks may be reused, ``stores_done`` polls the server event.
  load:  ``record`` the worker event (earlier kernels that use the target blocks go first),
         send Retrieve; then the current stream waits on the server event, so the forward
         reads the loaded KV only after the copy.

Torch is imported here; this module runs inside vLLM (or a test harness), never in the server.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping

import torch

from lmcd.cudadrv import check, driver, fast_driver

CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE = 10
IPC_HANDLE_BYTES = 64
VMM_ADVICE = ("vLLM allocated its KV cache with CUDA's virtual memory API, which legacy CUDA IPC cannot share: "
              "start vLLM without --enable-sleep-mode and without PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
              "(or use lmcache.mp.mp_transfer_mode lmcache_driven, where no KV memory is shared)")


class CudaShareError(ValueError):
    """KV memory this connector cannot share with the server; the message says why and what to do."""


def allocation_of(address: int) -> tuple[int, int]:
    """(base, size) of the CUDA allocation holding ``address``; refuses memory legacy IPC cannot export."""
    capable = ctypes.c_uint32(0)
    check(driver().cuPointerGetAttribute(ctypes.byref(capable), CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
                                           ctypes.c_uint64(address)), "cuPointerGetAttribute", CudaShareError)
    if not capable.value & 0xFF:
        raise CudaShareError(VMM_ADVICE)
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


class CudaShare:
    """One worker's KV allocations, exported once, and the two interprocess events."""

    def __init__(self, kv_caches: Mapping[str, torch.Tensor]) -> None:
        devices = {t.device for t in kv_caches.values()}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise CudaShareError(f"the KV tensors must all be on one CUDA device, found {sorted(map(str, devices))}")
        self.device = next(iter(devices)).index or 0
        torch.cuda.set_device(self.device)
        torch.cuda.synchronize(self.device)  # the primary context is current on this thread from here
        ranges: dict[int, int] = {}
        for tensor in kv_caches.values():
            base, size = allocation_of(tensor.data_ptr())
            ranges[base] = size
        self.bases = sorted(ranges)
        self.sizes = [ranges[b] for b in self.bases]
        self.handles = [ipc_handle(b) for b in self.bases]
        self.pci = device_pci(self.device)
        self.worker_event = torch.cuda.Event(enable_timing=False, blocking=False, interprocess=True)
        self.worker_event.record(torch.cuda.current_stream(self.device))
        self.event_handle = bytes(self.worker_event.ipc_handle())
        self.server_event: torch.cuda.Event | None = None
        self.stores_pending = False

    def open_server_event(self, handle: bytes) -> None:
        self.server_event = torch.cuda.Event.from_ipc_handle(self.device, handle)

    def before_copy(self) -> None:
        """Mark the current stream's work so far: the server's copy starts after it. (The driver is
        called directly: this is on the request's critical path, and torch's wrappers cost tens of
        microseconds more per call.)"""
        check(fast_driver().cuEventRecord(self.worker_event.cuda_event,
                                          torch.cuda.current_stream(self.device).cuda_stream),
              "cuEventRecord (worker's event)")

    def after_load(self) -> None:
        """Make the current stream (the forward) wait for the server's copy, on the GPU."""
        assert self.server_event is not None
        check(fast_driver().cuStreamWaitEvent(torch.cuda.current_stream(self.device).cuda_stream,
                                              self.server_event.cuda_event, 0), "cuStreamWaitEvent (server's event)")

    def stores_done(self) -> bool:
        """Whether every store sent so far has finished on the GPU (polls; never blocks)."""
        if self.stores_pending and self.server_event is not None and self.server_event.query():
            self.stores_pending = False
        return not self.stores_pending

    def fence_stores(self) -> None:
        """The current stream waits (on the GPU) for stores in flight: their blocks may be rewritten next."""
        if self.stores_pending and self.server_event is not None:
            torch.cuda.current_stream(self.device).wait_event(self.server_event)
