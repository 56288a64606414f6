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
import logging
import time
from collections.abc import Mapping

import numpy as np
import torch

from lmcd.cudadrv import CudaError, check, driver, fast_driver
from lmcd.kernels import MAX_INLINE_BLOCKS, OneChunkLaunch, check_blocks, one_chunk_functions, stages_for
from lmcd.protocol import KVLayout

CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE = 10
IPC_HANDLE_BYTES = 64
log = logging.getLogger("lmcd.connector")
VMM_ADVICE = ("vLLM allocated its KV cache with CUDA's virtual memory API, which legacy CUDA IPC cannot share: "
              "start vLLM without --enable-sleep-mode and without PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
              "(or use lmcache.mp.mp_transfer_mode lmcache_driven, where no KV memory is shared)")


class CudaShareError(ValueError):
    """KV memory this connector cannot share with the server; the message says why and what to do."""


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


class CudaShare:
    """One worker's KV allocations, exported once (``export``), and the two interprocess events."""

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
        self.pci = device_pci(self.device)
        self.handles: list[bytes] = []
        self.event_handle = b""
        self.server_event: torch.cuda.Event | None = None
        self.stores_pending = False

    def export(self) -> None:
        """The IPC handles of the allocations and of the worker's event (engine_driven: the server
        copies); refuses memory legacy IPC cannot export, naming the vLLM setting to change."""
        if self.handles:
            return
        if not all(ipc_capable(base) for base in self.bases):
            raise CudaShareError(VMM_ADVICE)
        self.handles = [ipc_handle(b) for b in self.bases]
        self.worker_event = torch.cuda.Event(enable_timing=False, blocking=False, interprocess=True)
        self.worker_event.record(torch.cuda.current_stream(self.device))
        self.event_handle = bytes(self.worker_event.ipc_handle())

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


class PoolCopierError(RuntimeError):
    """This worker cannot copy through the shared pool itself (the message says why); it falls back."""


class PoolCopier:
    """This worker's own copies between its KV blocks and the server's shared pool (lmcache_driven on CUDA).

    The pool (mapped from SHM here) is registered with CUDA once, so a slot is a DMA target. A chunk
    crosses PCIe as ONE contiguous copy-engine copy between its slot and a staging buffer in this
    GPU; on a side stream, lmcd's page-copy kernel (``lmcd.kernels``, compiled here with NVRTC; the
    chunk's block ids inside the launch, on every SM) moves the chunk's pages between that buffer
    and the KV blocks. Where that kernel cannot run (no NVRTC, more than 64 blocks per chunk),
    torch's ``index_select``/``index_copy_`` over row views of the KV do it, at a higher host cost.
    Up to ``stages`` chunks are in flight; the host only queues driver calls::

        store  gather stream:  wait(free[b]) pages -> S[b] record(full[b])
               copy stream:                   wait(full[b]) S[b] -> slot record(free[b])
        load   copy stream:    wait(free[b]) slot -> S[b] record(full[b])
               gather stream:                 wait(full[b]) S[b] -> pages record(free[b])

    Ordering with the engine: the gather stream waits on the engine's current stream before it
    touches a block; after a load the engine's stream waits for the scatter; nothing waits on
    the host. ``store``/``load`` return the (start, end) events of the copy.
    """

    def __init__(self, kv_caches: Mapping[str, torch.Tensor], layout: KVLayout, bases: list[int],
                 pool_address: int, pool_bytes: int) -> None:
        self.device = next(iter(kv_caches.values())).device
        self.layout = layout
        self.pool_address, self.pool_bytes = pool_address, pool_bytes
        started = time.monotonic()
        check(driver().cuMemHostRegister_v2(ctypes.c_void_p(pool_address), ctypes.c_size_t(pool_bytes), 1),
              "cuMemHostRegister (the shared pool)", PoolCopierError)
        self.registered = True
        log.info("Registered the server's shared pool (%.1f GiB) with CUDA in %.2f s: this worker copies "
                 "between its KV blocks and the pool itself", pool_bytes / 2**30, time.monotonic() - started)
        page, stride = layout.page_bytes, layout.block_stride
        addresses = [bases[s] + o for s, o in zip(layout.layer_segments, layout.layer_offsets, strict=True)]
        self.plane_addresses = addresses
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in kv_caches.values()}
        item = 8
        while item > 1 and (page % item or stride % item or any(a % item for a in addresses)):
            item //= 2
        dtype = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[item]
        self.row_elems = page // item
        # planes that share a storage and a residue modulo the block stride share one row view
        views: dict[tuple[int, int], torch.Tensor] = {}
        plane_view: list[torch.Tensor] = []
        plane_rows: list[int] = []
        for address in addresses:
            start = next((ptr for ptr, st in storages.items() if ptr <= address < ptr + st.nbytes()), None)
            if start is None:
                raise PoolCopierError(f"a KV page at {address:#x} lies outside every KV tensor's storage")
            storage = storages[start]
            residue = (address - start) % stride
            key = (start, residue)
            if key not in views:
                rows = (storage.nbytes() - residue - page) // stride + 1
                views[key] = torch.empty(0, dtype=dtype, device=self.device).set_(
                    storage, residue // item, (rows, self.row_elems), (stride // item, 1))
            plane_view.append(views[key])
            plane_rows.append((address - start - residue) // stride)
        self.plane_rows = np.asarray(plane_rows, dtype=np.int64)
        # runs of consecutive planes that share a view: one kernel per run and chunk (usually one run)
        self.runs: list[tuple[int, int, torch.Tensor]] = []
        for plane, view in enumerate(plane_view):
            if self.runs and self.runs[-1][2] is view:
                first, _, _ = self.runs[-1]
                self.runs[-1] = (first, plane + 1, view)
            else:
                self.runs.append((plane, plane + 1, view))
        self.bpc = 0
        self.chunk_bytes = 0
        self.staging: torch.Tensor | None = None
        self.gather = torch.cuda.Stream(self.device)
        self.copy = torch.cuda.Stream(self.device)
        self.dtype = dtype

    def prepare(self, blocks_per_chunk: int) -> None:
        """Allocate the staging buffers (once the chunk size is known); PoolCopierError if the GPU is full."""
        self.bpc = blocks_per_chunk
        self.chunk_bytes = self.layout.num_layers * blocks_per_chunk * self.layout.page_bytes
        self.stages = stages_for(self.chunk_bytes)
        try:
            self.staging = torch.empty((self.stages, self.layout.num_layers * blocks_per_chunk, self.row_elems),
                                       dtype=self.dtype, device=self.device)
        except torch.OutOfMemoryError:
            raise PoolCopierError(
                f"no GPU memory for {self.stages} staging buffers of {self.chunk_bytes / 2**20:.0f} MiB; lower "
                "vLLM's --gpu-memory-utilization") from None
        self.full = [self._event() for _ in range(self.stages)]
        self.free = [self._event() for _ in range(self.stages)]
        self.engine_mark = self._event()
        self._rows_ready = self._event()
        self._rows_host: torch.Tensor | None = None
        self._rows_dev = torch.empty(0, dtype=torch.int64, device=self.device)
        self.stage_ptrs = [self.staging[b].data_ptr() for b in range(self.stages)]
        self.next_stage = 0
        self.launch = self._kernel_launch(blocks_per_chunk)
        log.info("Staging %d chunks of %.1f MiB in GPU memory for this worker's own copies", self.stages,
                 self.chunk_bytes / 2**20)

    def _kernel_launch(self, blocks_per_chunk: int) -> OneChunkLaunch | None:
        """lmcd's page-copy kernel (compiled here with NVRTC), or None where it cannot run: torch's index
        ops move the pages then, at a higher host cost per chunk."""
        if blocks_per_chunk > MAX_INLINE_BLOCKS:
            log.info("Chunks of %d blocks exceed the %d a kernel launch carries: torch's index ops move the pages",
                     blocks_per_chunk, MAX_INLINE_BLOCKS)
            return None
        index = self.device.index or 0
        major, minor = torch.cuda.get_device_capability(index)
        try:
            v16, v1 = one_chunk_functions(index, f"sm_{major}{minor}")
        except CudaError as exc:
            log.info("lmcd's page-copy kernel is not available here (%s): torch's index ops move the pages", exc)
            return None
        page, stride = self.layout.page_bytes, self.layout.block_stride
        vec16 = page % 16 == 0 and stride % 16 == 0 and not any(a % 16 for a in self.plane_addresses)
        self.plane_bases = torch.tensor(self.plane_addresses, dtype=torch.int64, device=self.device)
        self.grid = torch.cuda.get_device_properties(index).multi_processor_count
        return OneChunkLaunch(v16 if vec16 else v1, self.plane_bases.data_ptr(), self.layout.num_layers,
                              blocks_per_chunk, page, stride)

    def _event(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=False)
        event.record(self.copy)  # torch creates the CUDA event at its first record
        return event

    @staticmethod
    def _record(event: torch.cuda.Event, stream: torch.cuda.Stream) -> None:
        check(fast_driver().cuEventRecord(event.cuda_event, stream.cuda_stream), "cuEventRecord")

    @staticmethod
    def _wait(stream: torch.cuda.Stream, event: torch.cuda.Event) -> None:
        check(fast_driver().cuStreamWaitEvent(stream.cuda_stream, event.cuda_event, 0), "cuStreamWaitEvent")

    def _rows(self, block_ids: list[int], num_chunks: int) -> torch.Tensor:
        """Per chunk, per plane, per block of the chunk: the row of the page in its plane's view, uploaded
        on the gather stream through one pinned buffer and one device buffer (torch's index path)."""
        count = num_chunks * self.layout.num_layers * self.bpc
        if self._rows_host is None or count > self._rows_host.numel():
            if self._rows_host is not None:
                self._rows_ready.synchronize()
            capacity = max(count, 8 * self.layout.num_layers * self.bpc)
            self._rows_host = torch.empty(capacity, dtype=torch.int64, pin_memory=True)
            self._rows_dev = torch.empty(capacity, dtype=torch.int64, device=self.device)
        else:
            self._rows_ready.synchronize()  # the previous upload has read the pinned buffer (long since)
        host = self._rows_host.numpy()[:count].reshape(num_chunks, -1, self.bpc)
        np.add(self.plane_rows.reshape(1, -1, 1), np.asarray(block_ids, dtype=np.int64).reshape(num_chunks, 1, -1),
               out=host)
        check(fast_driver().cuMemcpyHtoDAsync_v2(self._rows_dev.data_ptr(), self._rows_host.data_ptr(), count * 8,
                                                 self.gather.cuda_stream), "cuMemcpyHtoDAsync (block rows)")
        self._record(self._rows_ready, self.gather)
        return self._rows_dev[:count]

    def store(self, slots: list[int], block_ids: list[int]) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        """Copy the chunks' blocks into the pool slots at byte offsets ``slots``; returns the (start, end)
        events of the copy (timed, so that the server can log how long it took)."""
        return self._copy(slots, block_ids, True, 0)

    def load(self, slots: list[int], block_ids: list[int], skip_blocks: int = 0
             ) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        """Copy the pool slots at byte offsets ``slots`` into the chunks' blocks (leaving out the first
        ``skip_blocks`` blocks of the first chunk); the engine's current stream waits for it. Returns
        the (start, end) events of the copy."""
        return self._copy(slots, block_ids, False, skip_blocks)

    def _copy(self, slots: list[int], block_ids: list[int], to_pool: bool, skip_blocks: int
              ) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        assert self.staging is not None, "prepare() first"
        blocks = check_blocks(block_ids, len(slots), self.bpc, self.layout.num_blocks, skip_blocks)
        blocks = blocks.reshape(len(slots), self.bpc)
        lib = fast_driver()
        engine = torch.cuda.current_stream(self.device)
        copy = self.copy.cuda_stream
        self._record(self.engine_mark, engine)
        # store: the step that wrote these blocks comes first; load: kernels before this point that
        # use the target blocks (the pool's chunks cross into the buffers meanwhile)
        self._wait(self.gather, self.engine_mark)
        start = torch.cuda.Event(enable_timing=True)
        start.record(self.gather if to_pool else self.copy)
        rows = None if self.launch is not None else self._rows(block_ids, len(slots))
        for j, slot in enumerate(slots):
            b = self._stage()
            buffer, address = self.stage_ptrs[b], self.pool_address + slot
            skip = skip_blocks if j == 0 else 0
            if to_pool:
                self._wait(self.gather, self.free[b])
                self._move_pages(j, b, blocks, rows, True, 0)
                self._record(self.full[b], self.gather)
                self._wait(self.copy, self.full[b])
                check(lib.cuMemcpyAsync(address, buffer, self.chunk_bytes, copy), "cuMemcpyAsync (store)")
                self._record(self.free[b], self.copy)
            else:
                self._wait(self.copy, self.free[b])
                check(lib.cuMemcpyAsync(buffer, address, self.chunk_bytes, copy), "cuMemcpyAsync (load)")
                self._record(self.full[b], self.copy)
                self._wait(self.gather, self.full[b])
                self._move_pages(j, b, blocks, rows, False, skip)
                self._record(self.free[b], self.gather)
        done = torch.cuda.Event(enable_timing=True)
        done.record(self.copy if to_pool else self.gather)
        if not to_pool:
            self._wait(engine, done)
        return start, done

    def _move_pages(self, j: int, b: int, blocks: np.ndarray, rows: torch.Tensor | None, to_pool: bool,
                    skip_blocks: int) -> None:
        """Chunk ``j``'s pages between staging buffer ``b`` and its blocks, on the gather stream: our
        kernel with the block ids inside the launch, or else torch's index ops over the row views."""
        if self.launch is not None:
            self.launch(self.stage_ptrs[b], blocks[j], skip_blocks, to_pool, self.gather.cuda_stream, self.grid)
            return
        assert rows is not None and self.staging is not None
        per_chunk = self.layout.num_layers * self.bpc
        chunk_rows = rows[j * per_chunk : (j + 1) * per_chunk]
        with torch.cuda.stream(self.gather):
            for first, end, view in self.runs:
                rows_of_run = chunk_rows[first * self.bpc : end * self.bpc]
                pages = self.staging[b, first * self.bpc : end * self.bpc]
                if to_pool:
                    torch.index_select(view, 0, rows_of_run, out=pages)
                    continue
                if skip_blocks:  # vLLM has these blocks already: never write them
                    keep = self._kept(end - first, skip_blocks)
                    rows_of_run, pages = rows_of_run[keep], pages[keep]
                view.index_copy_(0, rows_of_run, pages)

    def _kept(self, num_planes: int, skip_blocks: int) -> torch.Tensor:
        """Rows of ``num_planes`` planes of one chunk without each plane's first ``skip_blocks`` blocks."""
        rows = np.arange(num_planes * self.bpc, dtype=np.int64).reshape(num_planes, self.bpc)[:, skip_blocks:]
        return torch.from_numpy(rows.ravel()).pin_memory().to(self.device, non_blocking=True)

    def _stage(self) -> int:
        b = self.next_stage
        self.next_stage = (b + 1) % self.stages
        return b

    def close(self) -> None:
        if self.registered:
            torch.cuda.synchronize(self.device)
            driver().cuMemHostUnregister(ctypes.c_void_p(self.pool_address))
            self.registered = False
        self.staging = None
