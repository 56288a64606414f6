"""In-process unit tests of the slab pool, the chunk index, the lease table, the CPU copy plan
(``lmcd.copyplan``: check_blocks, plan, split, run) and the server's copy threads.

Pools are made with ``touch=False``: their arenas are only reserved (virtual memory), so even a
1 GiB pool costs nothing as long as the test does not write its bytes.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import numpy as np
import pytest

from lmcd import copyplan
from lmcd.copyplan import BlockIdError, CopyPlan, check_blocks, plan, split
from lmcd.protocol import ChunkStatus, KVLayout
from lmcd.server.index import ChunkIndex, Entry
from lmcd.server.leases import LeaseTable, holder_of
from lmcd.server.pool import MAX_SLAB_BYTES, PAGE, Pool, slab_bytes_for
from lmcd.server.transfer import MIN_BYTES_PER_THREAD, CopyThreads

MiB = 1 << 20


def key(i: int, ns: int = 1, rank: int = 0) -> tuple[int, int, bytes]:
    return (ns, rank, i.to_bytes(32, "little"))


@pytest.fixture
def pools():
    made: list[Pool] = []

    def make(capacity: int) -> Pool:
        pool = Pool(capacity, touch=False)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close()


# ---------------------------------------------------------------- slab_bytes_for / Pool geometry


@pytest.mark.parametrize(
    ("capacity", "slab"),
    [
        (PAGE, PAGE),
        (PAGE + 100, PAGE),
        (64 * MiB, 64 * MiB),
        (MAX_SLAB_BYTES, MAX_SLAB_BYTES),
        (MAX_SLAB_BYTES + 1, MAX_SLAB_BYTES // 2 // PAGE * PAGE + 0),
        (600 * MiB, 200 * MiB),
        (1 << 30, MAX_SLAB_BYTES),
        (4 << 30, MAX_SLAB_BYTES),
        (3 * MAX_SLAB_BYTES + 12345, (3 * MAX_SLAB_BYTES + 12345) // 4 // PAGE * PAGE),
    ],
)
def test_slab_bytes_for(capacity: int, slab: int) -> None:
    got = slab_bytes_for(capacity)
    assert got == slab
    assert got % PAGE == 0 and PAGE <= got <= MAX_SLAB_BYTES
    num_slabs = capacity // got
    # the slabs tile the arena with less than one page (per slab) left over
    assert 0 <= capacity - num_slabs * got < PAGE * max(1, num_slabs)


def test_pool_geometry(pools) -> None:
    pool = pools(600 * MiB + 777)
    assert pool.slab_bytes == 200 * MiB
    assert pool.num_slabs == 3
    assert pool.capacity_bytes == 600 * MiB
    assert pool.num_free_slabs == 3
    assert pool.used_bytes == 0
    assert len(pool.array) == pool.capacity_bytes
    with pytest.raises(ValueError, match="below one page"):
        Pool(PAGE - 1, touch=False)


def test_pool_touch_small_arena() -> None:
    pool = Pool(8 * PAGE, touch=True)
    try:
        assert pool.capacity_bytes == 8 * PAGE
        slot = pool.allocate(PAGE)
        assert slot is not None
        pool.array[slot : slot + PAGE] = 7
        assert int(pool.array[slot : slot + PAGE].sum()) == 7 * PAGE
    finally:
        pool.close()


# ---------------------------------------------------------------- allocation


def test_allocate_fills_a_slab_before_taking_another(pools) -> None:
    pool = pools(1 << 30)  # 4 slabs of 256 MiB
    size = 64 * MiB
    slots = [pool.allocate(size) for _ in range(4)]
    assert slots == [0, size, 2 * size, 3 * size]  # one slab, consecutive slots
    assert pool.num_free_slabs == 3
    fifth = pool.allocate(size)
    assert fifth == MAX_SLAB_BYTES  # the next slab
    assert pool.num_free_slabs == 2
    assert pool.used_bytes == 5 * size


def test_size_classes_use_separate_slabs(pools) -> None:
    pool = pools(1 << 30)
    a = pool.allocate(3 * MiB)
    b = pool.allocate(5 * MiB)
    c = pool.allocate(3 * MiB)
    assert a is not None and b is not None and c is not None
    assert a // pool.slab_bytes == c // pool.slab_bytes != b // pool.slab_bytes
    assert c == a + 3 * MiB
    assert pool.num_free_slabs == 2
    assert pool.used_bytes == 11 * MiB


def test_slot_size_not_dividing_slab_leaves_waste_unused(pools) -> None:
    pool = pools(MAX_SLAB_BYTES)  # one slab
    size = 100 * MiB  # 2 slots, 56 MiB waste
    assert pool.allocate(size) == 0
    assert pool.allocate(size) == size
    assert pool.allocate(size) is None  # the waste is never handed out
    assert pool.allocate(MiB) is None  # and no other class can have the slab
    assert pool.used_bytes == 2 * size


def test_freed_slab_is_reused_by_another_size_class(pools) -> None:
    pool = pools(2 * MAX_SLAB_BYTES)  # 2 slabs
    small = [pool.allocate(64 * MiB) for _ in range(8)]  # both slabs full of 64 MiB slots
    assert None not in small and pool.num_free_slabs == 0
    assert pool.allocate(128 * MiB) is None  # no slab for a new class
    for slot in small[:3]:  # slab 0 still has one used slot
        assert slot is not None
        pool.free(slot)
    assert pool.num_free_slabs == 0
    assert pool.allocate(128 * MiB) is None
    assert small[3] is not None
    pool.free(small[3])  # slab 0 is now empty: back on the free list
    assert pool.num_free_slabs == 1
    big = pool.allocate(128 * MiB)
    assert big == 0  # the freed slab, now in the 128 MiB class
    assert pool.allocate(128 * MiB) == 128 * MiB
    assert pool.allocate(128 * MiB) is None
    assert pool.allocate(64 * MiB) is None  # slab 1 is full of 64 MiB slots
    assert pool.used_bytes == 4 * 64 * MiB + 2 * 128 * MiB == pool.capacity_bytes


def test_full_slab_becomes_partial_again_after_a_free(pools) -> None:
    pool = pools(MAX_SLAB_BYTES)
    slots = [pool.allocate(64 * MiB) for _ in range(4)]
    assert pool.allocate(64 * MiB) is None
    assert slots[2] is not None
    pool.free(slots[2])
    assert pool.allocate(64 * MiB) == slots[2]  # the freed slot, not a new slab
    assert pool.allocate(64 * MiB) is None


def test_allocate_too_large_raises_and_can_ever_fit(pools) -> None:
    pool = pools(64 * MiB)
    assert pool.can_ever_fit(64 * MiB) and pool.can_ever_fit(1)
    assert not pool.can_ever_fit(64 * MiB + 1)
    assert not pool.can_ever_fit(0)
    with pytest.raises(ValueError, match="exceeds the slab size"):
        pool.allocate(64 * MiB + 1)
    assert pool.used_bytes == 0


def test_double_free_of_last_slot_is_caught(pools) -> None:
    pool = pools(MAX_SLAB_BYTES)
    slot = pool.allocate(MiB)
    assert slot is not None
    pool.free(slot)
    with pytest.raises(AssertionError):
        pool.free(slot)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_allocate_free_matches_model(pools, seed: int) -> None:
    """Property test: the pool agrees with a simple model of slabs after every step."""
    rng = random.Random(seed)
    pool = pools(1 << 30)  # 4 slabs of 256 MiB
    slab = pool.slab_bytes
    sizes = [PAGE, 3 * MiB + PAGE, 40 * MiB, 100 * MiB, 256 * MiB]
    live: dict[int, int] = {}  # slot -> size
    model_slabs: list[tuple[int, int]] = [(0, 0)] * pool.num_slabs  # (slot size, used slots)
    for step in range(4000):
        if live and (rng.random() < 0.45 or len(live) > 3000):
            slot = rng.choice(list(live))
            size = live.pop(slot)
            pool.free(slot)  # type: ignore[arg-type]
            s = slot // slab
            cls, used = model_slabs[s]
            model_slabs[s] = (0, 0) if used == 1 else (cls, used - 1)
        else:
            size = rng.choice(sizes)
            room = any(c == size and u < slab // size for c, u in model_slabs) or any(u == 0 for _, u in model_slabs)
            slot = pool.allocate(size)
            if not room:
                assert slot is None, f"step {step}: allocated {size} with no room"
                continue
            assert slot is not None, f"step {step}: {size} refused although the model has room"
            assert slot not in live
            s, offset = divmod(slot, slab)
            cls, used = model_slabs[s]
            assert cls in (0, size), f"step {step}: slab {s} holds class {cls}, got a {size} slot"
            assert offset % size == 0 and offset + size <= slab
            model_slabs[s] = (size, used + 1)
            live[slot] = size
        assert pool.used_bytes == sum(live.values())
        assert pool.num_free_slabs == sum(u == 0 for _, u in model_slabs)
        assert pool.used_bytes <= pool.capacity_bytes
    # no two live slots overlap
    spans = sorted((slot, slot + size) for slot, size in live.items())
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False))
    for slot in list(live):
        pool.free(slot)  # type: ignore[arg-type]
    assert pool.used_bytes == 0
    assert pool.num_free_slabs == pool.num_slabs


def test_allocate_and_free_are_constant_time(pools) -> None:
    """Allocation must not scan: with 262144 small slots, the last allocations cost what the first did."""
    pool = pools(1 << 30)
    per_slab = pool.slab_bytes // PAGE
    total = pool.num_slabs * per_slab
    batch = 4000

    def timed(n: int) -> tuple[float, list[int]]:
        started = time.perf_counter()
        got = [pool.allocate(PAGE) for _ in range(n)]
        return time.perf_counter() - started, got  # type: ignore[return-value]

    first = min(_refill(pool, timed, batch) for _ in range(3))
    slots: list[int] = []
    _, slots = timed(total - batch)
    assert None not in slots
    last, tail = timed(batch)
    assert None not in tail
    assert pool.allocate(PAGE) is None
    assert pool.used_bytes == pool.capacity_bytes
    for _ in range(2):  # free and allocate the tail again: best of three, the machine is shared
        for slot in tail:
            pool.free(slot)  # type: ignore[arg-type]
        seconds, tail = timed(batch)
        last = min(last, seconds)
    assert last < 10 * first + 0.05, f"first {batch} allocations took {first:.4f} s, last {batch} took {last:.4f} s"
    started = time.perf_counter()
    for slot in slots + tail:
        pool.free(slot)  # type: ignore[arg-type]
    per_free = (time.perf_counter() - started) / total
    assert per_free < 50e-6
    assert pool.used_bytes == 0 and pool.num_free_slabs == pool.num_slabs


def _refill(pool: Pool, timed, n: int) -> float:  # noqa: ANN001
    seconds, got = timed(n)
    for slot in got:
        pool.free(slot)
    return seconds


# ---------------------------------------------------------------- ChunkIndex


def stored(index: ChunkIndex, i: int, nbytes: int = PAGE) -> Entry:
    entry, status = index.begin_store(key(i), nbytes)
    assert status == ChunkStatus.STORED and entry is not None
    index.finish_store(entry, True)
    return entry


def small_index(pools, slots: int = 8) -> ChunkIndex:
    return ChunkIndex(pools(slots * PAGE))


def test_store_present_and_invisible_while_writing(pools) -> None:
    index = small_index(pools)
    entry, status = index.begin_store(key(1), PAGE)
    assert status == ChunkStatus.STORED and entry is not None
    assert index.get_ready(key(1)) is None  # writing: invisible
    assert index.begin_store(key(1), PAGE) == (None, ChunkStatus.PRESENT)
    assert key(1) not in index.lru
    index.finish_store(entry, True)
    assert index.get_ready(key(1)) is entry
    assert list(index.lru) == [key(1)]
    assert index.pool.used_bytes == PAGE and len(index) == 1


def test_failed_store_frees_its_slot(pools) -> None:
    index = small_index(pools)
    entry, _ = index.begin_store(key(1), PAGE)
    assert entry is not None
    index.finish_store(entry, False)
    assert index.get_ready(key(1)) is None and len(index) == 0
    assert index.pool.used_bytes == 0 and not index.lru
    again, status = index.begin_store(key(1), PAGE)
    assert status == ChunkStatus.STORED and again is not None


def test_lru_evicts_oldest_first(pools) -> None:
    index = small_index(pools, 8)
    for i in range(8):
        stored(index, i)
    assert index.pool.used_bytes == 8 * PAGE == index.pool.capacity_bytes
    for i in range(8, 12):
        stored(index, i)
    assert sorted(k[2][0] for k in index.entries) == list(range(4, 12))
    assert index.num_evictions == 4
    assert index.pool.used_bytes == 8 * PAGE


def test_lru_order_follows_use(pools) -> None:
    index = small_index(pools, 4)
    entries = [stored(index, i) for i in range(4)]
    assert index.begin_store(key(0), PAGE) == (None, ChunkStatus.PRESENT)  # a repeated store is a use
    index.pin(entries[1])  # a lookup with lease ...
    index.unpin(entries[1])  # ... and its retrieve: now the newest
    assert list(index.lru) == [key(2), key(3), key(0), key(1)]
    stored(index, 10)
    assert index.get_ready(key(2)) is None
    stored(index, 11)
    assert index.get_ready(key(3)) is None
    assert {k[2][0] for k in index.entries} == {0, 1, 10, 11}


def test_pinned_entries_are_never_evicted(pools) -> None:
    index = small_index(pools, 4)
    entries = [stored(index, i) for i in range(4)]
    index.pin(entries[0])
    index.pin(entries[2])
    index.pin(entries[2])
    for i in range(10, 30):
        stored(index, i)
    assert index.get_ready(key(0)) is entries[0]
    assert index.get_ready(key(2)) is entries[2]
    assert len(index) == 4 and index.pool.used_bytes == 4 * PAGE
    assert key(0) not in index.lru and key(2) not in index.lru
    index.unpin(entries[2])
    assert key(2) not in index.lru  # still one pin
    index.unpin(entries[2])
    assert list(index.lru)[-1] == key(2)


def test_refused_full_when_every_chunk_is_pinned_or_writing(pools) -> None:
    index = small_index(pools, 4)
    entries = [stored(index, i) for i in range(3)]
    writing, status = index.begin_store(key(3), PAGE)
    assert status == ChunkStatus.STORED and writing is not None
    for entry in entries:
        index.pin(entry)
    assert index.begin_store(key(99), PAGE) == (None, ChunkStatus.REFUSED_FULL)
    assert index.num_evictions == 0 and len(index) == 4
    assert index.pool.used_bytes == 4 * PAGE
    index.finish_store(writing, True)  # now evictable
    entry, status = index.begin_store(key(99), PAGE)
    assert status == ChunkStatus.STORED and entry is not None
    assert index.get_ready(key(3)) is None and index.num_evictions == 1
    index.finish_store(entry, True)
    assert index.begin_store(key(100), PAGE)[1] == ChunkStatus.STORED  # evicts 99


def test_refused_too_large(pools) -> None:
    index = small_index(pools, 4)
    stored(index, 1)
    assert index.begin_store(key(2), 4 * PAGE + 1) == (None, ChunkStatus.REFUSED_TOO_LARGE)
    assert index.begin_store(key(3), 0) == (None, ChunkStatus.REFUSED_TOO_LARGE)
    assert len(index) == 1 and index.num_evictions == 0  # nothing evicted for a hopeless store
    assert index.begin_store(key(4), 4 * PAGE)[1] == ChunkStatus.STORED  # exactly one slab fits (evicts 1)
    assert index.get_ready(key(1)) is None


def test_other_size_class_evicts_until_a_slab_frees(pools) -> None:
    index = ChunkIndex(pools(2 * MAX_SLAB_BYTES))  # 2 slabs
    for i in range(8):
        stored(index, i, 64 * MiB)  # fills both slabs
    entry, status = index.begin_store(key(100), 128 * MiB)
    assert status == ChunkStatus.STORED and entry is not None
    # the 4 oldest (all of slab 0) had to go so that slab could change class
    assert index.num_evictions == 4
    assert {k[2][0] for k in index.entries} == {4, 5, 6, 7, 100}
    assert entry.slot == 0
    index.finish_store(entry, True)
    assert index.pool.used_bytes == 4 * 64 * MiB + 128 * MiB


def test_clear_frees_unpinned_now_and_pinned_when_unpinned(pools) -> None:
    index = small_index(pools, 8)
    entries = [stored(index, i) for i in range(4)]
    index.pin(entries[1])
    index.pin(entries[1])
    writing, _ = index.begin_store(key(50), PAGE)
    assert writing is not None
    assert index.clear() == 5
    assert len(index) == 0 and not index.lru and index.get_ready(key(0)) is None
    # 1 pinned + 1 writing keep their slots
    assert index.pool.used_bytes == 2 * PAGE
    # the key can be stored again at once, in a different slot
    fresh = stored(index, 1)
    assert fresh.slot not in (entries[1].slot, writing.slot)
    assert index.pool.used_bytes == 3 * PAGE
    index.unpin(entries[1])
    assert index.pool.used_bytes == 3 * PAGE  # one pin left
    index.unpin(entries[1])
    assert index.pool.used_bytes == 2 * PAGE
    assert index.get_ready(key(1)) is fresh  # the orphan never touched the new entry
    assert list(index.lru) == [key(1)]
    index.finish_store(writing, True)
    assert index.pool.used_bytes == PAGE
    assert index.get_ready(key(50)) is None and len(index) == 1


def test_clear_while_writing_failed_copy(pools) -> None:
    index = small_index(pools, 2)
    writing, _ = index.begin_store(key(1), PAGE)
    assert writing is not None
    index.clear()
    index.finish_store(writing, False)
    assert index.pool.used_bytes == 0 and len(index) == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_index_random_operations_keep_accounting(pools, seed: int) -> None:
    rng = random.Random(seed)
    index = small_index(pools, 16)
    pins: list[Entry] = []
    writing: list[Entry] = []
    for _ in range(3000):
        op = rng.random()
        if op < 0.5:
            entry, status = index.begin_store(key(rng.randrange(64)), PAGE)
            if entry is not None:
                writing.append(entry)
            elif status == ChunkStatus.REFUSED_FULL:
                assert not index.lru  # refused only when nothing is evictable
        elif op < 0.7 and writing:
            index.finish_store(writing.pop(rng.randrange(len(writing))), rng.random() < 0.9)
        elif op < 0.8:
            entry = index.get_ready(key(rng.randrange(64)))
            if entry is not None:
                index.pin(entry)
                pins.append(entry)
        elif op < 0.95 and pins:
            index.unpin(pins.pop(rng.randrange(len(pins))))
        elif op > 0.995:
            index.clear()
        live = {id(e): e for e in index.entries.values()}
        for e in pins + writing:
            live[id(e)] = e
        assert index.pool.used_bytes == PAGE * len(live)
        assert all(e.ready and e.pins == 0 and e.indexed for e in index.lru.values())
        assert set(index.lru) == {k for k, e in index.entries.items() if e.ready and e.pins == 0}
        assert index.evictable_per_slab == dict(Counter(e.slab for e in index.lru.values()))
        assert sum(index.chunks_per_ns.values()) == len(index)
        assert index.pool.used_bytes <= index.pool.capacity_bytes


# ---------------------------------------------------------------- LeaseTable


def entries_for(n: int, rank: int = 0) -> list[Entry]:
    return [Entry(key(i, rank=rank), i * PAGE, PAGE) for i in range(n)]  # type: ignore[arg-type]


A, B = (1, ""), (2, "")  # the anonymous instances of namespaces 1 and 2
HA, HB = holder_of(A, 7), holder_of(B, 8)  # held by sessions 7 and 8


def test_lease_take_per_rank_and_release() -> None:
    table = LeaseTable(60.0)
    r0, r1 = entries_for(2, 0), entries_for(3, 1)
    lease = table.create(A, HA, {0: r0, 1: r1})
    assert len(table) == 1
    assert table.take(lease.lease_id, 0, A) == r0
    assert len(table) == 1  # rank 1 has not taken its part
    assert table.take(lease.lease_id, 0, A) == []  # taken already
    assert table.take(lease.lease_id, 1, A) == r1
    assert len(table) == 0 and table.next_expiry() is None
    assert table.take(lease.lease_id, 1, A) is None
    assert table.release(lease.lease_id, A) is None
    other = table.create(A, HA, {0: entries_for(1)})
    assert other.lease_id != lease.lease_id
    assert table.release(other.lease_id, A) == other.entries()
    assert table.release(other.lease_id, A) is None
    assert len(table) == 0


def test_lease_expire_in_order() -> None:
    table = LeaseTable(0.5)
    a = table.create(A, HA, {0: entries_for(2)})
    b = table.create(B, HB, {0: entries_for(1)})
    assert table.next_expiry() == a.expires_at
    assert a.expires_at <= b.expires_at
    assert table.expire(a.expires_at - 0.01) == [] and len(table) == 2
    assert table.expire(a.expires_at) == a.entries()
    assert table.num_expired == 1 and len(table) == 1
    assert table.take(a.lease_id, 0, A) is None  # a is gone, b is not
    assert table.next_expiry() == b.expires_at
    assert len(table.expire(b.expires_at + 100)) == 1
    assert table.num_expired == 2 and table.next_expiry() is None
    assert table.take(b.lease_id, 0, B) is None


def test_lease_leave_of_the_session_that_took_them() -> None:
    table = LeaseTable(60.0)
    mine = [table.create(A, HA, {0: entries_for(2)}) for _ in range(3)]
    theirs = table.create(A, holder_of(A, 9), {0: entries_for(4)})  # same namespace, another session
    table.take(mine[0].lease_id, 0, A)  # consumed already
    table.join(HA)
    released = table.leave(HA)
    assert len(released) == 4  # two open leases of 2 entries
    assert len(table) == 1 and table.next_expiry() == theirs.expires_at
    assert table.leave(HA) == []
    assert table.leave(holder_of(A, 999)) == []
    assert table.num_expired == 0
    assert table.release(theirs.lease_id, A) == theirs.entries()


def test_leases_answer_only_their_owner_as_if_missing() -> None:
    table = LeaseTable(60.0)
    inst = (1, "engine-a")
    lease = table.create(inst, holder_of(inst, 7), {0: entries_for(1, 0), 1: entries_for(1, 1)})
    for stranger in (A, (1, "engine-b"), (2, "engine-a")):
        assert table.take(lease.lease_id, 0, stranger) is None  # the same answer as a lease that is not there
        assert table.release(lease.lease_id, stranger) is None
    assert table.leave(holder_of((1, "engine-b"), 7)) == [] and table.leave(HA) == []
    assert len(table) == 1
    assert len(table.take(lease.lease_id, 0, inst) or []) == 1  # a worker of the instance consumes
    assert len(table.release(lease.lease_id, inst) or []) == 1  # and its scheduler may release the rest


def test_an_instances_leases_live_until_its_last_session_leaves() -> None:
    table = LeaseTable(60.0)
    inst = (3, "engine")
    held = holder_of(inst, 11)
    assert held == holder_of(inst, 12)  # whichever of its sessions took it
    table.join(held)  # the scheduler
    table.join(held)  # a worker
    lease = table.create(inst, held, {0: entries_for(2)})
    assert table.leave(held) == []  # the scheduler went: its worker may still consume
    assert len(table) == 1
    assert table.leave(held) == lease.entries()  # the last session went: released at once
    assert len(table) == 0


def test_lease_ids_are_random_63_bit_and_never_a_live_ones() -> None:
    table = LeaseTable(60.0)
    ids = [table.create(A, HA, {0: entries_for(1)}).lease_id for _ in range(2000)]
    assert len(set(ids)) == len(ids) and all(0 < i < 2**63 for i in ids)
    assert max(ids) > 2**60 and min(ids) < 2**62  # spread over the 63 bits, not counted from 1
    assert sum(b - a == 1 for a, b in zip(ids, ids[1:], strict=False)) == 0  # not sequential
    fresh = LeaseTable(60.0)  # a restarted server: none of the old ids names its leases
    assert not {fresh.create(A, HA, {0: entries_for(1)}).lease_id for _ in range(2000)} & set(ids)


# ---------------------------------------------------------------- lmcd.copyplan


def make_kv(num_planes: int, num_blocks: int, page: int, stride: int, one_segment: bool, seed: int,
            num_layers: int | None = None) -> tuple[KVLayout, list[np.ndarray], np.ndarray]:
    """Random KV planes in numpy segments (one per plane, or all back to back in one), the layout
    that describes them and ``copyplan.plane_addresses`` of it."""
    rng = np.random.default_rng(seed)
    plane_bytes = num_blocks * stride
    if one_segment:
        segs = [rng.integers(0, 256, num_planes * plane_bytes + 64, dtype=np.uint8)]
        offsets, seg_of = [i * plane_bytes for i in range(num_planes)], [0] * num_planes
    else:
        segs = [rng.integers(0, 256, plane_bytes + 64, dtype=np.uint8) for _ in range(num_planes)]
        offsets, seg_of = [0] * num_planes, list(range(num_planes))
    layout = KVLayout(num_layers or num_planes, num_blocks, 16, page, stride, offsets, seg_of)
    return layout, segs, copyplan.plane_addresses(layout, [seg.ctypes.data for seg in segs])


def kv_page(segs: list[np.ndarray], layout: KVLayout, plane: int, block: int) -> bytes:
    start = layout.plane_offsets[plane] + block * layout.block_stride
    return segs[layout.plane_segments[plane]][start : start + layout.page_bytes].tobytes()


def test_check_blocks_returns_the_chunk_rows_or_names_what_is_wrong() -> None:
    blocks = check_blocks([3, 1, 0, 2, 7, 6], 3, 2, 8)
    assert blocks.dtype == np.int64 and blocks.tolist() == [[3, 1], [0, 2], [7, 6]]
    assert check_blocks(np.array([5, 4], dtype=np.int32), 1, 2, 8, skip_blocks=1).tolist() == [[5, 4]]
    assert check_blocks([], 0, 4, 8).shape == (0, 4)
    for ids, count, skip, match, out_of_range in (
            ([0, 1, 2], 2, 0, r"2 chunks need 4 block ids \(2 per chunk\), got 3", False),
            ([0, 1, 2, 3, 4], 2, 0, "got 5", False),
            ([0, 1, 2, 8], 2, 0, r"block id 8 is out of range: 8 blocks are registered \(0..7\)", True),
            ([-1, 1, 2, 3], 2, 0, "block id -1 is out of range", True),
            ([0, 1, 2, 2**64 - 1], 2, 0, f"block id {2**64 - 1} is out of range", True),  # beyond int64
            ([0, 1, 2, 3], 2, 2, "skip_blocks 2 must be in 0..1", False),
            ([0, 1, 2, 3], 2, -1, "skip_blocks -1", False)):
        with pytest.raises(BlockIdError, match=match) as err:
            check_blocks(ids, count, 2, 8, skip)
        assert err.value.out_of_range is out_of_range, ids


def test_plane_addresses_follow_segments_and_offsets() -> None:
    layout = KVLayout(2, 4, 16, 64, 64, [0, 256, 512, 0], [1, 0, 1, 2])
    got = copyplan.plane_addresses(layout, [1000, 5000, 9000])
    assert got.dtype == np.int64 and got.tolist() == [5000, 1256, 5512, 9000]


@pytest.mark.parametrize("one_segment", [False, True])
@pytest.mark.parametrize("stride_pad", [0, 64])
@pytest.mark.parametrize("num_layers, num_planes", [(3, 3), (2, 4)], ids=["planes-are-layers", "kv-split"])
@pytest.mark.parametrize("seed", [0, 1])
def test_plan_roundtrip_exact_bytes(one_segment: bool, stride_pad: int, num_layers: int, num_planes: int,
                                    seed: int) -> None:
    num_blocks, page, bpc, num_chunks = 40, 256, 4, 5
    layout, segs, planes = make_kv(num_planes, num_blocks, page, page + stride_pad, one_segment, seed, num_layers)
    assert layout.num_planes == num_planes and layout.num_layers == num_layers
    rng = np.random.default_rng(seed + 100)
    chunk_bytes = num_planes * bpc * page  # every plane of a chunk is in its slot
    arena = np.zeros(8 * chunk_bytes, dtype=np.uint8)
    slot_index = rng.permutation(8)[:num_chunks]
    slots = (slot_index.astype(np.int64) * chunk_bytes + arena.ctypes.data).tolist()
    perm = rng.permutation(num_blocks)
    src_blocks = check_blocks(perm[: num_chunks * bpc], num_chunks, bpc, num_blocks)
    dst_blocks = check_blocks(perm[num_chunks * bpc : 2 * num_chunks * bpc], num_chunks, bpc, num_blocks)
    before = [s.copy() for s in segs]

    to_pool = plan(layout, planes, slots, src_blocks, True)
    assert to_pool.num_bytes == num_chunks * chunk_bytes
    copyplan.run(to_pool)
    for j in range(num_chunks):
        slot = arena[slot_index[j] * chunk_bytes : (slot_index[j] + 1) * chunk_bytes]
        for plane in range(num_planes):
            for k in range(bpc):
                within = (plane * bpc + k) * page  # plane-major inside the slot
                assert slot[within : within + page].tobytes() == kv_page(before, layout, plane,
                                                                         int(src_blocks[j, k]))
    for u in np.setdiff1d(np.arange(8), slot_index):
        assert not arena[u * chunk_bytes : (u + 1) * chunk_bytes].any()
    for seg, old in zip(segs, before, strict=True):
        assert np.array_equal(seg, old)  # a store never writes the KV

    from_pool = plan(layout, planes, slots, dst_blocks, False)
    assert from_pool.num_bytes == num_chunks * chunk_bytes
    copyplan.run(from_pool)
    written = set(dst_blocks.ravel().tolist())
    for j in range(num_chunks):
        for plane in range(num_planes):
            for k in range(bpc):
                assert kv_page(segs, layout, plane, int(dst_blocks[j, k])) == kv_page(
                    before, layout, plane, int(src_blocks[j, k]))
    for plane in range(num_planes):
        for block in range(num_blocks):
            if block not in written:
                assert kv_page(segs, layout, plane, block) == kv_page(before, layout, plane, block)
    # padding between pages (stride > page) and the segment tails are never touched
    for seg, old in zip(segs, before, strict=True):
        assert np.array_equal(seg[-64:], old[-64:])
        if stride_pad:
            pad_mask = np.zeros(len(seg), dtype=bool)
            for plane in range(num_planes):
                if segs[layout.plane_segments[plane]] is not seg:
                    continue
                base = layout.plane_offsets[plane]
                for block in range(num_blocks):
                    start = base + block * layout.block_stride + page
                    pad_mask[start : start + stride_pad] = True
            assert np.array_equal(seg[pad_mask], old[pad_mask])


@pytest.mark.parametrize("skip_blocks", [1, 3])
def test_plan_skip_blocks_leaves_the_first_chunks_leading_blocks_alone(skip_blocks: int) -> None:
    num_planes, num_blocks, page, bpc, num_chunks = 4, 16, 128, 4, 2
    layout, segs, planes = make_kv(num_planes, num_blocks, page, page, False, 9, num_layers=2)
    chunk_bytes = num_planes * bpc * page
    arena = np.random.default_rng(10).integers(0, 256, num_chunks * chunk_bytes, dtype=np.uint8)
    slots = [arena.ctypes.data + j * chunk_bytes for j in range(num_chunks)]
    blocks = check_blocks(list(range(8, 16)), num_chunks, bpc, num_blocks, skip_blocks)
    before = [s.copy() for s in segs]
    copy_plan = plan(layout, planes, slots, blocks, False, skip_blocks)
    assert copy_plan.num_bytes == num_chunks * chunk_bytes - skip_blocks * num_planes * page
    copyplan.run(copy_plan)
    for plane in range(num_planes):
        for j in range(num_chunks):
            for k in range(bpc):
                block = int(blocks[j, k])
                within = j * chunk_bytes + (plane * bpc + k) * page
                want = (kv_page(before, layout, plane, block) if j == 0 and k < skip_blocks
                        else arena[within : within + page].tobytes())
                assert kv_page(segs, layout, plane, block) == want, (plane, j, k)


def test_plan_merges_contiguous_runs() -> None:
    num_planes, page, bpc = 2, 128, 4
    layout, segs, planes = make_kv(num_planes, 32, page, page, False, 3)
    base = 1 << 20
    chunk_bytes = num_planes * bpc * page

    def rows(ids: list[int]) -> np.ndarray:
        return check_blocks(ids, len(ids) // bpc, bpc, 32)

    # one chunk, consecutive blocks: one run per plane (planes live in different segments)
    got = plan(layout, planes, [base], rows([8, 9, 10, 11]), True)
    assert got.size.tolist() == [bpc * page] * num_planes
    assert got.src.tolist() == [int(planes[0]) + 8 * page, int(planes[1]) + 8 * page]
    assert got.dst.tolist() == [base, base + bpc * page]
    # broken runs split exactly where the block ids jump
    got = plan(layout, planes, [base], rows([8, 9, 3, 4]), True)
    assert got.size.tolist() == [2 * page, 2 * page] * num_planes
    assert got.src.tolist()[:2] == [int(planes[0]) + 8 * page, int(planes[0]) + 3 * page]
    assert got.dst.tolist()[:2] == [base, base + 2 * page]
    # descending ids never merge
    got = plan(layout, planes, [base], rows([7, 6, 5, 4]), False)
    assert len(got.size) == bpc * num_planes and set(got.size.tolist()) == {page}
    assert got.dst.tolist()[:4] == [int(planes[0]) + b * page for b in (7, 6, 5, 4)]
    assert got.src.tolist()[:4] == [base + k * page for k in range(4)]
    # two chunks in adjacent slots with consecutive blocks still split per plane
    got = plan(layout, planes, [base, base + chunk_bytes], rows(list(range(8))), True)
    assert got.num_bytes == 2 * chunk_bytes and len(got.size) == 4
    # stride > page: never contiguous on the KV side
    padded, _, padded_planes = make_kv(num_planes, 32, page, page + 16, False, 4)
    got = plan(padded, padded_planes, [base], rows([8, 9, 10, 11]), True)
    assert len(got.size) == bpc * num_planes


def test_plan_merges_across_planes_in_one_segment() -> None:
    """Planes back to back in one segment and all blocks in order: the whole chunk is one copy."""
    num_planes, num_blocks, page = 3, 4, 64
    layout, segs, planes = make_kv(num_planes, num_blocks, page, page, True, 5)
    arena = np.zeros(num_planes * num_blocks * page, dtype=np.uint8)
    got = plan(layout, planes, [arena.ctypes.data], check_blocks(range(num_blocks), 1, num_blocks, num_blocks), True)
    assert got.size.tolist() == [num_planes * num_blocks * page]
    assert got.src.tolist() == [segs[0].ctypes.data]
    copyplan.run(got)
    assert np.array_equal(arena, segs[0][: len(arena)])


def byte_map(*plans: CopyPlan) -> list[tuple[int, int, int]]:
    """What plans copy, as merged (source start, source end, destination - source) intervals; an
    overlap (a byte copied twice) fails."""
    runs = sorted((s, s + n, d - s) for copy_plan in plans
                  for s, d, n in zip(copy_plan.src.tolist(), copy_plan.dst.tolist(), copy_plan.size.tolist(),
                                     strict=True))
    merged: list[tuple[int, int, int]] = []
    for start, end, delta in runs:
        if merged:
            assert start >= merged[-1][1], "a byte is copied twice"
            if start == merged[-1][1] and delta == merged[-1][2]:
                merged[-1] = (merged[-1][0], end, delta)
                continue
        merged.append((start, end, delta))
    return merged


@pytest.mark.parametrize("num_parts", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_covers_the_plan_exactly_in_balanced_parts(num_parts: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 40))
    size = rng.integers(1, 200, n).astype(np.int64) * 64
    size[int(rng.integers(0, n))] = 64 * 4000  # one long run, which must be cut to balance the parts
    src = np.cumsum(size) - size + (1 << 30)
    dst = (np.cumsum(size[::-1]) - size[::-1])[::-1] + (1 << 34)  # other order on the other side
    copy_plan = CopyPlan(src, dst, size)
    parts = split(copy_plan, num_parts)
    assert 1 <= len(parts) <= num_parts
    assert sum(part.num_bytes for part in parts) == copy_plan.num_bytes
    assert all(len(part.size) and (part.size > 0).all() for part in parts)
    assert byte_map(*parts) == byte_map(copy_plan)  # every byte once, to the same place
    if num_parts > 1:
        assert len(parts) == num_parts
        fair = -(-copy_plan.num_bytes // num_parts)
        assert max(part.num_bytes for part in parts) <= 2 * fair


def test_split_of_an_empty_plan_is_that_plan() -> None:
    empty = CopyPlan(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    parts = split(empty, 4)
    assert len(parts) == 1 and parts[0].num_bytes == 0


def test_split_shares_one_long_run() -> None:
    one = CopyPlan(np.array([1 << 30]), np.array([1 << 34]), np.array([12 * MiB]))
    parts = split(one, 3)
    assert [part.num_bytes for part in parts] == [4 * MiB] * 3


# ---------------------------------------------------------------- server.transfer.CopyThreads


def test_copy_threads_split_and_report_once() -> None:
    num_planes, page, bpc, num_chunks = 2, 64 << 10, 16, 4  # 8 MiB: split over threads
    layout, segs, planes = make_kv(num_planes, 128, page, page, True, 6)
    chunk_bytes = num_planes * bpc * page
    arena = np.zeros(num_chunks * chunk_bytes, dtype=np.uint8)
    slots = (np.arange(num_chunks, dtype=np.int64) * chunk_bytes + arena.ctypes.data).tolist()
    ids = np.random.default_rng(6).permutation(128)[: num_chunks * bpc]
    ids[:bpc] = np.arange(bpc)  # one long run too
    blocks = check_blocks(ids, num_chunks, bpc, 128)
    threads = CopyThreads(3)
    try:
        calls: list[tuple[BaseException | None, float, str]] = []
        done = threading.Event()

        def finished(error: BaseException | None, seconds: float) -> None:
            calls.append((error, seconds, threading.current_thread().name))
            done.set()

        copy_plan = plan(layout, planes, slots, blocks, True)
        assert len(split(copy_plan, min(3, copy_plan.num_bytes // MIN_BYTES_PER_THREAD))) == 2
        threads.submit(copy_plan, finished)
        assert done.wait(30)
        time.sleep(0.05)
        assert len(calls) == 1
        error, seconds, thread_name = calls[0]
        assert error is None and seconds > 0 and thread_name.startswith("lmcd-copy")
        reference = np.zeros_like(arena)
        ref_slots = (np.arange(num_chunks, dtype=np.int64) * chunk_bytes + reference.ctypes.data).tolist()
        copyplan.run(plan(layout, planes, ref_slots, blocks, True))
        assert np.array_equal(arena, reference) and arena.any()
    finally:
        threads.shutdown()


def test_copy_threads_time_the_copy_not_the_wait_for_a_thread() -> None:
    threads = CopyThreads(1)
    src = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)
    dst = np.zeros_like(src)
    one = CopyPlan(np.array([src.ctypes.data]), np.array([dst.ctypes.data]), np.array([4096]))
    try:
        seconds: list[float] = []
        done = threading.Event()

        def hold_the_thread(error: BaseException | None, _seconds: float) -> None:
            time.sleep(0.5)  # done() runs on the copy thread: the next plan waits for it

        def finished(error: BaseException | None, copy_seconds: float) -> None:
            seconds.append(copy_seconds)
            done.set()

        threads.submit(one, hold_the_thread)
        submitted = time.perf_counter()
        threads.submit(one, finished)
        assert done.wait(10)
        assert time.perf_counter() - submitted >= 0.4  # it did wait for the thread ...
        assert seconds[0] < 0.2, seconds  # ... and that wait is not in its seconds
        assert np.array_equal(dst, src)
    finally:
        threads.shutdown()


def test_double_free_is_caught_while_the_slab_is_in_use(pools) -> None:
    pool = pools(MAX_SLAB_BYTES)
    a, b = pool.allocate(64 * MiB), pool.allocate(64 * MiB)
    assert a is not None and b is not None
    pool.free(a)
    with pytest.raises(AssertionError, match="not allocated"):
        pool.free(a)
    assert pool.used_bytes == 64 * MiB


def test_eviction_prefers_the_size_being_stored(pools) -> None:
    index = ChunkIndex(pools(2 * MAX_SLAB_BYTES))  # 2 slabs
    for i in range(4):
        stored(index, i, 64 * MiB)  # slab 0: four 64 MiB chunks (oldest)
    for i in range(4, 6):
        stored(index, i, 128 * MiB)  # slab 1: two 128 MiB chunks
    entry, status = index.begin_store(key(100), 128 * MiB)
    assert status == ChunkStatus.STORED and entry is not None
    # the oldest 128 MiB chunk goes (one eviction), not the four older 64 MiB ones
    assert index.num_evictions == 1
    assert {k[2][0] for k in index.entries} == {0, 1, 2, 3, 5, 100}


# ---------------------------------------------------------------- eviction across chunk sizes (issue 13, item 5)

KiB = 1 << 10


def gigabyte_of_512k_chunks(pools) -> tuple[ChunkIndex, int]:
    """A 1 GiB pool (4 slabs of 256 MiB) holding 2,048 chunks of 512 KiB, used round robin over the slabs
    (as lookups leave them), so that every slab holds old and new chunks."""
    index = ChunkIndex(pools(4 * MAX_SLAB_BYTES))
    num = 4 * MAX_SLAB_BYTES // (512 * KiB)
    entries = [stored(index, i, 512 * KiB) for i in range(num)]
    per_slab = num // 4
    for k in range(per_slab):
        for slab in range(4):
            index.touch(entries[slab * per_slab + k])
    return index, num


def test_a_second_chunk_size_evicts_one_slab_not_the_cache(pools) -> None:
    index, num = gigabyte_of_512k_chunks(pools)
    entry, status = index.begin_store(key(10**6), 256 * KiB)
    assert status == ChunkStatus.STORED and entry is not None
    assert index.num_evictions == num // 4  # one slab's 512 chunks (the whole cache before the fix)
    assert index.pool.slab_of(entry.slot) == 0  # the slab whose newest chunk is the oldest
    assert {k[2] for k in index.entries} == {key(i)[2] for i in range(num // 4, num)} | {key(10**6)[2]}
    index.finish_store(entry, True)
    for i in range(1, 1024):  # the rest of that slab takes the new size without another eviction
        assert index.begin_store(key(10**6 + i), 256 * KiB)[1] == ChunkStatus.STORED
    assert index.num_evictions == num // 4


def test_nothing_is_evicted_when_no_slab_can_be_freed(pools) -> None:
    index, num = gigabyte_of_512k_chunks(pools)
    per_slab = num // 4
    for slab in range(4):  # one pinned chunk per slab: no slab can change size
        index.pin(index.entries[key(slab * per_slab + 7)])
    assert index.begin_store(key(10**6), 256 * KiB) == (None, ChunkStatus.REFUSED_FULL)
    assert index.allocate_free(256 * KiB) is None  # a worker's grant takes the same path
    assert index.num_evictions == 0 and len(index) == num
    index.unpin(index.entries[key(2 * per_slab + 7)])  # slab 2 is freeable now, and only slab 2
    slot = index.allocate_free(256 * KiB)
    assert slot is not None and index.pool.slab_of(slot) == 2
    assert index.num_evictions == per_slab and len(index) == num - per_slab


def test_a_slab_with_a_chunk_being_written_or_granted_is_not_freed(pools) -> None:
    index = ChunkIndex(pools(3 * MAX_SLAB_BYTES))  # 3 slabs of 64 MiB chunks, 4 per slab, slab 0 oldest
    for i in range(11):
        stored(index, i, 64 * MiB)
    writing, _ = index.begin_store(key(11), 64 * MiB)  # slab 2: one chunk still being written
    granted = index.allocate_free(64 * MiB)  # no free slot: evicts chunk 0 (its size); slab 0 holds a grant
    assert writing is not None and granted is not None and index.pool.slab_of(granted) == 0
    assert index.num_evictions == 1
    entry, status = index.begin_store(key(100), 128 * MiB)
    assert status == ChunkStatus.STORED and entry is not None
    assert index.pool.slab_of(entry.slot) == 1  # slab 0 (granted) and slab 2 (writing) are kept whole
    assert index.num_evictions == 1 + 4
    assert {k[2][0] for k in index.entries} == {1, 2, 3, 8, 9, 10, 11, 100}


def test_eviction_of_the_same_size_scans_no_slabs(pools, monkeypatch) -> None:
    index, num = gigabyte_of_512k_chunks(pools)
    asked: list[int] = []
    slab_used = index.pool.slab_used
    monkeypatch.setattr(index.pool, "slab_used", lambda slab: asked.append(slab) or slab_used(slab))
    for i in range(100):
        stored(index, 10**6 + i, 512 * KiB)
    assert index.num_evictions == 100 and asked == []  # one LRU chunk each: O(1), no slab consulted
    assert index.begin_store(key(2 * 10**6), 256 * KiB)[1] == ChunkStatus.STORED
    assert 0 < len(asked) <= 4  # another size: the slabs holding evictable chunks, once each
