"""Worker-side: share vLLM's KV memory (SHM, CUDA IPC) or copy it itself, describe its pages, load and store.

``migrate_to_shm`` gives every backing buffer of the KV tensors a POSIX SHM twin (copying what
is there) and re-points each tensor at it in place (``Tensor.set_``), so every reference vLLM
holds now reads and writes shared pages. engine_driven runs it at registration, before any KV
is written; the other modes keep vLLM's KV in its own memory and run it only when they meet a
server that does not share its pool.

``describe_pages`` turns the tensors into a ``KVLayout``: in each layer's tensor the
dimension whose size is the number of blocks is the block dimension; every index of the
dimensions before it is one *plane* (e.g. K and V in a ``[2, blocks, ...]`` layout), and the
dimensions after it must be contiguous (one page)::

    layer tensor [outer..., num_blocks, inner...]  ->  planes = product(outer)
    page (plane, block b) = inner bytes at plane_offset + b * block_stride

Torch is imported here only: this module runs inside vLLM, never in the server.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import mmap
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

from lmcd import protocol as p
from lmcd.connector.client import CacheClient, LmcdError
from lmcd.connector.scheduler import LoadSpec, StoreSpec
from lmcd.connector.session import ServerSession
from lmcd.connector.settings import ConnectorSettings
from lmcd.connector.shm import ShmSegment
from lmcd.server.transfer import CopyPlan, plan, run_plan
from lmcd.shm import SHM_DIR

if TYPE_CHECKING:
    from lmcd.connector.cuda import CudaShare

log = logging.getLogger("lmcd.connector")


class LayoutError(ValueError):
    """KV tensors this connector cannot describe; the message says what was found."""


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
            shared = torch.frombuffer(seg._mmap, dtype=torch.uint8)
            shared.copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
            segments[key] = (seg, shared.untyped_storage())
            log.info("Migrated CPU KV cache tensor (nbytes=%d) to SHM %s", storage.nbytes(), seg.shm_name)
        _, shared_storage = segments[key]
        with torch.no_grad():
            tensor.set_(shared_storage, tensor.storage_offset(), tensor.size(), tensor.stride())
    return [seg for seg, _ in segments.values()]


def describe_pages(kv_caches: Mapping[str, torch.Tensor], bases: list[int], sizes: list[int], num_blocks: int,
                   block_size: int) -> p.KVLayout:
    """The page geometry of ``kv_caches``, with every plane's offset into the memory segment
    (SHM segment or CUDA allocation, starting at ``bases[i]``, ``sizes[i]`` bytes) that holds it."""
    offsets: list[int] = []
    seg_ids: list[int] = []
    page_bytes = block_stride = None
    for name, tensor in kv_caches.items():
        dims = [d for d, size in enumerate(tensor.shape) if size == num_blocks]
        if not dims:
            raise LayoutError(f"{name} has shape {tuple(tensor.shape)}: no dimension of {num_blocks} blocks")
        b = dims[0]
        item = tensor.element_size()
        inner = tensor.shape[b + 1 :]
        expected = [math.prod(inner[i + 1 :]) for i in range(len(inner))]
        if list(tensor.stride()[b + 1 :]) != expected:
            raise LayoutError(f"{name}: a page (dims after the block dim, shape {tuple(inner)}) is not "
                              f"contiguous: strides {tensor.stride()}")
        this_page, this_stride = math.prod(inner) * item, tensor.stride(b) * item
        if page_bytes is None:
            page_bytes, block_stride = this_page, this_stride
        elif (page_bytes, block_stride) != (this_page, this_stride):
            raise LayoutError(f"{name}: page {this_page} B / stride {this_stride} B differ from other layers'")
        base = tensor.data_ptr()
        seg = next((i for i, start in enumerate(bases) if start <= base < start + sizes[i]), None)
        if seg is None:
            raise LayoutError(f"{name} does not live in the shared memory segments (share it first)")
        for outer in itertools.product(*(range(n) for n in tensor.shape[:b])):
            plane = base + sum(i * s for i, s in zip(outer, tensor.stride()[:b], strict=True)) * item
            offsets.append(plane - bases[seg])
            seg_ids.append(seg)
    assert page_bytes is not None and block_stride is not None
    return p.KVLayout(len(offsets), num_blocks, block_size, page_bytes, block_stride, offsets, seg_ids)


class SharedPool:
    """The server's pool mapped into this worker (lmcache_driven): the worker copies itself."""

    def __init__(self, shm_name: str) -> None:
        self.name = shm_name
        fd = os.open(os.path.join(SHM_DIR, shm_name.lstrip("/")), os.O_RDWR)
        try:
            self._mmap = mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        finally:
            os.close(fd)
        self.array = np.frombuffer(self._mmap, dtype=np.uint8)
        self.base_address = self.array.ctypes.data

    def close(self) -> None:
        del self.array
        with contextlib.suppress(BufferError):
            self._mmap.close()


class WorkerState:
    """One vLLM worker's registration with the server, and its loads and stores.

    engine_driven: the KV tensors move into SHM at registration and the server copies between
    those pages and its pool (Store, Retrieve). lmcache_driven (and auto, where the server shares
    its pool): the KV stays in vLLM's own memory and this worker copies between it and the
    server's shared pool itself, on the calling thread (Reserve + copy + Commit, Pin + copy +
    Release). Where the server does not share its pool (no --share-pool), the worker moves its KV
    into SHM then and uses engine_driven (lmcache_driven says so in one warning); the copy keeps
    every byte vLLM wrote.
    """

    def __init__(self, settings: ConnectorSettings, namespace: p.Namespace, name: str) -> None:
        self.settings = settings
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.num_blocks = self.block_size = 0
        self.segments: list[ShmSegment] = []
        self.layout: p.KVLayout | None = None
        self.bases: list[int] = []  # start of each memory segment the layout's offsets count from
        self.worker_id: int | None = None
        self.pool: SharedPool | None = None
        self.layer_addresses: np.ndarray | None = None
        self.cuda: CudaShare | None = None
        self.session = ServerSession(settings, namespace, p.Role.WORKER, name, on_connect=self._register)

    def register_kv_caches(self, kv_caches: Mapping[str, torch.Tensor], num_blocks: int, block_size: int) -> None:
        if next(iter(kv_caches.values())).device.type == "cuda":
            from lmcd.connector.cuda import CudaShare

            self.cuda = CudaShare(kv_caches)
            self.layout = describe_pages(kv_caches, self.cuda.bases, self.cuda.sizes, num_blocks, block_size)
            log.info("Sharing %d CUDA allocations (%.1f MiB) of GPU %d (PCI %s) over CUDA IPC",
                     len(self.cuda.bases), sum(self.cuda.sizes) / 2**20, self.cuda.device, self.cuda.pci)
        else:
            for name, tensor in kv_caches.items():
                if tensor.device.type != "cpu":
                    raise LayoutError(f"{name} is on {tensor.device}; the CPU path needs CPU KV tensors")
            self.kv_caches, self.num_blocks, self.block_size = dict(kv_caches), num_blocks, block_size
            if self.settings.transfer_mode == "engine_driven":
                self._move_to_shm()  # now, before any KV is written
        self.session.call(lambda client: None, None, "register")  # connects, and registers via on_connect

    def _move_to_shm(self) -> None:
        self.segments = migrate_to_shm(self.kv_caches)
        self.bases = [seg.array.ctypes.data for seg in self.segments]
        self.layout = describe_pages(self.kv_caches, self.bases, [seg.nbytes for seg in self.segments],
                                     self.num_blocks, self.block_size)

    def _register(self, client: CacheClient) -> None:
        self.worker_id = None
        if self.cuda is not None:
            assert self.layout is not None
            cuda = self.cuda
            info = client.register_worker(self.layout, [], cuda.sizes, "cuda", cuda.handles, cuda.pci,
                                          cuda.event_handle)
            cuda.open_server_event(info.event_handle)
            self.worker_id = info.worker_id
            if self.settings.transfer_mode == "lmcache_driven":
                log.warning("lmcache_driven is not available for GPU workers; %s uses engine_driven (the server "
                            "copies over CUDA IPC)", self.session.name)
            return
        pool_name = client.hello.pool_segment if client.hello is not None else ""
        if self.settings.transfer_mode != "engine_driven" and pool_name:
            self._map_pool(pool_name)
            if not self.segments:  # the KV stays in vLLM's own memory: only the pool is shared
                storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                            for t in self.kv_caches.values()}
                self.bases, sizes = list(storages), list(storages.values())
                self.layout = describe_pages(self.kv_caches, self.bases, sizes, self.num_blocks, self.block_size)
                self.worker_id = client.register_worker(self.layout, [], sizes).worker_id
                self._set_layer_addresses()
                return
        else:
            if self.pool is not None:
                self.pool.close()
                self.pool = None
            if self.settings.transfer_mode == "lmcache_driven":
                log.warning("lmcache_driven needs a server started with --share-pool; %s uses engine_driven",
                            self.session.name)
            if not self.segments:
                self._move_to_shm()
        assert self.layout is not None
        info = client.register_worker(self.layout, [seg.shm_name for seg in self.segments],
                                      [seg.nbytes for seg in self.segments])
        self.worker_id = info.worker_id
        if self.pool is not None:
            self._set_layer_addresses()

    def _map_pool(self, name: str) -> None:
        if self.pool is not None and self.pool.name != name:
            self.pool.close()
            self.pool = None
        if self.pool is None:
            self.pool = SharedPool(name)
            log.info("Mapped the server's shared pool %s (lmcache_driven: this worker copies)", name)

    def _set_layer_addresses(self) -> None:
        assert self.layout is not None
        bases = np.array(self.bases, dtype=np.int64)
        self.layer_addresses = bases[np.asarray(self.layout.layer_segments)] + np.asarray(self.layout.layer_offsets,
                                                                                         np.int64)

    def _plan(self, offsets: list[int], block_ids: list[int], to_pool: bool, skip_blocks: int = 0) -> CopyPlan:
        assert self.pool is not None and self.layout is not None and self.layer_addresses is not None
        slots = np.asarray(offsets, dtype=np.int64) + self.pool.base_address
        return plan(self.layout, self.layer_addresses, slots, np.asarray(block_ids, dtype=np.int64), to_pool,
                    skip_blocks)

    def load(self, spec: LoadSpec, blocks_per_chunk: int) -> set[int]:
        """Copy the spec's chunks into vLLM's blocks; returns the block ids that did NOT load."""
        started = time.perf_counter()
        num_chunks = len(spec.chunk_hashes)
        if self.pool is not None:
            got = self.session.call(lambda client: self._load_itself(client, spec, blocks_per_chunk), 0, "pin")
        else:
            if self.cuda is not None:
                self.cuda.before_copy()
            got = self.session.call(
                lambda client: client.retrieve(self._worker_id(), spec.chunk_hashes, spec.block_ids, spec.lease_id,
                                               spec.skip_blocks), 0, "retrieve")
            if self.cuda is not None and got:
                self.cuda.after_load()
        if got < num_chunks:
            first_failed = max(got * blocks_per_chunk, spec.skip_blocks)
            log.warning("Loaded %d of %d chunks; vLLM recomputes the rest", got, num_chunks)
            return set(spec.block_ids[first_failed:])
        log.debug("Loaded %d chunks in %.4f s", num_chunks, time.perf_counter() - started)
        return set()

    def _load_itself(self, client: CacheClient, spec: LoadSpec, blocks_per_chunk: int) -> int:
        offsets, pin_id = client.pin(self._worker_id(), spec.chunk_hashes, spec.lease_id)
        if pin_id is None:
            return 0
        try:
            run_plan(self._plan(offsets, spec.block_ids[: len(offsets) * blocks_per_chunk], False,
                                  spec.skip_blocks))
        finally:
            client.release(pin_id)
        return len(offsets)

    def store(self, spec: StoreSpec) -> None:
        if self.pool is not None:
            self.session.call(lambda client: self._store_itself(client, spec), None, "reserve")
            return
        if self.cuda is not None:
            self.cuda.before_copy()
        result = self.session.call(lambda client: client.store(self._worker_id(), spec.chunk_hashes,
                                                               spec.block_ids), None, "store")
        if self.cuda is not None and result is not None and p.ChunkStatus.STORED in result.statuses:
            self.cuda.stores_pending = True

    def fence_stores(self) -> None:
        if self.cuda is not None:
            self.cuda.fence_stores()

    def stores_done(self) -> bool:
        """Whether the stores sent so far are complete (GPU: polled; CPU: they complete in the call)."""
        return self.cuda is None or self.cuda.stores_done()

    def _store_itself(self, client: CacheClient, spec: StoreSpec) -> None:
        worker_id = self._worker_id()
        statuses, offsets = client.reserve(worker_id, spec.chunk_hashes)
        mine = [i for i, status in enumerate(statuses) if status == p.ChunkStatus.STORED]
        if not mine:
            return
        bpc = len(spec.block_ids) // len(spec.chunk_hashes)
        blocks = [b for i in mine for b in spec.block_ids[i * bpc : (i + 1) * bpc]]
        hashes = [spec.chunk_hashes[i] for i in mine]
        try:
            run_plan(self._plan([offsets[i] for i in mine], blocks, True))
        except BaseException:
            client.commit(worker_id, hashes, ok=False)
            raise
        client.commit(worker_id, hashes)

    def _worker_id(self) -> int:
        if self.worker_id is None:
            raise LmcdError("KV caches are not registered with the server")
        return self.worker_id

    def close(self) -> None:
        if self.worker_id is not None and self.session.available:
            worker_id = self.worker_id
            self.session.call(lambda client: client.unregister_worker(worker_id), None, "unregister")
        self.session.close()
        if self.pool is not None:
            self.pool.close()
        for seg in self.segments:
            seg.close()
        self.segments = []
