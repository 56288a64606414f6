"""Leases: the pins a lookup (or a worker's ``Pin``) takes, owned by whoever took them.

Ownership: touched only by the request loop thread.

A lease holds, per rank, the entries a lookup pinned. A retrieve by rank r takes rank r's
part (and unpins it when its copy ends); the lease is gone once every rank took its part,
when its owner releases it, when it expires, or when its owner goes (below). Every lease has
the same time to live, so insertion order is expiry order and expiry is O(1) per expired lease.

Owners (``LeaseOwner``): a session that said Hello with an ``instance_id`` takes leases for
its INSTANCE, ``(namespace id, instance id)``: the scheduler takes, its workers (same engine
id, same namespace) consume. A session without one owns its leases alone. Only the owner can
take, release or consume a lease; to anyone else it answers as a lease that does not exist.

Ids are random 63-bit numbers (``secrets``), never equal to a live lease's, so an id from
before a restart, or another instance's, names no lease (a collision with one of the 2**63
ids is what it would take).

When an owner goes: a session's own leases are released the moment it disconnects; an
instance's leases live while any session of that instance is connected (its workers may be
about to consume what its scheduler looked up, across a scheduler reconnect) and are released
when the instance's last session disconnects. Expiry applies to both.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from lmcd.server.index import Entry

LeaseOwner = tuple[int, int, str]  # (session id, 0, "") alone, or (0, namespace id, instance id)


def session_owner(session_id: int) -> LeaseOwner:
    return (session_id, 0, "")


def instance_owner(ns_id: int, instance_id: str) -> LeaseOwner:
    return (0, ns_id, instance_id)


@dataclass(slots=True)
class Lease:
    lease_id: int
    owner: LeaseOwner
    expires_at: float
    by_rank: dict[int, list[Entry]] = field(default_factory=dict)

    def entries(self) -> list[Entry]:
        return [entry for part in self.by_rank.values() for entry in part]


class LeaseTable:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._leases: OrderedDict[int, Lease] = OrderedDict()
        self._by_owner: dict[LeaseOwner, set[int]] = {}
        self._sessions: dict[LeaseOwner, int] = {}  # owner -> connected sessions taking leases for it
        self.num_expired = 0

    def __len__(self) -> int:
        return len(self._leases)

    def _new_id(self) -> int:
        while True:
            lease_id = secrets.randbits(63)
            if lease_id and lease_id not in self._leases:
                return lease_id

    def create(self, owner: LeaseOwner, by_rank: dict[int, list[Entry]]) -> Lease:
        lease = Lease(self._new_id(), owner, time.monotonic() + self.ttl_s, by_rank)
        self._leases[lease.lease_id] = lease
        self._by_owner.setdefault(owner, set()).add(lease.lease_id)
        return lease

    def _owned(self, lease_id: int, owner: LeaseOwner) -> Lease | None:
        lease = self._leases.get(lease_id)
        return lease if lease is not None and lease.owner == owner else None

    def take(self, lease_id: int, rank: int, owner: LeaseOwner) -> list[Entry] | None:
        """Rank ``rank``'s pinned entries (now owned by the caller), or None if ``owner`` has no such lease."""
        lease = self._owned(lease_id, owner)
        if lease is None:
            return None
        part = lease.by_rank.pop(rank, [])
        if not lease.by_rank:
            self._drop(lease)
        return part

    def release(self, lease_id: int, owner: LeaseOwner) -> list[Entry] | None:
        lease = self._owned(lease_id, owner)
        if lease is None:
            return None
        self._drop(lease)
        return lease.entries()

    def join(self, owner: LeaseOwner) -> None:
        """A session now takes leases for ``owner`` (at its Hello)."""
        self._sessions[owner] = self._sessions.get(owner, 0) + 1

    def leave(self, owner: LeaseOwner) -> list[Entry]:
        """A session of ``owner`` went; if it was the last, every lease of ``owner`` ends now.
        Returns the entries to unpin."""
        left = self._sessions.get(owner, 1) - 1
        if left > 0:
            self._sessions[owner] = left
            return []
        self._sessions.pop(owner, None)
        entries: list[Entry] = []
        for lease_id in list(self._by_owner.get(owner, ())):
            entries.extend(self.release(lease_id, owner) or [])
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
        owned = self._by_owner.get(lease.owner)
        if owned is not None:
            owned.discard(lease.lease_id)
            if not owned:
                del self._by_owner[lease.owner]
