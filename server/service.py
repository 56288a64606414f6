"""The cache service: what each request does to the pool, index, leases and workers.

Ownership: every method runs on the request loop thread (copy completions are posted back
to it), so the state here needs no locks. ``handle`` returns the reply, or None when the
reply is sent later (after a copy) through ``send``. Every request gets exactly one reply.

The copies themselves are in two helpers, one per ``Copier``: ``ServerCopies``
(``server/copies.py``: Store and Retrieve, the server copies) and ``WorkerCopies``
(``server/grants.py``: Grant, Commit, Pin and Loaded, the worker copies through the shared pool).
Both count and log the same way (``count_store``, ``count_retrieve``): a store counts when its
bytes are in the pool, a retrieve when they are in the worker's blocks, and the seconds in the
log line are the copy's own time where it ran (GPU events, or the copying thread's clock).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from collections.abc import Callable

from lmcd import __version__
from lmcd import protocol as p
from lmcd.server.config import ServerConfig
from lmcd.server.copies import ServerCopies
from lmcd.server.gpu import CudaSupport
from lmcd.server.grants import WorkerCopies
from lmcd.server.handoff import MAX_HANDOFF_FDS, HandedFd, Peer
from lmcd.server.index import ChunkIndex, Entry, IndexKey
from lmcd.server.leases import LeaseHolder, LeaseOwner, LeaseTable, holder_of
from lmcd.server.metrics import Stats
from lmcd.server.namespaces import NamespaceTable
from lmcd.server.pool import Pool
from lmcd.server.session import Post, RequestError, Send, Session
from lmcd.server.tiers import Tiers
from lmcd.server.workers import RegistrationError, Worker, WorkerRegistry

log = logging.getLogger("lmcd.server")

CAPABILITIES = ["cpu-shm", "leases", "lookup-all-ranks", "store-status-per-chunk", "fd-handoff"]
MAX_WORLD_SIZE = 4096
MAX_HELD_FDS = 8192  # handed-over fds all sessions hold between handoff and registration


class CacheService:
    def __init__(self, config: ServerConfig, pool: Pool, send: Send, post: Post,
                 cuda: CudaSupport | None = None) -> None:
        self.config = config
        self.pool = pool
        self.index = ChunkIndex(pool)
        self.leases = LeaseTable(config.lease_timeout_s)
        cuda = cuda or CudaSupport(None, "CUDA was not probed")
        self.workers = WorkerRegistry(cuda.host, cuda.problem, pool_shared=pool.shared)
        self.stats = Stats()
        self.send = send
        self.post = post
        self.namespaces = NamespaceTable(self.index)
        self.handoff_path = ""  # the server's handoff socket (lmcd.server.handoff), set at startup
        self._handoffs: dict[bytes, Session] = {}  # handoff nonce -> its session
        self.server_copies = ServerCopies(self)
        self.worker_copies = WorkerCopies(self)
        self.tiers: Tiers | None = None  # the L2 cascade, when tiers are configured (set at startup)
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
                self.unregister(session, self.worker(session, worker_id))
                return p.Unregistered(rid)
            case p.Lookup():
                return self.lookup(session, request, started)
            case p.Store():
                return self.server_copies.store(session, request, started)
            case p.Retrieve():
                return self.server_copies.retrieve(session, request, started)
            case p.Release(rid=rid, lease_id=lease_id):
                return p.Released(rid, self.release(session, lease_id))
            case p.Grant():
                return self.worker_copies.grant(session, request)
            case p.Commit():
                return self.worker_copies.commit(session, request)
            case p.Pin():
                return self.worker_copies.pin(session, request)
            case p.Loaded():
                return self.worker_copies.loaded(session, request)
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
        self._join(session, req)
        if not session.handoff_nonce:
            session.handoff_nonce = secrets.token_bytes(32)
            self._handoffs[session.handoff_nonce] = session
        log.debug("Session %d hello: role=%s pid=%d namespace=%s", session.session_id, req.role.name, req.pid, ns)
        capabilities = (CAPABILITIES + (["shared-pool"] if self.pool.shared else [])
                        + (["cuda-ipc"] if self.workers.cuda is not None else []))
        return p.HelloReply(req.rid, __version__, p.PROTOCOL_VERSION, self.config.chunk_size,
                            p.HASH_ALGORITHM, capabilities, session.session_id, self.pool.name,
                            self.config.lease_timeout_s, self.handoff_path, session.handoff_nonce)

    def attach_handoff(self, nonce: bytes, handed: list[HandedFd], peer: Peer) -> str | None:
        """A handoff's checked fds, for the session whose nonce came with them (replacing any it still
        holds); None, or why they were refused (then the caller keeps and closes them)."""
        session = self._handoffs.get(nonce)
        if session is None or not hmac.compare_digest(nonce, session.handoff_nonce):
            return "unknown handoff nonce: say Hello first and hand over with the nonce its reply carries"
        held = sum(len(s.handed) for s in self._handoffs.values() if s is not session)
        if len(handed) > MAX_HANDOFF_FDS or held + len(handed) > MAX_HELD_FDS:
            return (f"the server holds {held} handed-over fds of sessions that have not registered yet and takes at "
                    f"most {MAX_HELD_FDS} ({MAX_HANDOFF_FDS} per session); register, or try again later")
        session.close_handed()
        session.handed, session.handed_by = handed, peer
        log.debug("Session %d: pid %d (uid %d) handed over %d memory fds", session.session_id, peer.pid, peer.uid,
                  len(handed))
        return None

    def _join(self, session: Session, req: p.Hello) -> None:
        """The session takes its namespace and lease owner (leases.py) from ``req``; a second Hello
        takes the new ones before it leaves the old ones, so that the same ones are kept."""
        ns = req.namespace
        old_ns_id = session.ns_id
        old_holder = self.lease_holder(session) if old_ns_id is not None else None
        ns_id = self.namespaces.acquire((ns.model, ns.kv_dtype, ns.geometry, ns.world_size))
        if old_ns_id not in (None, ns_id) and self.workers.for_session(session.session_id):
            self.namespaces.release(ns_id)
            raise RequestError(p.ErrorCode.BAD_REQUEST, "this session has workers registered in its namespace; "
                               "unregister them before a Hello with another namespace")
        session.ns_id, session.hello = ns_id, req
        self.leases.join(self.lease_holder(session))
        if old_ns_id is not None and old_holder is not None:
            self._leave(old_ns_id, old_holder)

    def _leave(self, ns_id: int, holder: LeaseHolder) -> list[Entry]:
        """A session leaves its namespace and lease holder; returns the lease entries it unpinned."""
        released = self.leases.leave(holder)
        self.unpin(released)
        self.namespaces.release(ns_id)
        return released

    @staticmethod
    def lease_owner(session: Session) -> LeaseOwner:
        """Whose leases this session may take, release and consume: its instance's (leases.py)."""
        assert session.hello is not None and session.ns_id is not None
        return (session.ns_id, session.hello.instance_id)

    def lease_holder(self, session: Session) -> LeaseHolder:
        """Whose sessions keep the leases this session takes (leases.py)."""
        return holder_of(self.lease_owner(session), session.session_id)

    def create_lease(self, session: Session, by_rank: dict[int, list[Entry]]) -> int:
        owner = self.lease_owner(session)
        return self.leases.create(owner, holder_of(owner, session.session_id), by_rank).lease_id

    def disconnect(self, session: Session) -> None:
        """The session's peer is gone: release its leases (an instance's, when it was the instance's last
        session), grants and workers at once."""
        self.stats.disconnects += 1
        session.closed = True
        released: list[Entry] = []
        if session.hello is not None and session.ns_id is not None:
            released = self._leave(session.ns_id, self.lease_holder(session))
        self.worker_copies.drop_grants(session)
        workers = self.workers.for_session(session.session_id)
        for worker in workers:
            self.workers.remove(worker)
        self._handoffs.pop(session.handoff_nonce, None)
        session.close_handed()
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
        handed = session.take_handed()
        try:
            worker = self._register(session, rank, req, handed)
        finally:
            for item in handed:  # mapped or refused: the fds have done their job
                os.close(item.fd)
        problem = self._chunk_bytes_problem(session.ns_id, worker.chunk_bytes)
        if problem:
            self.workers.remove(worker)
            raise RequestError(p.ErrorCode.LAYOUT_MISMATCH, problem)
        self.namespaces.chunk_bytes.setdefault(session.ns_id, worker.chunk_bytes)
        layout = req.layout
        if req.copier == p.Copier.WORKER:
            where = "the worker's own memory; it copies through the shared pool"
        elif worker.gpu is not None:
            where = f"{len(req.ipc_handles)} CUDA IPC allocations on GPU {worker.gpu.device} ({req.device_pci})"
        else:
            where = f"{len(req.segment_sizes)} SHM segments"
        log.info("Registered KV cache for %s ID %d with %d layers (%d blocks of %d tokens, %.1f MiB in %s, "
                 "rank %d)", "GPU" if req.device == p.Device.CUDA else "CPU", session.hello.pid, layout.num_layers,
                 layout.num_blocks, layout.block_size, sum(req.segment_sizes) / 2**20, where, rank)
        return p.Registered(req.rid, worker.worker_id, worker.chunk_bytes, worker.blocks_per_chunk,
                            worker.gpu.event_handle if worker.gpu is not None else b"")

    def _register(self, session: Session, rank: int, req: p.RegisterWorker, handed: list[HandedFd]) -> Worker:
        assert session.hello is not None and session.ns_id is not None
        registered = self.workers.for_session(session.session_id)
        if registered:
            raise RequestError(p.ErrorCode.LIMIT, f"this session already registered worker {registered[0].worker_id}; "
                                                  "a session registers one worker: unregister it first")
        if req.copier == p.Copier.WORKER:
            self.worker_copies.require_shared_pool()
        try:
            return self.workers.register(session.session_id, session.hello.pid, session.ns_id, rank, req,
                                         self.config.chunk_size, handed)
        except RegistrationError as exc:
            raise RequestError(p.ErrorCode.SEGMENT_ERROR, str(exc)) from None

    def unregister(self, session: Session, worker: Worker) -> None:
        self.worker_copies.drop_grants(session)
        self.workers.remove(worker)

    def _chunk_bytes_problem(self, ns_id: int, chunk_bytes: int) -> str | None:
        if not self.pool.can_ever_fit(chunk_bytes):
            return (f"one chunk of this layout takes {chunk_bytes / 2**20:.1f} MiB, more than the pool's slab of "
                    f"{self.pool.slab_bytes / 2**20:.1f} MiB: lower --chunk-size or raise --l1-size-gb")
        known = self.namespaces.chunk_bytes.get(ns_id)
        if known is not None and known != chunk_bytes:
            return (f"this namespace already holds chunks of {known} bytes, this layout makes {chunk_bytes}: "
                    "put the page geometry into the namespace so that different layouts never share chunks")
        return None

    def worker(self, session: Session, worker_id: int, copier: p.Copier | None = None) -> Worker:
        """This session's worker ``worker_id``; with ``copier``, one registered for that kind of copies."""
        worker = self.workers.get(worker_id)
        if worker is None or worker.session_id != session.session_id:
            raise RequestError(p.ErrorCode.UNKNOWN_WORKER,
                               f"worker {worker_id} is not registered by this session; register first")
        if copier is not None and worker.copier != copier:
            ops = "Grant, Commit, Pin and Loaded" if copier == p.Copier.WORKER else "Store and Retrieve"
            raise RequestError(p.ErrorCode.BAD_REQUEST,
                               f"worker {worker_id} registered for {worker.copier.name.lower()} copies; {ops} are "
                               f"for workers registered for {copier.name.lower()} copies")
        return worker

    # ------------------------------------------------------------ lookup and leases

    def lookup(self, session: Session, req: p.Lookup, started: float) -> p.LookupReply | None:
        """The leading chunks L1 holds for every rank; where L2 tiers may hold more, the reply waits
        for their prefetch into L1 (at most ``--l2-prefetch-load-timeout``, ``server/tiers.py``)."""
        assert session.hello is not None and session.ns_id is not None
        ns = session.hello.namespace
        ranks = list(range(ns.world_size)) if ns.rank is None else [ns.rank]
        parts = self.index.leading_ready(session.ns_id, ranks, req.chunk_keys)
        num_l1 = len(parts[0])
        chunk_bytes = self.namespaces.chunk_bytes.get(session.ns_id)
        if self.tiers is not None and num_l1 < len(req.chunk_keys) and chunk_bytes is not None:
            ns_id = session.ns_id

            def answer() -> None:
                if session.closed or session.ns_id != ns_id:  # gone, or another namespace now
                    return
                reply = self._lookup_reply(session, req, ranks, self.index.leading_ready(ns_id, ranks, req.chunk_keys))
                self.send(session, reply, "lookup", started)

            if self.tiers.start_prefetch(ns_id, self.namespaces.text_of(ns_id), chunk_bytes, ranks,
                                         req.chunk_keys[num_l1:], answer):
                return None
        return self._lookup_reply(session, req, ranks, parts)

    def _lookup_reply(self, session: Session, req: p.Lookup, ranks: list[int],
                      parts: list[list[Entry]]) -> p.LookupReply:
        """Count a lookup's leading hits ``parts`` (one list per rank of ``ranks``) and pin them under a
        lease if it asks for one."""
        num_hits = len(parts[0])
        self.stats.lookups += 1
        self.stats.lookup_hit_chunks += num_hits
        self.stats.lookup_miss_chunks += len(req.chunk_keys) - num_hits
        if not (num_hits and req.lease):
            for part in parts:
                for entry in part:
                    self.index.touch(entry)
            return p.LookupReply(req.rid, num_hits, None)
        for part in parts:
            self.index.pin_many(part)
        lease_id = self.create_lease(session, dict(zip(ranks, parts, strict=True)))
        if req.slots and self.pool.shared:  # workers that copy themselves read these
            return p.LookupReply(req.rid, num_hits, lease_id, [[e.slot for e in part] for part in parts])
        return p.LookupReply(req.rid, num_hits, lease_id)

    def release(self, session: Session, lease_id: int) -> int:
        entries = self.leases.release(lease_id, self.lease_owner(session))
        if entries is None:
            raise RequestError(p.ErrorCode.UNKNOWN_LEASE, f"lease {lease_id} is unknown or already over")
        self.unpin(entries)
        return len(entries)

    def take_lease(self, session: Session, lease_id: int, rank: int) -> list[Entry]:
        """Rank ``rank``'s pinned entries of a lease of the session's owner (now owned by the caller)."""
        part = self.leases.take(lease_id, rank, self.lease_owner(session))
        if part is None:
            raise RequestError(p.ErrorCode.UNKNOWN_LEASE, f"lease {lease_id} is unknown or expired; look up again")
        return part

    def pin_leading(self, session: Session, worker: Worker, keys: list[bytes], lease_id: int | None) -> list[Entry]:
        """Pin the leading cached chunks of ``keys`` (taking this rank's part of a lease); every
        returned entry holds one pin owned by the caller."""
        leased = ({entry.key: entry for entry in self.take_lease(session, lease_id, worker.rank)}
                  if lease_id is not None else {})
        pinned: list[Entry] = []
        for chunk_key in keys:
            key = self.key(worker, chunk_key)
            entry = leased.pop(key, None)
            if entry is None:
                entry = self.index.get_ready(key)
                if entry is None:
                    break
                self.index.pin(entry)
            pinned.append(entry)
        self.unpin(list(leased.values()))  # leased chunks the caller did not ask for
        if any(entry.nbytes != worker.chunk_bytes for entry in pinned):
            self.unpin(pinned)
            raise RequestError(p.ErrorCode.LAYOUT_MISMATCH, "cached chunk size differs from this worker's layout")
        return pinned

    def expire(self, now: float) -> None:
        """What times out: leases, grants, and lookups waiting for L2 reads (loop turn)."""
        before = self.leases.num_expired
        self.unpin(self.leases.expire(now))
        self.stats.expired_leases += self.leases.num_expired - before
        self.worker_copies.expire_grants(now)
        if self.tiers is not None:
            self.tiers.expire(now)

    def next_deadline(self) -> float | None:
        """When ``expire`` next has something to do (None: nothing is due)."""
        due = [t for t in (self.leases.next_expiry(), self.tiers.next_deadline() if self.tiers else None)
               if t is not None]
        return min(due, default=None)

    def write_behind(self, ns_id: int, entries: list[Entry]) -> None:
        """A store's chunks are readable in L1: copy them to the L2 tiers in the background."""
        if self.tiers is not None and entries:
            self.tiers.write_behind(self.namespaces.text_of(ns_id), entries)

    # ------------------------------------------------------------ helpers

    @staticmethod
    def key(worker: Worker, chunk_key: bytes) -> IndexKey:
        return (worker.ns_id, worker.rank, chunk_key)

    def unpin(self, entries: list[Entry]) -> None:
        for entry in entries:
            self.index.unpin(entry)

    def count_store(self, worker: Worker, num_chunks: int, seconds: float, log_line: bool = True) -> tuple[int, int]:
        """A store's bytes are in the pool (server and worker copies alike); ``seconds``: the copy's own
        time where it ran. Logs LMCache's familiar line, unless the caller logs it after its reply with
        the (tokens, bytes) returned."""
        num_tokens, num_bytes = num_chunks * self.config.chunk_size, num_chunks * worker.chunk_bytes
        self.stats.stores += 1
        self.stats.stored_chunks += num_chunks
        self.stats.stored_bytes += num_bytes
        self.observe_copy("store", seconds)
        if log_line:
            self.log_copy("Stored", num_tokens, num_bytes, seconds)
        return num_tokens, num_bytes

    def count_retrieve(self, worker: Worker, num_chunks: int, skip_blocks: int, seconds: float,
                       log_line: bool = True) -> tuple[int, int]:
        """A retrieve's bytes are in the worker's blocks (server and worker copies alike); the first
        ``skip_blocks`` blocks of the first chunk were left out. As ``count_store`` for the log line."""
        layout = worker.layout
        num_tokens = num_chunks * self.config.chunk_size - skip_blocks * layout.block_size
        num_bytes = num_chunks * worker.chunk_bytes - skip_blocks * layout.num_planes * layout.page_bytes
        self.stats.retrieves += 1
        self.stats.retrieved_chunks += num_chunks
        self.stats.retrieved_bytes += num_bytes
        self.observe_copy("retrieve", seconds)
        if log_line:
            self.log_copy("Retrieved", num_tokens, num_bytes, seconds)
        return num_tokens, num_bytes

    def log_copy(self, verb: str, num_tokens: int, num_bytes: int, seconds: float) -> None:
        log.info("%s %d tokens in %.4f seconds (%.2f GB/s, %.1f MiB)", verb, num_tokens, seconds,
                 num_bytes / seconds / 1e9 if seconds > 0 else 0.0, num_bytes / 2**20)

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
            "namespaces": len(self.namespaces),
            "grants": {"granted_slots": self.worker_copies.num_granted,
                       "reclaimed_slots": self.worker_copies.num_reclaimed},
            "l2": self.tiers.status() if self.tiers is not None else [],
            "workers": [
                {"worker_id": w.worker_id, "session_id": w.session_id, "pid": w.pid,
                 "device": w.device.name.lower(), "copier": w.copier.name.lower(), "rank": w.rank,
                 "num_layers": w.layout.num_layers, "num_planes": w.layout.num_planes,
                 "num_blocks": w.layout.num_blocks, "block_size": w.layout.block_size,
                 "page_bytes": w.layout.page_bytes, "chunk_bytes": w.chunk_bytes,
                 "blocks_per_chunk": w.blocks_per_chunk, "copies_in_flight": w.inflight}
                for w in self.workers.workers.values()
            ],
            "server_pid": os.getpid(),
        }
