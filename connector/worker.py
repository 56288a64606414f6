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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from lmcd import protocol as p
from lmcd.connector.client import CacheClient, LmcdError, ServerError, WorkerInfo
from lmcd.connector.scheduler import LoadSpec, StoreSpec
from lmcd.connector.session import ServerSession
from lmcd.connector.settings import ConnectorSettings
from lmcd.connector.shm import ShmSegment
from lmcd.kernels import stages_for
from lmcd.server.transfer import CopyPlan, plan, run_plan
from lmcd.shm import SHM_DIR

if TYPE_CHECKING:
    from lmcd.connector.cuda import CudaShare, PoolCopier

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


@dataclass(slots=True)
class InFlight:
    """A GPU copy through the shared pool; ``then(client, seconds)`` sends its Commit or Release."""

    start: torch.cuda.Event
    done: torch.cuda.Event
    then: Callable[[CacheClient, float], None]
    is_store: bool


class WorkerState:
    """One vLLM worker's registration with the server, and its loads and stores.

    engine_driven: the server copies between vLLM's KV and its pool (Store, Retrieve): CPU KV
    tensors move into SHM at registration, GPU KV is shared over CUDA IPC. lmcache_driven (and
    auto, where the server shares its pool): the KV stays in vLLM's own memory and this worker
    copies between it and the server's shared pool itself, with no request before the copy:

    - store: into slots the server GRANTED ahead of time, then ``Commit`` names the chunks (sent
      without waiting; its reply brings fresh grants). Without enough grants, one ``Grant`` first.
    - load: from the slots the scheduler's lookup reported (its lease pins them), then a
      per-rank ``Release``, sent without waiting. Without them (or past their deadline), ``Pin``
      first, then ``Release`` of that pin.

    CPU copies run on the calling thread (memmove), GPU copies on side streams (``PoolCopier``):
    their Commit/Release goes out once their event has completed (``settle``, from every call).
    Where the server does not share its pool (no --share-pool), the worker uses engine_driven
    (lmcache_driven says so in one warning); a CPU worker moves its KV into SHM then, keeping
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
        self.copier: PoolCopier | None = None  # GPU, lmcache_driven: this worker's own copies
        self.grants: list[int] = []  # free pool slots the server granted to this worker
        self.grant_target = 0
        self.in_flight: list[InFlight] = []  # GPU copies this worker made, until it sees them end
        self.posted: list[tuple[int, int]] = []  # (rid, slots asked) of commits/releases sent without waiting
        self.session = ServerSession(settings, namespace, p.Role.WORKER, name, on_connect=self._register)

    def register_kv_caches(self, kv_caches: Mapping[str, torch.Tensor], num_blocks: int, block_size: int) -> None:
        if next(iter(kv_caches.values())).device.type == "cuda":
            from lmcd.connector.cuda import CudaShare

            self.cuda = CudaShare(kv_caches)
            self.kv_caches, self.num_blocks, self.block_size = dict(kv_caches), num_blocks, block_size
            if self.settings.transfer_mode == "engine_driven":
                self.cuda.export()  # refuses memory CUDA IPC cannot share, now
            self.layout = describe_pages(kv_caches, self.cuda.bases, self.cuda.sizes, num_blocks, block_size)
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
        self.grants, self.in_flight, self.posted = [], [], []  # a new session: the server forgot them
        pool_name = client.hello.pool_segment if client.hello is not None else ""
        copies_itself = self.settings.transfer_mode != "engine_driven" and bool(pool_name)
        if self.cuda is not None:
            if copies_itself and self._gpu_copies_itself(client, pool_name):
                return
            self._register_cuda_ipc(client)
            return
        if copies_itself:
            self._map_pool(pool_name)
            if not self.segments:  # the KV stays in vLLM's own memory: only the pool is shared
                self.bases, sizes, self.layout = self._storage_layout()
                self._registered(client.register_worker(self.layout, [], sizes))
                self._set_layer_addresses()
                return
        else:
            self._unmap_pool()
            if self.settings.transfer_mode == "lmcache_driven":
                log.warning("lmcache_driven needs a server started with --share-pool; %s uses engine_driven",
                            self.session.name)
            if not self.segments:
                self._move_to_shm()
        assert self.layout is not None
        info = client.register_worker(self.layout, [seg.shm_name for seg in self.segments],
                                      [seg.nbytes for seg in self.segments])
        self.worker_id = info.worker_id
        if self.pool is not None:  # KV already in SHM, and the server shares its pool now: still copy here
            self._registered(info)
            self._set_layer_addresses()

    def _register_cuda_ipc(self, client: CacheClient) -> None:
        """engine_driven on a GPU: the server maps the KV allocations and copies."""
        cuda = self.cuda
        assert cuda is not None and self.layout is not None
        self._unmap_pool()
        cuda.export()
        log.info("Sharing %d CUDA allocations (%.1f MiB) of GPU %d (PCI %s) over CUDA IPC",
                 len(cuda.bases), sum(cuda.sizes) / 2**20, cuda.device, cuda.pci)
        info = client.register_worker(self.layout, [], cuda.sizes, "cuda", cuda.handles, cuda.pci, cuda.event_handle)
        cuda.open_server_event(info.event_handle)
        self.worker_id = info.worker_id

    def _gpu_copies_itself(self, client: CacheClient, pool_name: str) -> bool:
        """lmcache_driven on a GPU: register the shared pool with CUDA and copy here; False (with one
        warning) where this worker cannot, so the server copies instead."""
        from lmcd.connector.cuda import PoolCopier, PoolCopierError

        cuda = self.cuda
        assert cuda is not None and self.layout is not None
        bases, sizes, layout = self._storage_layout()  # no memory is shared: pages count from their tensors
        try:
            if self.copier is None or self.pool is None or self.pool.name != pool_name:
                self._unmap_pool()
                self._map_pool(pool_name)
                assert self.pool is not None
                self.copier = PoolCopier(self.kv_caches, layout, bases, self.pool.base_address,
                                         self.pool.array.nbytes)
            info = client.register_worker(layout, [], sizes, "cuda", [], cuda.pci)
            if self.copier.chunk_bytes != info.chunk_bytes:
                self.copier.prepare(info.chunk_bytes // (self.layout.num_layers * self.layout.page_bytes))
        except (PoolCopierError, OSError) as exc:
            log.warning("%s cannot copy through the shared pool itself (%s); the server copies over CUDA IPC "
                        "instead (engine_driven)", self.session.name, exc)
            self._unmap_pool()
            return False
        self._registered(info)
        return True

    def _storage_layout(self) -> tuple[list[int], list[int], p.KVLayout]:
        """The KV tensors' storages (start, bytes) and the pages relative to them: the layout of a worker
        that shares no memory (it copies itself)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.kv_caches.values()}
        bases, sizes = list(storages), list(storages.values())
        return bases, sizes, describe_pages(self.kv_caches, bases, sizes, self.num_blocks, self.block_size)

    def _registered(self, info: WorkerInfo) -> None:
        """A worker that copies itself: keep granted slots for as many chunks as a GPU worker stages."""
        self.worker_id = info.worker_id
        self.grant_target = stages_for(info.chunk_bytes)

    def _unmap_pool(self) -> None:
        if self.copier is not None:
            self.copier.close()
            self.copier = None
        if self.pool is not None:
            self.pool.close()
            self.pool = None

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
        try:
            return self._load_from_pool(client, spec, blocks_per_chunk)
        finally:
            self._settle(client)  # after the copy is queued: earlier copies' Commit/Release are not urgent

    def _load_from_pool(self, client: CacheClient, spec: LoadSpec, blocks_per_chunk: int) -> int:
        worker_id = self._worker_id()
        rank = self.session.namespace.rank or 0
        num_chunks = len(spec.chunk_hashes)
        lease_slots = spec.slot_offsets[rank] if spec.slot_offsets is not None and rank < len(spec.slot_offsets) \
            else []
        if (spec.lease_id is not None and len(lease_slots) >= num_chunks
                and time.monotonic() < spec.slots_valid_until):
            offsets, lease_id = lease_slots[:num_chunks], spec.lease_id  # where the lookup pinned them
            def release(c: CacheClient, seconds: float = 0.0) -> None:
                self.posted.append((c.post_release_rank(lease_id, rank, seconds), 0))
        else:  # no usable lookup slots: pin the chunks now (taking this rank's part of the lease)
            offsets, pin_id = client.pin(worker_id, spec.chunk_hashes, spec.lease_id)
            if pin_id is None:
                return 0
            def release(c: CacheClient, seconds: float = 0.0) -> None:  # the server timed it from the pin
                self.posted.append((c.post(lambda rid: p.Release(rid, pin_id), "release"), 0))
        blocks = spec.block_ids[: len(offsets) * blocks_per_chunk]
        started = time.perf_counter()
        try:
            if self.copier is not None:
                start, done = self.copier.load(offsets, blocks, spec.skip_blocks)
                self.in_flight.append(InFlight(start, done, release, False))
            else:
                run_plan(self._plan(offsets, blocks, False, spec.skip_blocks))
        except BaseException:
            release(client)
            raise
        if self.copier is None:  # a CPU copy ended in this call: so does its request
            release(client, time.perf_counter() - started)
            self._collect(client)
        return len(offsets)

    def store(self, spec: StoreSpec) -> None:
        if self.pool is not None:
            self.session.call(lambda client: self._store_itself(client, spec), None, "store")
            return
        if self.cuda is not None:
            self.cuda.before_copy()
        result = self.session.call(lambda client: client.store(self._worker_id(), spec.chunk_hashes,
                                                               spec.block_ids), None, "store")
        if self.cuda is not None and result is not None and p.ChunkStatus.STORED in result.statuses:
            self.cuda.stores_pending = True

    def _store_itself(self, client: CacheClient, spec: StoreSpec) -> None:
        worker_id = self._worker_id()
        num_chunks = len(spec.chunk_hashes)
        bpc = len(spec.block_ids) // num_chunks
        if len(self.grants) < num_chunks:
            self._settle(client)  # replies of earlier commits may bring grants; else the copy goes first
        asked = None
        if len(self.grants) < num_chunks:  # ask for the rest now; its reply is read once the first copies are queued
            need = num_chunks - len(self.grants)
            asked = client.post(lambda rid: p.Grant(rid, worker_id, need), "grant")
        done = 0
        try:
            while True:
                n = min(num_chunks - done, len(self.grants))
                if n:
                    self._store_into_grants(client, worker_id, spec.chunk_hashes[done : done + n],
                                            spec.block_ids[done * bpc : (done + n) * bpc])
                    done += n
                if done == num_chunks or asked is None:
                    break
                reply = client.collect(asked, self.settings.request_timeout_s)
                asked = None
                if not isinstance(reply, p.Granted):
                    raise LmcdError(f"no reply to Grant from the lmcd server within "
                                    f"{self.settings.request_timeout_s} s")
                self.grants += reply.slot_offsets
        finally:
            self._settle(client)
        if done < num_chunks:
            log.debug("The pool granted slots for %d of %d chunks (full of pinned chunks)", done, num_chunks)

    def _store_into_grants(self, client: CacheClient, worker_id: int, hashes: list[bytes], blocks: list[int]) -> None:
        """Copy chunks into as many granted slots; their Commit goes out when the copy has ended."""
        n = len(hashes)
        slots, self.grants = self.grants[:n], self.grants[n:]

        def commit(c: CacheClient, seconds: float, ok: bool = True) -> None:  # and ask for slots up to the target
            coming = sum(want for _, want in self.posted)
            want = max(0, self.grant_target - len(self.grants) - coming) if ok else 0
            self.posted.append((c.post_commit_granted(worker_id, hashes, slots, want, ok, seconds), want))

        started = time.perf_counter()
        try:
            if self.copier is not None:
                start, done = self.copier.store(slots, blocks)
                self.in_flight.append(InFlight(start, done, commit, True))
                return
            run_plan(self._plan(slots, blocks, True))
        except BaseException:
            commit(client, 0.0, False)
            raise
        commit(client, time.perf_counter() - started)
        self._collect(client)  # a CPU copy ended in this call: the chunks are readable when it returns

    def _collect(self, client: CacheClient) -> None:
        """Wait for the replies of every request sent without waiting."""
        posted, self.posted = self.posted, []
        for rid, _ in posted:
            if self._reply(client, rid, self.settings.request_timeout_s) is None:
                raise LmcdError(f"no reply from the lmcd server within {self.settings.request_timeout_s} s")

    def settle(self) -> None:
        """Send the Commit/Release of copies that have finished, and read the replies that came."""
        if self.pool is not None and (self.in_flight or self.posted):
            self.session.call(self._settle, None, "settle")

    def _settle(self, client: CacheClient) -> None:
        while self.in_flight and self.in_flight[0].done.query():  # they finish in order per stream
            copy = self.in_flight.pop(0)
            copy.then(client, copy.start.elapsed_time(copy.done) / 1e3)
        still: list[tuple[int, int]] = []
        for rid, want in self.posted:
            reply = self._reply(client, rid, 0.0)
            if reply is None:
                still.append((rid, want))
        self.posted = still

    def _reply(self, client: CacheClient, rid: int, timeout_s: float) -> p.Reply | None:
        """The reply of a request sent without waiting (None: not yet); a refusal is logged, not raised:
        the copy it followed is over either way (an expired lease, say)."""
        try:
            reply = client.collect(rid, timeout_s)
        except ServerError as exc:
            log.warning("LMCache server refused a request of %s after its copy: %s", self.session.name, exc)
            return p.Pong(rid)
        if isinstance(reply, p.Committed):
            self.grants += reply.granted
        return reply

    def fence_stores(self) -> None:
        if self.copier is not None:
            stores = [copy.done for copy in self.in_flight if copy.is_store]
            if stores:
                torch.cuda.current_stream(self.copier.device).wait_event(stores[-1])
        elif self.cuda is not None:
            self.cuda.fence_stores()

    def stores_done(self) -> bool:
        """Whether the stores sent so far are complete (GPU: polled; CPU: they complete in the call)."""
        if self.copier is not None:
            self.settle()
            return not any(copy.is_store for copy in self.in_flight)
        return self.cuda is None or self.cuda.stores_done()

    def _worker_id(self) -> int:
        if self.worker_id is None:
            raise LmcdError("KV caches are not registered with the server")
        return self.worker_id

    def close(self) -> None:
        if self.copier is not None:
            torch.cuda.synchronize(self.copier.device)  # every copy ends: their Commit/Release go out
        self.settle()
        if self.worker_id is not None and self.session.available:
            worker_id = self.worker_id
            self.session.call(lambda client: client.unregister_worker(worker_id), None, "unregister")
        self.session.close()
        self._unmap_pool()
        for seg in self.segments:
            seg.close()
        self.segments = []
