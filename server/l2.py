"""L2 objects and adapters: what every tier behind the L1 pool stores, and the calls a tier answers.

An L2 object is one chunk of one rank of one namespace, named so that every lmcd server (on any
node, before or after a restart) that sees the same chunk gives it the same name::

    name    = hex(blake2b-128(namespace text | rank | chunk key))       (32 hex digits)
    object  = | header (HEADER_BYTES + len(namespace text)) | payload (the chunk's bytes) |
    header  = magic "LMCDL2" | format u16 | header bytes u32 | payload bytes u64 | checksum u64 |
              rank u32 | chunk key 32 B | name digest 16 B | namespace length u16 | namespace text

The header names the object completely, so a tier never has to trust where an object was found:
``verify`` checks the magic, sizes, the name digest, namespace, rank and chunk key against the one
asked for, and the checksum of the payload. A corrupt, truncated or foreign object fails it and is
never loaded (the cascade drops it, counts it and logs it once). The checksum is XXH3-64 (the
``xxhash`` package: about 55 GB/s on one core here, against 4 GB/s for zlib's CRC-32, so checking
costs a tier's read almost nothing); it detects torn writes and bit rot. It is not a MAC: whoever
can write the tier can forge an object, as whoever can write the L1 pool can.

Adapters (``Adapter``) are called from the cascade's tier threads (``server/tiers.py``), never from
the request loop, except ``holds`` (in-memory, cheap, thread-safe). Every call may raise
``TierError``; an object that is not there is ``MissingObject`` (a subclass), an object whose size
cannot be the one asked for is ``CorruptObject``. An adapter never blocks a call forever: every
remote call has a timeout.
"""

from __future__ import annotations

import abc
import hashlib
import struct
from dataclasses import dataclass

import xxhash

MAGIC = b"LMCDL2"
FORMAT = 1
# magic, format, header bytes, payload bytes, checksum, rank, chunk key, name digest, namespace length
_FIXED = struct.Struct("<6sHIQQi32s16sH")
HEADER_BYTES = _FIXED.size  # without the namespace text
MAX_NAMESPACE_BYTES = 4096
CHUNK_KEY_BYTES = 32


class TierError(Exception):
    """A tier could not do what was asked (I/O error, connection lost, timeout, no space)."""


class MissingObject(TierError):
    """The tier does not hold the object (never stored, evicted, expired)."""


class CorruptObject(TierError):
    """What the tier holds under the name cannot be the object asked for."""


@dataclass(frozen=True, slots=True)
class ObjectId:
    """One chunk of one rank of one namespace, the same on every server and across restarts."""

    namespace: str  # namespace_text(): everything that changes the chunk's bytes, world size included
    rank: int
    chunk_key: bytes

    @property
    def digest(self) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        h.update(self.namespace.encode())
        h.update(b"\0" + self.rank.to_bytes(4, "little") + self.chunk_key)
        return h.digest()

    @property
    def name(self) -> str:
        """The object's name in every tier (a file name, the end of a Redis key)."""
        return self.digest.hex()


def checksum(payload: memoryview | bytes) -> int:
    """The payload's XXH3-64."""
    return int(xxhash.xxh3_64_intdigest(payload))


def namespace_text(model: str, kv_dtype: str, geometry: str, world_size: int) -> str:
    """The canonical text of a namespace: model, KV dtype, page geometry and world size."""
    return f"{model}\x1f{kv_dtype}\x1f{geometry}\x1f{world_size}"


def encode_header(oid: ObjectId, payload: memoryview | bytes) -> bytes:
    """The header of ``payload`` stored as ``oid`` (computes the payload's checksum)."""
    ns = oid.namespace.encode()
    if len(ns) > MAX_NAMESPACE_BYTES:
        raise ValueError(f"namespace text of {len(ns)} bytes exceeds {MAX_NAMESPACE_BYTES}")
    header_bytes = HEADER_BYTES + len(ns)
    fixed = _FIXED.pack(MAGIC, FORMAT, header_bytes, memoryview(payload).nbytes, checksum(payload), oid.rank,
                        oid.chunk_key, oid.digest, len(ns))
    return fixed + ns


def header_bytes_of(first: bytes | memoryview) -> int:
    """How long the header is, from its first HEADER_BYTES bytes; CorruptObject if they are no header."""
    if len(first) < HEADER_BYTES:
        raise CorruptObject(f"object of {len(first)} bytes is shorter than a header ({HEADER_BYTES})")
    magic, fmt, header_bytes, *_ = _FIXED.unpack_from(first)
    if magic != MAGIC or fmt != FORMAT:
        raise CorruptObject(f"not an lmcd L2 object (magic {bytes(magic)!r}, format {fmt})")
    if not HEADER_BYTES <= header_bytes <= HEADER_BYTES + MAX_NAMESPACE_BYTES:
        raise CorruptObject(f"header length {header_bytes} out of range")
    return int(header_bytes)


def verify(oid: ObjectId, header: bytes | memoryview, payload: memoryview | bytes) -> None:
    """Raise CorruptObject unless ``header`` + ``payload`` are exactly object ``oid``, intact."""
    header_bytes = header_bytes_of(header)
    if len(header) != header_bytes:
        raise CorruptObject(f"header of {len(header)} bytes, its length field says {header_bytes}")
    _, _, _, payload_bytes, expected, rank, chunk_key, digest, ns_len = _FIXED.unpack_from(header)
    namespace = bytes(header[HEADER_BYTES:])
    if ns_len != len(namespace) or digest != oid.digest or rank != oid.rank or chunk_key != oid.chunk_key \
            or namespace != oid.namespace.encode():
        raise CorruptObject("the object names another chunk (name digest, namespace, rank or chunk key differ)")
    nbytes = memoryview(payload).nbytes
    if payload_bytes != nbytes:
        raise CorruptObject(f"payload of {nbytes} bytes, its header says {payload_bytes} (truncated?)")
    if checksum(payload) != expected:
        raise CorruptObject("payload checksum mismatch")


def payload_bytes_of(header: bytes | memoryview) -> int:
    """The payload length a (length-checked) header announces."""
    return int(_FIXED.unpack_from(header)[3])


@dataclass(slots=True)
class TierCounters:
    """What one tier did; written by tier threads under the cascade's lock, read for /status and /metrics."""

    hits: int = 0  # objects read into L1
    misses: int = 0  # objects asked for and not there
    bytes_in: int = 0  # bytes written to the tier
    bytes_out: int = 0  # bytes read from the tier
    writes: int = 0  # objects written
    skipped_present: int = 0  # writes not done: the tier holds the object already
    dropped_writes: int = 0  # writes dropped: the write queue was full or the tier down
    errors: int = 0  # calls that failed (I/O, connection, timeout)
    corrupt: int = 0  # corrupt, truncated or foreign objects dropped
    timeouts: int = 0  # reads that missed a lookup's deadline


class Adapter(abc.ABC):
    """One L2 tier. Thread-safe: the cascade calls it from several tier threads at once.

    ``kind`` is the adapter type of its configuration ("fs", "resp", "valkey"); ``describe()`` says
    where it stores, without secrets.
    """

    kind: str = ""
    remote: bool = False  # holds() cannot answer: ``contains`` makes a round trip

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the tier stores, e.g. ``fs /var/cache/lmcd (10.0 GiB)``, ``resp 10.0.0.5:6379``; no secrets."""

    def start(self) -> None:  # noqa: B027  (optional hook)
        """Get ready to serve (rebuild an index, connect), logging progress; called once, off the loop."""

    def holds(self, name: str) -> bool | None:
        """Whether the tier holds ``name`` by its in-memory index; None if it cannot know without a round
        trip (remote tiers). Cheap, thread-safe; may be called on the loop thread."""
        return None

    @abc.abstractmethod
    def contains(self, names: list[str]) -> list[bool]:
        """Which of ``names`` the tier holds now: in memory, or one pipelined round trip (with a timeout)."""

    @abc.abstractmethod
    def write(self, name: str, header: bytes, payload: memoryview) -> bool:
        """Store object ``name`` (``header`` then ``payload``), atomically: a reader sees the whole object
        or none. Returns False (and writes nothing) when the tier holds ``name`` already."""

    @abc.abstractmethod
    def read_into(self, name: str, dest: memoryview) -> bytes:
        """Read object ``name``: its payload into ``dest`` (exactly ``len(dest)`` bytes), its header
        returned. MissingObject if not there; CorruptObject if its header is no header or announces a
        payload of another length than ``len(dest)`` (the caller then ``verify``-ies the rest)."""

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Drop object ``name`` (a corrupt one); no error if it is not there."""

    @abc.abstractmethod
    def usage(self) -> dict[str, int | float | bool | None]:
        """For /status and /metrics: ``capacity_bytes`` (None: unbounded or unknown), ``used_bytes``,
        ``objects`` (None: unknown), ``available`` (False while the tier is down), plus anything of the
        adapter's own."""

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Release files and connections; called once at shutdown after the write queue was flushed."""
