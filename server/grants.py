"""Worker copies: ``Grant``, ``Commit``, ``Pin`` and ``Loaded`` for workers registered with
``Copier.WORKER``, which copy between their own KV and the shared pool (server ``--share-pool``).

No request comes before a worker's copy: a store goes into slots granted ahead of time (owned
by the session until committed, at most a quarter of the pool, at least 1 GiB) and ``Commit``
names its chunks afterwards; a load reads the slots a lookup (or a ``Pin``) leased, and
``Loaded`` ends its rank's part of the lease. Both are counted and logged when they arrive,
after the worker's copy, with the seconds the worker timed as the server times its own.

Ownership: the loop thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmcd import protocol as p
from lmcd.server.pool import SlotId
from lmcd.server.session import RequestError, Session

if TYPE_CHECKING:
    from lmcd.server.service import CacheService
    from lmcd.server.workers import Worker

MIN_GRANT_CAP_BYTES = 1 << 30  # a session may hold this much granted, or a quarter of the pool if more


class WorkerCopies:
    def __init__(self, service: CacheService) -> None:
        self.service = service

    def require_shared_pool(self) -> None:
        if not self.service.pool.shared:
            raise RequestError(p.ErrorCode.BAD_REQUEST, "the server's pool is not shared, so workers cannot copy "
                               "themselves: start the server with --share-pool (lmcache.mp.mp_transfer_mode "
                               "lmcache_driven), or register for server copies (engine_driven)")

    def grant(self, session: Session, req: p.Grant) -> p.Granted:
        worker = self.service.worker(session, req.worker_id, p.Copier.WORKER)
        return p.Granted(req.rid, self._grant(session, worker, req.num_slots))

    def _grant(self, session: Session, worker: Worker, num_slots: int) -> list[int]:
        """Up to ``num_slots`` free slots for ``worker``'s chunks (bounded per session), evicting LRU chunks."""
        svc = self.service
        cap = max(MIN_GRANT_CAP_BYTES, svc.pool.capacity_bytes // 4)
        num_slots = min(num_slots, max(0, cap - sum(session.granted.values())) // worker.chunk_bytes)
        evictions_before = svc.index.num_evictions
        slots: list[int] = []
        for _ in range(num_slots):
            slot = svc.index.allocate_free(worker.chunk_bytes)
            if slot is None:
                break
            session.granted[slot] = worker.chunk_bytes
            slots.append(slot)
        svc.stats.evicted_chunks += svc.index.num_evictions - evictions_before
        return slots

    def commit(self, session: Session, req: p.Commit) -> p.Committed:
        """The worker wrote one store's chunks into slots it was granted: index them."""
        svc = self.service
        worker = svc.worker(session, req.worker_id, p.Copier.WORKER)
        if len(req.slots) != len(req.chunk_keys):
            raise RequestError(p.ErrorCode.BAD_REQUEST, f"{len(req.chunk_keys)} chunk keys need as many slots, "
                               f"got {len(req.slots)}")
        if len(set(req.slots)) != len(req.slots):
            raise RequestError(p.ErrorCode.BAD_REQUEST, "a slot is named twice in one commit")
        for slot in req.slots:
            if session.granted.get(slot) != worker.chunk_bytes:
                raise RequestError(p.ErrorCode.BAD_REQUEST, f"slot {slot} is not a slot granted to this session "
                                   f"for chunks of {worker.chunk_bytes} bytes; commit only slots from Grant")
        statuses: list[p.ChunkStatus] = []
        for chunk_key, slot in zip(req.chunk_keys, req.slots, strict=True):
            del session.granted[slot]
            status = svc.index.insert_ready(svc.key(worker, chunk_key), SlotId(slot), worker.chunk_bytes)
            if status != p.ChunkStatus.STORED:
                svc.pool.free(SlotId(slot))
            statuses.append(status)
        stored = statuses.count(p.ChunkStatus.STORED)
        svc.stats.store_present_chunks += len(statuses) - stored
        if stored:
            svc.count_store(worker, stored, req.copy_seconds)
        return p.Committed(req.rid, statuses, self._grant(session, worker, req.want_slots))

    def pin(self, session: Session, req: p.Pin) -> p.Pinned:
        svc = self.service
        worker = svc.worker(session, req.worker_id, p.Copier.WORKER)
        pinned = svc.pin_leading(worker, req.chunk_keys, req.lease_id)
        if not pinned:
            return p.Pinned(req.rid, [], None)
        lease = svc.leases.create(session.session_id, {worker.rank: pinned})
        return p.Pinned(req.rid, [entry.slot for entry in pinned], lease.lease_id)

    def loaded(self, session: Session, req: p.Loaded) -> p.Released:
        """The worker copied its rank's chunks of a lease out of the shared pool itself."""
        svc = self.service
        worker = svc.worker(session, req.worker_id, p.Copier.WORKER)
        if req.skip_blocks >= worker.blocks_per_chunk:
            raise RequestError(p.ErrorCode.BAD_REQUEST, f"skip_blocks {req.skip_blocks} must be below the "
                               f"{worker.blocks_per_chunk} blocks of a chunk")
        entries = svc.take_lease(req.lease_id, worker.rank)
        svc.unpin(entries)
        keys = set(req.chunk_keys)
        num_loaded = sum(entry.key[2] in keys for entry in entries)
        if num_loaded:
            svc.count_retrieve(worker, num_loaded, req.skip_blocks, req.copy_seconds)
        return p.Released(req.rid, len(entries))

    def drop_grants(self, session: Session) -> None:
        """Slots granted to a session that goes (or unregisters) go back to the pool."""
        for slot in session.granted:
            self.service.pool.free(SlotId(slot))
        session.granted.clear()
