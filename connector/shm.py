"""Worker KV memory in POSIX shared memory, shared with the server once at registration.

A segment is created anonymous (``O_TMPFILE`` in /dev/shm): it has no name until
registration links it as ``/lmcache_kv_<pid>_<idx>``; the server maps it and unlinks the
name, and the worker unlinks it too if the server did not. So nothing stays in /dev/shm
whatever crashes, and the same memory can be registered again with a restarted server.
Where ``O_TMPFILE`` is missing, a named segment is used and unlinked on ``close()``.

``CpuKVCache`` lays KV out as vLLM's CPU backend does (layout LBHNC): per layer a tensor
``[num_blocks, num_kv_heads, block_size, 2 * head_size]``, so page (layer, block) is one
contiguous run of ``num_kv_heads * block_size * 2 * head_size * dtype_bytes`` bytes.
"""

from __future__ import annotations

import ctypes
import errno
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
    """``nbytes`` of shared memory mapped in this process; ``array`` is a uint8 view of it."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.index = next(_indices)
        self.name: str | None = None  # linked name, while one exists
        self._anonymous = hasattr(os, "O_TMPFILE")
        try:
            fd = os.open(SHM_DIR, os.O_TMPFILE | os.O_RDWR, 0o600) if self._anonymous else -1
        except OSError:
            self._anonymous = False
        if not self._anonymous:
            self.name = self._fresh_name()
            fd = os.open(os.path.join(SHM_DIR, self.name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            self._mmap = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            self.unlink_name()
            raise
        self._fd = fd
        self.array = np.frombuffer(self._mmap, dtype=np.uint8)

    def _fresh_name(self, attempt: int = 0) -> str:
        suffix = f"_{attempt}" if attempt else ""
        return f"lmcache_kv_{os.getpid()}_{self.index}{suffix}"

    def link_name(self) -> str:
        """Give the segment a name in /dev/shm (for registration); returns it with a leading '/'."""
        if self.name is not None:
            return "/" + self.name
        for attempt in range(100):
            name = self._fresh_name(attempt)
            target = os.path.join(SHM_DIR, name).encode()
            source = f"/proc/self/fd/{self._fd}".encode()
            if _libc.linkat(_AT_FDCWD, source, _AT_FDCWD, target, _AT_SYMLINK_FOLLOW) == 0:
                self.name = name
                return "/" + name
            err = ctypes.get_errno()
            if err != errno.EEXIST:
                raise OSError(err, f"cannot link SHM segment as /dev/shm/{name}: {os.strerror(err)}")
        raise OSError(errno.EEXIST, "no free /dev/shm/lmcache_kv_* name")

    def unlink_name(self) -> None:
        if self.name is not None:
            try:
                os.unlink(os.path.join(SHM_DIR, self.name))
            except FileNotFoundError:
                pass
            if self._anonymous:
                self.name = None

    def close(self) -> None:
        if self.name is not None:
            self.unlink_name()
            self.name = None
        del self.array
        os.close(self._fd)
        try:
            self._mmap.close()
        except BufferError:
            pass  # views of it are still alive; the memory goes when they do (it has no name left)


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
    """Register KV memory with the server; the names exist only while the server maps them."""
    try:
        names = [seg.link_name() for seg in segments]
        return client.register_worker(layout, names, [seg.nbytes for seg in segments])
    finally:
        for seg in segments:
            if seg._anonymous:
                seg.unlink_name()
