"""Worker-side: move vLLM's CPU KV tensors into SHM once, describe their pages, load and store.

``migrate_to_shm`` gives every backing buffer of the KV tensors a POSIX SHM twin (copying what
is there) and re-points each tensor at it in place (``Tensor.set_``), so every reference vLLM
holds now reads and writes shared pages; it runs at registration, before any KV is written.

``describe_pages`` turns the tensors into a ``KVLayout``: in each layer's tensor the
dimension whose size is the number of blocks is the block dimension; every index of the
dimensions before it is one *plane* (e.g. K and V in a ``[2, blocks, ...]`` layout), and the
dimensions after it must be contiguous (one page)::

    layer tensor [outer..., num_blocks, inner...]  ->  planes = product(outer)
    page (plane, block b) = inner bytes at plane_offset + b * block_stride

Torch is imported here only: this module runs inside vLLM, never in the server.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Mapping

import torch

from lmcd import protocol as p
from lmcd.connector.client import CacheClient, LmcdError
from lmcd.connector.scheduler import LoadSpec, StoreSpec
from lmcd.connector.session import ServerSession
from lmcd.connector.settings import ConnectorSettings
from lmcd.connector.shm import ShmSegment

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


def describe_pages(kv_caches: Mapping[str, torch.Tensor], segments: list[ShmSegment], num_blocks: int,
                   block_size: int) -> p.KVLayout:
    bases = [seg.array.ctypes.data for seg in segments]
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
        seg = next((i for i, start in enumerate(bases)
                    if start <= base < start + segments[i].nbytes), None)
        if seg is None:
            raise LayoutError(f"{name} does not live in the SHM segments (migrate it first)")
        for outer in itertools.product(*(range(n) for n in tensor.shape[:b])):
            plane = base + sum(i * s for i, s in zip(outer, tensor.stride()[:b], strict=True)) * item
            offsets.append(plane - bases[seg])
            seg_ids.append(seg)
    assert page_bytes is not None and block_stride is not None
    return p.KVLayout(len(offsets), num_blocks, block_size, page_bytes, block_stride, offsets, seg_ids)


class WorkerState:
    """One vLLM worker's registration with the server, and its loads and stores."""

    def __init__(self, settings: ConnectorSettings, namespace: p.Namespace, name: str) -> None:
        self.settings = settings
        self.segments: list[ShmSegment] = []
        self.layout: p.KVLayout | None = None
        self.worker_id: int | None = None
        self.session = ServerSession(settings, namespace, p.Role.WORKER, name, on_connect=self._register)

    def register_kv_caches(self, kv_caches: Mapping[str, torch.Tensor], num_blocks: int, block_size: int) -> None:
        self.segments = migrate_to_shm(kv_caches)
        self.layout = describe_pages(kv_caches, self.segments, num_blocks, block_size)
        self.session.call(lambda client: None, None, "register")  # connects, and registers via on_connect

    def _register(self, client: CacheClient) -> None:
        assert self.layout is not None
        self.worker_id = None
        info = client.register_worker(self.layout, [seg.shm_name for seg in self.segments],
                                      [seg.nbytes for seg in self.segments])
        self.worker_id = info.worker_id

    def load(self, spec: LoadSpec, blocks_per_chunk: int) -> set[int]:
        """Copy the spec's chunks into vLLM's blocks; returns the block ids that did NOT load."""
        started = time.perf_counter()
        num_chunks = len(spec.chunk_hashes)
        got = self.session.call(
            lambda client: client.retrieve(self._worker_id(), spec.chunk_hashes, spec.block_ids, spec.lease_id,
                                           spec.skip_blocks), 0, "retrieve")
        if got < num_chunks:
            first_failed = max(got * blocks_per_chunk, spec.skip_blocks)
            log.warning("Loaded %d of %d chunks; vLLM recomputes the rest", got, num_chunks)
            return set(spec.block_ids[first_failed:])
        log.debug("Loaded %d chunks in %.4f s", num_chunks, time.perf_counter() - started)
        return set()

    def store(self, spec: StoreSpec) -> None:
        self.session.call(lambda client: client.store(self._worker_id(), spec.chunk_hashes, spec.block_ids),
                          None, "store")

    def _worker_id(self) -> int:
        if self.worker_id is None:
            raise LmcdError("KV caches are not registered with the server")
        return self.worker_id

    def close(self) -> None:
        if self.worker_id is not None and self.session.available:
            worker_id = self.worker_id
            self.session.call(lambda client: client.unregister_worker(worker_id), None, "unregister")
        self.session.close()
        for seg in self.segments:
            seg.close()
        self.segments = []
