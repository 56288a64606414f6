"""The L2 cascade: write-behind to every tier, and lookups that prefetch from the first tier holding a chunk.

Ownership: ``Tiers`` and ``Prefetch`` are loop-thread state. Each tier has its own reader and
writer threads (``_Workers``, daemon threads: a tier stuck in a syscall never holds up the exit);
a job runs an adapter call there and posts its result back to the loop, where the index, pins and
queues change. Counters are written under the tier's lock, read by /status and /metrics.

Write-behind (``write_behind``, after a store's chunks are readable in L1)::

    for each tier: holds it already (in-memory index) -> skipped, counted
                   queue over its byte bound          -> dropped, counted (the store never waits)
                   else pin the entry, queue a write; the write thread encodes the header (checksum)
                   from the slot's bytes, the adapter writes it (once: it answers False when it
                   holds the object); the entry is unpinned on the loop when the write ends

Lookup (``start_prefetch``, for the chunks after the leading ones L1 has)::

    resolve  -- per (chunk, rank): L1 (ready or being written), else the first tier holding it:
                local tiers answer from memory on the loop; remote tiers in one pipelined
                ``contains`` on their reader thread. The leading run of chunks that every
                rank has somewhere is what can be prefetched.
    read     -- each chunk of the run not in L1 gets a writing L1 slot (``begin_store``) and a read
                job on its tier: payload into the slot, then ``verify``; the entry becomes ready
                only if the object is intact (a corrupt one is deleted, counted, logged once).
    answer   -- when every job has ended, or at the deadline (``--l2-prefetch-load-timeout``),
                whichever is first: the lookup counts what is READY IN L1 then and pins it under
                its lease. A read that ends later still fills L1 (the next lookup hits) but is never
                reported by this one: no reported hit is ever missing, no lookup waits past its deadline.

A tier with a job past its deadline is "stalled": lookups skip it (a miss, not a wait) until that
job returns. A tier that is down (``Adapter.usage()["available"]`` False) is skipped the same way.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from lmcd.protocol import ChunkStatus
from lmcd.server import l2
from lmcd.server.index import Entry, IndexKey

if TYPE_CHECKING:
    from lmcd.server.config import ServerConfig
    from lmcd.server.index import ChunkIndex
    from lmcd.server.pool import Pool
    from lmcd.server.session import Post

log = logging.getLogger("lmcd.l2")

READ_THREADS = 4  # I/O: cold reads of separate files reach the sequential rate only with several in flight
WRITE_THREADS = 2
AVAILABILITY_CHECK_S = 0.5  # how often a tier's availability is read from its adapter (usage())


class _Workers:
    """A few daemon threads running jobs in FIFO order; ``close`` ends them once the queue is empty."""

    def __init__(self, name: str, num_threads: int) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                         for i in range(num_threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:  # a job reports its own errors; this is a bug in one, never the thread's end
                log.exception("Internal error in an L2 job")

    def close(self, timeout_s: float) -> bool:
        """Stop after the queued jobs; True if every thread ended within ``timeout_s``."""
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)


class Tier:
    """One adapter with its threads, write queue and counters."""

    def __init__(self, label: str, adapter: l2.Adapter, queue_bytes: int) -> None:
        self.label = label
        self.adapter = adapter
        self.queue_limit_bytes = queue_bytes
        self.counters = l2.TierCounters()
        self.lock = threading.Lock()
        self.readers = _Workers(f"lmcd-l2-{label}-read", READ_THREADS)
        self.writers = _Workers(f"lmcd-l2-{label}-write", WRITE_THREADS)
        # loop-thread state
        self.queued_bytes = 0
        self.writing: set[str] = set()  # names queued or being written
        self.reads_in_flight = 0
        self.stalled_jobs = 0  # jobs past a lookup's deadline that have not returned yet
        self.corrupt_logged = False
        self._available = True
        self._available_checked = 0.0

    def count(self, **deltas: int) -> None:
        with self.lock:
            for name, delta in deltas.items():
                setattr(self.counters, name, getattr(self.counters, name) + delta)

    def usable(self, now: float) -> bool:
        """Whether lookups may ask this tier now (not stalled, not down)."""
        return not self.stalled_jobs and self.available(now)

    def available(self, now: float) -> bool:
        """Whether the tier is up, by its adapter (read at most every AVAILABILITY_CHECK_S)."""
        if now - self._available_checked >= AVAILABILITY_CHECK_S:
            self._available_checked = now
            try:
                self._available = bool(self.adapter.usage().get("available", True))
            except Exception:
                self._available = False
        return self._available

    def note_corrupt(self, oid: l2.ObjectId, why: str) -> None:
        """Count a dropped object; the first of this tier is logged at WARNING, the rest at DEBUG."""
        self.count(corrupt=1)
        level = logging.DEBUG if self.corrupt_logged else logging.WARNING
        self.corrupt_logged = True
        log.log(level, "L2 tier %s: dropped corrupt object %s (rank %d): %s%s", self.label, oid.name, oid.rank, why,
                "" if level == logging.DEBUG else "; further ones are counted in /metrics and logged at DEBUG")

    def status(self) -> dict[str, object]:
        with self.lock:
            counters = asdict(self.counters)
        usage: dict[str, object]
        try:
            usage = dict(self.adapter.usage())
        except Exception as exc:
            usage = {"available": False, "error": str(exc)}
        return {"tier": self.label, "kind": self.adapter.kind, "where": self.adapter.describe(), **usage,
                "counters": counters,
                "queues": {"write_queued_bytes": self.queued_bytes, "write_queued_objects": len(self.writing),
                           "write_queue_limit_bytes": self.queue_limit_bytes, "reads_in_flight": self.reads_in_flight,
                           "stalled_jobs": self.stalled_jobs}}


Reply = Callable[[], None]


@dataclass(slots=True, eq=False)
class Prefetch:
    """One lookup waiting for L2 reads (loop-thread state)."""

    ns_id: int
    namespace: str
    chunk_bytes: int
    ranks: list[int]
    keys: list[bytes]  # the lookup's chunk keys, from the first one L1 lacks
    deadline: float
    answer: Reply  # counts what L1 holds then, pins it, replies: called exactly once
    reading: bool = False  # membership is resolved: the reads are started (answered when they end)
    answered: bool = False
    jobs: dict[int, Tier] = field(default_factory=dict)  # job id -> its tier, while it runs (not ended)


class Tiers:
    """The ordered cascade of L2 tiers (see the module docstring)."""

    def __init__(self, tiers: list[Tier], index: ChunkIndex, pool: Pool, post: Post, timeout_s: float) -> None:
        self.tiers = tiers
        self.index = index
        self.pool = pool
        self.post = post
        self.timeout_s = timeout_s
        self._prefetches: list[Prefetch] = []
        self._next_job = 0

    # ------------------------------------------------------------ write-behind

    def write_behind(self, namespace: str, entries: list[Entry], source: Tier | None = None) -> None:
        """Queue ``entries`` (ready, in L1) for every tier that does not hold them (loop thread); ``source``:
        the tier they were just read from (which holds them)."""
        named = []  # (entry, its object, the object's name), named once for every tier
        for entry in entries:
            if entry.ready and entry.indexed:  # not cleared meanwhile
                oid = l2.ObjectId(namespace, entry.key[1], entry.key[2])
                named.append((entry, oid, oid.name))
        now = time.monotonic()
        for tier in self.tiers:
            if tier is source:
                continue
            if not tier.available(now):  # down: its copies are dropped, not queued behind a dead tier
                tier.count(dropped_writes=len(named))
                continue
            for entry, oid, name in named:
                if name in tier.writing or tier.adapter.holds(name):
                    tier.count(skipped_present=1)
                    continue
                if tier.queued_bytes + entry.nbytes > tier.queue_limit_bytes:
                    tier.count(dropped_writes=1)
                    continue
                self.index.pin(entry)
                tier.queued_bytes += entry.nbytes
                tier.writing.add(name)
                tier.writers.submit(self._write_job(tier, oid, entry))

    def _write_job(self, tier: Tier, oid: l2.ObjectId, entry: Entry) -> Callable[[], None]:
        payload = self.pool.array[entry.slot : entry.slot + entry.nbytes].data  # pinned: nobody reuses it

        def job() -> None:
            try:
                written = tier.adapter.write(oid.name, l2.encode_header(oid, payload), payload)
            except l2.TierError as exc:
                tier.count(errors=1)
                log.debug("L2 tier %s: write of %s failed: %s", tier.label, oid.name, exc)
            else:
                if written:
                    tier.count(writes=1, bytes_in=entry.nbytes)
                else:
                    tier.count(skipped_present=1)

            def done() -> None:
                tier.queued_bytes -= entry.nbytes
                tier.writing.discard(oid.name)
                self.index.unpin(entry)

            self.post(done)

        return job

    @property
    def queued_writes(self) -> int:
        return sum(len(tier.writing) for tier in self.tiers)

    # ------------------------------------------------------------ lookup

    def start_prefetch(self, ns_id: int, namespace: str, chunk_bytes: int, ranks: list[int], keys: list[bytes],
                       answer: Reply) -> bool:
        """Prefetch the leading chunks of ``keys`` (all missing from L1 for some rank) into L1; ``answer``
        runs once they are there, or at the deadline. False (``answer`` will not run) if no tier can
        have them now."""
        now = time.monotonic()
        usable = [tier for tier in self.tiers if tier.usable(now)]
        if not usable:
            return False
        job = Prefetch(ns_id, namespace, chunk_bytes, ranks, keys, now + self.timeout_s, answer)
        self._prefetches.append(job)  # from now on its deadline holds, whatever phase it is in
        sources: list[list[Tier | None | bool]] = [[None] * len(ranks) for _ in keys]  # True: in L1
        self._resolve(job, sources, usable, 0)
        return True

    def _resolve(self, job: Prefetch, sources: list[list[Tier | None | bool]], usable: list[Tier], step: int) -> None:
        """Find a source for every (chunk, rank) still unresolved: L1 and local tiers here, one remote tier
        per step (its ``contains`` runs on its reader thread and calls back here with ``step + 1``)."""
        if step == 0:
            for i, chunk_key in enumerate(job.keys):
                for r, rank in enumerate(job.ranks):
                    if (job.ns_id, rank, chunk_key) in self.index.entries:
                        sources[i][r] = True
        while step < len(usable):
            tier = usable[step]
            wanted = [(i, r) for i, row in enumerate(sources) for r, source in enumerate(row) if source is None]
            if not wanted:
                break
            names = [l2.ObjectId(job.namespace, job.ranks[r], job.keys[i]).name for i, r in wanted]
            if not tier.adapter.remote:
                found = [bool(tier.adapter.holds(name)) for name in names]
                self._found(tier, sources, wanted, found)
                step += 1
                continue
            self._run(job, tier, partial(tier.adapter.contains, names),
                      partial(self._contains_done, job, sources, usable, step, tier, wanted))
            return
        self._read(job, sources)

    def _contains_done(self, job: Prefetch, sources: list[list[Tier | None | bool]], usable: list[Tier], step: int,
                       tier: Tier, wanted: list[tuple[int, int]], found: object) -> None:
        if isinstance(found, list) and len(found) == len(wanted):  # else the call failed (counted): none found
            self._found(tier, sources, wanted, [bool(held) for held in found])
        if job.answered:
            return
        self._resolve(job, sources, usable, step + 1)

    @staticmethod
    def _found(tier: Tier, sources: list[list[Tier | None | bool]], wanted: list[tuple[int, int]],
               found: list[bool]) -> None:
        """``tier`` holds the ``wanted`` (chunk, rank) pairs where ``found`` says so; the rest are its misses."""
        for (i, r), held in zip(wanted, found, strict=True):
            if held:
                sources[i][r] = tier
        tier.count(misses=found.count(False))

    def _read(self, job: Prefetch, sources: list[list[Tier | None | bool]]) -> None:
        """Read the leading run of chunks that every rank has somewhere into writing L1 slots."""
        job.reading = True
        for i, row in enumerate(sources):
            if any(source is None for source in row) or not self._read_row(job, i, row):
                break
        if not job.jobs:
            self._answer(job)

    def _read_row(self, job: Prefetch, i: int, row: list[Tier | None | bool]) -> bool:
        """Start the reads of chunk ``i`` for the ranks a tier has it for; False if L1 had no slot."""
        for r, source in enumerate(row):
            if not isinstance(source, Tier):
                continue  # in L1 already
            key: IndexKey = (job.ns_id, job.ranks[r], job.keys[i])
            entry, status = self.index.begin_store(key, job.chunk_bytes)
            if entry is None:
                if status == ChunkStatus.PRESENT:
                    continue  # stored meanwhile (or being stored): the answer sees what is ready
                return False  # L1 full of pinned chunks: no further slot
            self._read_one(job, source, l2.ObjectId(job.namespace, job.ranks[r], job.keys[i]), entry)
        return True

    def _read_one(self, job: Prefetch, tier: Tier, oid: l2.ObjectId, entry: Entry) -> None:
        dest = self.pool.array[entry.slot : entry.slot + entry.nbytes].data  # writing: only this job touches it

        def read() -> bool:
            try:
                header = tier.adapter.read_into(oid.name, dest)
                l2.verify(oid, header, dest)
            except l2.MissingObject:
                tier.count(misses=1)
                return False
            except l2.CorruptObject as exc:
                tier.note_corrupt(oid, str(exc))
                try:
                    tier.adapter.delete(oid.name)
                except l2.TierError:
                    tier.count(errors=1)
                return False
            tier.count(hits=1, bytes_out=len(dest))
            return True

        tier.reads_in_flight += 1

        def done(ok: object) -> None:
            tier.reads_in_flight -= 1
            self.index.finish_store(entry, ok is True)
            if ok is True:
                self.write_behind(job.namespace, [entry], source=tier)  # to the other tiers, e.g. Redis -> disk

        self._run(job, tier, read, done)

    def _run(self, job: Prefetch, tier: Tier, call: Callable[[], object], done: Callable[[object], None]) -> None:
        """Run ``call`` on ``tier``'s reader thread; ``done(result)`` on the loop (result: the call's value,
        or None when it raised a TierError, counted). It is in ``job.jobs`` until it ended."""
        job_id = self._next_job = self._next_job + 1
        job.jobs[job_id] = tier

        def run() -> None:
            result: object
            try:
                result = call()
            except l2.TierError as exc:
                tier.count(errors=1)
                log.debug("L2 tier %s: %s", tier.label, exc)
                result = None
            except Exception:
                log.exception("Internal error in an L2 read of tier %s", tier.label)
                result = None
            self.post(lambda: self._job_done(job, job_id, result, done))

        tier.readers.submit(run)

    def _job_done(self, job: Prefetch, job_id: int, result: object, done: Callable[[object], None]) -> None:
        tier = job.jobs.pop(job_id)
        if job.answered:  # it outlived the lookup's deadline
            tier.stalled_jobs -= 1
        done(result)
        if not job.jobs and not job.answered and job.reading:
            self._answer(job)

    def _answer(self, job: Prefetch) -> None:
        if not job.answered:
            job.answered = True
            self._prefetches.remove(job)
            job.answer()

    def next_deadline(self) -> float | None:
        return min((job.deadline for job in self._prefetches), default=None)

    def expire(self, now: float) -> None:
        """Answer every lookup whose deadline passed; tiers with its jobs still running are stalled."""
        if not self._prefetches:
            return
        late = [job for job in self._prefetches if job.deadline <= now]
        for job in late:
            for tier in job.jobs.values():
                tier.stalled_jobs += 1
                tier.count(timeouts=1)
            self._answer(job)
            log.debug("An L2 prefetch passed its %.2f s deadline with %d calls running", self.timeout_s,
                      len(job.jobs))

    # ------------------------------------------------------------ lifecycle

    def flush(self, timeout_s: float, run_calls: Callable[[], None]) -> None:
        """Wait (at most ``timeout_s``) for the queued writes; the loop's posted calls run meanwhile."""
        pending = self.queued_writes
        if not pending:
            return
        log.info("Shutting down: flushing %d queued L2 writes (at most %.0f s)", pending, timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.queued_writes and time.monotonic() < deadline:
            time.sleep(0.005)
            run_calls()
        if self.queued_writes:
            log.warning("Shutting down: %d L2 writes not flushed within %.0f s are lost (the chunks stay in no tier)",
                        self.queued_writes, timeout_s)

    def close(self) -> bool:
        """End the threads and close the adapters; False if a thread is still inside a call (then the
        caller must not unmap the pool: that thread may still read it)."""
        ended = True
        for tier in self.tiers:
            ended &= tier.readers.close(1.0)
            ended &= tier.writers.close(1.0)
        for tier in self.tiers:
            try:
                tier.adapter.close()
            except Exception:
                log.exception("Closing L2 tier %s failed", tier.label)
        return ended

    def status(self) -> list[dict[str, object]]:
        return [tier.status() for tier in self.tiers]


def open_tiers(config: ServerConfig, index: ChunkIndex, pool: Pool, post: Post) -> Tiers:
    """The cascade of ``config.l2_adapters``, in order, each adapter started (which logs its progress)."""
    from lmcd.server.config import ConfigError
    from lmcd.server.l2config import make_adapter

    queue_bytes = max(1, min((config.l2_write_queue_mb or 0) << 20, pool.capacity_bytes // 4))
    kinds = [spec.kind for spec in config.l2_adapters]
    tiers: list[Tier] = []
    for i, spec in enumerate(config.l2_adapters):
        label = spec.kind if kinds.count(spec.kind) == 1 else f"{spec.kind}{kinds[:i + 1].count(spec.kind)}"
        adapter = make_adapter(spec)
        try:
            adapter.start()
        except l2.TierError as exc:  # e.g. a disk tier's directory that cannot be made: the operator must fix it
            for tier in tiers:
                tier.adapter.close()
            raise ConfigError(f"--l2-adapter #{i + 1} ({adapter.describe()}): {exc}") from None
        tiers.append(Tier(label, adapter, queue_bytes))
        log.info("L2 tier %d (%s): %s; write-behind queue of %.0f MiB", i + 1, label, adapter.describe(),
                 queue_bytes / 2**20)
    log.info("L2 cascade: %s (a lookup waits at most %.2f s for L2 reads; --l2-prefetch-load-timeout)",
             " -> ".join(["L1"] + [tier.label for tier in tiers]), config.l2_prefetch_load_timeout_s)
    return Tiers(tiers, index, pool, post, config.l2_prefetch_load_timeout_s)
