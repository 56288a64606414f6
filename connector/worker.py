"""One vLLM worker's registration with the server, and its loads and stores.

Who copies is decided at registration (README, "Who copies") and logged as LMCache logs it,
``Creating transfer context (device_type=..., mode=...)``: ``SharedKV`` (server copies,
``engine_driven``) or ``SharedPool`` (worker copies, ``lmcache_driven``). On a CPU the choice fixes
where vLLM's KV lives, so it is made once, in ``register_kv_caches``, before vLLM has run a step,
and the KV never moves later; on a GPU nothing moves, so each registration chooses again.
Errors a user must fix locally raise from ``register_kv_caches``; anything the server causes later
costs a warning and a recompute (``ServerSession``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from lmcd import protocol as p
from lmcd.connector.client import CacheClient, HandoffError, LmcdError, WorkerInfo
from lmcd.connector.layout import LayoutError, describe_pages, migrate_to_shm, storages
from lmcd.connector.scheduler import LoadSpec, StoreSpec
from lmcd.connector.session import ServerSession
from lmcd.connector.settings import ConnectorSettings
from lmcd.connector.shared_kv import SharedKV
from lmcd.connector.shared_pool import SharedPool
from lmcd.shm import ShmSegment

if TYPE_CHECKING:
    from lmcd.connector.cuda import CudaShare

log = logging.getLogger("lmcd.connector")
MODE_NAMES = {p.Copier.SERVER: "engine_driven", p.Copier.WORKER: "lmcache_driven"}


class WorkerState:
    def __init__(self, settings: ConnectorSettings, namespace: p.Namespace, name: str) -> None:
        self.settings = settings
        self.mode = settings.transfer_mode
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.num_blocks = self.block_size = 0
        self.device: int | None = None  # the CUDA device of the KV, None on a CPU
        self.cuda: CudaShare | None = None  # GPU: the KV allocations (exported for server copies)
        self.segments: list[ShmSegment] | None = None  # CPU: the KV's shared memfds, once it moved there
        self.plane: SharedKV | SharedPool | None = None  # who copies, for the current registration
        self.worker_id: int | None = None
        self.blocks_per_chunk = 0  # the server's chunk size over vLLM's block size (Registered)
        self._registering = False  # within register_kv_caches: vLLM has not run a step yet
        self._answered = False  # a server has answered since register_kv_caches
        self._unregistered: SharedKV | SharedPool | None = None  # a plane whose registration failed
        self.session = ServerSession(settings, namespace, p.Role.WORKER, name, on_connect=self._register)

    # ------------------------------------------------------------ registration

    def register_kv_caches(self, kv_caches: Mapping[str, torch.Tensor], num_blocks: int, block_size: int) -> None:
        devices = {t.device.type for t in kv_caches.values()}
        if devices not in ({"cpu"}, {"cuda"}):
            raise LayoutError(f"the KV tensors must all be on the CPU or all on CUDA devices, found {devices}")
        self.kv_caches, self.num_blocks, self.block_size = dict(kv_caches), num_blocks, block_size
        self._describe(*storages(kv_caches))  # a layout this connector cannot copy fails now
        if devices == {"cuda"}:
            from lmcd.connector.cuda import CudaShare, kv_device

            self.device = kv_device(kv_caches)
            self.cuda = CudaShare(kv_caches, self.device)
            if self.mode == "engine_driven":
                self.cuda.export()  # refuses memory CUDA IPC cannot share, now
        elif self.mode == "engine_driven":
            self._move_to_shm()  # now, before vLLM has run a step
        self._registering = True
        try:
            self.session.call(lambda client: None, None, "register")  # connects; registers through _register
        finally:
            self._registering = False
        if self.device is None and self.segments is None and not self._answered and self.mode == "auto":
            log.info("No LMCache server answers at registration: auto chooses server copies (engine_driven), which "
                     "any server can serve later without moving vLLM's KV again")
            self._move_to_shm()

    def _move_to_shm(self) -> None:
        assert not self.plane, "vLLM's KV moves into SHM only at registration"
        self.segments = migrate_to_shm(self.kv_caches)

    def _register(self, client: CacheClient) -> None:
        """Register with a server that just answered (the first time, or again after it restarted). A
        plane whose registration failed is kept for the next attempt, which reuses it if it fits."""
        previous, self.plane, self.worker_id = self.plane or self._unregistered, None, None
        self._unregistered = None
        if not self.kv_caches:
            return  # register_kv_caches has not come yet
        self._answered = True
        try:
            plane = self._choose(client, previous)
            if previous is not None and plane is not previous:
                previous.close()
            try:
                plane, info = self._register_plane(client, plane)
            except BaseException:
                self._unregistered = plane
                raise
        except LmcdError:
            raise
        except Exception as exc:  # the worker cannot use this server: a warning and a recompute, never a crash
            raise LmcdError(f"registration failed: {exc}") from exc
        self.plane, self.worker_id, self.blocks_per_chunk = plane, info.worker_id, info.blocks_per_chunk
        copier = p.Copier.WORKER if isinstance(self.plane, SharedPool) else p.Copier.SERVER
        if self.mode != "auto" and MODE_NAMES[copier] != self.mode:
            log.warning("lmcache.mp.mp_transfer_mode %s is not possible with this server: the server copies "
                        "(engine_driven)", self.mode)
        log.info("Creating transfer context (device_type=%s, mode=%s): %s", "cpu" if self.device is None else "cuda",
                 MODE_NAMES[copier], "the server shares its pool and this worker copies"
                 if copier == p.Copier.WORKER else "this worker shares its KV memory and the server copies")

    def _register_plane(self, client: CacheClient, plane: SharedKV | SharedPool
                        ) -> tuple[SharedKV | SharedPool, WorkerInfo]:
        """Register ``plane``; a GPU worker that cannot copy itself registers for server copies instead."""
        try:
            return plane, plane.register(client)
        except LmcdError:
            raise
        except Exception as exc:
            if not isinstance(plane, SharedPool) or self.device is None:
                raise
            # this GPU worker cannot copy itself (NVRTC, pinning, GPU memory): the server copies instead
            log.warning("%s cannot copy through the shared pool itself (%s); the server copies over CUDA IPC "
                        "instead (engine_driven)", self.session.name, exc)
            if plane.worker_id is not None:
                client.unregister_worker(plane.worker_id)
            plane.close()
            shared_kv = self._shared_kv()
            return shared_kv, shared_kv.register(client)

    def _choose(self, client: CacheClient, previous: SharedKV | SharedPool | None) -> SharedKV | SharedPool:
        """Who copies for this registration (module docstring); ``previous`` is reused where it fits."""
        assert client.hello is not None
        pool_name = client.hello.pool_segment
        if self.device is None and self.segments is None and not pool_name:
            if self.mode == "auto" and self._registering:  # the first registration: the KV may still move
                self._move_to_shm()
            else:
                raise LmcdError(f"this worker's KV stays in vLLM's memory (lmcache.mp.mp_transfer_mode {self.mode}, "
                                f"decided at registration) and the server at {self.settings.url} does not share "
                                "its pool: start the server with --share-pool")
        if not pool_name or self.segments is not None or self.mode == "engine_driven":
            return previous if isinstance(previous, SharedKV) else self._shared_kv()
        if isinstance(previous, SharedPool) and previous.pool.name == pool_name and not previous.closed:
            return previous
        starts, sizes = storages(self.kv_caches)  # no memory is shared: pages count from their tensors
        try:
            return SharedPool(client, self._describe(starts, sizes), starts, sizes, self.device, self.session.name)
        except HandoffError as exc:  # e.g. another user than the server's: the pool is not for it
            if self.mode != "auto" or (self.device is None and not self._registering):
                raise
            log.warning("%s cannot map the server's shared pool (%s); the server copies instead (engine_driven)",
                        self.session.name, exc)
            if self.device is None:
                self._move_to_shm()
            return self._shared_kv()

    def _describe(self, starts: list[int], sizes: list[int]) -> p.KVLayout:
        return describe_pages(self.kv_caches, starts, sizes, self.num_blocks, self.block_size)

    def _shared_kv(self) -> SharedKV:
        if self.cuda is not None:
            return SharedKV(self._describe(self.cuda.starts, self.cuda.sizes), cuda=self.cuda)
        assert self.segments is not None
        starts = [seg.array.ctypes.data for seg in self.segments]
        return SharedKV(self._describe(starts, [seg.nbytes for seg in self.segments]), segments=self.segments)

    # ------------------------------------------------------------ loads and stores

    def load(self, spec: LoadSpec) -> set[int]:
        """Copy the spec's chunks into vLLM's blocks; returns the block ids that did NOT load."""
        started = time.perf_counter()
        num_chunks = len(spec.chunk_keys)
        got = self.session.call(lambda client: self._plane().load(client, spec), 0, "load")
        if got < num_chunks:
            first_failed = max(got * spec.blocks_per_chunk, spec.skip_blocks)
            # a partial load from a server that answers is news; without one the session said so already
            log.log(logging.WARNING if self.plane is not None else logging.DEBUG,
                    "Loaded %d of %d chunks; vLLM recomputes the rest", got, num_chunks)
            return set(spec.block_ids[first_failed:])
        log.debug("Load of %d chunks handed over in %.3f ms", num_chunks, (time.perf_counter() - started) * 1e3)
        return set()

    def store(self, spec: StoreSpec) -> None:
        started = time.perf_counter()
        self.session.call(lambda client: self._plane().store(client, spec), None, "store")
        log.debug("Store of %d chunks handed over in %.3f ms", len(spec.chunk_keys),
                  (time.perf_counter() - started) * 1e3)

    def settle(self) -> None:
        """Send what finished copies owe the server (worker copies on a GPU), and read its replies."""
        if isinstance(self.plane, SharedPool) and (self.plane.in_flight or self.plane.posted):
            self.session.call(lambda client: self._plane().settle(client), None, "settle")

    def fence_stores(self) -> None:
        if self.plane is not None:
            self.plane.fence_stores()

    def stores_done(self) -> bool:
        """Whether the stores sent so far are complete (GPU: polled; CPU: they complete in the call)."""
        self.settle()
        return self.plane is None or self.plane.stores_done()

    def _plane(self) -> SharedKV | SharedPool:
        if self.plane is None:
            raise LmcdError("KV caches are not registered with the server")
        return self.plane

    def close(self) -> None:
        plane = self.plane
        if isinstance(plane, SharedPool):
            plane.finish(self.session.client if self.session.available else None)
        if self.worker_id is not None and self.session.available:
            worker_id = self.worker_id
            self.session.call(lambda client: client.unregister_worker(worker_id), None, "unregister")
        self.session.close()
        if plane is not None:
            plane.close()
        self.plane = None
        for seg in self.segments or []:
            seg.close()
        self.segments = None
