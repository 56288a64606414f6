"""The lmcd wire protocol: every message that crosses between a client and the server.

Transport: one ZMQ ROUTER socket on the server (``tcp://host:port`` or ``ipc://path``), one
DEALER socket per client session. Every message is ONE frame holding one msgpack-encoded
``Request`` (client -> server) or ``Reply`` (server -> client). Every request gets exactly one
reply carrying the same ``rid``; failures are ``Error`` replies, never silence.

Evolution rules (read before you edit):
  1. ``PROTOCOL_VERSION`` changes only when an old peer would misread a new message. Version 2
     replaced version 1's Reserve/Commit-by-hash and its two-in-one Commit and Release. Version 3:
     a worker's memory crosses as file descriptors over the handoff socket, never by name
     (``segment_names`` is retired), and leases are random ids bound to an instance.
  2. Every message is ``array_like``: fields are positional. New fields go at the END and
     carry a default, so an older peer's shorter array still decodes.
  3. No field is ever retyped, reordered or removed; retire a field by ignoring it.
  4. Tags are stable strings; a new operation is a new Struct with a new tag. One Struct per
     operation and per reply: an operation is never chosen by which fields are empty.
  5. The first request of a session is ``Hello``; anything else before it gets
     ``Error(ErrorCode.NOT_HELLO)``. ``Hello`` and ``Error`` keep their shape across versions, so
     a peer of another version is always told ``VERSION_MISMATCH`` in words it can decode.

Why array_like everywhere: lookup/store/retrieve and their replies are on the hot path of
every inference step (array encoding is smaller and faster than maps), and msgspec needs
every Struct of one tagged union to share one encoding, so the cold messages follow.
``gc=False`` is set on the hot messages: they hold only bytes/ints/lists of them, never cycles.

Words (README glossary): a *chunk key* is the 32-byte hash chain of a chunk; a *slot* is a
byte offset in the server's pool; a *plane* is one page array of the KV (a layer, or the K or
V half of one); a *lease* holds the pins of a lookup, or of a worker's ``Pin``.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

PROTOCOL_VERSION = 3
HASH_ALGORITHM = "blake2b-256-chain-u32le"
HASH_BYTES = 32

# Bounds that make a hostile or broken frame fail to decode instead of costing memory.
MAX_FRAME_BYTES = 64 * 1024 * 1024
# Before Hello a peer is unauthenticated: a bigger frame is refused unread (a Hello takes < 20 KiB).
MAX_FRAME_BYTES_BEFORE_HELLO = 64 * 1024
MAX_CHUNKS_PER_REQUEST = 65536
MAX_BLOCKS_PER_REQUEST = 1 << 20
MAX_SEGMENTS = 4096
MAX_PLANES = 8192
MAX_TEXT = 4096

ChunkKeyWire = Annotated[bytes, msgspec.Meta(min_length=HASH_BYTES, max_length=HASH_BYTES)]
KeyList = Annotated[list[ChunkKeyWire], msgspec.Meta(max_length=MAX_CHUNKS_PER_REQUEST)]
NonNeg = Annotated[int, msgspec.Meta(ge=0)]
Positive = Annotated[int, msgspec.Meta(gt=0)]
BlockIdList = Annotated[list[NonNeg], msgspec.Meta(max_length=MAX_BLOCKS_PER_REQUEST)]
SlotList = Annotated[list[NonNeg], msgspec.Meta(max_length=MAX_CHUNKS_PER_REQUEST)]
Seconds = Annotated[float, msgspec.Meta(ge=0)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
IPC_HANDLE_BYTES = 64  # cudaIpcMemHandle_t and cudaIpcEventHandle_t
IpcHandle = Annotated[bytes, msgspec.Meta(min_length=IPC_HANDLE_BYTES, max_length=IPC_HANDLE_BYTES)]


class ErrorCode(enum.IntEnum):
    BAD_FRAME = 1  # not one decodable frame
    BAD_REQUEST = 2  # decodable, but values are invalid
    NOT_HELLO = 3  # an operation before Hello
    VERSION_MISMATCH = 4
    AUTH_FAILED = 5
    UNKNOWN_WORKER = 6
    UNKNOWN_LEASE = 7
    BLOCK_OUT_OF_RANGE = 8
    SEGMENT_ERROR = 9  # a worker's memory cannot be mapped, or is not what the layout says
    LAYOUT_MISMATCH = 10  # chunk bytes differ from what the namespace already holds
    INTERNAL = 12
    LIMIT = 13  # a per-session or per-server limit was reached (the message names it and how to raise it)


class Role(enum.IntEnum):
    CLIENT = 0  # tools, tests, bench
    SCHEDULER = 1  # vLLM scheduler: lookups for every rank
    WORKER = 2  # one vLLM rank: registers KV memory, stores, retrieves


class Device(enum.IntEnum):
    CPU = 0
    CUDA = 1


class Copier(enum.IntEnum):
    """Who copies a worker's chunks, decided by the worker at registration.

    SERVER: the server copies between the worker's KV and the pool (``Store``, ``Retrieve``); the
    worker shares its KV memory (CPU: POSIX SHM segments; CUDA: IPC handles). LMCache's name for
    it is ``engine_driven``. WORKER: the worker copies between its KV and the server's shared pool
    itself (``Grant``, ``Commit``, ``Pin``, ``Loaded``) and shares no KV memory (``lmcache_driven``).
    """

    SERVER = 0
    WORKER = 1


class ChunkStatus(enum.IntEnum):
    """Outcome of one chunk of a store."""

    STORED = 0
    PRESENT = 1  # already cached (or being stored by someone else): nothing copied
    REFUSED_FULL = 2  # no free slot and nothing evictable (every chunk pinned)
    REFUSED_TOO_LARGE = 3  # chunk bytes exceed the pool's slab size
    FAILED = 4  # the copy failed (message in the reply)


class Namespace(msgspec.Struct, array_like=True, frozen=True):
    """Everything that changes the bytes of a chunk. Chunks of two namespaces never mix.

    ``rank`` is None for a scheduler session, which looks up on behalf of every rank.
    """

    model: Text
    kv_dtype: Text
    geometry: Text  # the engine's page geometry, e.g. "L12.H8.N128.C128.LBHNC"
    world_size: Positive = 1
    rank: NonNeg | None = None


class KVLayout(msgspec.Struct, array_like=True, frozen=True):
    """Where a worker's KV pages live inside its memory segments.

    A *plane* is one array of pages: a layer's tensor, or each K/V half of it in a ``[2, blocks,
    ...]`` layout, so ``num_layers <= len(plane_offsets)``. Page (plane p, block b) is
    ``page_bytes`` contiguous bytes at ``segment[plane_segments[p]] + plane_offsets[p] + b *
    block_stride``::

        segment k:  |<- plane_offsets[p] ->|page b=0|...|page b=1|...   (block_stride apart)
    """

    num_layers: Positive
    num_blocks: Positive
    block_size: Positive  # tokens per block
    page_bytes: Positive
    block_stride: Positive
    plane_offsets: Annotated[list[NonNeg], msgspec.Meta(min_length=1, max_length=MAX_PLANES)]
    plane_segments: Annotated[list[NonNeg], msgspec.Meta(min_length=1, max_length=MAX_PLANES)]

    @property
    def num_planes(self) -> int:
        return len(self.plane_offsets)


# ---------------------------------------------------------------- requests


class Hello(msgspec.Struct, array_like=True, tag="hello"):
    """``instance_id``: the inference instance this session belongs to (vLLM's engine id), the
    same for its scheduler and all its workers: they share the instance's leases. Empty: the
    session's leases are its own."""

    rid: int
    version: int
    role: Role
    namespace: Namespace
    auth_token: Text | None = None
    client_name: Text = ""
    pid: int = 0
    instance_id: Text = ""


class Ping(msgspec.Struct, array_like=True, tag="ping"):
    rid: int


class RegisterWorker(msgspec.Struct, array_like=True, tag="register"):
    """Register one worker's KV memory, once per session, with who copies (``copier``) named.

    ``segment_sizes``: bytes of each memory segment the layout's offsets count from (an SHM
    segment, a CUDA allocation, or, for a worker that copies itself, a KV tensor's storage).
    CPU + SERVER: the segments are sealed memfds the worker handed over (one file descriptor per
    segment size, in order) through the handoff socket before this request; ``segment_names`` is
    retired (version 3) and must be empty: the server never opens a worker's memory by name. CUDA + SERVER:
    ``ipc_handles`` holds one CUDA IPC memory handle per segment, ``device_pci`` names the
    worker's GPU by PCI address ("dddd:bb:dd") and ``event_handle`` is the worker's interprocess
    event, which the server's copy waits on. WORKER: no names or handles (the server maps none
    of the worker's memory) and the server must share its pool.
    """

    rid: int
    layout: KVLayout
    device: Device
    copier: Copier
    segment_sizes: Annotated[list[Positive], msgspec.Meta(min_length=1, max_length=MAX_SEGMENTS)]
    segment_names: Annotated[list[Text], msgspec.Meta(max_length=MAX_SEGMENTS)] = []
    ipc_handles: Annotated[list[IpcHandle], msgspec.Meta(max_length=MAX_SEGMENTS)] = []
    device_pci: Text = ""
    event_handle: Annotated[bytes, msgspec.Meta(max_length=IPC_HANDLE_BYTES)] = b""


class UnregisterWorker(msgspec.Struct, array_like=True, tag="unregister"):
    rid: int
    worker_id: int


class Lookup(msgspec.Struct, array_like=True, gc=False, tag="lookup"):
    """How many leading chunks are cached for every rank; pins them under a lease if asked.

    ``slots`` (a shared pool only, with a lease): the reply also says where every rank's pinned
    chunks are, so workers that copy themselves read them with no request of their own.
    """

    rid: int
    chunk_keys: KeyList
    lease: bool = True
    slots: bool = False


class Store(msgspec.Struct, array_like=True, gc=False, tag="store"):
    """Server copies: copy blocks into the pool. ``block_ids`` holds blocks-per-chunk ids per chunk."""

    rid: int
    worker_id: int
    chunk_keys: KeyList
    block_ids: BlockIdList


class Retrieve(msgspec.Struct, array_like=True, gc=False, tag="retrieve"):
    """Server copies: copy cached chunks into blocks; takes this rank's part of ``lease_id`` if given."""

    rid: int
    worker_id: int
    chunk_keys: KeyList
    block_ids: BlockIdList
    lease_id: int | None = None
    skip_blocks: NonNeg = 0  # leading blocks of the first chunk not to write (the engine has them)


class Release(msgspec.Struct, array_like=True, gc=False, tag="release"):
    """End a lease nobody will load from (every rank's part): its chunks are unpinned."""

    rid: int
    lease_id: int


class Grant(msgspec.Struct, array_like=True, gc=False, tag="grant"):
    """Worker copies: hand this worker free slots to fill before it names the chunks (``Commit``),
    so that a store needs no request before its copy. Granted slots belong to the session until
    committed, or until the worker unregisters or disconnects."""

    rid: int
    worker_id: int
    num_slots: NonNeg


class Commit(msgspec.Struct, array_like=True, gc=False, tag="commit"):
    """Worker copies: one store ended. Its chunks were written into these granted ``slots`` (one
    per key, in order); each slot becomes its chunk's, or goes back to the pool if the chunk is
    cached already. ``want_slots``: grant this many fresh slots in the reply. ``copy_seconds``: how
    long the copy took, timed by the worker as the server times its own (the log line)."""

    rid: int
    worker_id: int
    chunk_keys: KeyList
    slots: SlotList
    want_slots: NonNeg = 0
    copy_seconds: Seconds = 0.0


class Pin(msgspec.Struct, array_like=True, gc=False, tag="pin"):
    """Worker copies, a load with no slots from a lookup: pin the leading cached chunks (taking this
    rank's part of ``lease_id`` if given) under a new lease and say where they are."""

    rid: int
    worker_id: int
    chunk_keys: KeyList
    lease_id: int | None = None


class Loaded(msgspec.Struct, array_like=True, gc=False, tag="loaded"):
    """Worker copies: this worker copied ``chunk_keys`` of ``lease_id`` (a lookup's or a Pin's) out of
    the pool in ``copy_seconds``, leaving out the first ``skip_blocks`` blocks of the first; its
    rank's part of the lease ends (chunks of it not named are unpinned, not counted)."""

    rid: int
    worker_id: int
    lease_id: int
    chunk_keys: KeyList
    skip_blocks: NonNeg = 0
    copy_seconds: Seconds = 0.0


class Clear(msgspec.Struct, array_like=True, tag="clear"):
    rid: int


class GetStatus(msgspec.Struct, array_like=True, tag="status"):
    rid: int


Request = (
    Hello | Ping | RegisterWorker | UnregisterWorker | Lookup | Store | Retrieve | Release | Grant | Commit | Pin
    | Loaded | Clear | GetStatus
)

# ---------------------------------------------------------------- replies


class Error(msgspec.Struct, array_like=True, tag="error"):
    rid: int
    code: ErrorCode
    message: str


class HelloReply(msgspec.Struct, array_like=True, tag="hello_ok"):
    """``pool_segment``: the shared pool's name (server ``--share-pool``), else "";
    ``lease_ttl_s``: how long a lookup's pins (and a worker's granted slots) live
    (``--lease-timeout``). ``handoff_path`` and ``handoff_nonce``: the server's Unix socket over
    which this session hands its memory over as file descriptors (and receives the shared
    pool's), and the one-time secret that ties that connection to this session."""

    rid: int
    server_version: str
    protocol_version: int
    chunk_size: int
    hash_algorithm: str
    capabilities: list[str]
    session_id: int
    pool_segment: str
    lease_ttl_s: float
    handoff_path: str = ""
    handoff_nonce: bytes = b""


class Pong(msgspec.Struct, array_like=True, tag="pong"):
    rid: int


class Registered(msgspec.Struct, array_like=True, tag="registered"):
    """``blocks_per_chunk`` engine blocks make one chunk of ``chunk_bytes``; ``event_handle``
    (CUDA, server copies): the server's interprocess event, recorded after every copy for this
    worker and before its reply."""

    rid: int
    worker_id: int
    chunk_bytes: int
    blocks_per_chunk: int
    event_handle: bytes = b""


class Unregistered(msgspec.Struct, array_like=True, tag="unregistered"):
    rid: int


class LookupReply(msgspec.Struct, array_like=True, gc=False, tag="lookup_ok"):
    """``slots`` (Lookup ``slots``): per rank of the session's namespace (every rank for a
    scheduler), the slots of the pinned chunks, valid while the lease lives."""

    rid: int
    num_hit_chunks: int
    lease_id: int | None
    slots: list[list[int]] = []


class StoreReply(msgspec.Struct, array_like=True, gc=False, tag="store_ok"):
    rid: int
    statuses: list[ChunkStatus]  # one per requested chunk, in order
    message: str = ""  # why any chunk was refused or failed


class RetrieveReply(msgspec.Struct, array_like=True, gc=False, tag="retrieve_ok"):
    """``num_retrieved_chunks`` leading chunks were copied; the rest were not cached."""

    rid: int
    num_retrieved_chunks: int


class Released(msgspec.Struct, array_like=True, gc=False, tag="released"):
    rid: int
    num_unpinned: int


class Granted(msgspec.Struct, array_like=True, gc=False, tag="granted"):
    """The granted slots (fewer than asked when the pool is full of pinned chunks)."""

    rid: int
    slots: list[int]


class Committed(msgspec.Struct, array_like=True, gc=False, tag="committed"):
    """Per chunk STORED, or PRESENT (cached already: its slot went back to the pool); ``granted``:
    the fresh slots asked for with ``want_slots``."""

    rid: int
    statuses: list[ChunkStatus]
    granted: list[int]


class Pinned(msgspec.Struct, array_like=True, gc=False, tag="pinned"):
    """Slots of the leading cached chunks, pinned under ``lease_id`` until ``Loaded`` (or a
    disconnect); no lease when none was cached."""

    rid: int
    slots: list[int]
    lease_id: int | None


class Cleared(msgspec.Struct, array_like=True, tag="cleared"):
    rid: int
    num_chunks: int


class StatusReply(msgspec.Struct, array_like=True, tag="status_ok"):
    rid: int
    status: dict[str, object]


Reply = (
    Error | HelloReply | Pong | Registered | Unregistered | LookupReply | StoreReply | RetrieveReply | Released
    | Granted | Committed | Pinned | Cleared | StatusReply
)

encoder = msgspec.msgpack.Encoder()
request_decoder: msgspec.msgpack.Decoder[Request] = msgspec.msgpack.Decoder(Request)
reply_decoder: msgspec.msgpack.Decoder[Reply] = msgspec.msgpack.Decoder(Reply)


def peek_rid(frame: bytes | memoryview) -> int:
    """Request id of an undecodable frame, so its Error reply can be matched (else 0).

    Read from the msgpack header alone: an array of two or more items whose first is a string (the
    tag) and whose second is an integer (the rid). Nothing after the rid is parsed, so a frame of
    millions of items or of deep nesting costs no memory and no time; a frame cut short or with
    trailing bytes still names its rid."""
    view = memoryview(frame).cast("B")
    head = bytes(view[:5])
    if not head:
        return 0
    if 0x92 <= head[0] <= 0x9F:  # fixarray of 2..15
        pos = 1
    elif head[0] == 0xDC and len(head) >= 3 and int.from_bytes(head[1:3], "big") >= 2:
        pos = 3
    elif head[0] == 0xDD and len(head) >= 5 and int.from_bytes(head[1:5], "big") >= 2:
        pos = 5
    else:
        return 0
    tag = bytes(view[pos : pos + 5])
    if not tag:
        return 0
    if 0xA0 <= tag[0] <= 0xBF:  # fixstr
        pos += 1 + (tag[0] & 0x1F)
    elif tag[0] in _STR_LENGTH_BYTES and len(tag) > _STR_LENGTH_BYTES[tag[0]]:
        n = _STR_LENGTH_BYTES[tag[0]]
        pos += 1 + n + int.from_bytes(tag[1 : 1 + n], "big")
    else:
        return 0
    rid = bytes(view[pos : pos + 9])
    if not rid:
        return 0
    first = rid[0]
    if first <= 0x7F:  # positive fixint
        return first
    if first >= 0xE0:  # negative fixint
        return first - 0x100
    size, signed = _INT_FORMATS.get(first, (0, False))
    if not size or len(rid) < 1 + size:
        return 0
    return int.from_bytes(rid[1 : 1 + size], "big", signed=signed)


_STR_LENGTH_BYTES = {0xD9: 1, 0xDA: 2, 0xDB: 4}  # str 8/16/32: bytes of the length
_INT_FORMATS = {0xCC: (1, False), 0xCD: (2, False), 0xCE: (4, False), 0xCF: (8, False),
                0xD0: (1, True), 0xD1: (2, True), 0xD2: (4, True), 0xD3: (8, True)}
