"""Worker copies (``lmcache_driven``), the worker's side: it copies between its own KV and the
server's shared pool (``--share-pool``), with no request before a copy (README, "Worker copies").

A store goes into granted slots (a ``Grant`` for the rest is sent while the first copies run) and
ONE ``Commit`` names its chunks once it has been copied; a load reads the slots of the scheduler's
lookup until ``slots_valid_until`` (else a ``Pin`` first), then ``Loaded``. Commits and Loaded go
out without waiting: at once on a CPU (the copy ran on this thread), once the copy's ``done``
event has completed on a GPU (``settle``, from every connector call), with the copy's seconds.

Granted slots age: the server reclaims a slot not committed within the lease time to live
(``HelloReply.lease_ttl_s``), so this worker never starts a copy into a slot granted more than
half of it ago (timed from when the request that brought it was sent); it drops such slots (the
server takes them back) and asks for fresh ones.

Ownership: one instance per registration, called from the vLLM worker's thread.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lmcd import copyplan
from lmcd import protocol as p
from lmcd.connector.client import CacheClient, LmcdError, ServerError, WorkerInfo
from lmcd.connector.scheduler import LoadSpec, StoreSpec
from lmcd.kernels.staged import CopyEvents, stages_for

log = logging.getLogger("lmcd.connector")
Then = Callable[[CacheClient, float], None]  # sends the Commit or Loaded of a finished copy, with its seconds


class MappedPool:
    """The server's pool, mapped into this worker from the fd its handoff socket sent (a sealed memfd:
    nobody can truncate it under the mapping). ``name`` is the server's name for it (HelloReply)."""

    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        try:
            self.nbytes = os.fstat(fd).st_size
            self._mmap = mmap.mmap(fd, self.nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        finally:
            os.close(fd)
        view = np.frombuffer(self._mmap, dtype=np.uint8)
        self.address = view.ctypes.data
        del view

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self._mmap.close()


@dataclass(slots=True)
class InFlight:
    """A GPU copy of this worker (one store or load: one or more queued copies), until it is seen done."""

    copies: list[CopyEvents]
    then: Then
    is_store: bool


class SharedPool:
    def __init__(self, client: CacheClient, layout: p.KVLayout, segment_addresses: list[int],
                 segment_sizes: list[int], device: int | None, name: str) -> None:
        self.layout = layout
        self.planes = copyplan.plane_addresses(layout, segment_addresses)
        self.segment_sizes = segment_sizes
        self.device = device  # the CUDA device of the KV, or None (CPU)
        self.name = name
        assert client.hello is not None
        pool_name = client.hello.pool_segment
        self.pool = MappedPool(pool_name, client.shared_pool_fd())
        log.info("Mapped the server's shared pool %s (lmcache_driven: this worker copies)", pool_name)
        from lmcd.connector.cuda import PoolCopier  # torch's CUDA side only where the KV is on a GPU

        self.copier: PoolCopier | None = None
        self.worker_id: int | None = None
        self.blocks_per_chunk = 0
        self.grants: list[int] = []  # free pool slots the server granted to this worker
        self.granted_at: dict[int, float] = {}  # slot of grants -> when the request that granted it was sent
        self.asked_at: dict[int, float] = {}  # rid of a posted Commit -> when it was sent (its reply grants)
        self.grant_target = 0
        self.in_flight: list[InFlight] = []  # GPU copies, in the order they were queued (and end)
        self.posted: list[tuple[int, int]] = []  # (rid, slots asked) of requests sent without waiting
        self.closed = False

    def register(self, client: CacheClient) -> WorkerInfo:
        """Register (again: a new session), mapping nothing new; what an earlier session was granted or
        owed died with it."""
        from lmcd.connector.cuda import PoolCopier

        if self.copier is not None:
            self.copier.synchronize()
            for copy in self.in_flight:  # ended; what they owed went with the old session
                self.copier.seconds(*copy.copies)
        self.grants, self.in_flight, self.posted = [], [], []
        self.granted_at, self.asked_at = {}, {}
        device = p.Device.CPU if self.device is None else p.Device.CUDA
        info = client.register_worker(self.layout, device, p.Copier.WORKER, self.segment_sizes)
        self.worker_id, self.blocks_per_chunk = info.worker_id, info.blocks_per_chunk
        self.grant_target = stages_for(info.chunk_bytes)  # as many chunks as a GPU copy keeps in flight
        if self.device is not None and self.copier is None:
            layout = self.layout
            self.copier = PoolCopier(self.device, self.planes.tolist(), layout.num_blocks, layout.page_bytes,
                                     layout.block_stride, info.blocks_per_chunk, self.pool.address, self.pool.nbytes)
        return info

    def _blocks(self, block_ids: list[int], num_chunks: int, skip_blocks: int = 0) -> np.ndarray:
        try:
            return copyplan.check_blocks(block_ids, num_chunks, self.blocks_per_chunk, self.layout.num_blocks,
                                         skip_blocks)
        except copyplan.BlockIdError as exc:  # a plan this worker cannot copy: recompute, never raise into vLLM
            raise LmcdError(f"{self.name} cannot copy this plan: {exc}") from None

    # ------------------------------------------------------------ store

    def store(self, client: CacheClient, spec: StoreSpec) -> None:
        assert self.worker_id is not None
        worker_id, keys = self.worker_id, spec.chunk_keys
        num_chunks = len(keys)
        blocks = self._blocks(spec.block_ids, num_chunks)
        if len(self.grants) < num_chunks:
            self.settle(client)  # replies of earlier commits may bring grants
        self._drop_old_grants(client)
        asked = None
        if len(self.grants) < num_chunks:  # ask for the rest now; its reply is read once the first copies are queued
            asked_at = time.monotonic()
            asked = client.post_grant(worker_id, num_chunks - len(self.grants))
        copies: list[CopyEvents] = []
        used: list[int] = []
        seconds = 0.0
        try:
            while True:
                n = min(num_chunks - len(used), len(self.grants))
                if n:
                    slots, self.grants = self.grants[:n], self.grants[n:]
                    part = blocks[len(used) : len(used) + n]
                    used += slots
                    if self.copier is not None:
                        copies.append(self.copier.store(slots, part))
                    else:
                        seconds += self._run(slots, part, True, 0)
                if len(used) == num_chunks or asked is None:
                    break
                reply = client.collect(asked, client.timeout_s)
                asked = None
                if not isinstance(reply, p.Granted):
                    raise LmcdError(f"no reply to Grant from the lmcd server within {client.timeout_s} s")
                self._add_grants(reply.slots, asked_at)
        except BaseException:
            self.grants = used + self.grants  # nothing is committed: the slots are still ours
            raise
        if len(used) < num_chunks:
            log.debug("The pool granted slots for %d of %d chunks (full of pinned chunks)", len(used), num_chunks)
        if not used:
            return
        stored = keys[: len(used)]

        def commit(c: CacheClient, copy_seconds: float) -> None:  # and ask for slots up to the target
            coming = sum(want for _, want in self.posted)
            want = max(0, self.grant_target - len(self.grants) - coming)
            sent_at = time.monotonic()
            rid = c.post_commit(worker_id, stored, used, want, copy_seconds)
            self.asked_at[rid] = sent_at
            self.posted.append((rid, want))

        if copies:
            self.in_flight.append(InFlight(copies, commit, True))
            self.settle(client)
        else:
            commit(client, seconds)
            self._collect(client)  # a CPU copy ended in this call: the chunks are readable when it returns

    # ------------------------------------------------------------ load

    def load(self, client: CacheClient, spec: LoadSpec) -> int:
        """Copy the spec's chunks into vLLM's blocks; returns how many leading chunks loaded."""
        assert self.worker_id is not None
        worker_id = self.worker_id
        num_chunks = len(spec.chunk_keys)
        blocks = self._blocks(spec.block_ids, num_chunks, spec.skip_blocks)
        rank = client.namespace.rank or 0
        leased = spec.slots[rank] if spec.slots is not None and rank < len(spec.slots) else []
        if spec.lease_id is not None and len(leased) >= num_chunks and time.monotonic() < spec.slots_valid_until:
            slots, lease_id = leased[:num_chunks], spec.lease_id  # where the lookup pinned them
        else:  # no usable lookup slots: pin the chunks now (taking this rank's part of the lease)
            pinned = client.pin(worker_id, spec.chunk_keys, spec.lease_id)
            if pinned.lease_id is None:
                return 0
            slots, lease_id = pinned.slots, pinned.lease_id
        keys = spec.chunk_keys[: len(slots)]

        def loaded(c: CacheClient, copy_seconds: float, copied: list[bytes] = keys) -> None:
            self.posted.append((c.post_loaded(worker_id, lease_id, copied, spec.skip_blocks, copy_seconds), 0))

        try:
            if self.copier is not None:
                events = self.copier.load(slots, blocks[: len(slots)], spec.skip_blocks)
                self.in_flight.append(InFlight([events], loaded, False))
                self.settle(client)  # after the copy is queued: earlier copies' Commit/Loaded are not urgent
                return len(slots)
            seconds = self._run(slots, blocks[: len(slots)], False, spec.skip_blocks)
        except BaseException:
            loaded(client, 0.0, [])  # nothing loaded: the lease's pins go, nothing is counted
            raise
        loaded(client, seconds)
        self._collect(client)
        return len(slots)

    def _run(self, slots: list[int], blocks: np.ndarray, to_pool: bool, skip_blocks: int) -> float:
        """A CPU copy on this thread; its seconds."""
        addresses = [self.pool.address + slot for slot in slots]
        copy_plan = copyplan.plan(self.layout, self.planes, addresses, blocks, to_pool, skip_blocks)
        started = time.perf_counter()
        copyplan.run(copy_plan)
        return time.perf_counter() - started

    # ------------------------------------------------------------ after the copies

    def settle(self, client: CacheClient) -> None:
        """Send the Commit/Loaded of copies that have finished, and read the replies that came."""
        copier = self.copier
        while copier is not None and self.in_flight and copier.done(self.in_flight[0].copies[-1]):
            copy = self.in_flight.pop(0)  # checked in the order they were queued
            if copy.is_store and any(events.failed for events in copy.copies):
                continue  # never committed: its slots go back to the server after the lease time to live
            copy.then(client, copier.seconds(*copy.copies))
        self.posted = [(rid, want) for rid, want in self.posted if not self._answered(client, rid, 0.0)]

    def _collect(self, client: CacheClient) -> None:
        """Wait for the replies of every request sent without waiting."""
        posted, self.posted = self.posted, []
        for rid, _ in posted:
            if not self._answered(client, rid, client.timeout_s):
                raise LmcdError(f"no reply from the lmcd server within {client.timeout_s} s")

    def _answered(self, client: CacheClient, rid: int, timeout_s: float) -> bool:
        """Whether a request sent without waiting has its reply (a Commit's brings grants). A refusal
        is logged, not raised: the copy it followed is over either way (an expired lease, say)."""
        try:
            reply = client.collect(rid, timeout_s)
        except ServerError as exc:
            log.warning("LMCache server refused a request of %s after its copy: %s", self.name, exc)
            self.asked_at.pop(rid, None)
            return True
        if isinstance(reply, p.Committed):
            self._add_grants(reply.granted, self.asked_at.get(rid, 0.0))
        if reply is not None:
            self.asked_at.pop(rid, None)
        return reply is not None

    def _add_grants(self, slots: list[int], asked_at: float) -> None:
        self.grants += slots
        for slot in slots:
            self.granted_at[slot] = asked_at

    def _drop_old_grants(self, client: CacheClient) -> None:
        """Forget granted slots older than half the lease time to live: the server may reclaim them
        before a copy into them is committed (module docstring)."""
        ttl = client.hello.lease_ttl_s if client.hello is not None else 0.0
        if ttl <= 0:
            return
        fresh_after = time.monotonic() - ttl / 2
        kept = [slot for slot in self.grants if self.granted_at.get(slot, 0.0) > fresh_after]
        if len(kept) < len(self.grants):
            log.debug("%s dropped %d granted slots older than %.1f s (half the lease timeout)", self.name,
                      len(self.grants) - len(kept), ttl / 2)
        self.grants = kept
        self.granted_at = {slot: self.granted_at[slot] for slot in kept}

    def stores_done(self) -> bool:
        """Whether the stores sent so far are complete (GPU: polled; CPU: they complete in the call)."""
        return not any(copy.is_store for copy in self.in_flight)

    def fence_stores(self) -> None:
        """The engine's stream waits (on the GPU) for stores in flight: their blocks may be rewritten next."""
        stores = [copy for copy in self.in_flight if copy.is_store]
        if self.copier is not None and stores:
            self.copier.fence(stores[-1].copies[-1])

    def finish(self, client: CacheClient | None) -> None:
        """Wait for every copy (GPU), send what they owe the server if it is there, and read its replies."""
        if self.copier is not None:
            self.copier.synchronize()
        if client is not None:
            self.settle(client)
            with contextlib.suppress(LmcdError):
                self._collect(client)

    def close(self) -> None:
        if self.copier is not None:
            self.copier.close()
            self.copier = None
        self.pool.close()
        self.closed = True
