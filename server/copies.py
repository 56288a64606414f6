"""Server copies: ``Store`` and ``Retrieve`` for workers registered with ``Copier.SERVER``.

The server copies between the worker's mapped KV pages and pool slots: on CPUs a copy plan
(``lmcd.copyplan``) run by ``CopyThreads`` off the loop, replied to when the copy has ended; on
GPUs the staged copy (``GpuWorker.submit``), replied to at once (the worker orders itself on the
server's event), and booked when the GPU has finished it.

Ownership: the loop thread; a copy's ``finish`` is posted back to it from a copy or completion
thread. A worker with copies in flight is never unmapped (``WorkerRegistry.copy_done``).

Exception safety: whatever raises (the copy, the bookkeeping after it, counting, logging), every
copy that was started ends exactly once: its chunks' stores end (``finish_store``: readable, or
dropped if the copy failed) or its pins drop, the worker's and the server's in-flight counts go
down, and the request gets its one reply (an ``Error`` if nothing else could be sent).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from lmcd import copyplan
from lmcd import protocol as p
from lmcd.server.index import Entry
from lmcd.server.session import RequestError, Session
from lmcd.server.transfer import CopyThreads
from lmcd.server.workers import Worker

if TYPE_CHECKING:
    from lmcd.server.service import CacheService

log = logging.getLogger("lmcd.server")
FULL_MESSAGE = "pool is full of pinned or in-flight chunks; retry later or raise --l1-size-gb"

Finish = Callable[[BaseException | None, float], None]  # (error, the copy's seconds), on the loop thread


class ServerCopies:
    def __init__(self, service: CacheService) -> None:
        self.service = service
        self.threads = CopyThreads(service.config.max_workers or 1)
        self.pending = 0  # copies in flight (shutdown waits for them)

    def store(self, session: Session, req: p.Store, started: float) -> p.StoreReply | None:
        svc = self.service
        worker = svc.worker(session, req.worker_id, p.Copier.SERVER)
        blocks = self._blocks(worker, req.chunk_keys, req.block_ids)
        evictions_before = svc.index.num_evictions
        statuses: list[p.ChunkStatus] = []
        writing: list[tuple[Entry, int]] = []
        try:
            for i, chunk_key in enumerate(req.chunk_keys):
                entry, status = svc.index.begin_store(svc.key(worker, chunk_key), worker.chunk_bytes)
                statuses.append(status)
                if entry is not None:
                    writing.append((entry, i))
        except BaseException:  # no copy started: what began writing ends now
            for entry, _ in writing:
                svc.index.finish_store(entry, False)
            raise
        svc.stats.evicted_chunks += svc.index.num_evictions - evictions_before
        svc.stats.store_present_chunks += statuses.count(p.ChunkStatus.PRESENT)
        refused = len(statuses) - len(writing) - statuses.count(p.ChunkStatus.PRESENT)
        svc.stats.store_refused_chunks += refused
        message = FULL_MESSAGE if refused else ""
        if not writing:
            return p.StoreReply(req.rid, statuses, message)
        early = worker.gpu is not None  # GPU: answered at launch; the worker orders itself on our event

        def finish(error: BaseException | None, seconds: float) -> None:
            for entry, i in writing:  # first the bookkeeping, which only asserts our own invariants
                svc.index.finish_store(entry, error is None)
                if error is not None:
                    statuses[i] = p.ChunkStatus.FAILED
            line = None
            if error is None:  # counted before the reply (a scrape after it sees the store), logged after it
                line = self._counted(lambda: svc.count_store(worker, len(writing), seconds, log_line=False))
                svc.write_behind(worker.ns_id, [entry for entry, _ in writing])
            if not early:
                text = f"copy failed: {error}" if error is not None else message
                svc.send(session, p.StoreReply(req.rid, statuses, text), "store", started)
            if error is not None:
                log.error("Store copy failed for worker %d: %s", worker.worker_id, error)
            elif line is not None:
                svc.log_copy("Stored", *line, seconds)

        entries = [entry for entry, _ in writing]
        self._copy(worker, entries, blocks[[i for _, i in writing]], True, 0, finish)
        return p.StoreReply(req.rid, list(statuses), message) if early else None

    def retrieve(self, session: Session, req: p.Retrieve, started: float) -> p.RetrieveReply | None:
        svc = self.service
        worker = svc.worker(session, req.worker_id, p.Copier.SERVER)
        blocks = self._blocks(worker, req.chunk_keys, req.block_ids, req.skip_blocks)
        pinned = svc.pin_leading(session, worker, req.chunk_keys, req.lease_id)
        if not pinned:
            return p.RetrieveReply(req.rid, 0)
        early = worker.gpu is not None

        def finish(error: BaseException | None, seconds: float) -> None:
            svc.unpin(pinned)
            if error is not None:
                log.error("Retrieve copy failed for worker %d: %s", worker.worker_id, error)
                if not early:
                    svc.send(session, p.Error(req.rid, p.ErrorCode.INTERNAL, f"copy failed: {error}"), "retrieve",
                             started)
                return
            line = self._counted(lambda: svc.count_retrieve(worker, len(pinned), req.skip_blocks, seconds,
                                                            log_line=False))
            if not early:  # the reply before the log line, as for a store
                svc.send(session, p.RetrieveReply(req.rid, len(pinned)), "retrieve", started)
            if line is not None:
                svc.log_copy("Retrieved", *line, seconds)

        self._copy(worker, pinned, blocks[: len(pinned)], False, req.skip_blocks, finish)
        return p.RetrieveReply(req.rid, len(pinned)) if early else None

    @staticmethod
    def _counted(count: Callable[[], tuple[int, int]]) -> tuple[int, int] | None:
        """Count a copy that ended; a failure to count (a metrics hook) is logged, and the copy's
        reply still goes out: the bytes were copied."""
        try:
            return count()
        except Exception:
            log.exception("Counting a copy failed")
            return None

    @staticmethod
    def _blocks(worker: Worker, keys: list[bytes], block_ids: list[int], skip_blocks: int = 0) -> np.ndarray:
        try:
            return copyplan.check_blocks(block_ids, len(keys), worker.blocks_per_chunk, worker.layout.num_blocks,
                                         skip_blocks)
        except copyplan.BlockIdError as exc:
            code = p.ErrorCode.BLOCK_OUT_OF_RANGE if exc.out_of_range else p.ErrorCode.BAD_REQUEST
            raise RequestError(code, f"worker {worker.worker_id}: {exc}") from None

    def _copy(self, worker: Worker, entries: list[Entry], blocks: np.ndarray, to_pool: bool, skip_blocks: int,
              finish: Finish) -> None:
        """Start the copy between ``entries``' slots and ``blocks``; ``finish`` runs on the loop thread
        when it has ended, after the worker's in-flight count drops."""
        svc = self.service
        base = svc.pool.base_address
        slot_addresses = [base + entry.slot for entry in entries]

        def done(error: BaseException | None, seconds: float) -> None:  # on a copy or completion thread
            def on_loop() -> None:
                self.pending -= 1
                try:
                    svc.workers.copy_done(worker)
                except Exception:  # unmapping a departed worker failed: the copy still ends
                    log.exception("Ending a copy of worker %d failed", worker.worker_id)
                finish(error, seconds)

            svc.post(on_loop)

        worker.inflight += 1
        self.pending += 1
        try:
            if worker.gpu is not None:
                worker.gpu.submit(slot_addresses, blocks, to_pool, skip_blocks, done)
            else:
                assert worker.planes is not None
                self.threads.submit(copyplan.plan(worker.layout, worker.planes, slot_addresses, blocks, to_pool,
                                                  skip_blocks), done)
        except BaseException as exc:  # refused before it started (or CUDA failed to launch): nothing was copied
            worker.inflight -= 1
            self.pending -= 1
            if to_pool:
                for entry in entries:
                    svc.index.finish_store(entry, False)
            else:
                svc.unpin(entries)
            raise RequestError(p.ErrorCode.INTERNAL, f"copy not started: {exc}") from None
