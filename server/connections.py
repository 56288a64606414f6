"""The ROUTER socket's connections and the sessions that ride on them; the connection cap.

Ownership: the request loop thread only (``CacheServer`` drains the socket monitor into this
table and asks it for the session of every frame).

What libzmq 4.3.5 tells us (ZMQ_ROUTER_NOTIFY is a draft option it is not built with): the socket
monitor reports ``EVENT_ACCEPTED(fd)`` when a connection is accepted and ``EVENT_DISCONNECTED(fd)``
when it ends, before the descriptor is closed; with one ZMQ io thread the events come in the order
they happened, so the disconnect of a connection comes before the accept of the next one that the
kernel gives the same descriptor. Every frame tells the descriptor it came on (ZMQ_SRCFD).

Rules (each keeps "nothing of a gone peer stays" true):
  1. A descriptor is open from its accept to its disconnect. A disconnect ends EVERY session that
     came on that descriptor: all of them are dead, so no disconnect is ever taken for another's.
  2. A frame of a new routing id opens a session only if its descriptor is open once the monitor
     is drained; otherwise its connection is gone already (it posted and closed at once), and its
     frames are dropped unanswered, counted as ``late_frames``: no state is made for a dead peer.
  3. A reply that cannot be sent (ROUTER_MANDATORY: the peer's pipe is gone) ends its session;
     this catches a dead peer whose descriptor the kernel gave to a new connection meanwhile.
  4. At most ``max_connections`` connections are open (the server raised its open-file limit to
     the hard limit first, and keeps ``FD_RESERVE`` descriptors for the sidecar, pool, copies and
     handoff). One over the cap is cut at once, with a rate-limited WARNING that names the cap.
  5. A connection on which no session has passed Hello within ``handshake_timeout_s`` is cut, so
     that idle or unauthenticated peers cannot hold the cap.

Cutting: ``shutdown(SHUT_RDWR)`` of the descriptor (checked to be a socket of our endpoint), after
which ZMQ sees the end of the stream, closes its own descriptor and reports the disconnect.
"""

from __future__ import annotations

import itertools
import logging
import resource
import socket
from collections import deque
from dataclasses import dataclass, field

from lmcd.server.session import Session

log = logging.getLogger("lmcd.server")

FD_RESERVE = 64  # descriptors kept for the HTTP sidecar, the pool, copies, the handoff socket and logs
MIN_CONNECTIONS = 16
WARNING_INTERVAL_S = 10.0


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (each ZMQ connection holds a descriptor);
    returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("Open-file limit stays at %d: raising it to the hard limit %d failed (%s)", soft, target, exc)
            return soft
        log.info("Open-file limit raised from %d to the hard limit %d", soft, target)
        return target
    log.info("Open-file limit: %d (the hard limit)", soft)
    return soft


@dataclass(slots=True, eq=False)
class Connection:
    """One accepted connection; ``fd`` is its descriptor while it is open."""

    fd: int
    accepted_at: float
    routing_ids: list[bytes] = field(default_factory=list)
    greeted: bool = False  # a session on it passed Hello
    cut: bool = False  # we shut it down; its disconnect is on the way


class Connections:
    def __init__(self, endpoint: str, open_file_limit: int, max_connections: int, handshake_timeout_s: float) -> None:
        self.max_connections = max(MIN_CONNECTIONS, min(max_connections, open_file_limit - FD_RESERVE))
        if self.max_connections < max_connections:
            self.cap_reason = (f"the open-file limit {open_file_limit} less {FD_RESERVE} kept for the sidecar, pool, "
                               "copies and handoff")
        else:
            self.cap_reason = "--max-connections"
        self.handshake_timeout_s = handshake_timeout_s
        self._endpoint = endpoint
        self.sessions: dict[bytes, Session] = {}
        self._fds: dict[int, Connection | None] = {}  # None: closed (disconnect seen, no accept since)
        self._num_live = 0  # open and not cut: what the cap counts
        self._by_age: deque[Connection] = deque()  # accept order, for the handshake deadline
        self._session_ids = itertools.count(1)
        self.accepted = 0
        self.refused_over_cap = 0
        self.cut_idle = 0
        self.late_frames = 0
        self.undeliverable_replies = 0
        self._unlogged = {"over_cap": 0, "idle": 0}
        self._logged_at = {"over_cap": -WARNING_INTERVAL_S, "idle": -WARNING_INTERVAL_S}

    def describe(self) -> str:
        return (f"at most {self.max_connections} open ZMQ connections ({self.cap_reason}); peers that have not "
                f"said Hello within {self.handshake_timeout_s:g} s are cut (--handshake-timeout)")

    # ------------------------------------------------------------ monitor events

    def on_events(self, events: list[tuple[bool, int]], now: float) -> list[Session]:
        """Apply monitor events ((accepted, fd): an accept, else a disconnect) in order; returns the
        sessions whose connection ended (the caller releases what they hold)."""
        ended: list[Session] = []
        over_cap: list[Connection] = []
        for accepted, fd in events:
            if accepted:
                if self._fds.get(fd) is not None:  # its disconnect never came (ZMQ says it always does)
                    ended.extend(self._closed(fd))
                conn = Connection(fd, now)
                self._fds[fd] = conn
                self.accepted += 1
                if self._num_live >= self.max_connections:
                    conn.cut = True
                    over_cap.append(conn)
                else:
                    self._num_live += 1
                    self._by_age.append(conn)
            else:
                ended.extend(self._closed(fd))
        for conn in over_cap:  # cut only what is still open after the whole batch
            if self._fds.get(conn.fd) is conn:
                self._cut(conn)
            self.refused_over_cap += 1
            self._note("over_cap", now)
        return ended

    def _closed(self, fd: int) -> list[Session]:
        conn = self._fds.get(fd)
        self._fds[fd] = None
        if conn is None:
            return []
        if not conn.cut:
            self._num_live -= 1
        ended = []
        for routing_id in conn.routing_ids:
            session = self.sessions.get(routing_id)
            if session is not None and session.fd == fd:
                del self.sessions[routing_id]
                ended.append(session)
        return ended

    # ------------------------------------------------------------ sessions

    def open_session(self, routing_id: bytes, fd: int | None, now: float) -> Session | None:
        """A session for the first frame of ``routing_id`` (call with the monitor drained), or None
        when its connection is gone already (rule 2)."""
        if fd is not None:
            if fd in self._fds:
                conn = self._fds[fd]
            else:  # accepted before the monitor started: open, as far as we know
                conn = self._fds[fd] = Connection(fd, now)
                self._num_live += 1
                self._by_age.append(conn)
            if conn is None or conn.cut:
                self.late_frames += 1
                return None
            conn.routing_ids.append(routing_id)
        session = Session(next(self._session_ids), routing_id, fd)
        self.sessions[routing_id] = session
        return session

    def end(self, session: Session) -> bool:
        """Forget ``session``; False if it had ended already."""
        if self.sessions.get(session.routing_id) is not session:
            return False
        del self.sessions[session.routing_id]
        return True

    def greeted(self, session: Session) -> None:
        """A session passed Hello: its connection is no longer cut for idling (rule 5)."""
        conn = self._fds.get(session.fd) if session.fd is not None else None
        if conn is not None:
            conn.greeted = True

    # ------------------------------------------------------------ cuts

    def expire(self, now: float) -> None:
        """Cut the connections past their handshake deadline with no session through Hello."""
        for kind in self._unlogged:
            self._flush(kind, now)
        by_age, deadline = self._by_age, now - self.handshake_timeout_s
        while by_age and by_age[0].accepted_at <= deadline:
            conn = by_age.popleft()
            if conn.greeted or conn.cut or self._fds.get(conn.fd) is not conn:
                continue
            conn.cut = True
            self._num_live -= 1
            self._cut(conn)
            self.cut_idle += 1
            self._note("idle", now)

    def _cut(self, conn: Connection) -> None:
        try:
            sock = socket.socket(fileno=conn.fd)
        except OSError:  # closed meanwhile: its disconnect is on the way
            return
        try:
            if self._is_ours(sock):
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # gone meanwhile
        finally:
            sock.detach()  # the descriptor stays ZMQ's, which closes it

    def _is_ours(self, sock: socket.socket) -> bool:
        """The descriptor is still a stream socket of our endpoint (not one the kernel reused for
        something else since the event)."""
        if sock.type != socket.SOCK_STREAM or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return False  # not a connection (a listener has our address too)
        if self._endpoint.startswith("ipc://"):
            path = self._endpoint[len("ipc://"):]
            if path.startswith("@"):  # the abstract namespace
                path = "\0" + path[1:]
            name = sock.getsockname()
            if isinstance(name, bytes):
                name = name.decode(errors="replace")
            return sock.family == socket.AF_UNIX and name == path
        port = int(self._endpoint.rsplit(":", 1)[1])
        return sock.family in (socket.AF_INET, socket.AF_INET6) and sock.getsockname()[1] == port

    def _note(self, kind: str, now: float) -> None:
        self._unlogged[kind] += 1
        self._flush(kind, now)

    def _flush(self, kind: str, now: float) -> None:
        """A rate-limited log line per kind of cut: at once, then at most one per WARNING_INTERVAL_S
        with the count since (``expire`` flushes what a quiet spell left unlogged)."""
        count = self._unlogged[kind]
        if not count or now - self._logged_at[kind] < WARNING_INTERVAL_S:
            return
        self._unlogged[kind], self._logged_at[kind] = 0, now
        if kind == "over_cap":
            log.warning("Cut %d new connection(s) over the cap of %d open ZMQ connections (%s): raise the open-file "
                        "limit (ulimit -n, systemd LimitNOFILE, the container's nofile) or --max-connections",
                        count, self.max_connections, self.cap_reason)
        else:
            log.info("Cut %d connection(s) that had not said Hello within %g s (--handshake-timeout)",
                     count, self.handshake_timeout_s)

    @property
    def num_open(self) -> int:
        """Open connections the cap counts (not those cut and on their way out)."""
        return self._num_live

    def status(self) -> dict[str, object]:
        return {
            "open": self._num_live, "max_connections": self.max_connections,
            "handshake_timeout_s": self.handshake_timeout_s, "accepted": self.accepted,
            "refused_over_cap": self.refused_over_cap, "cut_idle": self.cut_idle,
            "late_frames": self.late_frames, "undeliverable_replies": self.undeliverable_replies,
        }
