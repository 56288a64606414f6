"""Worker KV memory in POSIX shared memory, shared with the server once at registration.

A segment lives under ``/dev/shm/lmcache_kv_<pid>_<idx>`` for exactly as long as its
worker: it is created anonymous (``O_TMPFILE``), share-locked with ``flock`` and only then
linked under its name, and ``close()`` unlinks it. The server maps it by name. The lock is
how the server tells a live owner from a dead one: when a worker disconnects, the server
unlinks those of its segments whose lock it can take exclusively (the owner died), so
nothing stays in /dev/shm after a crash, while a live worker's names survive a server
restart and can be registered again.

``CpuKVCache`` lays KV out as vLLM's CPU backend does (layout LBHNC): per layer a tensor
``[num_blocks, num_kv_heads, block_size, 2 * head_size]``, so page (layer, block) is one
contiguous run of ``num_kv_heads * block_size * 2 * head_size * dtype_bytes`` bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import mmap
import os
from collections.abc import Sequence

import numpy as np

from lmcd.connector.client import CacheClient, WorkerInfo
from lmcd.protocol import KVLayout

SHM_DIR = "/dev/shm"
_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400
_libc = ctypes.CDLL(None, use_errno=True)
_indices = itertools.count()


class ShmSegment:
    """``nbytes`` of shared memory mapped in this process and named in /dev/shm until ``close()``.

    ``array`` is a uint8 view of it. The segment's fd stays open holding a shared flock.
    """

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
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
            self._mmap = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
            with contextlib.suppress(AttributeError, OSError):  # huge pages where shmem THP is "advise"
                self._mmap.madvise(mmap.MADV_HUGEPAGE)
        except BaseException:
            with contextlib.suppress(UnboundLocalError, OSError):
                os.close(fd)
            if getattr(self, "name", None):
                self._unlink()
            raise
        self._fd = fd
        self.array = np.frombuffer(self._mmap, dtype=np.uint8)

    @property
    def shm_name(self) -> str:
        """The POSIX SHM name, with its leading '/'."""
        return "/" + self.name

    def _names(self) -> list[str]:
        base = f"lmcache_kv_{os.getpid()}_{self.index}"
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
        raise OSError(errno.EEXIST, "no free /dev/shm/lmcache_kv_* name")

    def _create_named(self) -> tuple[str, int]:
        for name in self._names():
            try:
                return name, os.open(os.path.join(SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            except FileExistsError:
                continue
        raise OSError(errno.EEXIST, "no free /dev/shm/lmcache_kv_* name")

    def _unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, self.name))

    def close(self) -> None:
        self._unlink()
        del self.array
        # views of it may still be alive; then the memory goes when they do (it has no name left)
        with contextlib.suppress(BufferError):
            self._mmap.close()
        os.close(self._fd)


class CpuKVCache:
    """A vLLM-CPU-shaped KV cache in SHM segments (one per layer, or one shared by all layers)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                 dtype_bytes: int = 2, one_segment: bool = False) -> None:
        self.page_bytes = num_kv_heads * block_size * 2 * head_size * dtype_bytes
        layer_bytes = num_blocks * self.page_bytes
        if one_segment:
            self.segments = [ShmSegment(num_layers * layer_bytes)]
            offsets, segs = [i * layer_bytes for i in range(num_layers)], [0] * num_layers
        else:
            self.segments = [ShmSegment(layer_bytes) for _ in range(num_layers)]
            offsets, segs = [0] * num_layers, list(range(num_layers))
        self.layout = KVLayout(num_layers, num_blocks, block_size, self.page_bytes, self.page_bytes, offsets, segs)
        self.geometry = f"L{num_layers}.H{num_kv_heads}.N{block_size}.C{2 * head_size}.B{dtype_bytes}.LBHNC"

    def pages(self, layer: int) -> np.ndarray:
        """Layer ``layer`` as a [num_blocks, page_bytes] uint8 array (a view of shared memory)."""
        seg = self.segments[self.layout.layer_segments[layer]]
        start = self.layout.layer_offsets[layer]
        return seg.array[start : start + self.layout.num_blocks * self.page_bytes].reshape(-1, self.page_bytes)

    def register(self, client: CacheClient) -> WorkerInfo:
        return register_segments(client, self.layout, self.segments)

    def close(self) -> None:
        for seg in self.segments:
            seg.close()


def register_segments(client: CacheClient, layout: KVLayout, segments: Sequence[ShmSegment]) -> WorkerInfo:
    """Register KV memory with the server, which maps the segments by name."""
    return client.register_worker(layout, [seg.shm_name for seg in segments], [seg.nbytes for seg in segments])
