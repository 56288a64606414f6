"""The cache service: what each request does to the pool, index, leases and workers.

Ownership: every method runs on the request loop thread (copy completions are posted back
to it), so the state here needs no locks. ``handle`` returns the reply, or None when the
reply is sent later (after a copy) through ``send``. Every request gets exactly one reply.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from lmcd import __version__
from lmcd import protocol as p
from lmcd.server.config import ServerConfig
from lmcd.server.gpu import CudaSupport
from lmcd.server.index import ChunkIndex, ChunkKey, Entry
from lmcd.server.leases import LeaseTable
from lmcd.server.metrics import Stats
from lmcd.server.pool import Pool, SlotId
from lmcd.server.transfer import CopyEngine, plan
from lmcd.server.workers import RegistrationError, Worker, WorkerRegistry

log = logging.getLogger("lmcd.server")
NO_CUDA = CudaSupport(None, "CUDA was not probed")

CAPABILITIES = ["cpu-shm", "leases", "lookup-all-ranks", "store-status-per-chunk"]
MAX_WORLD_SIZE = 4096
MIN_GRANT_CAP_BYTES = 1 << 30  # a session may hold this much granted, or a quarter of the pool if more


class RequestError(Exception):
    """Raised by a handler to answer with ``Error(code, message)``."""

    def __init__(self, code: p.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True, eq=False)
class Session:
    session_id: int
    routing_id: bytes
    fd: int | None
    connected_at: float = field(default_factory=time.monotonic)
    hello: p.Hello | None = None
    ns_id: int | None = None
    reserved: dict[ChunkKey, Entry] = field(default_factory=dict)  # lmcache_driven stores not committed
    reserved_at: float = 0.0
    granted: dict[int, int] = field(default_factory=dict)  # lmcache_driven: granted slot -> bytes


Send = Callable[[Session, p.Reply, str, float], None]  # (session, reply, op, start time)
Post = Callable[[Callable[[], None]], None]  # run a callable on the loop thread (thread-safe)


class CacheService:
    def __init__(self, config: ServerConfig, pool: Pool, send: Send, post: Post,
                 cuda: CudaSupport = NO_CUDA) -> None:
        self.config = config
        self.pool = pool
        self.index = ChunkIndex(pool)
        self.leases = LeaseTable(config.lease_timeout_s)
        self.workers = WorkerRegistry(cuda.host, cuda.problem, config.copy_ctas, config.copy_engine)
        self.copies = CopyEngine(config.max_workers or 1)
        self.stats = Stats()
        self._send = send
        self._post = post
        self._namespaces: dict[tuple[str, str, str, int], int] = {}
        self._namespace_chunk_bytes: dict[int, int] = {}
        self.pending_copies = 0
        self.full_status: Callable[[], dict[str, object]] = self.status  # the server adds sessions etc.
        self.observe_copy: Callable[[str, float], None] = lambda direction, seconds: None  # thread-safe hook

    # ------------------------------------------------------------ dispatch

    def handle(self, session: Session, request: p.Request, started: float) -> p.Reply | None:
        if session.hello is None and not isinstance(request, p.Hello):
            raise RequestError(p.ErrorCode.NOT_HELLO, "the first request of a session must be Hello")
        match request:
            case p.Hello():
                return self.hello(session, request)
            case p.Ping(rid=rid):
                return p.Pong(rid)
            case p.RegisterWorker():
                return self.register(session, request)
            case p.UnregisterWorker(rid=rid, worker_id=worker_id):
                self.workers.remove(self._worker(session, worker_id))
                return p.Unregistered(rid)
            case p.Lookup():
                return self.lookup(session, request)
            case p.Store():
                return self.store(session, request, started)
            case p.Retrieve():
                return self.retrieve(session, request, started)
            case p.Release(rid=rid, lease_id=lease_id, rank=rank, copy_seconds=seconds) if rank is not None:
                return self.release_rank(session, rid, lease_id, rank, seconds)
            case p.Release(rid=rid, lease_id=lease_id):
                lease = self.leases.get(lease_id)
                entries = self.leases.release(lease_id)
                if entries is None or lease is None:
                    raise RequestError(p.ErrorCode.UNKNOWN_LEASE, f"lease {lease_id} is unknown or already over")
                self._unpin(entries)
                if lease.copied_bytes:  # the end of a worker-side copy out of the shared pool
                    self._log_copy("Retrieved", len(entries), lease.copied_bytes, lease.started)
                return p.Released(rid, len(entries))
            case p.Reserve():
                return self.reserve(session, request)
            case p.Commit():
                return self.commit(session, request)
            case p.Pin():
                return self.pin(session, request)
            case p.Grant():
                return self.grant(session, request)
            case p.Clear(rid=rid):
                return p.Cleared(rid, self.clear())
            case p.GetStatus(rid=rid):
                return p.StatusReply(rid, self.full_status())
        raise AssertionError(f"unhandled request type {type(request).__name__}")

    # ------------------------------------------------------------ sessions

    def hello(self, session: Session, req: p.Hello) -> p.HelloReply:
        if req.version != p.PROTOCOL_VERSION:
            raise RequestError(
                p.ErrorCode.VERSION_MISMATCH,
                f"client speaks protocol version {req.version}, this server (lmcd {__version__}) speaks "
                f"{p.PROTOCOL_VERSION}; install matching lmcd versions on both sides",
            )
        token = self.config.auth_token
        if token is not None and not hmac.compare_digest((req.auth_token or "").encode(), token.encode()):
            raise RequestError(
                p.ErrorCode.AUTH_FAILED,
                "auth token missing or wrong: pass the server's --auth-token / LMCD_AUTH_TOKEN "
                "(connector key lmcache.mp.auth_token)",
            )
        ns = req.namespace
        if ns.world_size > MAX_WORLD_SIZE:  # a scheduler's lookup walks every rank
            raise RequestError(p.ErrorCode.BAD_REQUEST, f"world size {ns.world_size} exceeds {MAX_WORLD_SIZE}")
        if ns.rank is not None and ns.rank >= ns.world_size:
            raise RequestError(p.ErrorCode.BAD_REQUEST, f"rank {ns.rank} is not below world size {ns.world_size}")
        if req.role == p.Role.WORKER and ns.rank is None:
            raise RequestError(p.ErrorCode.BAD_REQUEST, "a worker session must give its rank in the namespace")
        key = (ns.model, ns.kv_dtype, ns.geometry, ns.world_size)
        session.ns_id = self._namespaces.setdefault(key, len(self._namespaces) + 1)
        session.hello = req
        log.debug("Session %d hello: role=%s pid=%d namespace=%s", session.session_id, req.role.name, req.pid, ns)
        capabilities = (CAPABILITIES + (["shared-pool"] if self.pool.segment is not None else [])
                        + (["cuda-ipc"] if self.workers.cuda is not None else []))
        return p.HelloReply(req.rid, __version__, p.PROTOCOL_VERSION, self.config.chunk_size,
                            p.HASH_ALGORITHM, capabilities, session.session_id, self.pool.shm_name,
                            self.config.lease_timeout_s)

    def disconnect(self, session: Session) -> None:
        """The session's peer is gone: release its leases and workers at once."""
        self.stats.disconnects += 1
        released = self.leases.release_session(session.session_id)
        self._unpin(released)
        for entry in session.reserved.values():  # reserved, never committed: the worker is gone
            self.index.finish_store(entry, False)
        session.reserved.clear()
        for slot in session.granted:  # granted, never committed
            self.pool.free(SlotId(slot))
        session.granted.clear()
        workers = self.workers.for_session(session.session_id)
        for worker in workers:
            self.workers.remove(worker)
        if session.hello is not None:
            log.info("Session %d (%s, pid %d) disconnected: released %d pinned chunks, %d workers",
                     session.session_id, session.hello.role.name.lower(), session.hello.pid,
                     len(released), len(workers))

    # ------------------------------------------------------------ workers

    def register(self, session: Session, req: p.RegisterWorker) -> p.Registered:
        assert session.hello is not None and session.ns_id is not None
        rank = session.hello.namespace.rank
        if rank is None:
            raise RequestError(p.ErrorCode.BAD_REQUEST,
                               "register needs a session whose namespace names its rank (role worker)")
        if not req.segment_names and not req.ipc_handles:
            self._shared_pool()  # a worker that keeps its KV private copies through the shared pool
        try:
            worker = self.workers.register(session.session_id, session.hello.pid, req.device, req.layout,
                                           req.segment_names, req.segment_sizes, self.config.chunk_size,
                                           ns_id=session.ns_id, rank=rank, ipc_handles=req.ipc_handles,
                                           device_pci=req.device_pci, event_handle=req.event_handle)
        except RegistrationError as exc:
            raise RequestError(p.ErrorCode.SEGMENT_ERROR, str(exc)) from None
        problem = self._chunk_bytes_problem(session.ns_id, worker.chunk_bytes)
        if problem:
            self.workers.remove(worker)
            raise RequestError(p.ErrorCode.LAYOUT_MISMATCH, problem)
        self._namespace_chunk_bytes.setdefault(session.ns_id, worker.chunk_bytes)
        layout = req.layout
        if worker.gpu is not None:
            where = f"{len(req.ipc_handles)} CUDA IPC allocations on GPU {worker.gpu.device} ({req.device_pci})"
        elif worker.copies_itself:
            where = "the worker's own memory; it copies through the shared pool"
        else:
            where = f"{len(req.segment_names)} SHM segments"
        log.info("Registered KV cache for %s ID %d with %d layers (%d blocks of %d tokens, %.1f MiB in %s, "
                 "rank %d)", "GPU" if req.device == "cuda" else "CPU", session.hello.pid, layout.num_layers,
                 layout.num_blocks, layout.block_size, sum(req.segment_sizes) / 2**20, where, rank)
        return p.Registered(req.rid, worker.worker_id, worker.chunk_bytes,
                            worker.gpu.event_handle if worker.gpu is not None else b"")

    def _chunk_bytes_problem(self, ns_id: int, chunk_bytes: int) -> str | None:
        if not self.pool.can_ever_fit(chunk_bytes):
            return (f"one chunk of this layout takes {chunk_bytes / 2**20:.1f} MiB, more than the pool's slab of "
                    f"{self.pool.slab_bytes / 2**20:.1f} MiB: lower --chunk-size or raise --l1-size-gb")
        known = self._namespace_chunk_bytes.get(ns_id)
        if known is not None and known != chunk_bytes:
            return (f"this namespace already holds chunks of {known} bytes, this layout makes {chunk_bytes}: "
                    "put the page geometry into the namespace so that different layouts never share chunks")
        return None

    def _worker(self, session: Session, worker_id: int) -> Worker:
        worker = self.workers.get(worker_id)
        if worker is None or worker.session_id != session.session_id:
            raise RequestError(p.ErrorCode.UNKNOWN_WORKER,
                               f"worker {worker_id} is not registered by this session; register first")
        return worker

    def _blocks(self, worker: Worker, hashes: list[bytes], block_ids: list[int]) -> np.ndarray:
        """The block ids of a server-side copy (Store, Retrieve), checked against the worker's layout."""
        if worker.copies_itself:
            raise RequestError(p.ErrorCode.BAD_REQUEST,
                               f"worker {worker.worker_id} registered without SHM segments, so the server cannot "
                               "copy its KV: it copies itself (Reserve/Commit, Pin/Release), or registers its SHM "
                               "segments for Store/Retrieve")
        expected = len(hashes) * worker.blocks_per_chunk
        if len(block_ids) != expected:
            raise RequestError(p.ErrorCode.BAD_REQUEST,
                               f"{len(hashes)} chunks need {expected} block ids "
                               f"({worker.blocks_per_chunk} per chunk), got {len(block_ids)}")
        # checked in Python before numpy sees them: faster for a request's few ids, and an id beyond
        # int64 (msgpack carries up to uint64) is out of range too
        num_blocks = worker.layout.num_blocks
        if block_ids and max(block_ids) >= num_blocks:
            raise RequestError(p.ErrorCode.BLOCK_OUT_OF_RANGE,
                               f"block id {max(block_ids)} is out of range: worker {worker.worker_id} registered "
                               f"{num_blocks} blocks (0..{num_blocks - 1})")
        return np.asarray(block_ids, dtype=np.int64)

    # ------------------------------------------------------------ lookup

    def lookup(self, session: Session, req: p.Lookup) -> p.LookupReply:
        assert session.hello is not None and session.ns_id is not None
        ns = session.hello.namespace
        ranks = list(range(ns.world_size)) if ns.rank is None else [ns.rank]
        parts = self.index.leading_ready(session.ns_id, ranks, req.chunk_hashes)
        num_hits = len(parts[0])
        self.stats.lookups += 1
        self.stats.lookup_hit_chunks += num_hits
        self.stats.lookup_miss_chunks += len(req.chunk_hashes) - num_hits
        lease_id = None
        if num_hits and req.lease:
            for part in parts:
                self.index.pin_many(part)
            lease_id = self.leases.create(session.session_id, dict(zip(ranks, parts, strict=True))).lease_id
            if req.slots and self.pool.segment is not None:  # workers that copy themselves read these
                return p.LookupReply(req.rid, num_hits, lease_id, [[e.slot for e in part] for part in parts])
        else:
            for part in parts:
                for entry in part:
                    self.index.touch(entry)
        return p.LookupReply(req.rid, num_hits, lease_id)

    # ------------------------------------------------------------ store

    def store(self, session: Session, req: p.Store, started: float) -> p.Reply | None:
        worker = self._worker(session, req.worker_id)
        blocks = self._blocks(worker, req.chunk_hashes, req.block_ids)
        self.stats.stores += 1
        evictions_before = self.index.num_evictions
        statuses: list[p.ChunkStatus] = []
        writing: list[tuple[Entry, int]] = []
        for i, chunk_hash in enumerate(req.chunk_hashes):
            entry, status = self.index.begin_store(self._key(worker, chunk_hash), worker.chunk_bytes)
            statuses.append(status)
            if entry is not None:
                writing.append((entry, i))
        self.stats.evicted_chunks += self.index.num_evictions - evictions_before
        self.stats.store_present_chunks += statuses.count(p.ChunkStatus.PRESENT)
        refused = len(statuses) - len(writing) - statuses.count(p.ChunkStatus.PRESENT)
        self.stats.store_refused_chunks += refused
        message = ("pool is full of pinned or in-flight chunks; retry later or raise --l1-size-gb"
                   if refused else "")
        if not writing:
            return p.StoreReply(req.rid, statuses, message)
        early = worker.gpu is not None  # GPU: answered at launch; the worker orders itself on our event

        def finish(error: BaseException | None, num_bytes: int) -> None:
            for entry, i in writing:
                self.index.finish_store(entry, error is None)
                if error is not None:
                    statuses[i] = p.ChunkStatus.FAILED
            self.workers.copy_done(worker)
            self.pending_copies -= 1
            if error is None:  # counted before the reply: a scrape after it sees the store
                self.stats.stored_chunks += len(writing)
                self.stats.stored_bytes += num_bytes
            if not early:  # the reply before the log line: the worker need not wait for it
                text = f"copy failed: {error}" if error is not None else message
                self._send(session, p.StoreReply(req.rid, statuses, text), "store", started)
            if error is None:
                self._log_copy("Stored", len(writing), num_bytes, started)
            else:
                log.error("Store copy failed for worker %d: %s", worker.worker_id, error)

        self._copy(worker, [e for e, _ in writing], blocks, [i for _, i in writing], True, 0, "store", finish,
                   started)
        return p.StoreReply(req.rid, list(statuses), message) if early else None

    # ------------------------------------------------------------ retrieve

    def retrieve(self, session: Session, req: p.Retrieve, started: float) -> p.Reply | None:
        worker = self._worker(session, req.worker_id)
        blocks = self._blocks(worker, req.chunk_hashes, req.block_ids)
        if req.skip_blocks >= worker.blocks_per_chunk:
            raise RequestError(p.ErrorCode.BAD_REQUEST, f"skip_blocks {req.skip_blocks} must be below the "
                               f"{worker.blocks_per_chunk} blocks of a chunk")
        self.stats.retrieves += 1
        pinned = self._pin_leading(worker, req.chunk_hashes, req.lease_id)
        if not pinned:
            return p.RetrieveReply(req.rid, 0)
        early = worker.gpu is not None

        def finish(error: BaseException | None, num_bytes: int) -> None:
            self._unpin(pinned)
            self.workers.copy_done(worker)
            self.pending_copies -= 1
            if error is not None:
                log.error("Retrieve copy failed for worker %d: %s", worker.worker_id, error)
                if not early:
                    self._send(session, p.Error(req.rid, p.ErrorCode.INTERNAL, f"copy failed: {error}"),
                               "retrieve", started)
                return
            self.stats.retrieved_chunks += len(pinned)
            self.stats.retrieved_bytes += num_bytes
            if not early:  # the reply before the log line, as for a store
                self._send(session, p.RetrieveReply(req.rid, len(pinned)), "retrieve", started)
            self._log_copy("Retrieved", len(pinned), num_bytes, started)

        self._copy(worker, pinned, blocks, list(range(len(pinned))), False, req.skip_blocks, "retrieve", finish,
                   started)
        return p.RetrieveReply(req.rid, len(pinned)) if early else None

    def _pin_leading(self, worker: Worker, hashes: list[bytes], lease_id: int | None) -> list[Entry]:
        """Pin the leading cached chunks of ``hashes`` (taking this rank's part of a lease); every
        returned entry holds one pin owned by the caller."""
        leased: dict[ChunkKey, Entry] = {}
        if lease_id is not None:
            part = self.leases.take(lease_id, worker.rank)
            if part is None:
                raise RequestError(p.ErrorCode.UNKNOWN_LEASE, f"lease {lease_id} is unknown or expired; look up again")
            leased = {entry.key: entry for entry in part}
        pinned: list[Entry] = []
        for chunk_hash in hashes:
            key = self._key(worker, chunk_hash)
            entry = leased.pop(key, None)
            if entry is None:
                entry = self.index.get_ready(key)
                if entry is None:
                    break
                self.index.pin(entry)
            pinned.append(entry)
        self._unpin(list(leased.values()))  # leased chunks the caller did not ask for
        if any(entry.nbytes != worker.chunk_bytes for entry in pinned):
            self._unpin(pinned)
            raise RequestError(p.ErrorCode.LAYOUT_MISMATCH, "cached chunk size differs from this worker's layout")
        return pinned

    # ------------------------------------------------------------ lmcache_driven (worker copies)

    def _shared_pool(self) -> None:
        if self.pool.segment is None:
            raise RequestError(p.ErrorCode.BAD_REQUEST, "the server's pool is not shared: start the server with "
                               "--share-pool to use lmcache.mp.mp_transfer_mode lmcache_driven")

    def reserve(self, session: Session, req: p.Reserve) -> p.Reserved:
        worker = self._worker(session, req.worker_id)
        self._shared_pool()
        self.stats.stores += 1
        evictions_before = self.index.num_evictions
        statuses, offsets = [], []
        for chunk_hash in req.chunk_hashes:
            key = self._key(worker, chunk_hash)
            entry, status = self.index.begin_store(key, worker.chunk_bytes)
            statuses.append(status)
            offsets.append(entry.slot if entry is not None else -1)
            if entry is not None:
                session.reserved[key] = entry
        session.reserved_at = time.perf_counter()
        self.stats.evicted_chunks += self.index.num_evictions - evictions_before
        self.stats.store_present_chunks += statuses.count(p.ChunkStatus.PRESENT)
        refused = sum(s in (p.ChunkStatus.REFUSED_FULL, p.ChunkStatus.REFUSED_TOO_LARGE) for s in statuses)
        self.stats.store_refused_chunks += refused
        message = "pool is full of pinned or in-flight chunks; retry later or raise --l1-size-gb" if refused else ""
        return p.Reserved(req.rid, statuses, offsets, message)

    def commit(self, session: Session, req: p.Commit) -> p.Committed:
        worker = self._worker(session, req.worker_id)
        if req.slot_offsets or req.want_slots:
            return self.commit_granted(session, worker, req)
        done = [session.reserved.pop(self._key(worker, h)) for h in req.chunk_hashes
                if self._key(worker, h) in session.reserved]
        for entry in done:
            self.index.finish_store(entry, req.ok)
        if req.ok and done:
            self.stats.stored_chunks += len(done)
            self.stats.stored_bytes += len(done) * worker.chunk_bytes
            self._log_copy("Stored", len(done), len(done) * worker.chunk_bytes, session.reserved_at)
        return p.Committed(req.rid, len(done))

    def grant(self, session: Session, req: p.Grant) -> p.Granted:
        worker = self._worker(session, req.worker_id)
        self._shared_pool()
        return p.Granted(req.rid, self._grant(session, worker, req.num_slots))

    def _grant(self, session: Session, worker: Worker, num_slots: int) -> list[int]:
        """Up to ``num_slots`` free slots for ``worker``'s chunks (bounded per session), evicting LRU chunks."""
        cap = max(MIN_GRANT_CAP_BYTES, self.pool.capacity_bytes // 4)
        num_slots = min(num_slots, max(0, cap - sum(session.granted.values())) // worker.chunk_bytes)
        evictions_before = self.index.num_evictions
        slots: list[int] = []
        for _ in range(num_slots):
            slot = self.index.allocate_free(worker.chunk_bytes)
            if slot is None:
                break
            session.granted[slot] = worker.chunk_bytes
            slots.append(slot)
        self.stats.evicted_chunks += self.index.num_evictions - evictions_before
        return slots

    def commit_granted(self, session: Session, worker: Worker, req: p.Commit) -> p.Committed:
        """The worker wrote chunks into slots it was granted: index them (see ``p.Commit``)."""
        self._shared_pool()
        if len(req.slot_offsets) != len(req.chunk_hashes):
            raise RequestError(p.ErrorCode.BAD_REQUEST, f"{len(req.chunk_hashes)} chunk hashes need as many slot "
                               f"offsets, got {len(req.slot_offsets)}")
        for slot in req.slot_offsets:
            if session.granted.get(slot) != worker.chunk_bytes:
                raise RequestError(p.ErrorCode.BAD_REQUEST, f"slot {slot} is not a slot granted to this session "
                                   f"for chunks of {worker.chunk_bytes} bytes; commit only slots from Grant")
        if len(set(req.slot_offsets)) != len(req.slot_offsets):
            raise RequestError(p.ErrorCode.BAD_REQUEST, "a slot is named twice in one commit")
        statuses: list[p.ChunkStatus] = []
        for chunk_hash, slot in zip(req.chunk_hashes, req.slot_offsets, strict=True):
            del session.granted[slot]
            status = (self.index.insert_ready(self._key(worker, chunk_hash), SlotId(slot), worker.chunk_bytes)
                      if req.ok else p.ChunkStatus.FAILED)
            if status != p.ChunkStatus.STORED:
                self.pool.free(SlotId(slot))
            statuses.append(status)
        stored = statuses.count(p.ChunkStatus.STORED)
        if req.slot_offsets:
            self.stats.stores += 1
            self.stats.store_present_chunks += statuses.count(p.ChunkStatus.PRESENT)
        if stored:
            self.stats.stored_chunks += stored
            self.stats.stored_bytes += stored * worker.chunk_bytes
            self._log_copy("Stored", stored, stored * worker.chunk_bytes, 0.0, req.copy_seconds)
        return p.Committed(req.rid, stored, statuses, self._grant(session, worker, req.want_slots))

    def release_rank(self, session: Session, rid: int, lease_id: int, rank: int, seconds: float) -> p.Released:
        """A worker copied its rank's chunks of a lookup's lease out of the shared pool itself."""
        entries = self.leases.take(lease_id, rank)
        if entries is None:
            raise RequestError(p.ErrorCode.UNKNOWN_LEASE, f"lease {lease_id} is unknown or already over")
        self._unpin(entries)
        if entries:
            nbytes = sum(entry.nbytes for entry in entries)
            self.stats.retrieves += 1
            self.stats.retrieved_chunks += len(entries)
            self.stats.retrieved_bytes += nbytes
            self._log_copy("Retrieved", len(entries), nbytes, 0.0, seconds)
        return p.Released(rid, len(entries))

    def pin(self, session: Session, req: p.Pin) -> p.Pinned:
        worker = self._worker(session, req.worker_id)
        self._shared_pool()
        self.stats.retrieves += 1
        pinned = self._pin_leading(worker, req.chunk_hashes, req.lease_id)
        if not pinned:
            return p.Pinned(req.rid, [], None)
        lease = self.leases.create(session.session_id, {worker.rank: pinned})
        lease.copied_bytes = len(pinned) * worker.chunk_bytes
        lease.started = time.perf_counter()
        self.stats.retrieved_chunks += len(pinned)
        self.stats.retrieved_bytes += lease.copied_bytes
        return p.Pinned(req.rid, [entry.slot for entry in pinned], lease.lease_id)

    # ------------------------------------------------------------ helpers

    def _key(self, worker: Worker, chunk_hash: bytes) -> ChunkKey:
        return (worker.ns_id, worker.rank, chunk_hash)

    def _copy(self, worker: Worker, entries: list[Entry], blocks: np.ndarray, chunk_positions: list[int],
              to_pool: bool, skip_blocks: int, direction: str,
              finish: Callable[[BaseException | None, int], None], started: float) -> None:
        """Start the copy of ``entries`` (pool side) and the chosen chunks' ``blocks`` (engine side);
        ``finish(error, bytes)`` then runs on the loop thread."""
        bpc = worker.blocks_per_chunk
        if len(chunk_positions) * bpc == len(blocks):  # every chunk of the request (the usual case)
            chosen = blocks
        else:
            chosen = blocks.reshape(-1, bpc)[np.asarray(chunk_positions)].ravel()
        base = self.pool.base_address
        slots = np.array([base + entry.slot for entry in entries], dtype=np.int64)
        worker.inflight += 1
        self.pending_copies += 1
        if worker.gpu is not None:
            num_bytes = worker.gpu.copier.copied_bytes(len(entries), skip_blocks)
        else:
            copy_plan = plan(worker.layout, worker.layer_addresses, slots, chosen, to_pool, skip_blocks)
            num_bytes = copy_plan.num_bytes

        def done(error: BaseException | None, seconds: float) -> None:  # on a copy or completion thread
            self.observe_copy(direction, seconds)
            self._post(lambda: finish(error, num_bytes))

        if worker.gpu is None:
            self.copies.submit(copy_plan, done)
            return
        try:
            submitted = time.perf_counter()
            worker.gpu.submit(slots, chosen, to_pool, done, skip_blocks)
            if log.isEnabledFor(logging.DEBUG):
                now = time.perf_counter()
                log.debug("GPU %s of %d chunks launched %.0f us after the request arrived (submit took %.0f us)",
                          direction, len(entries), (now - started) * 1e6, (now - submitted) * 1e6)
        except BaseException as exc:  # refused before launch (or CUDA failed to launch): nothing was copied
            worker.inflight -= 1
            self.pending_copies -= 1
            self._unpin_or_abandon(entries, to_pool)
            raise RequestError(p.ErrorCode.INTERNAL, f"GPU copy not started: {exc}") from None

    def _unpin_or_abandon(self, entries: list[Entry], to_pool: bool) -> None:
        if to_pool:
            for entry in entries:
                self.index.finish_store(entry, False)
        else:
            self._unpin(entries)

    def _unpin(self, entries: list[Entry]) -> None:
        for entry in entries:
            self.index.unpin(entry)

    def _log_copy(self, verb: str, num_chunks: int, num_bytes: int, started: float, seconds: float = 0.0) -> None:
        """LMCache's familiar line; ``seconds`` given: a copy the worker made (and timed) itself."""
        seconds = seconds or time.perf_counter() - started
        tokens = num_chunks * self.config.chunk_size
        log.info("%s %d tokens in %.4f seconds (%.2f GB/s, %.1f MiB)", verb, tokens, seconds,
                 num_bytes / seconds / 1e9 if seconds > 0 else 0.0, num_bytes / 2**20)

    def expire_leases(self, now: float) -> None:
        before = self.leases.num_expired
        self._unpin(self.leases.expire(now))
        self.stats.expired_leases += self.leases.num_expired - before

    def clear(self) -> int:
        num_chunks = self.index.clear()
        log.info("Cleared %d chunks from the L1 pool", num_chunks)
        return num_chunks

    def status(self) -> dict[str, object]:
        pool = self.pool
        return {
            "pool": {
                "capacity_bytes": pool.capacity_bytes, "used_bytes": pool.used_bytes,
                "free_bytes": pool.capacity_bytes - pool.used_bytes, "num_chunks": len(self.index),
                "slab_bytes": pool.slab_bytes, "num_slabs": pool.num_slabs, "num_free_slabs": pool.num_free_slabs,
            },
            "counters": self.stats.as_dict(),
            "leases": len(self.leases),
            "workers": [
                {"worker_id": w.worker_id, "session_id": w.session_id, "pid": w.pid, "device": w.device,
                 "rank": w.rank, "num_layers": w.layout.num_layers,
                 "num_blocks": w.layout.num_blocks, "block_size": w.layout.block_size,
                 "page_bytes": w.layout.page_bytes, "chunk_bytes": w.chunk_bytes, "copies_in_flight": w.inflight}
                for w in self.workers.workers.values()
            ],
            "server_pid": os.getpid(),
        }
