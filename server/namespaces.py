"""Namespace ids: what a session's Hello names, as the small int the index keys chunks by.

Ownership: the request loop thread.

A namespace id is held by the sessions that said Hello with it and by the index's chunks of
it (``ChunkIndex.chunks_per_ns``); when neither holds it any more, the namespace and its
chunk-bytes record are forgotten, so a server that sees a million distinct Hellos keeps only
the namespaces in use. Ids count up and are never reused: a forgotten id names nothing, and a
namespace seen again gets a fresh one (its chunks were all gone, so nothing is lost).
"""

from __future__ import annotations

import itertools

from lmcd.server.index import ChunkIndex
from lmcd.server.l2 import namespace_text

NamespaceKey = tuple[str, str, str, int]  # (model, kv dtype, geometry, world size)


class NamespaceTable:
    def __init__(self, index: ChunkIndex) -> None:
        self._index = index
        self._ids: dict[NamespaceKey, int] = {}
        self._keys: dict[int, NamespaceKey] = {}
        self._sessions: dict[int, int] = {}  # ns id -> sessions holding it
        self.chunk_bytes: dict[int, int] = {}  # ns id -> bytes of its chunks, once a worker registered
        self._next_ids = itertools.count(1)
        index.on_namespace_empty = self._forget_if_unused

    def __len__(self) -> int:
        return len(self._ids)

    def text_of(self, ns_id: int) -> str:
        """The namespace's canonical text (``l2.namespace_text``): its name in every L2 tier."""
        return namespace_text(*self._keys[ns_id])

    def acquire(self, key: NamespaceKey) -> int:
        """The id of ``key``, held for one more session until ``release``."""
        ns_id = self._ids.get(key)
        if ns_id is None:
            ns_id = self._ids[key] = next(self._next_ids)
            self._keys[ns_id] = key
        self._sessions[ns_id] = self._sessions.get(ns_id, 0) + 1
        return ns_id

    def release(self, ns_id: int) -> None:
        """A session holding ``ns_id`` went (or said Hello again with another namespace)."""
        left = self._sessions[ns_id] - 1
        if left:
            self._sessions[ns_id] = left
            return
        del self._sessions[ns_id]
        self._forget_if_unused(ns_id)

    def _forget_if_unused(self, ns_id: int) -> None:
        if ns_id in self._sessions or ns_id in self._index.chunks_per_ns or ns_id not in self._keys:
            return
        del self._ids[self._keys.pop(ns_id)]
        self.chunk_bytes.pop(ns_id, None)
