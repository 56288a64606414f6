"""Named POSIX shared memory owned by one process: created anonymous, locked, then named.

A segment lives under ``/dev/shm/<prefix>_<pid>_<idx>`` for exactly as long as its owner: it is
created anonymous (``O_TMPFILE``), share-locked with ``flock`` and only then linked under its
name, and ``close()`` unlinks it. Another process maps it by name. The lock is how a server
tells a live owner from a dead one (``lmcd.server.workers.sweep_orphans``), so nothing stays in
/dev/shm after a crash. Used for workers' KV memory (``lmcache_kv``) and for the server's
pool when it is shared (``lmcache_pool``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import mmap
import os

import numpy as np

SHM_DIR = "/dev/shm"
_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400
_libc = ctypes.CDLL(None, use_errno=True)
_indices = itertools.count()


class ShmSegment:
    """``nbytes`` of shared memory mapped in this process and named in /dev/shm until ``close()``.

    ``array`` is a uint8 view of it. The segment's fd stays open holding a shared flock.
    """

    def __init__(self, nbytes: int, prefix: str = "lmcache_kv") -> None:
        self.nbytes = nbytes
        self.prefix = prefix
        self.index = next(_indices)
        try:
            fd = os.open(SHM_DIR, os.O_TMPFILE | os.O_RDWR, 0o600)
            anonymous = True
        except (AttributeError, OSError):
            anonymous = False
        try:
            if anonymous:
                fcntl.flock(fd, fcntl.LOCK_SH)  # locked before it has a name: no window for a sweeper
                os.ftruncate(fd, nbytes)
                self.name = self._link(fd)
            else:
                self.name, fd = self._create_named()
                fcntl.flock(fd, fcntl.LOCK_SH)
                os.ftruncate(fd, nbytes)
            self.mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
            with contextlib.suppress(AttributeError, OSError):  # huge pages where shmem THP is "advise"
                self.mapping.madvise(mmap.MADV_HUGEPAGE)
        except BaseException:
            with contextlib.suppress(UnboundLocalError, OSError):
                os.close(fd)
            if getattr(self, "name", None):
                self._unlink()
            raise
        self._fd = fd
        self.array = np.frombuffer(self.mapping, dtype=np.uint8)

    @property
    def shm_name(self) -> str:
        """The POSIX SHM name, with its leading '/'."""
        return "/" + self.name

    def _names(self) -> list[str]:
        base = f"{self.prefix}_{os.getpid()}_{self.index}"
        return [base] + [f"{base}_{attempt}" for attempt in range(1, 100)]

    def _link(self, fd: int) -> str:
        source = f"/proc/self/fd/{fd}".encode()
        for name in self._names():
            target = os.path.join(SHM_DIR, name).encode()
            if _libc.linkat(_AT_FDCWD, source, _AT_FDCWD, target, _AT_SYMLINK_FOLLOW) == 0:
                return name
            err = ctypes.get_errno()
            if err != errno.EEXIST:
                raise OSError(err, f"cannot name SHM segment /dev/shm/{name}: {os.strerror(err)}")
        raise OSError(errno.EEXIST, f"no free /dev/shm/{self.prefix}_* name")

    def _create_named(self) -> tuple[str, int]:
        for name in self._names():
            try:
                return name, os.open(os.path.join(SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            except FileExistsError:
                continue
        raise OSError(errno.EEXIST, f"no free /dev/shm/{self.prefix}_* name")

    def _unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, self.name))

    def close(self) -> None:
        self._unlink()
        del self.array
        # views of it may still be alive; then the memory goes when they do (it has no name left)
        with contextlib.suppress(BufferError):
            self.mapping.close()
        os.close(self._fd)
