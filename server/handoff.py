"""The handoff socket: where a worker proves it holds its KV memory by handing over its file descriptors.

The server never opens a worker's memory by name (a name proves nothing: the server, often root,
could open memory its client cannot). A worker connects to this Unix stream socket
(``/dev/shm/lmcd_<pid>_<random>.sock``, mode 0666: any local client may try; the session's
``HelloReply.handoff_nonce`` is the authorisation) and sends the nonce with its segments' fds
(SCM_RIGHTS; wire format in ``lmcd.shm``). Each fd must be a sealed memfd (``check_memory_fd``):
a regular file on the kernel's internal tmpfs whose seals forbid shrinking, so no holder can
truncate it under the server's mapping, and which no /dev/shm size limit bounds, so a first touch
cannot fail with SIGBUS. The fds are then attached to the session with that nonce, on the loop
thread (``attach``), and its ``RegisterWorker`` maps them. A worker that copies itself asks for the
shared pool's fd instead, which it gets only if it runs as the server's user (the pool holds every
user's chunks).

Threads: one accept thread; each connection is served by a thread of its own, at most
``MAX_CONCURRENT`` at once (more are refused at once), each within ``TIMEOUT_S``. They touch no
cache state: ``attach`` runs on the loop thread through ``post``.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import secrets
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from lmcd import shm

log = logging.getLogger("lmcd.handoff")

SHM_DIR = "/dev/shm"
TIMEOUT_S = 5.0
ATTACH_TIMEOUT_S = 2.0
MAX_CONCURRENT = 8
MAX_HANDOFF_FDS = 1024  # per session (a vLLM CPU worker hands over one per KV storage: one per layer or fewer)
TMPFS_MAGIC = 0x01021994  # memfds live on the kernel's internal tmpfs; hugetlbfs (0x958458f6) is refused


class HandoffError(Exception):
    """A handoff the server refuses; the message, sent back to the worker, says why and what to do."""


@dataclass(frozen=True, slots=True)
class Peer:
    """The connecting process as the kernel reports it (SO_PEERCRED), in the server's pid namespace."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class HandedFd:
    """One handed-over memory fd, checked (``check_memory_fd``), and its size in bytes."""

    fd: int
    nbytes: int


Attach = Callable[[bytes, list[HandedFd], Peer], "str | None"]  # loop thread: None, or why it was refused
Post = Callable[[Callable[[], None]], None]


def _fs_type(fd: int) -> int:
    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type is its first field (a long)
    if shm.libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def check_memory_fd(fd: int, index: int) -> int:
    """Size of a handed-over memory fd that is a sealed memfd; HandoffError otherwise."""
    advice = "hand over sealed memfds (lmcd.shm.ShmSegment; upgrade the worker's lmcd)"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HandoffError(f"fd {index} is not a regular file (mode {st.st_mode:o}); {advice}")
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        fs_type = _fs_type(fd)
    except OSError as exc:
        raise HandoffError(f"fd {index} is not a sealable memfd ({exc.strerror}); {advice}") from None
    if not seals & fcntl.F_SEAL_SHRINK:
        raise HandoffError(f"fd {index} is not sealed against shrinking (F_SEAL_SHRINK), so it could be truncated "
                           f"under the server's mapping; {advice}")
    if fs_type != TMPFS_MAGIC:
        raise HandoffError(f"fd {index} is not on the kernel's tmpfs (filesystem magic {fs_type:#x}; hugetlbfs "
                           f"memfds are refused: a fault there can kill the server); {advice}")
    return st.st_size


def read_request(conn: socket.socket, deadline: float) -> tuple[int, bytes, list[int]]:
    """(flags, nonce, fds) of one handoff request; the caller owns the fds. On an error every fd
    received so far is closed here."""
    data = b""
    fds: list[int] = []
    try:
        while len(data) < shm.HANDOFF_HEADER.size:
            data += _receive(conn, deadline, fds)
        magic, version, flags, _, num_fds, nonce = shm.HANDOFF_HEADER.unpack_from(data)
        if magic != shm.HANDOFF_MAGIC or version != shm.HANDOFF_VERSION:
            raise HandoffError(f"not an lmcd handoff request of version {shm.HANDOFF_VERSION}; install matching "
                               "lmcd versions on both sides")
        if num_fds > MAX_HANDOFF_FDS:
            raise HandoffError(f"{num_fds} fds exceed the limit of {MAX_HANDOFF_FDS} per session; put the KV into "
                               "fewer segments")
        num_bytes = shm.HANDOFF_HEADER.size + max(0, -(-num_fds // shm.MAX_FDS_PER_MESSAGE) - 1)
        while len(data) < num_bytes or len(fds) < num_fds:
            if len(data) > num_bytes or len(fds) > num_fds:
                break
            data += _receive(conn, deadline, fds)
        if len(data) != num_bytes or len(fds) != num_fds:
            raise HandoffError(f"the request carries {len(data)} bytes and {len(fds)} fds, its header announces "
                               f"{num_bytes} and {num_fds}")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return flags, nonce, fds


def _receive(conn: socket.socket, deadline: float, fds: list[int]) -> bytes:
    """One message's bytes; its fds are appended to ``fds`` (close-on-exec)."""
    conn.settimeout(max(0.001, deadline - time.monotonic()))
    chunk, got, flags, _ = socket.recv_fds(conn, 4096, shm.MAX_FDS_PER_MESSAGE, socket.MSG_CMSG_CLOEXEC)
    fds += got
    if flags & socket.MSG_CTRUNC:
        raise HandoffError(f"more than {shm.MAX_FDS_PER_MESSAGE} fds in one message")
    if not chunk:
        raise HandoffError("the connection closed before the whole request came")
    return chunk


def send_reply(conn: socket.socket, message: str = "", fds: list[int] | None = None) -> None:
    body = message.encode()[:60000]
    status = shm.HANDOFF_REFUSED if message else shm.HANDOFF_OK
    socket.send_fds(conn, [shm.HANDOFF_REPLY.pack(status, len(body)) + body], fds or [])


class _Pending:
    """One handoff waiting for the loop thread. Whoever comes first decides who closes the fds."""

    def __init__(self, handed: list[HandedFd]) -> None:
        self.handed = handed
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.abandoned = False
        self.result: str | None = "the server did not answer"


class HandoffServer:
    """The listening socket and its threads (module docstring). ``pool_fd``: the shared pool, or None."""

    def __init__(self, attach: Attach, post: Post, pool_fd: int | None) -> None:
        self._attach, self._post, self._pool_fd = attach, post, pool_fd
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT)
        self._stopping = threading.Event()
        self.path, self._sock = _bind()
        self._thread = threading.Thread(target=self._accept_loop, name="lmcd-handoff", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if not self._stopping.is_set():
                    log.warning("Handoff socket accept failed: %s", exc)
                    time.sleep(0.1)
                continue
            if not self._slots.acquire(blocking=False):
                self._refuse_busy(conn)
                continue
            threading.Thread(target=self._serve, args=(conn,), name="lmcd-handoff-conn", daemon=True).start()

    @staticmethod
    def _refuse_busy(conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            conn.settimeout(0.5)
            send_reply(conn, f"the server is serving {MAX_CONCURRENT} handoffs already; try again")

    def _serve(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        fds: list[int] = []
        try:
            with conn:
                try:
                    peer = Peer(*struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)))
                    want, nonce, fds = read_request(conn, deadline)
                    pool = self._pool_for(peer) if want & shm.HANDOFF_WANT_POOL else []
                    handed = [HandedFd(fd, check_memory_fd(fd, i)) for i, fd in enumerate(fds)]
                    refused = self._attach_on_loop(nonce, handed, peer)
                    if refused is None:
                        fds = []  # the session owns them now
                        log.debug("Handoff from pid %d (uid %d): %d fds%s", peer.pid, peer.uid, len(handed),
                                  ", sent the pool" if pool else "")
                    else:
                        pool = []
                    message = refused or ""
                except HandoffError as exc:
                    message, pool = str(exc), []
                    log.info("Handoff refused: %s", message)
                conn.settimeout(max(0.001, deadline - time.monotonic()))
                send_reply(conn, message, pool)
        except OSError as exc:  # the peer went away or was too slow: nothing to answer
            log.debug("Handoff connection dropped: %s", exc)
        finally:
            for fd in fds:
                os.close(fd)
            self._slots.release()

    def _pool_for(self, peer: Peer) -> list[int]:
        if self._pool_fd is None:
            raise HandoffError("this server does not share its pool; start it with --share-pool true")
        if peer.uid != os.geteuid():
            raise HandoffError(f"the shared pool holds every user's chunks, so only processes of the server's user "
                               f"(uid {os.geteuid()}) get it, and this worker runs as uid {peer.uid}: run both as one "
                               "user, or let the server copy (server without --share-pool)")
        return [self._pool_fd]

    def _attach_on_loop(self, nonce: bytes, handed: list[HandedFd], peer: Peer) -> str | None:
        pending = _Pending(handed)

        def run() -> None:
            with pending.lock:
                if pending.abandoned:
                    return  # the handoff thread gave up and closes the fds itself
                try:
                    pending.result = self._attach(nonce, handed, peer)
                finally:
                    pending.done.set()

        self._post(run)
        if not pending.done.wait(ATTACH_TIMEOUT_S):
            with pending.lock:
                if not pending.done.is_set():
                    pending.abandoned = True
                    raise HandoffError(f"the server's request loop did not take the handoff within "
                                       f"{ATTACH_TIMEOUT_S:.0f} s; try again")
        return pending.result


def _bind() -> tuple[str, socket.socket]:
    for _ in range(10):
        path = os.path.join(SHM_DIR, f"lmcd_{os.getpid()}_{secrets.token_hex(8)}.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
        except FileExistsError:
            sock.close()
            continue
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot create the handoff socket {path}: {exc.strerror}; the server needs "
                          f"a writable {SHM_DIR} (shared with its workers: Docker --ipc host)") from None
        os.chmod(path, 0o666)  # any local client may connect; the session's nonce authorises it
        sock.listen(64)
        sock.settimeout(0.5)  # the accept loop notices close() within this
        return path, sock
    raise OSError(f"no free handoff socket name in {SHM_DIR}")

