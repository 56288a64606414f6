"""The lmcd client: one ZMQ DEALER session with the server, typed calls, clear timeouts.

Used by the vLLM connector, the tests and ``lmcache bench``. Thread-safe: calls are
serialised by a lock (one request in flight per client); each reply is matched to its
request by ``rid``, so a late reply to a request that timed out is skipped, never mistaken.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import zmq

from lmcd import protocol as p
from lmcd import shm

DEFAULT_PORT = 5555
HANDOFF_TIMEOUT_S = 10.0


class LmcdError(Exception):
    """Base of every error the client raises."""


class ServerError(LmcdError):
    """The server answered with ``Error(code, message)``."""

    def __init__(self, code: p.ErrorCode, message: str, op: str) -> None:
        super().__init__(f"{op}: {code.name}: {message}")
        self.code = code
        self.message = message


class ServerTimeout(LmcdError, TimeoutError):
    """No reply within the timeout: the server is down, unreachable or overloaded."""


class ProtocolError(LmcdError):
    """The server answered with a reply this request does not take."""


def server_url(host: str = "localhost", port: int = DEFAULT_PORT) -> str:
    """``tcp://host:port`` from ``tcp://host``, a bare host or IP; ``ipc://...`` passes through."""
    if host.startswith("ipc://"):
        return host
    host = host.removeprefix("tcp://").rstrip("/")
    if ":" in host and not host.startswith("["):
        if host.count(":") == 1:  # host:port already given
            return f"tcp://{host}"
        host = f"[{host}]"  # bare IPv6
    return f"tcp://{host}:{port}"


class HandoffError(LmcdError):
    """The server's handoff socket refused this worker's memory, or cannot be reached."""


def hand_over(path: str, nonce: bytes, fds: Sequence[int], want_pool: bool = False,
              timeout_s: float = HANDOFF_TIMEOUT_S) -> int | None:
    """Hand memory fds to the server's session with ``nonce`` over its handoff socket ``path``
    (wire format in ``lmcd.shm``) and wait for its answer; with ``want_pool``, the shared pool's fd
    (owned by the caller) comes back. HandoffError names what went wrong."""
    if not path:
        raise HandoffError("the server names no handoff socket: install matching lmcd versions on both sides")
    flags = shm.HANDOFF_WANT_POOL if want_pool else 0
    header = shm.HANDOFF_HEADER.pack(shm.HANDOFF_MAGIC, shm.HANDOFF_VERSION, flags, 0, len(fds), nonce)
    batches = [list(fds[i : i + shm.MAX_FDS_PER_MESSAGE]) for i in range(0, len(fds), shm.MAX_FDS_PER_MESSAGE)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(path)
        except OSError as exc:
            raise HandoffError(f"cannot reach the server's handoff socket {path}: {exc.strerror or exc}; the worker "
                               "and the server must share /dev/shm (same host; in Docker --ipc host, in "
                               "Kubernetes hostIPC)") from None
        try:
            try:
                socket.send_fds(sock, [header], batches[0] if batches else [])
                for batch in batches[1:]:
                    socket.send_fds(sock, [shm.HANDOFF_MORE], batch)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered early (a refusal) and closed: read why
            status, message, received = _handoff_reply(sock)
        except OSError as exc:
            raise HandoffError(f"handoff over {path} failed: {exc}") from None
    pool = received[0] if received else None
    for extra in received[1:]:
        os.close(extra)
    if status != shm.HANDOFF_OK:
        if pool is not None:
            os.close(pool)
        raise HandoffError(f"the server refused the handoff: {message}")
    if want_pool and pool is None:
        raise HandoffError("the server sent no shared pool")
    return pool


def _handoff_reply(sock: socket.socket) -> tuple[int, str, list[int]]:
    """(status, message, fds received) of the server's one reply."""
    data, fds = b"", []
    head = shm.HANDOFF_REPLY.size
    while len(data) < head or len(data) < head + shm.HANDOFF_REPLY.unpack_from(data)[1]:
        chunk, got, _, _ = socket.recv_fds(sock, 65536, 1, socket.MSG_CMSG_CLOEXEC)
        fds += got
        if not chunk:
            for fd in fds:
                os.close(fd)
            raise OSError("the server closed the handoff connection without an answer")
        data += chunk
    status, length = shm.HANDOFF_REPLY.unpack_from(data)
    return status, data[head : head + length].decode(errors="replace"), fds


@dataclass(frozen=True, slots=True)
class LookupResult:
    """``slots`` (a shared pool): per rank, where the leased chunks are, which workers that copy
    themselves may read without a request of their own until ``slots_valid_until``
    (``time.monotonic()``, which every process of the host shares), half the lease's time to live."""

    num_hit_chunks: int
    lease_id: int | None
    slots: list[list[int]] | None = None
    slots_valid_until: float = 0.0


@dataclass(frozen=True, slots=True)
class StoreResult:
    statuses: list[p.ChunkStatus]
    message: str

    @property
    def num_stored(self) -> int:
        return self.statuses.count(p.ChunkStatus.STORED)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    worker_id: int
    chunk_bytes: int
    blocks_per_chunk: int
    event_handle: bytes = b""  # CUDA, server copies: the server's interprocess event


@dataclass(frozen=True, slots=True)
class PinResult:
    slots: list[int]
    lease_id: int | None


R = TypeVar("R", bound=p.Reply)


class CacheClient:
    def __init__(
        self, url: str, namespace: p.Namespace, *, role: p.Role = p.Role.CLIENT, auth_token: str | None = None,
        timeout_s: float = 10.0, client_name: str = "", connect: bool = True, connect_timeout_s: float = 1.0,
        instance_id: str = "",
    ) -> None:
        """``instance_id``: the inference instance this client belongs to (vLLM's engine id), the same
        for its scheduler and every worker: they share the leases it takes (``Hello.instance_id``)."""
        self.url = url
        self.namespace = namespace
        self.role = role
        self.instance_id = instance_id
        self.auth_token = auth_token
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s  # how long a request waits for a connection at all
        self.client_name = client_name or f"pid{os.getpid()}"
        self.hello: p.HelloReply | None = None
        self._rids = itertools.count(1)
        self._lock = threading.Lock()
        self._ctx: zmq.Context = zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._replies: zmq.Poller | None = None  # made once per socket: Socket.poll makes one per call
        self._posted: dict[int, str] = {}  # rid -> op of requests sent with post(), reply not yet read
        self._arrived: dict[int, p.Reply] = {}  # their replies, read while waiting for another one
        if connect:
            self.connect()

    # ------------------------------------------------------------ session

    def connect(self) -> p.HelloReply:
        """(Re)open the socket and say Hello; raises ServerError on version/auth mismatch."""
        self.close()
        self._posted.clear()
        self._arrived.clear()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue a request for a server that is not there
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        sock.connect(self.url)
        self._sock = sock
        self._replies = zmq.Poller()
        self._replies.register(sock, zmq.POLLIN)
        return self.say_hello()

    def say_hello(self) -> p.HelloReply:
        """Hello over the current socket (ZMQ reconnects it by itself after an outage)."""
        hello = self._say_hello()
        if hello.hash_algorithm != p.HASH_ALGORITHM:  # chunk keys would never match the server's
            raise ProtocolError(f"the lmcd server at {self.url} (lmcd {hello.server_version}) keys chunks with "
                                f"{hello.hash_algorithm}, this client with {p.HASH_ALGORITHM}: install matching "
                                "lmcd versions on both sides")
        self.hello = hello
        return hello

    def connected(self) -> bool:
        """Whether the socket has a live connection to the server now (never waits)."""
        return self._sock is not None and bool(self._sock.poll(0, zmq.POLLOUT))

    def _hello_request(self, rid: int) -> p.Hello:
        return p.Hello(rid, p.PROTOCOL_VERSION, self.role, self.namespace, self.auth_token, self.client_name,
                       os.getpid(), self.instance_id)

    def _say_hello(self) -> p.HelloReply:
        return self._call(self._hello_request, "hello", p.HelloReply)

    @property
    def chunk_size(self) -> int:
        if self.hello is None:
            raise LmcdError(f"not connected to the lmcd server at {self.url}; call connect() first")
        return self.hello.chunk_size

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
            self._replies = None

    def __enter__(self) -> CacheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ operations

    def ping(self) -> float:
        """Round-trip time in seconds."""
        started = time.perf_counter()
        self._call(lambda rid: p.Ping(rid), "ping", p.Pong)
        return time.perf_counter() - started

    def register_worker(self, layout: p.KVLayout, device: p.Device, copier: p.Copier, segment_sizes: Sequence[int],
                        segment_fds: Sequence[int] = (), ipc_handles: Sequence[bytes] = (), device_pci: str = "",
                        event_handle: bytes = b"") -> WorkerInfo:
        """``segment_fds`` (CPU, server copies): the memory of each segment, sealed memfds
        (``lmcd.shm.ShmSegment.fd``), handed over first; the server maps them, never anything by name."""
        if segment_fds:
            self.hand_over(segment_fds)
        reply = self._call(lambda rid: p.RegisterWorker(rid, layout, device, copier, list(segment_sizes), [],
                                                        list(ipc_handles), device_pci, event_handle), "register",
                           p.Registered)
        return WorkerInfo(reply.worker_id, reply.chunk_bytes, reply.blocks_per_chunk, reply.event_handle)

    def hand_over(self, fds: Sequence[int], want_pool: bool = False) -> int | None:
        """Hand memory fds to this session on the server (``hand_over``); with ``want_pool`` the
        shared pool's fd comes back. The next ``RegisterWorker`` of this session maps them."""
        hello = self.hello
        if hello is None:
            raise LmcdError(f"not connected to the lmcd server at {self.url}; call connect() first")
        return hand_over(hello.handoff_path, hello.handoff_nonce, fds, want_pool, self.timeout_s)

    def shared_pool_fd(self) -> int:
        """The server's shared pool (``--share-pool``) as an fd owned by the caller, to map."""
        fd = self.hand_over([], want_pool=True)
        assert fd is not None
        return fd

    def unregister_worker(self, worker_id: int) -> None:
        self._call(lambda rid: p.UnregisterWorker(rid, worker_id), "unregister", p.Unregistered)

    def lookup(self, chunk_keys: Sequence[bytes], lease: bool = True, slots: bool = False) -> LookupResult:
        """``slots``: also where every rank's leased chunks are in the shared pool (if the server shares it)."""
        asked = time.monotonic()
        reply = self._call(lambda rid: p.Lookup(rid, list(chunk_keys), lease, slots), "lookup", p.LookupReply)
        if not reply.slots:
            return LookupResult(reply.num_hit_chunks, reply.lease_id)
        ttl = self.hello.lease_ttl_s if self.hello is not None else 0.0
        return LookupResult(reply.num_hit_chunks, reply.lease_id, reply.slots, asked + ttl / 2)

    def lookup_for_load(self, chunk_keys: Sequence[bytes]) -> LookupResult:
        """A scheduler's leased lookup, with the leased chunks' slots where the server shares its pool."""
        return self.lookup(chunk_keys, True, self.hello is not None and bool(self.hello.pool_segment))

    def store(self, worker_id: int, chunk_keys: Sequence[bytes], block_ids: Sequence[int]) -> StoreResult:
        reply = self._call(lambda rid: p.Store(rid, worker_id, list(chunk_keys), list(block_ids)), "store",
                           p.StoreReply)
        return StoreResult(list(reply.statuses), reply.message)

    def retrieve(self, worker_id: int, chunk_keys: Sequence[bytes], block_ids: Sequence[int],
                 lease_id: int | None = None, skip_blocks: int = 0) -> int:
        """Copies the leading cached chunks into ``block_ids`` (leaving out the first ``skip_blocks``
        blocks of the first chunk); returns how many chunks it found and copied."""
        reply = self._call(lambda rid: p.Retrieve(rid, worker_id, list(chunk_keys), list(block_ids), lease_id,
                                                  skip_blocks), "retrieve", p.RetrieveReply)
        return reply.num_retrieved_chunks

    def release(self, lease_id: int) -> int:
        """End a lease nobody will load from; returns how many chunks it unpinned."""
        return self._call(lambda rid: p.Release(rid, lease_id), "release", p.Released).num_unpinned

    def pin(self, worker_id: int, chunk_keys: Sequence[bytes], lease_id: int | None = None) -> PinResult:
        """Worker copies: slots of the leading cached chunks, pinned under a lease until ``post_loaded``."""
        reply = self._call(lambda rid: p.Pin(rid, worker_id, list(chunk_keys), lease_id), "pin", p.Pinned)
        return PinResult(list(reply.slots), reply.lease_id)

    def post_grant(self, worker_id: int, num_slots: int) -> int:
        """Worker copies: ask for free slots to fill (``collect`` the ``Granted``)."""
        return self.post(lambda rid: p.Grant(rid, worker_id, num_slots), "grant")

    def post_commit(self, worker_id: int, chunk_keys: Sequence[bytes], slots: Sequence[int], want_slots: int,
                    copy_seconds: float) -> int:
        """Worker copies: name the chunks of one store written into granted slots (``collect`` the
        ``Committed``: statuses and fresh grants)."""
        return self.post(lambda rid: p.Commit(rid, worker_id, list(chunk_keys), list(slots), want_slots,
                                              copy_seconds), "commit")

    def post_loaded(self, worker_id: int, lease_id: int, chunk_keys: Sequence[bytes], skip_blocks: int,
                    copy_seconds: float) -> int:
        """Worker copies: this rank's part of a lease was copied out (``collect`` the ``Released``)."""
        return self.post(lambda rid: p.Loaded(rid, worker_id, lease_id, list(chunk_keys), skip_blocks,
                                              copy_seconds), "loaded")

    def clear(self) -> int:
        return self._call(lambda rid: p.Clear(rid), "clear", p.Cleared).num_chunks

    def status(self) -> dict[str, object]:
        return self._call(lambda rid: p.GetStatus(rid), "status", p.StatusReply).status

    # ------------------------------------------------------------ transport

    def post(self, make: Callable[[int], p.Request], op: str) -> int:
        """Send a request and return its rid at once; its reply is read by ``collect`` (or kept
        aside while another call waits for its own reply)."""
        with self._lock:
            sock = self._sock
            if sock is None:
                raise LmcdError(f"{op}: the client is closed; call connect() first")
            rid = next(self._rids)
            try:
                sock.send(p.encoder.encode(make(rid)), zmq.NOBLOCK)
            except zmq.Again:
                raise ServerTimeout(f"{op}: no connection to the lmcd server at {self.url}") from None
            self._posted[rid] = op
            return rid

    def collect(self, rid: int, timeout_s: float = 0.0) -> p.Reply | None:
        """The reply to posted request ``rid``, or None if it has not come within ``timeout_s``.
        An ``Error`` reply raises ServerError."""
        with self._lock:
            reply = self._arrived.pop(rid, None)
            if reply is None and rid in self._posted:
                reply = self._wait_for(rid, time.monotonic() + timeout_s, self._posted[rid], quiet=True)
            if reply is not None:
                op = self._posted.pop(rid, "request")
                if isinstance(reply, p.Error):
                    raise ServerError(reply.code, reply.message, op)
            return reply

    def _call(self, make: Callable[[int], p.Request], op: str, expected: type[R]) -> R:
        """One request; its reply of type ``expected``, else ServerError (an Error reply) or ProtocolError."""
        with self._lock:
            reply = self._exchange(make, op)
            if isinstance(reply, p.Error) and reply.code == p.ErrorCode.NOT_HELLO and op != "hello":
                # the server restarted (a new session): say Hello again, then retry once
                hello = self._exchange(self._hello_request, "hello")
                if isinstance(hello, p.HelloReply):
                    self.hello = hello
                    reply = self._exchange(make, op)
        if isinstance(reply, p.Error):
            raise ServerError(reply.code, reply.message, op)
        if not isinstance(reply, expected):
            raise ProtocolError(f"{op}: the lmcd server at {self.url} answered {type(reply).__name__}, expected "
                                f"{expected.__name__}; is it the same lmcd version?")
        return reply

    def _exchange(self, make: Callable[[int], p.Request], op: str) -> p.Reply:
        """One request, one reply (the caller holds the lock)."""
        sock, replies = self._sock, self._replies
        if sock is None or replies is None:
            raise LmcdError(f"{op}: the client is closed; call connect() first")
        rid = next(self._rids)
        request = p.encoder.encode(make(rid))
        try:
            sock.send(request, zmq.NOBLOCK)  # connected: sent at once, no poll
        except zmq.Again:  # no connection (IMMEDIATE): wait for one, but not long
            wait_s = min(self.timeout_s, self.connect_timeout_s)
            if not sock.poll(int(wait_s * 1000), zmq.POLLOUT):
                raise ServerTimeout(f"{op}: cannot reach the lmcd server at {self.url} within {wait_s:.1f} s;"
                                    " is `lmcache server` running there?") from None
            sock.send(request)
        reply = self._wait_for(rid, time.monotonic() + self.timeout_s, op)
        if reply is None:  # not quiet: _wait_for raises at the deadline
            raise ServerTimeout(f"{op}: no reply from the lmcd server at {self.url}")
        return reply

    def _wait_for(self, rid: int, deadline: float, op: str, quiet: bool = False) -> p.Reply | None:
        """Read replies until ``rid``'s; a posted request's reply is kept for ``collect``, any other
        answers a request that already timed out. None (``quiet``) or ServerTimeout at the deadline."""
        sock, replies = self._sock, self._replies
        assert sock is not None and replies is not None
        while True:
            if not replies.poll(self._ms_left(deadline)):
                if quiet:
                    return None
                raise ServerTimeout(f"{op}: no reply from the lmcd server at {self.url} within "
                                    f"{self.timeout_s:.1f} s")
            reply = p.reply_decoder.decode(sock.recv())
            if reply.rid == rid:
                return reply
            if reply.rid in self._posted:
                self._arrived[reply.rid] = reply

    @staticmethod
    def _ms_left(deadline: float) -> int:
        return max(0, int((deadline - time.monotonic()) * 1000))
