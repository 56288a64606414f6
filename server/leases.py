"""Leases: the pins a lookup (or a worker's ``Pin``) takes, owned by whoever took them.

Ownership: touched only by the request loop thread.

A lease holds, per rank, the entries a lookup pinned. A retrieve by rank r takes rank r's
part (and unpins it when its copy ends); the lease is gone once every rank took its part,
when its owner releases it, when it expires, or when its owner goes (below). Every lease has
the same time to live, so insertion order is expiry order and expiry is O(1) per expired lease.

Owners (``LeaseOwner``, ``(namespace id, instance id)``): a session that said Hello with an
``instance_id`` takes leases for its INSTANCE: the scheduler takes, its workers (same engine id,
same namespace) consume. Only sessions of the owner can take, release or consume a lease; to
anyone else it answers as a lease that does not exist. Sessions that give no instance id
(tools, tests, old connectors) share the namespace's anonymous instance ``(namespace id, "")``
for access: a scheduler session's lease is consumed by worker sessions of the namespace, as
before instances existed, but never across namespaces, and never by a session of a named
instance. (The vLLM connector always sends vLLM's engine id.)

Ids are random 63-bit numbers (``secrets``), never equal to a live lease's, so an id from
before a restart, or another instance's, names no lease (a collision with one of the 2**63
ids is what it would take).

Holders (``LeaseHolder``) decide when a lease ends with its sessions: a named instance holds
its leases, which live while any session of that instance is connected (its workers may be
about to consume what its scheduler looked up, across a scheduler reconnect) and are released
when the instance's last session disconnects; a lease of the anonymous instance is held by the
session that took it, and released the moment that session disconnects. Expiry applies to both.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from lmcd.server.index import Entry

LeaseOwner = tuple[int, str]  # (namespace id, instance id): who may take, release or consume a lease
LeaseHolder = tuple[int, int, str]  # whose sessions keep it: (session id, 0, "") or (0, namespace id, instance id)


def holder_of(owner: LeaseOwner, session_id: int) -> LeaseHolder:
    """A named instance holds its leases; the anonymous one's are held by the session taking them."""
    return (0, *owner) if owner[1] else (session_id, 0, "")


@dataclass(slots=True)
class Lease:
    lease_id: int
    owner: LeaseOwner
    holder: LeaseHolder
    expires_at: float
    by_rank: dict[int, list[Entry]] = field(default_factory=dict)

    def entries(self) -> list[Entry]:
        return [entry for part in self.by_rank.values() for entry in part]


class LeaseTable:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._leases: OrderedDict[int, Lease] = OrderedDict()
        self._by_holder: dict[LeaseHolder, set[int]] = {}
        self._sessions: dict[LeaseHolder, int] = {}  # holder -> its connected sessions
        self.num_expired = 0

    def __len__(self) -> int:
        return len(self._leases)

    def _new_id(self) -> int:
        while True:
            lease_id = secrets.randbits(63)
            if lease_id and lease_id not in self._leases:
                return lease_id

    def create(self, owner: LeaseOwner, holder: LeaseHolder, by_rank: dict[int, list[Entry]]) -> Lease:
        lease = Lease(self._new_id(), owner, holder, time.monotonic() + self.ttl_s, by_rank)
        self._leases[lease.lease_id] = lease
        self._by_holder.setdefault(holder, set()).add(lease.lease_id)
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

    def join(self, holder: LeaseHolder) -> None:
        """A session of ``holder`` said Hello."""
        self._sessions[holder] = self._sessions.get(holder, 0) + 1

    def leave(self, holder: LeaseHolder) -> list[Entry]:
        """A session of ``holder`` went; if it was the last, every lease ``holder`` holds ends now.
        Returns the entries to unpin."""
        left = self._sessions.get(holder, 1) - 1
        if left > 0:
            self._sessions[holder] = left
            return []
        self._sessions.pop(holder, None)
        entries: list[Entry] = []
        for lease_id in list(self._by_holder.get(holder, ())):
            lease = self._leases[lease_id]
            self._drop(lease)
            entries.extend(lease.entries())
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
        held = self._by_holder.get(lease.holder)
        if held is not None:
            held.discard(lease.lease_id)
            if not held:
                del self._by_holder[lease.holder]
