"""The chunk index: chunk key -> pool slot, with LRU eviction over unpinned chunks.

Ownership: touched only by the request loop thread (no locks).

An entry is always in exactly one of these states::

    writing  -- slot allocated, store copy in flight; invisible to lookups, not evictable
    ready    -- readable; in ``lru`` iff it is indexed and has no pins (evictable)
    orphan   -- removed from the index (cleared) while pinned or writing; its slot is freed
                when the last pin drops or the write finishes

``lru`` holds exactly the ready, indexed, unpinned entries, oldest first (``lru_by_size``
holds the same entries split by chunk size; ``evictable_per_slab`` counts them per slab), so
eviction is O(1) when the size being stored has an evictable chunk. Pinning removes an entry from
``lru``; unpinning puts it back as newest.

Eviction frees what the allocation needs and no more::

    1. a free slot of the size (pool.allocate)                      -> nothing evicted
    2. else the least recently used chunk of that size              -> ONE chunk evicted
    3. else ONE whole slab whose every slot is an evictable chunk   -> that slab's chunks
       (not pinned, not writing, not granted), the one whose newest
       use is oldest: O(slabs) to choose it, O(lru) to collect its
       chunks, once per slab that changes size
    4. else nothing is evicted and the store is refused (REFUSED_FULL)

A slab's "newest use" is a stamp raised whenever one of its chunks becomes evictable or is
used; it never goes down (a slab whose newest chunk got pinned still counts as recently used).

Namespaces: ``chunks_per_ns`` counts the indexed entries of each namespace id; when one
drops to zero, ``on_namespace_empty`` is called (the service forgets a namespace nobody uses).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
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
    slab: int = 0  # the pool slab holding ``slot`` (Pool.slab_of), kept to spare the hot path a division


class ChunkIndex:
    """Chunk key -> Entry, plus the LRU order and the eviction policy (see module docstring)."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.entries: dict[IndexKey, Entry] = {}
        self.lru: OrderedDict[IndexKey, Entry] = OrderedDict()
        self.lru_by_size: dict[int, OrderedDict[IndexKey, Entry]] = {}
        self.evictable_per_slab: dict[int, int] = {}  # slab -> how many of the lru's entries it holds
        self._slab_use: dict[int, int] = {}  # slab -> stamp of its newest use (slabs in evictable_per_slab)
        self._clock = 0
        self.chunks_per_ns: dict[int, int] = {}
        self.on_namespace_empty: Callable[[int], None] = lambda ns_id: None
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
        key, slab = entry.key, entry.slab
        self.lru[key] = entry
        same = self.lru_by_size.get(entry.nbytes)
        if same is None:
            same = self.lru_by_size[entry.nbytes] = OrderedDict()
        same[key] = entry
        counts = self.evictable_per_slab
        counts[slab] = counts.get(slab, 0) + 1
        self._clock += 1
        self._slab_use[slab] = self._clock

    def _lru_remove(self, entry: Entry) -> None:
        key = entry.key
        if self.lru.pop(key, None) is not None:
            same = self.lru_by_size[entry.nbytes]
            del same[key]
            if not same:
                del self.lru_by_size[entry.nbytes]
            slab, counts = entry.slab, self.evictable_per_slab
            left = counts[slab] - 1
            if left:
                counts[slab] = left
            else:
                del counts[slab], self._slab_use[slab]

    def touch(self, entry: Entry) -> None:
        """Mark a ready, unpinned entry as just used."""
        if entry.key in self.lru:
            self.lru.move_to_end(entry.key)
            self.lru_by_size[entry.nbytes].move_to_end(entry.key)
            self._clock += 1
            self._slab_use[entry.slab] = self._clock

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
        entry = Entry(key, slot, nbytes, slab=self.pool.slab_of(slot))
        self._index(entry)
        return entry, ChunkStatus.STORED

    def finish_store(self, entry: Entry, ok: bool) -> None:
        """The store copy of ``entry`` ended; make it readable, or drop it if it failed."""
        if not entry.indexed:  # cleared while writing
            if entry.pins == 0:
                self.pool.free(entry.slot)
            return
        if not ok:
            self._unindex(entry)
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
        entry = Entry(key, slot, nbytes, ready=True, slab=self.pool.slab_of(slot))
        self._index(entry)
        self._lru_add(entry)
        return ChunkStatus.STORED

    def _index(self, entry: Entry) -> None:
        self.entries[entry.key] = entry
        ns_id = entry.key[0]
        self.chunks_per_ns[ns_id] = self.chunks_per_ns.get(ns_id, 0) + 1

    def _unindex(self, entry: Entry) -> None:
        """Drop an entry from the index (its slot is the caller's to free, now or at its last pin)."""
        del self.entries[entry.key]
        entry.indexed = False
        ns_id = entry.key[0]
        left = self.chunks_per_ns[ns_id] - 1
        if left:
            self.chunks_per_ns[ns_id] = left
        else:
            del self.chunks_per_ns[ns_id]
            self.on_namespace_empty(ns_id)

    def _allocate(self, nbytes: int) -> SlotId | None:
        """A slot of ``nbytes``, evicting what that needs and no more (module docstring)."""
        slot = self.pool.allocate(nbytes)
        if slot is not None:
            return slot
        same = self.lru_by_size.get(nbytes)
        if same:
            self._evict(next(iter(same.values())))  # its slab now has a free slot of this size
        else:
            slab = self._oldest_freeable_slab()
            if slab is None:
                return None
            for victim in [entry for entry in self.lru.values() if entry.slab == slab]:
                self._evict(victim)  # the last one frees the slab for any size
        slot = self.pool.allocate(nbytes)
        assert slot is not None, "eviction freed no slot"
        return slot

    def _oldest_freeable_slab(self) -> int | None:
        """The slab whose every allocated slot is an evictable chunk, least recently used first."""
        best: int | None = None
        slab_used, use = self.pool.slab_used, self._slab_use
        for slab, num_evictable in self.evictable_per_slab.items():
            if num_evictable == slab_used(slab) and (best is None or use[slab] < use[best]):
                best = slab
        return best

    def _evict(self, victim: Entry) -> None:
        self._lru_remove(victim)
        self._unindex(victim)
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
        self.evictable_per_slab.clear()
        self._slab_use.clear()
        emptied, self.chunks_per_ns = list(self.chunks_per_ns), {}
        for ns_id in emptied:
            self.on_namespace_empty(ns_id)
        return num_chunks
