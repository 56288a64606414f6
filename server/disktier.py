"""The local-filesystem L2 tier (kind "fs"): one file per object, an in-memory LRU index, a byte bound.

Layout (``base_path`` is owned by one adapter of one process; ``start`` takes ``.lmcd-fs.lock``)::

    base_path/.lmcd-fs.lock                   flock held from start() to close()
    base_path/<n[:2]>/<n>.kv                  object n (32 hex digits): l2 header, then payload
    base_path/<n[:2]>/.<n>.<seq>.tmp          a write in flight (or torn by a killed process)

256 subdirectories by the first two hex digits: names are uniformly distributed, so 100k objects
make ~400 entries a directory, which keeps ``ls``/``rm`` usable by an operator and spreads the
kernel's per-directory lock over concurrent creates, renames and unlinks. Anything else found
under ``base_path`` is foreign: never indexed, never deleted.

Writes are crash-consistent without fsync: the object is written to a temp file in its final
directory and renamed onto its name, so a process killed mid-write leaves only a temp file (which
the next ``start`` deletes) and the final name only ever names a complete file. Power loss may
still leave a renamed file whose data never reached the disk; the header's checksum catches that when
the cascade ``verify``-ies the read, and it ``delete``-s the object. An fsync per object would cost
more than the chunk is worth: an L2 object is a cache entry, losing it is a miss.

State (all under ``_lock``, held only for dictionary work, never across I/O)::

    _index     name -> file bytes, least recently used first; every name has its file on disk
               (unless removed behind our back: a read that finds it gone drops it)
    _busy      names with a write or an unlink in flight; disjoint from _index
    _reserved  bytes of the writes in flight;  _used + _reserved <= capacity, always
    _stamp     the newest mtime given (ns): every write and read sets a file's mtime to a stamp strictly
               above it, so the LRU order survives a restart exactly (scan sorts by mtime) even with
               coarse clocks or a clock set back

A name is at most one of: indexed, busy, absent; a second write of an indexed or busy name returns
False. Readers open files without the lock: an object evicted while it is read stays readable
through the open descriptor (Linux unlink semantics), and a name is only ever replaced by a rename,
so a read sees one complete file or raises MissingObject, never part of one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict

from lmcd.server.diskscan import TEMP_SUFFIX, object_path, scan
from lmcd.server.l2 import (
    HEADER_BYTES,
    Adapter,
    CorruptObject,
    MissingObject,
    TierError,
    header_bytes_of,
    payload_bytes_of,
)

log = logging.getLogger("lmcd.l2")

GIB, MIB = 1 << 30, 1 << 20
LOCK_NAME = ".lmcd-fs.lock"
DEFAULT_FLOOR_BYTES = GIB  # the free-space floor when none is given: min(1 GiB, 5 % of the filesystem)
DEFAULT_FLOOR_FRACTION = 0.05
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class FsAdapter(Adapter):
    """Objects as files under ``base_path``, at most ``max_capacity_bytes`` of them (file bytes), LRU-evicted.

    ``min_free_bytes`` is the free space a write must leave on the filesystem, else it raises TierError
    and writes nothing (reads go on). None: min(1 GiB, 5 % of the filesystem's size), decided at start().
    Thread-safe: every method may be called from any thread once start() returned.
    """

    kind = "fs"

    def __init__(self, base_path: str, max_capacity_bytes: int, min_free_bytes: int | None = None) -> None:
        if max_capacity_bytes <= 0:
            raise ValueError(f"fs tier {base_path}: max_capacity_bytes must be positive, got {max_capacity_bytes}")
        if min_free_bytes is not None and min_free_bytes < 0:
            raise ValueError(f"fs tier {base_path}: min_free_bytes must be >= 0 or None, got {min_free_bytes}")
        self.base_path = os.path.abspath(base_path)
        self.capacity_bytes = max_capacity_bytes
        self.min_free_bytes = min_free_bytes
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()
        self._busy: set[str] = set()
        self._used = 0
        self._reserved = 0
        self._lock_fd: int | None = None
        self._seq = itertools.count()  # temp-file names; next() is atomic under the GIL
        self._stamp = 0

    def describe(self) -> str:
        cap = self.capacity_bytes
        size = f"{cap / GIB:.1f} GiB" if cap >= GIB else f"{cap / MIB:.1f} MiB"
        return f"fs {self.base_path} ({size})"

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Create ``base_path`` and its subdirectories, take its lock, rebuild the index from the files
        (oldest mtime first), delete temp files of killed writers, evict down to capacity."""
        self._lock_fd = _take_directory(self.base_path)
        if self.min_free_bytes is None:
            st = os.statvfs(self.base_path)
            self.min_free_bytes = min(DEFAULT_FLOOR_BYTES, int(st.f_blocks * st.f_frsize * DEFAULT_FLOOR_FRACTION))
        found = scan(self.base_path)
        with self._lock:
            self._index = OrderedDict(found.objects)
            self._used = sum(self._index.values())
            self._stamp = found.newest_mtime_ns
            victims = self._choose_victims(0)
        self._unlink_victims(victims)
        if victims:
            log.info("Disk tier %s: evicted %d objects (%.2f GiB) down to its capacity of %.2f GiB",
                     self.base_path, len(victims), sum(victims.values()) / GIB, self.capacity_bytes / GIB)

    def close(self) -> None:
        """Release the directory's lock; the adapter refuses reads and writes afterwards."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # drops the flock

    # ------------------------------------------------------------ the index

    def holds(self, name: str) -> bool:
        with self._lock:
            return name in self._index

    def contains(self, names: list[str]) -> list[bool]:
        with self._lock:
            return [n in self._index for n in names]

    def usage(self) -> dict[str, int | float | bool | None]:
        try:
            st = os.statvfs(self.base_path)
            free: int | None = st.f_bavail * st.f_frsize
        except OSError:
            free = None
        with self._lock:
            return {"capacity_bytes": self.capacity_bytes, "used_bytes": self._used, "objects": len(self._index),
                    "available": self._lock_fd is not None, "free_bytes": free,
                    "min_free_bytes": self.min_free_bytes, "writing_bytes": self._reserved}

    # ------------------------------------------------------------ write

    def write(self, name: str, header: bytes, payload: memoryview) -> bool:
        """Store ``name`` (see Adapter.write), evicting LRU objects first. False, writing nothing, if it is
        indexed or a write or eviction of it is in flight. TierError if it is larger than the capacity,
        if the write would take the filesystem below ``min_free_bytes`` (nothing is evicted then), or on
        an I/O error (ENOSPC, EDQUOT included); no temp file outlives the call."""
        self._check_started()
        data = memoryview(payload).cast("B")
        if header_bytes_of(header) != len(header) or payload_bytes_of(header) != len(data):
            raise ValueError(f"fs tier: the header of {name} does not describe its {len(data)}-byte payload")
        size = len(header) + len(data)
        if self.holds(name):
            return False
        free = self._free_bytes()
        with self._lock:
            if name in self._index or name in self._busy:
                return False
            victims = self._make_room(name, size, free)
            self._busy.add(name)
            self._reserved += size
        done = False
        try:
            self._unlink_victims(victims)
            self._write_file(name, header, data)
            done = True
        finally:
            with self._lock:
                self._busy.discard(name)
                self._reserved -= size
                if done:
                    self._index[name] = size
                    self._used += size
        return True

    def _make_room(self, name: str, size: int, free: int) -> dict[str, int]:
        """Under the lock: the LRU victims a write of ``size`` needs, taken out of the index (and marked
        busy); TierError, with nothing evicted, if the object cannot be written."""
        if size > self.capacity_bytes:
            raise TierError(f"fs tier {self.base_path}: object {name} of {size} bytes exceeds the tier's capacity "
                            f"of {self.capacity_bytes} bytes; raise the capacity or store smaller chunks")
        if self._reserved + size > self.capacity_bytes:
            raise TierError(f"fs tier {self.base_path}: writes in flight ({self._reserved} bytes) leave no room for "
                            f"{name} ({size} bytes) within {self.capacity_bytes} bytes; retry later")
        need = self._used + self._reserved + size - self.capacity_bytes
        freed = 0
        for victim_size in self._index.values():  # oldest first
            if freed >= need:
                break
            freed += victim_size
        floor = self.min_free_bytes or 0
        if free + freed - size < floor:
            raise TierError(f"fs tier {self.base_path}: writing {name} ({size} bytes) would leave "
                            f"{free + freed - size} bytes free on its filesystem, below the floor of {floor}; "
                            f"writes stop until space is freed there (or lower the tier's capacity or floor)")
        return self._choose_victims(size)

    def _choose_victims(self, size: int) -> dict[str, int]:
        """Under the lock: pop LRU objects until ``size`` more bytes fit; they become busy until unlinked."""
        victims: dict[str, int] = {}
        while self._index and self._used + self._reserved + size > self.capacity_bytes:
            victim, victim_size = self._index.popitem(last=False)
            self._used -= victim_size
            self._busy.add(victim)
            victims[victim] = victim_size
        return victims

    def _unlink_victims(self, victims: dict[str, int]) -> None:
        try:
            for victim in victims:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(object_path(self.base_path, victim))
        except OSError as e:
            raise TierError(f"fs tier {self.base_path}: cannot evict: {e}") from e
        finally:
            with self._lock:
                self._busy.difference_update(victims)

    def _write_file(self, name: str, header: bytes, data: memoryview) -> None:
        """Write ``header`` + ``data`` to a temp file beside the final name, then rename it there.
        The temp file never outlives this call."""
        final = object_path(self.base_path, name)
        temp = os.path.join(os.path.dirname(final), f".{name}.{next(self._seq):x}{TEMP_SUFFIX}")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise self._write_error(name, e) from e
        try:
            try:
                _write_all(fd, [memoryview(header), data])
                stamp = self._next_stamp()
                os.utime(fd, ns=(stamp, stamp))
            finally:
                os.close(fd)
            os.rename(temp, final)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            if isinstance(e, OSError):
                raise self._write_error(name, e) from e
            raise

    def _write_error(self, name: str, e: OSError) -> TierError:
        if e.errno in _SPACE_ERRNOS:
            return TierError(f"fs tier {self.base_path}: no space writing {name} ({os.strerror(e.errno or 0)}); "
                             f"free space on its filesystem or lower the tier's capacity")
        return TierError(f"fs tier {self.base_path}: cannot write {name}: {e}")

    # ------------------------------------------------------------ read, delete

    def read_into(self, name: str, dest: memoryview) -> bytes:
        self._check_started()
        path = object_path(self.base_path, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._forget_missing(name, path)
            raise MissingObject(f"fs tier {self.base_path}: no object {name}") from None
        except OSError as e:
            raise TierError(f"fs tier {self.base_path}: cannot open {name}: {e}") from e
        try:
            header = _read_object(fd, name, dest)
            stamp = self._next_stamp()
            with contextlib.suppress(OSError):
                os.utime(fd, ns=(stamp, stamp))  # the LRU order the next start() rebuilds
        except OSError as e:
            raise TierError(f"fs tier {self.base_path}: cannot read {name}: {e}") from e
        finally:
            os.close(fd)
        with self._lock:
            if name in self._index:
                self._index.move_to_end(name)
        return header

    def _forget_missing(self, name: str, path: str) -> None:
        """A read found no file: drop ``name`` if the index still has it and it is really gone (an
        evict-then-rewrite may have put it back since the open)."""
        with self._lock:
            if name in self._index and not os.path.exists(path):
                self._used -= self._index.pop(name)

    def delete(self, name: str) -> None:
        with self._lock:
            if name in self._busy:
                return  # a write or an unlink of it is in flight: what it leaves is current
            self._used -= self._index.pop(name, 0)
            self._busy.add(name)
        self._unlink_victims({name: 0})

    # ------------------------------------------------------------ helpers

    def _check_started(self) -> None:
        if self._lock_fd is None:
            raise TierError(f"fs tier {self.base_path} is not started (call start()) or already closed")

    def _next_stamp(self) -> int:
        with self._lock:
            self._stamp = max(time.time_ns(), self._stamp + 1)
            return self._stamp

    def _free_bytes(self) -> int:
        try:
            st = os.statvfs(self.base_path)
        except OSError as e:
            raise TierError(f"fs tier {self.base_path}: cannot stat its filesystem: {e}") from e
        return st.f_bavail * st.f_frsize


def _take_directory(base_path: str) -> int:
    """Create ``base_path`` and its 256 subdirectories and lock it; the lock's fd. TierError if it cannot
    be created or written, or another process uses it."""
    try:
        os.makedirs(base_path, exist_ok=True)
        for i in range(256):
            os.makedirs(os.path.join(base_path, f"{i:02x}"), mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(base_path, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise TierError(f"fs tier {base_path}: cannot create or write the directory ({e}); create it writable "
                        f"for the server's user or point the tier elsewhere") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        raise TierError(f"fs tier {base_path}: another adapter or process uses this directory (it holds "
                        f"{LOCK_NAME}); give each server its own directory") from e
    return fd


def _write_all(fd: int, views: list[memoryview]) -> None:
    """os.writev until every byte of ``views`` is written (a write may be short); no copies."""
    views = [v for v in views if len(v)]
    while views:
        n = os.writev(fd, views)
        if n <= 0:
            raise OSError(errno.EIO, "writev wrote nothing")
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


def _read_object(fd: int, name: str, dest: memoryview) -> bytes:
    """The header of the object open as ``fd``, its payload read straight into ``dest``; CorruptObject
    if its header is no header or its sizes (announced, asked for, on disk) disagree."""
    file_bytes = os.fstat(fd).st_size
    first = os.pread(fd, HEADER_BYTES, 0)
    header_bytes = header_bytes_of(first)
    header = first + os.pread(fd, header_bytes - HEADER_BYTES, HEADER_BYTES) if header_bytes > HEADER_BYTES else first
    if len(header) != header_bytes:
        raise CorruptObject(f"object {name}: truncated header ({len(header)} of {header_bytes} bytes)")
    payload_bytes = payload_bytes_of(header)
    if payload_bytes != len(dest):
        raise CorruptObject(f"object {name}: payload of {payload_bytes} bytes, {len(dest)} asked for")
    if file_bytes != header_bytes + payload_bytes:
        raise CorruptObject(f"object {name}: file of {file_bytes} bytes, its header says "
                            f"{header_bytes + payload_bytes} (truncated?)")
    view = memoryview(dest).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], header_bytes + done)
        if n == 0:
            raise CorruptObject(f"object {name}: truncated while read ({done} of {len(view)} payload bytes)")
        done += n
    return header
