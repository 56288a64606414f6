"""The chunk index: chunk key -> pool slot, with LRU eviction over unpinned chunks.

Ownership: touched only by the request loop thread (no locks).

An entry is always in exactly one of these states::

    writing  -- slot allocated, store copy in flight; invisible to lookups, not evictable
    ready    -- readable; in ``lru`` iff it is indexed and has no pins (evictable)
    orphan   -- removed from the index (cleared) while pinned or writing; its slot is freed
                when the last pin drops or the write finishes

``lru`` holds exactly the ready, indexed, unpinned entries, oldest first (``lru_by_size``
holds the same entries split by chunk size), so eviction is O(1). Pinning removes an entry
from ``lru``; unpinning puts it back as newest. The victim is the least recently used chunk
of the size being stored, which frees a usable slot at once; only if no chunk of that size
is evictable does the oldest chunk of any size go, until a whole slab frees up.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from lmcd.protocol import ChunkStatus
from lmcd.server.pool import Pool, SlotId

IndexKey = tuple[int, int, bytes]  # (namespace id, rank, chunk key)


@dataclass(slots=True, eq=False)
class Entry:
    key: IndexKey
    slot: SlotId
    nbytes: int
    pins: int = 0
    ready: bool = False
    indexed: bool = True


class ChunkIndex:
    """Chunk key -> Entry, plus the LRU order and the eviction policy (see module docstring)."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.entries: dict[IndexKey, Entry] = {}
        self.lru: OrderedDict[IndexKey, Entry] = OrderedDict()
        self.lru_by_size: dict[int, OrderedDict[IndexKey, Entry]] = {}
        self.num_evictions = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get_ready(self, key: IndexKey) -> Entry | None:
        entry = self.entries.get(key)
        return entry if entry is not None and entry.ready else None

    def leading_ready(self, ns_id: int, ranks: list[int], chunk_keys: list[bytes]) -> list[list[Entry]]:
        """Per rank, the entries of the leading chunks that are ready for EVERY rank (hot path)."""
        entries = self.entries
        if len(ranks) == 1:
            rank = ranks[0]
            part: list[Entry] = []
            for chunk_key in chunk_keys:
                entry = entries.get((ns_id, rank, chunk_key))
                if entry is None or not entry.ready:
                    break
                part.append(entry)
            return [part]
        parts: list[list[Entry]] = [[] for _ in ranks]
        for chunk_key in chunk_keys:
            row = [entries.get((ns_id, rank, chunk_key)) for rank in ranks]
            if not all(entry is not None and entry.ready for entry in row):
                break
            for part, entry in zip(parts, row, strict=True):
                part.append(entry)  # type: ignore[arg-type]
        return parts

    # ------------------------------------------------------------ pins

    def _lru_add(self, entry: Entry) -> None:
        self.lru[entry.key] = entry
        self.lru_by_size.setdefault(entry.nbytes, OrderedDict())[entry.key] = entry

    def _lru_remove(self, entry: Entry) -> None:
        if self.lru.pop(entry.key, None) is not None:
            same = self.lru_by_size[entry.nbytes]
            del same[entry.key]
            if not same:
                del self.lru_by_size[entry.nbytes]

    def touch(self, entry: Entry) -> None:
        """Mark a ready, unpinned entry as just used."""
        if entry.key in self.lru:
            self.lru.move_to_end(entry.key)
            self.lru_by_size[entry.nbytes].move_to_end(entry.key)

    def pin(self, entry: Entry) -> None:
        if entry.pins == 0 and entry.indexed:
            self._lru_remove(entry)
        entry.pins += 1

    def pin_many(self, entries: list[Entry]) -> None:
        lru_remove = self._lru_remove
        for entry in entries:
            if entry.pins == 0 and entry.indexed:
                lru_remove(entry)
            entry.pins += 1

    def unpin(self, entry: Entry) -> None:
        assert entry.pins > 0, "unpin of an unpinned entry"
        entry.pins -= 1
        if entry.pins == 0:
            if not entry.indexed:
                self.pool.free(entry.slot)
            elif entry.ready:
                self._lru_add(entry)  # newest: it was just used

    # ------------------------------------------------------------ store

    def begin_store(self, key: IndexKey, nbytes: int) -> tuple[Entry | None, ChunkStatus]:
        """Reserve a slot for ``key`` (evicting LRU chunks if needed); the entry starts writing."""
        existing = self.entries.get(key)
        if existing is not None:
            self.touch(existing)
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
            self._lru_add(entry)

    def allocate_free(self, nbytes: int) -> SlotId | None:
        """A slot that no chunk owns yet (a worker's grant), evicting LRU chunks if needed."""
        return self._allocate(nbytes) if self.pool.can_ever_fit(nbytes) else None

    def insert_ready(self, key: IndexKey, slot: SlotId, nbytes: int) -> ChunkStatus:
        """Make ``slot`` (already written) the readable chunk ``key``; PRESENT (the caller keeps
        the slot) when ``key`` is cached or being stored already."""
        existing = self.entries.get(key)
        if existing is not None:
            self.touch(existing)
            return ChunkStatus.PRESENT
        entry = Entry(key, slot, nbytes, ready=True)
        self.entries[key] = entry
        self._lru_add(entry)
        return ChunkStatus.STORED

    def _allocate(self, nbytes: int) -> SlotId | None:
        while True:
            slot = self.pool.allocate(nbytes)
            if slot is not None:
                return slot
            same = self.lru_by_size.get(nbytes)
            if same:
                victim = next(iter(same.values()))
            elif self.lru:
                victim = next(iter(self.lru.values()))
            else:
                return None
            self._lru_remove(victim)
            del self.entries[victim.key]
            victim.indexed = False
            self.pool.free(victim.slot)
            self.num_evictions += 1

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
        self.lru_by_size.clear()
        return num_chunks
