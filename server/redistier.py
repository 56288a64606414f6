"""The Redis/Valkey L2 tier (kinds "resp" and "valkey"): one redis-py client, plain or Redis Cluster.

An object is one string key, ``key_prefix + name``, whose value is the object's bytes (header then
payload, ``server/l2.py``), set with ``NX`` (and ``EX ttl_seconds`` when configured). A write asks
``EXISTS`` first, so a chunk some server stored already costs one small round trip, not its payload.

The adapter is always in exactly one of two states::

    up    -- calls go to Redis; the watcher thread samples INFO memory and DBSIZE every SAMPLE_EVERY_S
    down  -- calls fail fast with TierError (no connect attempt per call); the watcher builds a fresh
             client and PINGs it, backing off BACKOFF_FIRST_S doubling to BACKOFF_MAX_S, until it answers

It starts down and goes up in ``start()`` (or later, in the watcher, if Redis is not reachable then).
A connection error or timeout on any call (caller or watcher) takes it down, logging one WARNING per
outage; the watcher logs one INFO when it is up again. A Redis error reply (OOM, WRONGTYPE, ...) fails
only that call. No redis-py exception leaves the adapter: every one becomes a TierError.

Capacity: Redis evicts (its ``maxmemory-policy``), the adapter never does, and never assumes that an
object it wrote is still there. ``max_capacity_bytes``, when given, is a soft cap of Redis's
``used_memory`` (whole server, sampled): writes are refused with TierError while it is exceeded.
``capacity_bytes`` is that cap, else Redis's ``maxmemory`` when set, else None (unbounded).

Ownership: thread-safe. Caller threads (the cascade's tier threads) share the client's connection
pool; ``_lock`` guards the state (``_client``, ``_up``, the counters); the watcher thread is the only
one that replaces the client and writes the sampled usage.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from redis import exceptions as rex
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from lmcd.server.l2 import (
    HEADER_BYTES,
    Adapter,
    CorruptObject,
    MissingObject,
    TierError,
    header_bytes_of,
    payload_bytes_of,
)

log = logging.getLogger("lmcd.server")

KINDS = ("resp", "valkey")
SAMPLE_EVERY_S = 2.0  # how stale usage() may be; the watcher's only load on a healthy Redis
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
# redis-py reads replies in recvs of this size (default 64 KiB): 1 MiB reads a 6 MiB GET ~10 % faster,
# for 1 MiB of read buffer per pooled connection
SOCKET_READ_BYTES = 1 << 20

Client = redis.Redis | RedisCluster
T = TypeVar("T")

# Errors that say Redis cannot be reached (or will not let us in): the adapter goes down. The cluster
# ones (no node for a slot, cluster down) too. Any other RedisError is a refusal of one call.
_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    rex.ConnectionError, rex.TimeoutError, rex.ClusterError, rex.RedisClusterException, OSError)


class RedisAdapter(Adapter):
    """L2 objects in a Redis, Valkey or Redis Cluster server (module docstring: states, capacity)."""

    remote = True

    def __init__(self, kind: str, *, host: str | None = None, port: int = 6379,
                 startup_nodes: list[tuple[str, int]] | None = None, cluster_mode: bool = False,
                 username: str | None = None, password: str | None = None, tls: bool = False,
                 key_prefix: str = "lmcd:", ttl_seconds: int | None = None, max_capacity_bytes: int | None = None,
                 timeout_s: float = 1.0) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not a Redis tier kind ({', '.join(KINDS)})")
        nodes = ([(host, port)] if host is not None else []) + list(startup_nodes or [])
        if not nodes:
            raise ValueError("a Redis tier needs host or startup_nodes")
        if not cluster_mode and len(nodes) > 1:
            raise ValueError("several Redis nodes given without cluster_mode")
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive, not {ttl_seconds}")
        if max_capacity_bytes is not None and max_capacity_bytes <= 0:
            raise ValueError(f"max_capacity_bytes must be positive, not {max_capacity_bytes}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s}")
        self.kind = kind
        self._nodes = nodes
        self._cluster_mode = cluster_mode
        self._username = username
        self._password = password  # never in describe(), repr() or a log line
        self._tls = tls
        self._prefix = key_prefix.encode()
        self._ttl = ttl_seconds
        self._max_capacity = max_capacity_bytes
        self._timeout = timeout_s
        self.address = ",".join(f"{h}:{p}" for h, p in nodes)

        self._lock = threading.Lock()
        self._client: Client | None = None
        self._up = False
        self._down_since = time.monotonic()
        self._reconnects = 0
        self._used_bytes: int | None = None
        self._maxmemory: int | None = None
        self._objects: int | None = None
        self._wake = threading.Event()  # a caller saw the tier go down, or close(): the watcher acts now
        self._closing = False
        self._watcher: threading.Thread | None = None

    # -- lifecycle

    def describe(self) -> str:
        extras = [f"prefix {self._prefix.decode()!r}"]
        if self._cluster_mode:
            extras.insert(0, "cluster")
        if self._tls:
            extras.append("tls")
        if self._ttl is not None:
            extras.append(f"ttl {self._ttl} s")
        if self._max_capacity is not None:
            extras.append(f"cap {self._max_capacity / (1 << 30):.1f} GiB")
        return f"{self.kind} {self.address} ({', '.join(extras)})"

    def __repr__(self) -> str:
        return f"RedisAdapter({self.describe()})"

    def start(self) -> None:
        """Connect and PING (bounded by timeout_s per node); if Redis does not answer, log and serve down."""
        try:
            self._reconnect()
        except _DOWN_ERRORS + (rex.RedisError,) as exc:
            self._went_down(exc)
        else:
            log.info("Redis tier %s connected", self.describe())
        self._watcher = threading.Thread(target=self._watch, name=f"lmcd-redis-{self.address}", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._up = False
            client, self._client = self._client, None
        self._wake.set()
        if self._watcher is not None:
            self._watcher.join(self._timeout * len(self._nodes) + 2.0)
        if client is not None:
            _close_quietly(client)

    # -- Adapter calls

    def contains(self, names: list[str]) -> list[bool]:
        if not names:
            return []
        keys = [self._key(n) for n in names]

        def exists_all(client: Client) -> list[bool]:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            return [bool(n) for n in pipe.execute()]

        return self._call("contains", exists_all)

    def write(self, name: str, header: bytes, payload: memoryview) -> bool:
        key = self._key(name)
        with self._lock:
            used = self._used_bytes
        if self._max_capacity is not None and used is not None and used > self._max_capacity:
            raise TierError(f"Redis tier {self.address} full: used_memory {used} B over max_capacity_bytes "
                            f"{self._max_capacity}")

        def exists_then_set(client: Client) -> bool:
            if client.exists(key):
                return False
            return self._set_nx(client, key, header, payload)

        return self._call("write", exists_then_set)

    def read_into(self, name: str, dest: memoryview) -> bytes:
        out = dest.cast("B") if dest.format != "B" or dest.ndim != 1 else dest
        header = self._call("read", lambda client: self._get_into(client, self._key(name), name, out))
        if header is None:
            raise MissingObject(f"{name} not in Redis tier {self.address}")
        return header

    def _get_into(self, client: Client, key: bytes, name: str, dest: memoryview) -> bytes | None:
        """GET ``key`` with its payload received straight into ``dest`` (redis-py would make one bytes of the
        whole value, which would then be copied: half the rate); the header returned, None if the key is not
        there. The reply is read off the connection's socket here; one that cannot be the object asked for
        drops the connection (its place in the stream is lost) and raises CorruptObject. A cluster node not
        connected yet, or a slot that moved, goes through RedisCluster's own GET (one copy more)."""
        node_client = client.get_node_from_key(key).redis_connection if isinstance(client, RedisCluster) else client
        if node_client is None:
            return self._get_copied(client, key, name, dest)
        pool = node_client.connection_pool
        conn = pool.get_connection()
        clean = False
        try:
            conn.send_packed_command([b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key)], check_health=False)
            sock = conn._sock  # connected by the send
            if sock is None:
                raise rex.ConnectionError("no socket after sending GET")
            header, clean = _read_object_reply(sock, name, dest)
        except rex.ResponseError as exc:
            clean = True  # an error line, read whole
            if isinstance(client, RedisCluster) and str(exc).startswith(("MOVED", "ASK")):
                return self._get_copied(client, key, name, dest)
            raise
        finally:
            if not clean:
                conn.disconnect()
            pool.release(conn)
        return header

    def _get_copied(self, client: Client, key: bytes, name: str, dest: memoryview) -> bytes | None:
        value = client.get(key)
        if value is None:
            return None
        assert isinstance(value, bytes)  # decode_responses is off
        view = memoryview(value)
        header_bytes = header_bytes_of(view[:HEADER_BYTES])
        if len(view) < header_bytes:
            raise CorruptObject(f"{name}: {len(view)} bytes, shorter than its header ({header_bytes})")
        header = bytes(view[:header_bytes])
        stored, announced = len(view) - header_bytes, payload_bytes_of(header)
        if stored != len(dest) or announced != len(dest):
            raise CorruptObject(f"{name}: payload of {stored} bytes, its header says {announced}, "
                                f"{len(dest)} asked for")
        dest[:] = view[header_bytes:]
        return header

    def delete(self, name: str) -> None:
        self._call("delete", lambda client: client.delete(self._key(name)))

    def usage(self) -> dict[str, int | float | bool | None]:
        with self._lock:
            return {
                "available": self._up,
                "capacity_bytes": self._max_capacity if self._max_capacity is not None else self._maxmemory,
                "used_bytes": self._used_bytes,  # Redis used_memory, the whole server's (all key prefixes)
                "objects": self._objects,  # DBSIZE: every key of the database, not only this prefix's
                "reconnects": self._reconnects,
            }

    # -- internals

    def _key(self, name: str) -> bytes:
        return self._prefix + name.encode()

    def _call(self, what: str, fn: Callable[[Client], T]) -> T:
        """``fn(client)`` if the tier is up, every failure a TierError; a down error takes the tier down."""
        with self._lock:
            client = self._client if self._up else None
        if client is None:
            raise TierError(f"Redis tier {self.address} unavailable (reconnecting)")
        try:
            return fn(client)
        except _DOWN_ERRORS as exc:
            self._went_down(exc, client)
            raise TierError(f"Redis tier {self.address} {what}: {exc}") from exc
        except rex.RedisError as exc:  # an error reply (OOM, WRONGTYPE, ...): this call only
            raise TierError(f"Redis tier {self.address} {what} refused: {exc}") from exc
        except Exception as exc:
            with self._lock:
                replaced = client is not self._client
            if not replaced:
                raise
            # the watcher closed this client under the call (after an outage): its state was torn down
            raise TierError(f"Redis tier {self.address} {what}: reconnected during the call ({exc!r})") from exc

    def _set_nx(self, client: Client, key: bytes, header: bytes, payload: memoryview) -> bool:
        """SET key header+payload NX [EX ttl], sending the payload from its memoryview (no copy): redis-py
        packs every argument into one bytes (hiredis copies a memoryview twice), so the command is packed
        here, as three parts whose middle one is the payload. Atomic: Redis sets the whole value or none."""
        node_client = client.get_node_from_key(key).redis_connection if isinstance(client, RedisCluster) else client
        if node_client is None:  # cluster node not connected yet: let RedisCluster route it (one copy)
            return self._set_nx_joined(client, key, header, payload)
        parts = _pack_set_nx(key, header, payload, self._ttl)
        pool = node_client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command(parts, check_health=False)
            reply = conn.read_response()
        except rex.AskError:  # MOVED too (a subclass): the slot moved; RedisCluster follows the redirection
            return self._set_nx_joined(client, key, header, payload)
        finally:
            pool.release(conn)
        return reply is not None  # None: another writer set the key between EXISTS and SET

    def _set_nx_joined(self, client: Client, key: bytes, header: bytes, payload: memoryview) -> bool:
        value = bytearray(len(header) + payload.nbytes)
        value[:len(header)] = header
        value[len(header):] = payload.cast("B") if payload.format != "B" else payload
        return bool(client.set(key, bytes(value), nx=True, ex=self._ttl))

    def _went_down(self, exc: BaseException, client: Client | None = None) -> None:
        """Mark the tier down (once per outage, one WARNING) and wake the watcher to reconnect."""
        with self._lock:
            if self._closing or (client is not None and client is not self._client):
                return  # closing, or a late failure of a client the watcher already replaced
            was_up, self._up = self._up, False
            if was_up or self._client is None:
                self._down_since = time.monotonic()
            first = was_up or self._watcher is None
        if first:
            log.warning("Redis tier %s unreachable (%s): serving from L1, reconnecting", self.address,
                        _reason(exc))
        self._wake.set()

    def _watch(self) -> None:
        """The watcher thread: sample usage while up, reconnect with backoff while down."""
        backoff = BACKOFF_FIRST_S
        while True:
            with self._lock:
                if self._closing:
                    return
                up, client = self._up, self._client
            if up and client is not None:
                backoff = BACKOFF_FIRST_S
                try:
                    self._sample(client)
                except _DOWN_ERRORS + (rex.RedisError,) as exc:
                    self._went_down(exc, client)
                    continue
                self._wake.wait(SAMPLE_EVERY_S)
                self._wake.clear()
                continue
            try:
                self._reconnect()
            except _DOWN_ERRORS + (rex.RedisError,):
                self._wake.wait(backoff)
                self._wake.clear()
                backoff = min(2 * backoff, BACKOFF_MAX_S)
                continue
            with self._lock:
                outage = time.monotonic() - self._down_since
            log.info("Redis tier %s reachable again after %.1f s", self.address, outage)

    def _reconnect(self) -> None:
        """A fresh client, PINGed; on success the tier is up with it (the old one closed)."""
        client = self._connect()
        try:
            client.ping()
            self._sample(client)
        except BaseException:
            _close_quietly(client)
            raise
        old: Client | None
        with self._lock:
            if self._closing:
                old = client
            else:
                old, self._client, self._up = self._client, client, True
                if old is not None:
                    self._reconnects += 1
        if old is not None:
            _close_quietly(old)

    def _connect(self) -> Client:
        common = dict(username=self._username, password=self._password, ssl=self._tls,
                      socket_timeout=self._timeout, socket_connect_timeout=self._timeout,
                      socket_read_size=SOCKET_READ_BYTES,
                      retry=Retry(NoBackoff(), 0))  # no retries: the cascade owns deadlines
        if self._cluster_mode:
            nodes = [ClusterNode(h, p) for h, p in self._nodes]
            return RedisCluster(startup_nodes=nodes, **common)  # type: ignore[arg-type]  # (connects)
        host, port = self._nodes[0]
        return redis.Redis(host=host, port=port, **common)  # type: ignore[arg-type]

    def _sample(self, client: Client) -> None:
        """used_memory, maxmemory and DBSIZE (summed over the primaries of a cluster); left unknown where
        the server refuses INFO or DBSIZE (renamed away on some managed services)."""
        try:
            self._sample_refusable(client)
        except rex.ResponseError as exc:
            log.debug("Redis tier %s: no usage sample (%s)", self.address, exc)

    def _sample_refusable(self, client: Client) -> None:
        if isinstance(client, RedisCluster):
            per_node = client.info("memory", target_nodes=RedisCluster.PRIMARIES)
            infos = list(per_node.values()) if isinstance(per_node, dict) and "used_memory" not in per_node \
                else [per_node]
            objects = client.dbsize(target_nodes=RedisCluster.PRIMARIES)
        else:
            infos = [client.info("memory")]
            objects = client.dbsize()
        used = sum(int(i.get("used_memory", 0)) for i in infos)
        maxmemory = sum(int(i.get("maxmemory", 0)) for i in infos)
        with self._lock:
            self._used_bytes, self._objects = used, int(objects)
            self._maxmemory = maxmemory or None  # 0: no maxmemory (unbounded)


def _pack_set_nx(key: bytes, header: bytes, payload: memoryview, ttl: int | None) -> list[bytes | memoryview]:
    """``SET key <header+payload> NX [EX ttl]`` in RESP, as [head, payload, tail] (the value one bulk string)."""
    options = [b"NX"] + ([b"EX", str(ttl).encode()] if ttl is not None else [])
    head = b"*%d\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s" % (3 + len(options), len(key), key,
                                                          len(header) + payload.nbytes, header)
    tail = b"\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(o), o) for o in options)
    return [head, payload, tail]


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _close_quietly(client: Client) -> None:
    try:
        client.close()
    except Exception as exc:  # closing a client of a dead server: nothing left to do
        log.debug("closing a Redis client: %r", exc)


def _read_object_reply(sock: socket.socket, name: str, dest: memoryview) -> tuple[bytes | None, bool]:
    """Read one RESP2/RESP3 reply to GET: None for a nil, else the object's header (its payload into ``dest``).
    Returns (header, whether the stream is at a reply boundary); raises ResponseError for an error line,
    CorruptObject for a value that cannot be an object of ``len(dest)`` payload bytes (stream not clean)."""
    line = _read_line(sock)
    if line in (b"$-1", b"_"):  # nil in RESP2 and RESP3 (redis-py says HELLO 3 where the server has it)
        return None, True
    if line[:1] == b"-":
        raise rex.ResponseError(line[1:].decode("utf-8", "replace"))
    if line[:1] == b"!" and line[1:].isdigit():  # a RESP3 blob error
        text = _recv_exact(sock, int(line[1:]) + 2)[:-2]
        raise rex.ResponseError(text.decode("utf-8", "replace"))
    if line[:1] != b"$" or not line[1:].isdigit():
        raise rex.InvalidResponse(f"unexpected reply to GET: {line[:40]!r}")
    total = int(line[1:])
    if total < HEADER_BYTES:
        raise CorruptObject(f"{name}: {total} bytes, shorter than a header ({HEADER_BYTES})")
    first = _recv_exact(sock, HEADER_BYTES)
    header_bytes = header_bytes_of(first)
    if total < header_bytes:
        raise CorruptObject(f"{name}: {total} bytes, shorter than its header ({header_bytes})")
    header = first + _recv_exact(sock, header_bytes - HEADER_BYTES)
    stored, announced = total - header_bytes, payload_bytes_of(header)
    if stored != len(dest) or announced != len(dest):
        raise CorruptObject(f"{name}: payload of {stored} bytes, its header says {announced}, {len(dest)} asked for")
    done = 0
    while done < len(dest):
        n = sock.recv_into(dest[done:])
        if not n:
            raise rex.ConnectionError("connection closed in the middle of a reply")
        done += n
    if _recv_exact(sock, 2) != b"\r\n":
        raise rex.InvalidResponse("a GET reply not ended by CRLF")
    return header, True


def _read_line(sock: socket.socket) -> bytes:
    """One reply line, without its CRLF, read byte by byte (a few dozen bytes): nothing of the value after it
    is taken off the socket."""
    line = bytearray()
    while not line.endswith(b"\r\n"):
        byte = sock.recv(1)
        if not byte:
            raise rex.ConnectionError("connection closed before a reply")
        line += byte
        if len(line) > 4096:
            raise rex.InvalidResponse("a reply line longer than 4096 bytes")
    return bytes(line[:-2])


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, done = memoryview(buf), 0
    while done < n:
        got = sock.recv_into(view[done:])
        if not got:
            raise rex.ConnectionError("connection closed in the middle of a reply")
        done += got
    return bytes(buf)
