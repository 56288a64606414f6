"""Leases: the pins a lookup takes, owned by the session that looked up.

Ownership: touched only by the request loop thread.

A lease holds, per rank, the entries a lookup pinned. A retrieve by rank r takes rank r's
part (and unpins it when its copy ends); the lease is gone once every rank took its part,
when its owner releases it, when it expires, or at once when its owner disconnects. Every
lease has the same time to live, so insertion order is expiry order and expiry is O(1) per
expired lease.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from lmcd.server.index import Entry


@dataclass(slots=True)
class Lease:
    lease_id: int
    session_id: int
    expires_at: float
    by_rank: dict[int, list[Entry]] = field(default_factory=dict)

    def entries(self) -> list[Entry]:
        return [entry for part in self.by_rank.values() for entry in part]


class LeaseTable:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._leases: OrderedDict[int, Lease] = OrderedDict()
        self._by_session: dict[int, set[int]] = {}
        self._ids = itertools.count(1)
        self.num_expired = 0

    def __len__(self) -> int:
        return len(self._leases)

    def create(self, session_id: int, by_rank: dict[int, list[Entry]]) -> Lease:
        lease = Lease(next(self._ids), session_id, time.monotonic() + self.ttl_s, by_rank)
        self._leases[lease.lease_id] = lease
        self._by_session.setdefault(session_id, set()).add(lease.lease_id)
        return lease

    def take(self, lease_id: int, rank: int) -> list[Entry] | None:
        """Rank ``rank``'s pinned entries (now owned by the caller), or None if no such lease."""
        lease = self._leases.get(lease_id)
        if lease is None:
            return None
        part = lease.by_rank.pop(rank, [])
        if not lease.by_rank:
            self._drop(lease)
        return part

    def release(self, lease_id: int) -> list[Entry] | None:
        lease = self._leases.get(lease_id)
        if lease is None:
            return None
        self._drop(lease)
        return lease.entries()

    def release_session(self, session_id: int) -> list[Entry]:
        entries: list[Entry] = []
        for lease_id in list(self._by_session.get(session_id, ())):
            entries.extend(self.release(lease_id) or [])
        return entries

    def expire(self, now: float) -> list[Entry]:
        entries: list[Entry] = []
        while self._leases:
            lease = next(iter(self._leases.values()))
            if lease.expires_at > now:
                break
            self._drop(lease)
            self.num_expired += 1
            entries.extend(lease.entries())
        return entries

    def next_expiry(self) -> float | None:
        return next(iter(self._leases.values())).expires_at if self._leases else None

    def _drop(self, lease: Lease) -> None:
        del self._leases[lease.lease_id]
        owned = self._by_session.get(lease.session_id)
        if owned is not None:
            owned.discard(lease.lease_id)
            if not owned:
                del self._by_session[lease.session_id]
