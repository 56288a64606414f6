"""Shared memory with no name: a sealed memfd, mapped here, handed to the server as a file descriptor.

A segment is an anonymous memfd (``memfd_create``, close-on-exec, sealing allowed), sized, then
sealed against shrinking, growing and further seals, and mapped ``MAP_SHARED``. It never has a
name in /dev/shm: nothing can open it by name, nothing is left behind when its owner dies (the
memory goes with the last descriptor and mapping), and /dev/shm's size does not bound it. Another
process gets it only as a file descriptor (``lmcd.connector.client.hand_over``: SCM_RIGHTS over
the server's handoff socket), which proves it holds the memory; the seals mean no holder can
truncate it under a mapping (a fault past the end would be SIGBUS). Used for workers' KV memory
(``lmcache_kv``) and for the server's pool when it is shared (``lmcache_pool``).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import itertools
import mmap
import os
import struct

import numpy as np

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14
libc = ctypes.CDLL(None, use_errno=True)  # the memory calls Python lacks (mincore, fstatfs, madvise off the GIL)
_indices = itertools.count()


def sealed_memfd(name: str, nbytes: int) -> int:
    """A new memfd of ``nbytes`` bytes, sealed against resizing (and against removing that): its fd."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, nbytes)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_shared(fd: int, nbytes: int) -> mmap.mmap:
    """``nbytes`` of ``fd`` mapped shared, read and write; huge pages advised (faulted on first use)."""
    mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
    with contextlib.suppress(AttributeError, OSError):  # huge pages where shmem THP is "advise"
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return mapping


class ShmSegment:
    """``nbytes`` of sealed shared memory (a memfd) mapped in this process until ``close()``.

    ``array`` is a uint8 view of it; ``fd`` is what crosses to the server; ``name`` only says
    what it is in logs and ``/proc/<pid>/fd`` (``memfd:<prefix>_<pid>_<idx>``), nothing opens it.
    """

    def __init__(self, nbytes: int, prefix: str = "lmcache_kv") -> None:
        self.nbytes = nbytes
        self.prefix = prefix
        self.name = f"{prefix}_{os.getpid()}_{next(_indices)}"
        self.fd = sealed_memfd(self.name, nbytes)
        try:
            self.mapping = map_shared(self.fd, nbytes)
        except BaseException:
            os.close(self.fd)
            raise
        self.array = np.frombuffer(self.mapping, dtype=np.uint8)

    def close(self) -> None:
        if self.fd < 0:
            return
        del self.array
        # views of it may still be alive; then the memory goes when they do
        with contextlib.suppress(BufferError):
            self.mapping.close()
        os.close(self.fd)
        self.fd = -1


# ---------------------------------------------------------------- the handoff socket's wire format
#
# A worker connects to the server's Unix stream socket (``HelloReply.handoff_path``) and sends ONE
# request: the header below, with its memory fds attached (SCM_RIGHTS, at most
# ``MAX_FDS_PER_MESSAGE`` per message: the rest follow, each batch attached to one more byte
# ``HANDOFF_MORE``). The server answers with ONE reply: a status byte, the message's length and
# the message (UTF-8; empty when the status is ``HANDOFF_OK``), with the shared pool's fd
# attached when the request asked for it and got it.
#
#   request: | b"LMCD" | version u8 | flags u8 | 0 u16 | num_fds u32 | nonce 32 B | (+ b"+" per extra batch)
#   reply:   | status u8 | message length u16 | message |

HANDOFF_HEADER = struct.Struct("<4sBBHI32s")
HANDOFF_REPLY = struct.Struct("<BH")
HANDOFF_MAGIC = b"LMCD"
HANDOFF_VERSION = 1
HANDOFF_WANT_POOL = 1  # flags: send the shared pool's fd back
HANDOFF_MORE = b"+"
HANDOFF_OK, HANDOFF_REFUSED = 0, 1
MAX_FDS_PER_MESSAGE = 250  # below the kernel's SCM_MAX_FD (253)
