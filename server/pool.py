"""The L1 pool: one arena allocated at start, carved into fixed-size slots by a slab allocator.

Ownership: created by the server at startup; ``allocate``/``free`` are called only from the
request loop thread. Copy threads only read/write bytes of slots the loop handed them.

Layout::

    arena:  | slab 0          | slab 1          | ... | slab S-1        | (tail < slab unused)
    slab:   | slot 0 | slot 1 | ... | slot k-1 | waste < slot_bytes |   (all slots of one class)

A slab is free, or owned by exactly one size class (one slot size). A slot id is the byte
offset of the slot in the arena. Allocate and free are O(1): a class keeps the slabs that
still have free slots; a slab whose last slot is freed goes back to the free-slab list, so
any class can reuse it. Eviction is not done here: the index evicts when ``allocate``
returns None.

Invariants: ``used_bytes == sum(slot_bytes of allocated slots)``; a slot is either on its
slab's free list or allocated, never both.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import NewType

import numpy as np

from lmcd.shm import MADV_POPULATE_WRITE, map_shared, sealed_memfd

SlotId = NewType("SlotId", int)

log = logging.getLogger("lmcd.pool")

MAX_SLAB_BYTES = 256 << 20
PAGE = 4096
TOUCH_STEP = 256 << 20


@dataclass(slots=True)
class _Slab:
    index: int
    slot_bytes: int = 0
    num_slots: int = 0
    free: list[int] = field(default_factory=list)  # free slot indices within the slab
    allocated: bytearray = field(default_factory=bytearray)  # 1 per allocated slot: catches double frees

    @property
    def used(self) -> int:
        return self.num_slots - len(self.free)


@dataclass(slots=True)
class _SizeClass:
    slot_bytes: int
    partial: dict[int, _Slab] = field(default_factory=dict)  # slabs with >= 1 free slot


def slab_bytes_for(capacity_bytes: int) -> int:
    """Equal slabs of at most 256 MiB that tile the arena with less than one page left over."""
    num_slabs = max(1, -(-capacity_bytes // MAX_SLAB_BYTES))
    return max(PAGE, capacity_bytes // num_slabs // PAGE * PAGE)


class Pool:
    """The arena and its slab allocator. See the module docstring for the invariants."""

    def __init__(self, capacity_bytes: int, *, touch: bool = True, shared: bool = False) -> None:
        if capacity_bytes < PAGE:
            raise ValueError(f"pool capacity {capacity_bytes} bytes is below one page ({PAGE})")
        self.slab_bytes = slab_bytes_for(capacity_bytes)
        self.num_slabs = capacity_bytes // self.slab_bytes
        self.capacity_bytes = self.num_slabs * self.slab_bytes
        # shared (workers copy themselves, lmcache_driven): a sealed memfd, handed to workers as an fd
        self.fd: int | None = None
        self.name = ""
        self.keep_mapped = False  # close() leaves the mapping to the process's end (a thread may still read it)
        if shared:
            self.name = f"lmcache_pool_{os.getpid()}_{secrets.token_hex(4)}"
            self.fd = sealed_memfd(self.name, self.capacity_bytes)
            try:
                self._mmap = map_shared(self.fd, self.capacity_bytes)
            except BaseException:
                os.close(self.fd)
                raise
        else:
            self._mmap = mmap.mmap(-1, self.capacity_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self._mmap.madvise(mmap.MADV_HUGEPAGE)
        self.array = np.frombuffer(self._mmap, dtype=np.uint8)
        self.base_address = self.array.ctypes.data
        if touch:
            try:
                self._touch()
            except BaseException:
                self.close()
                raise
        self._slabs = [_Slab(i) for i in range(self.num_slabs)]
        self._free_slabs: list[int] = list(range(self.num_slabs - 1, -1, -1))
        self._classes: dict[int, _SizeClass] = {}
        self.used_bytes = 0

    def _touch(self) -> None:
        """Fault every page in now (with progress), so no store pays for it later."""
        total = self.capacity_bytes
        started = time.monotonic()
        last_report = started
        populate = True
        for offset in range(0, total, TOUCH_STEP):
            length = min(total, offset + TOUCH_STEP) - offset
            if populate:
                try:  # one syscall per step instead of one page fault per page; fails instead of SIGBUS
                    self._mmap.madvise(MADV_POPULATE_WRITE, offset, length)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:  # EINVAL: a kernel before 5.14, without it
                        raise OSError(exc.errno, f"cannot back the L1 pool's {total / 2**30:.2f} GiB with memory "
                                      f"(at {offset / 2**30:.2f} GiB: {exc.strerror}); lower --l1-size-gb") from None
                    populate = False
            if not populate:
                self.array[offset : offset + length : PAGE] = 0
            now = time.monotonic()
            if now - last_report >= 1.0:
                log.info("Touching L1 pool: %d%% (%.1f/%.1f GiB)", 100 * offset // total,
                         offset / 2**30, total / 2**30)
                last_report = now
        log.info("Touched L1 pool of %.2f GiB in %.2f s", total / 2**30, time.monotonic() - started)

    # ------------------------------------------------------------ allocation

    def allocate(self, nbytes: int) -> SlotId | None:
        """A slot of exactly ``nbytes`` usable bytes, or None when this size class is full."""
        if nbytes > self.slab_bytes:
            raise ValueError(f"chunk of {nbytes} bytes exceeds the slab size {self.slab_bytes}")
        cls = self._classes.get(nbytes)
        if cls is None:
            cls = self._classes[nbytes] = _SizeClass(nbytes)
        if cls.partial:
            slab = next(iter(cls.partial.values()))
        elif self._free_slabs:
            slab = self._slabs[self._free_slabs.pop()]
            slab.slot_bytes = nbytes
            slab.num_slots = self.slab_bytes // nbytes
            slab.free = list(range(slab.num_slots - 1, -1, -1))
            slab.allocated = bytearray(slab.num_slots)
            cls.partial[slab.index] = slab
        else:
            return None
        index = slab.free.pop()
        slab.allocated[index] = 1
        if not slab.free:
            del cls.partial[slab.index]
        self.used_bytes += nbytes
        return SlotId(slab.index * self.slab_bytes + index * nbytes)

    def free(self, slot: SlotId) -> None:
        slab = self._slabs[slot // self.slab_bytes]
        assert slab.slot_bytes, f"free of a slot that is not allocated (its slab is free): {slot}"
        index, rest = divmod(slot % self.slab_bytes, slab.slot_bytes)
        assert rest == 0 and slab.allocated[index], f"free of a slot that is not allocated: {slot}"
        slab.allocated[index] = 0
        cls = self._classes[slab.slot_bytes]
        was_full = not slab.free
        slab.free.append(index)
        self.used_bytes -= slab.slot_bytes
        if slab.used == 0:
            cls.partial.pop(slab.index, None)
            slab.slot_bytes = slab.num_slots = 0
            slab.free = []
            slab.allocated = bytearray()
            self._free_slabs.append(slab.index)
        elif was_full:
            cls.partial[slab.index] = slab

    def slab_of(self, slot: SlotId) -> int:
        """The index of the slab that holds ``slot``."""
        return slot // self.slab_bytes

    def slab_used(self, slab: int) -> int:
        """How many slots of slab ``slab`` are allocated (0: the slab is free)."""
        return self._slabs[slab].used

    def can_ever_fit(self, nbytes: int) -> bool:
        return 0 < nbytes <= self.slab_bytes

    @property
    def num_free_slabs(self) -> int:
        return len(self._free_slabs)

    @property
    def shared(self) -> bool:
        return self.fd is not None

    def close(self) -> None:
        if not hasattr(self, "array") or self.keep_mapped:
            return
        del self.array
        self._mmap.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
