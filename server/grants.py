"""Worker copies: ``Grant``, ``Commit``, ``Pin`` and ``Loaded`` for workers registered with
``Copier.WORKER``, which copy between their own KV and the shared pool (server ``--share-pool``).

No request comes before a worker's copy: a store goes into slots granted ahead of time and
``Commit`` names its chunks afterwards; a load reads the slots a lookup (or a ``Pin``) leased, and
``Loaded`` ends its rank's part of the lease. Both are counted and logged when they arrive,
after the worker's copy, with the seconds the worker timed as the server times its own.

Grants are bounded and expire. A session holds at most ``grant_cap`` granted bytes (a quarter of
the pool, at least one chunk: room for one large store, e.g. 2 GiB of a 16K-token prompt on a 12
GiB pool), so one session never takes the pool from the others. A granted slot not committed
within the lease time to live (``HelloReply.lease_ttl_s``) is reclaimed: it goes back to the pool,
and a later Commit naming it gets FAILED for that chunk (a miss, never a wrong chunk: the slot may
hold another chunk by then). The worker never writes into a granted slot older than half the time
to live (``connector/shared_pool.py``), so a reclaimed slot is never written by it. Every grant
has the same time to live, so grant order is expiry order and reclaiming is O(1) per slot.

Ownership: the loop thread.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from lmcd import protocol as p
from lmcd.server.index import Entry
from lmcd.server.pool import SlotId
from lmcd.server.session import RequestError, Session

if TYPE_CHECKING:
    from lmcd.server.service import CacheService
    from lmcd.server.workers import Worker

log = logging.getLogger("lmcd.server")
POOL_FRACTION = 4  # a session holds at most this share of the pool granted


def grant_cap(pool_bytes: int, chunk_bytes: int) -> int:
    """Bytes one session may hold granted: room for the others, and at least one chunk."""
    return max(chunk_bytes, pool_bytes // POOL_FRACTION)


class WorkerCopies:
    def __init__(self, service: CacheService) -> None:
        self.service = service
        self.ttl_s = service.config.lease_timeout_s
        self._expiry: OrderedDict[int, tuple[Session, float]] = OrderedDict()  # granted slot -> (holder, deadline)
        self._reclaimed: dict[int, set[int]] = {}  # session id -> its slots reclaimed, not yet named
        self.num_reclaimed = 0

    @property
    def num_granted(self) -> int:
        """Slots granted to sessions now, not yet committed or reclaimed."""
        return len(self._expiry)

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
        cap = grant_cap(svc.pool.capacity_bytes, worker.chunk_bytes)
        num_slots = min(num_slots, max(0, cap - sum(session.granted.values())) // worker.chunk_bytes)
        evictions_before = svc.index.num_evictions
        deadline = time.monotonic() + self.ttl_s
        reclaimed = self._reclaimed.get(session.session_id)
        slots: list[int] = []
        for _ in range(num_slots):
            slot = svc.index.allocate_free(worker.chunk_bytes)
            if slot is None:
                break
            session.granted[slot] = worker.chunk_bytes
            self._expiry[slot] = (session, deadline)
            if reclaimed is not None:
                reclaimed.discard(slot)
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
        reclaimed = self._reclaimed.get(session.session_id, set())
        for slot in req.slots:
            if session.granted.get(slot) != worker.chunk_bytes and slot not in reclaimed:
                raise RequestError(p.ErrorCode.BAD_REQUEST, f"slot {slot} is not a slot granted to this session "
                                   f"for chunks of {worker.chunk_bytes} bytes; commit only slots from Grant")
        statuses: list[p.ChunkStatus] = []
        ready: list[Entry] = []  # the chunks now readable, for the L2 tiers
        for chunk_key, slot in zip(req.chunk_keys, req.slots, strict=True):
            if slot not in session.granted:  # reclaimed: its bytes are not trusted, the chunk is a miss
                reclaimed.discard(slot)
                statuses.append(p.ChunkStatus.FAILED)
                continue
            del session.granted[slot]
            del self._expiry[slot]
            key = svc.key(worker, chunk_key)
            status = svc.index.insert_ready(key, SlotId(slot), worker.chunk_bytes)
            if status == p.ChunkStatus.STORED:
                ready.append(svc.index.entries[key])
            else:
                svc.pool.free(SlotId(slot))
            statuses.append(status)
        stored = statuses.count(p.ChunkStatus.STORED)
        failed = statuses.count(p.ChunkStatus.FAILED)
        svc.stats.store_present_chunks += len(statuses) - stored - failed
        svc.stats.store_refused_chunks += failed
        if stored:
            svc.count_store(worker, stored, req.copy_seconds)
            svc.write_behind(worker.ns_id, ready)
        return p.Committed(req.rid, statuses, self._grant(session, worker, req.want_slots))

    def pin(self, session: Session, req: p.Pin) -> p.Pinned:
        svc = self.service
        worker = svc.worker(session, req.worker_id, p.Copier.WORKER)
        pinned = svc.pin_leading(session, worker, req.chunk_keys, req.lease_id)
        if not pinned:
            return p.Pinned(req.rid, [], None)
        return p.Pinned(req.rid, [entry.slot for entry in pinned], svc.create_lease(session, {worker.rank: pinned}))

    def loaded(self, session: Session, req: p.Loaded) -> p.Released:
        """The worker copied its rank's chunks of a lease out of the shared pool itself."""
        svc = self.service
        worker = svc.worker(session, req.worker_id, p.Copier.WORKER)
        if req.skip_blocks >= worker.blocks_per_chunk:
            raise RequestError(p.ErrorCode.BAD_REQUEST, f"skip_blocks {req.skip_blocks} must be below the "
                               f"{worker.blocks_per_chunk} blocks of a chunk")
        entries = svc.take_lease(session, req.lease_id, worker.rank)
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
            del self._expiry[slot]
        session.granted.clear()
        self._reclaimed.pop(session.session_id, None)

    def expire_grants(self, now: float) -> None:
        """Reclaim the granted slots not committed within the time to live (module docstring)."""
        expiry = self._expiry
        num_before = self.num_reclaimed
        while expiry:
            slot, (session, deadline) = next(iter(expiry.items()))
            if deadline > now:
                break
            del expiry[slot]
            del session.granted[slot]
            self._reclaimed.setdefault(session.session_id, set()).add(slot)
            self.service.pool.free(SlotId(slot))
            self.num_reclaimed += 1
        if self.num_reclaimed > num_before:
            log.info("Reclaimed %d granted slots not committed within %.0f s (lease timeout)",
                     self.num_reclaimed - num_before, self.ttl_s)
