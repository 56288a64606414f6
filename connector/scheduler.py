"""Scheduler-side bookkeeping: which chunks a request can load, and which it must store.

Pure Python (no vLLM import), so it is tested on its own. The vLLM connector feeds it the
scheduler's calls and ships the ``RequestPlan``s it returns to every worker.

Token arithmetic for one request (C = chunk size, B = block size, C % B == 0)::

    prompt:   |chunk 0 |chunk 1 |chunk 2 |chunk 3 |par|      only full chunks have keys
    cached:   |<---- hit_chunks * C ----->|                  from the server's lookup
    local:    |<- vLLM prefix cache ->|                      num_computed_tokens (B-aligned)
    load:                             |<->|                  to_load = usable hit - local
    load = the chunks overlapping [local, local + to_load); the first one skips its
    (local - first * C) // B leading blocks, which vLLM already has.

vLLM must compute at least one prompt token, so a hit of the whole prompt is cut to
``len(prompt) - 1`` tokens (the last chunk is loaded; its last token is recomputed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lmcd.connector.client import LookupResult
from lmcd.connector.keys import chunk_keys

log = logging.getLogger("lmcd.connector")
MISS = LookupResult(0, None)


@dataclass(frozen=True, slots=True)
class LoadSpec:
    chunk_keys: list[bytes]
    block_ids: list[int]  # blocks_per_chunk ids per chunk
    blocks_per_chunk: int
    skip_blocks: int  # leading blocks of the first chunk that vLLM already computed
    lease_id: int | None
    # shared pool: per rank, where the leased chunks are; a worker that copies itself reads them
    # there without a request of its own, until ``slots_valid_until`` (time.monotonic(), which
    # every process of the host shares), safely before the lease can expire
    slots: list[list[int]] | None = None
    slots_valid_until: float = 0.0


@dataclass(frozen=True, slots=True)
class StoreSpec:
    chunk_keys: list[bytes]
    block_ids: list[int]  # blocks_per_chunk ids per chunk
    blocks_per_chunk: int


@dataclass(frozen=True, slots=True)
class RequestPlan:
    """What every worker does for one request in one step (crosses to the workers)."""

    req_id: str
    load: LoadSpec | None = None
    store: StoreSpec | None = None


@dataclass(slots=True)
class _Tracker:
    req_id: str
    prompt: list[int]
    keys: list[bytes]
    block_ids: list[int] = field(default_factory=list)
    num_stored_chunks: int = 0  # chunks cached or already planned for a store
    hit: LookupResult = MISS  # the last lookup: its lease and, with a shared pool, every rank's slots
    computed_at_lookup: int = 0
    pending_load: tuple[int, int] | None = None  # token range [start, end) to load
    stored: bool = False  # a store was planned for it (GPU workers finish stores asynchronously)
    may_store: bool = True  # kv_role stores and the request did not ask for lmcache.skip_save


LookupFn = Callable[[list[bytes]], LookupResult]  # a leased lookup of the prompt's chunk keys
ReleaseFn = Callable[[int], None]


class SchedulerState:
    """Per-request state between ``get_num_new_matched_tokens`` and ``request_finished``."""

    def __init__(self, chunk_size: int, block_size: int, lookup: LookupFn, release: ReleaseFn, *,
                 loads: bool = True, stores: bool = True) -> None:
        """``loads``/``stores``: what vLLM's ``kv_role`` allows (``kv_consumer`` never stores,
        ``kv_producer`` never loads, ``kv_both`` does both)."""
        if chunk_size % block_size:
            raise ValueError(f"chunk size {chunk_size} is not a multiple of vLLM's block size {block_size}; "
                             f"start the server with --chunk-size a multiple of {block_size}")
        self.chunk_size = chunk_size
        self.block_size = block_size
        self.blocks_per_chunk = chunk_size // block_size
        self._lookup = lookup
        self._release = release
        self.loads, self.stores = loads, stores
        self._trackers: dict[str, _Tracker] = {}

    def _tracker(self, req_id: str, prompt: Sequence[int]) -> _Tracker:
        tracker = self._trackers.get(req_id)
        if tracker is None:
            prompt = list(prompt)
            tracker = _Tracker(req_id, prompt, chunk_keys(prompt, self.chunk_size), may_store=self.stores)
            self._trackers[req_id] = tracker
        return tracker

    def num_new_matched_tokens(self, req_id: str, prompt: Sequence[int], num_computed_tokens: int, *,
                               skip_load: bool = False, skip_save: bool = False) -> int:
        """Tokens vLLM may take from the cache beyond ``num_computed_tokens`` (never more than allowed).
        ``skip_load``/``skip_save``: this request's ``lmcache.skip_load``/``lmcache.skip_save``."""
        tracker = self._tracker(req_id, prompt)
        tracker.may_store = self.stores and not skip_save
        self._drop_lease(tracker)  # asked again: the previous answer's pins are not needed
        if not self.loads or skip_load:
            return 0  # no lookup: nothing is pinned, nothing loads
        tracker.hit = self._lookup(tracker.keys) if tracker.keys else MISS
        tracker.num_stored_chunks = max(tracker.num_stored_chunks, tracker.hit.num_hit_chunks)
        hit_tokens = tracker.hit.num_hit_chunks * self.chunk_size
        usable = min(hit_tokens, len(tracker.prompt) - 1)
        to_load = max(0, usable - num_computed_tokens)
        tracker.computed_at_lookup = num_computed_tokens
        log.info("Reqid: %s, Total tokens %d, LMCache hit tokens: %d, need to load: %d", req_id,
                 len(tracker.prompt), hit_tokens, to_load)
        if to_load == 0:
            self._drop_lease(tracker)
        return to_load

    def after_alloc(self, req_id: str, num_external_tokens: int) -> None:
        tracker = self._trackers.get(req_id)
        if tracker is None:
            return
        if num_external_tokens > 0:
            start = tracker.computed_at_lookup
            tracker.pending_load = (start, start + num_external_tokens)
        else:
            tracker.pending_load = None
            self._drop_lease(tracker)

    def plan_step(self, req_id: str, prompt: Sequence[int] | None, block_ids: Sequence[int] | None,
                  replace_blocks: bool, num_computed_tokens: int, num_scheduled_tokens: int) -> RequestPlan | None:
        """Loads and stores of one request for the step being scheduled."""
        tracker = self._trackers.get(req_id)
        if tracker is None:
            if prompt is None:
                return None
            tracker = self._tracker(req_id, prompt)
        if block_ids is not None:
            tracker.block_ids = list(block_ids) if replace_blocks else tracker.block_ids + list(block_ids)
        load = self._plan_load(tracker)
        store = self._plan_store(tracker, num_computed_tokens + num_scheduled_tokens)
        if load is None and store is None:
            return None
        return RequestPlan(req_id, load, store)

    def _plan_load(self, tracker: _Tracker) -> LoadSpec | None:
        if tracker.pending_load is None:
            return None
        start, end = tracker.pending_load
        tracker.pending_load = None
        first, last = start // self.chunk_size, -(-end // self.chunk_size)
        bpc = self.blocks_per_chunk
        hit, tracker.hit = tracker.hit, MISS  # the workers consume its lease
        return LoadSpec(tracker.keys[first:last], tracker.block_ids[first * bpc : last * bpc], bpc,
                        (start - first * self.chunk_size) // self.block_size, hit.lease_id,
                        [rank[first:last] for rank in hit.slots] if hit.slots is not None else None,
                        hit.slots_valid_until)

    def _plan_store(self, tracker: _Tracker, num_tokens_after_step: int) -> StoreSpec | None:
        if not tracker.may_store:
            return None
        full = min(num_tokens_after_step, len(tracker.prompt)) // self.chunk_size
        full = min(full, len(tracker.block_ids) // self.blocks_per_chunk)
        start = tracker.num_stored_chunks
        if full <= start:
            return None
        tracker.num_stored_chunks = full
        tracker.stored = True
        bpc = self.blocks_per_chunk
        return StoreSpec(tracker.keys[start:full], tracker.block_ids[start * bpc : full * bpc], bpc)

    def finished(self, req_id: str) -> bool:
        """Forget the request; returns whether any store was planned for it."""
        tracker = self._trackers.pop(req_id, None)
        if tracker is None:
            return False
        self._drop_lease(tracker)
        return tracker.stored

    def _drop_lease(self, tracker: _Tracker) -> None:
        hit, tracker.hit = tracker.hit, MISS
        if hit.lease_id is not None:
            self._release(hit.lease_id)

    def __len__(self) -> int:
        return len(self._trackers)
