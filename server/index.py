"""The chunk index: chunk key -> pool slot, with LRU eviction over unpinned chunks.

Ownership: touched only by the request loop thread (no locks).

An entry is always in exactly one of these states::

    writing  -- slot allocated, store copy in flight; invisible to lookups, not evictable
    ready    -- readable; in ``lru`` iff it is indexed and has no pins (evictable)
    orphan   -- removed from the index (cleared) while pinned or writing; its slot is freed
                when the last pin drops or the write finishes

``lru`` holds exactly the ready, indexed, unpinned entries, oldest first, so eviction is
O(1): pop the oldest. Pinning removes an entry from ``lru``; unpinning puts it back as newest.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import NewType

from lmcd.protocol import ChunkStatus
from lmcd.server.pool import Pool, SlotId

ChunkHash = NewType("ChunkHash", bytes)
ChunkKey = tuple[int, int, bytes]  # (namespace id, rank, chunk hash)


@dataclass(slots=True, eq=False)
class Entry:
    key: ChunkKey
    slot: SlotId
    nbytes: int
    pins: int = 0
    ready: bool = False
    indexed: bool = True


class ChunkIndex:
    """Chunk key -> Entry, plus the LRU order and the eviction policy (see module docstring)."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.entries: dict[ChunkKey, Entry] = {}
        self.lru: OrderedDict[ChunkKey, Entry] = OrderedDict()
        self.num_evictions = 0
        self.evicted_bytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get_ready(self, key: ChunkKey) -> Entry | None:
        entry = self.entries.get(key)
        return entry if entry is not None and entry.ready else None

    # ------------------------------------------------------------ pins

    def pin(self, entry: Entry) -> None:
        if entry.pins == 0 and entry.indexed:
            self.lru.pop(entry.key, None)
        entry.pins += 1

    def unpin(self, entry: Entry) -> None:
        assert entry.pins > 0, "unpin of an unpinned entry"
        entry.pins -= 1
        if entry.pins == 0:
            if not entry.indexed:
                self.pool.free(entry.slot)
            elif entry.ready:
                self.lru[entry.key] = entry  # newest: it was just used

    # ------------------------------------------------------------ store

    def begin_store(self, key: ChunkKey, nbytes: int) -> tuple[Entry | None, ChunkStatus]:
        """Reserve a slot for ``key`` (evicting LRU chunks if needed); the entry starts writing."""
        existing = self.entries.get(key)
        if existing is not None:
            if existing.ready and existing.pins == 0:
                self.lru.move_to_end(key)
            return None, ChunkStatus.PRESENT
        if not self.pool.can_ever_fit(nbytes):
            return None, ChunkStatus.REFUSED_TOO_LARGE
        slot = self._allocate(nbytes)
        if slot is None:
            return None, ChunkStatus.REFUSED_FULL
        entry = Entry(key, slot, nbytes)
        self.entries[key] = entry
        return entry, ChunkStatus.STORED

    def finish_store(self, entry: Entry, ok: bool) -> None:
        """The store copy of ``entry`` ended; make it readable, or drop it if it failed."""
        if not entry.indexed:  # cleared while writing
            if entry.pins == 0:
                self.pool.free(entry.slot)
            return
        if not ok:
            del self.entries[entry.key]
            entry.indexed = False
            self.pool.free(entry.slot)
            return
        entry.ready = True
        if entry.pins == 0:
            self.lru[entry.key] = entry

    def _allocate(self, nbytes: int) -> SlotId | None:
        while True:
            slot = self.pool.allocate(nbytes)
            if slot is not None:
                return slot
            if not self.lru:
                return None
            _, victim = self.lru.popitem(last=False)
            del self.entries[victim.key]
            victim.indexed = False
            self.pool.free(victim.slot)
            self.num_evictions += 1
            self.evicted_bytes += victim.nbytes

    # ------------------------------------------------------------ clear

    def clear(self) -> int:
        """Drop every chunk from the index now. Pinned or writing chunks keep their slot until
        their reader or writer is done, so no copy ever reads or writes a reused slot."""
        num_chunks = len(self.entries)
        for entry in self.entries.values():
            entry.indexed = False
            if entry.pins == 0 and entry.ready:
                self.pool.free(entry.slot)
        self.entries.clear()
        self.lru.clear()
        return num_chunks
