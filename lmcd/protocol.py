"""The lmcd wire protocol: every message that crosses between a client and the server.

Transport: one ZMQ ROUTER socket on the server (``tcp://host:port`` or ``ipc://path``), one
DEALER socket per client session. Every message is ONE frame holding one msgpack-encoded
``Request`` (client -> server) or ``Reply`` (server -> client). Every request gets exactly one
reply carrying the same ``rid``; failures are ``Error`` replies, never silence.

Evolution rules (read before you edit):
  1. ``PROTOCOL_VERSION`` changes only when an old peer would misread a new message.
  2. Every message is ``array_like``: fields are positional. New fields go at the END and
     carry a default, so an older peer's shorter array still decodes.
  3. No field is ever retyped, reordered or removed; retire a field by ignoring it.
  4. Tags are stable strings; a new operation is a new Struct with a new tag.
  5. The first request of a session is ``Hello``; anything else before it gets
     ``Error(ErrorCode.NOT_HELLO)``.

Why array_like everywhere: lookup/store/retrieve and their replies are on the hot path of
every inference step (array encoding is smaller and faster than maps), and msgspec needs
every Struct of one tagged union to share one encoding, so the cold messages follow.
``gc=False`` is set on the hot messages: they hold only bytes/ints/lists of them, never cycles.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

PROTOCOL_VERSION = 1
HASH_ALGORITHM = "blake2b-256-chain-u32le"
HASH_BYTES = 32

# Bounds that make a hostile or broken frame fail to decode instead of costing memory.
MAX_FRAME_BYTES = 64 * 1024 * 1024
MAX_CHUNKS_PER_REQUEST = 65536
MAX_BLOCKS_PER_REQUEST = 1 << 20
MAX_SEGMENTS = 4096
MAX_LAYERS = 4096
MAX_TEXT = 4096

ChunkHashWire = Annotated[bytes, msgspec.Meta(min_length=HASH_BYTES, max_length=HASH_BYTES)]
HashList = Annotated[list[ChunkHashWire], msgspec.Meta(max_length=MAX_CHUNKS_PER_REQUEST)]
BlockIdList = Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(max_length=MAX_BLOCKS_PER_REQUEST)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
IPC_HANDLE_BYTES = 64  # cudaIpcMemHandle_t and cudaIpcEventHandle_t
IpcHandle = Annotated[bytes, msgspec.Meta(min_length=IPC_HANDLE_BYTES, max_length=IPC_HANDLE_BYTES)]
NonNeg = Annotated[int, msgspec.Meta(ge=0)]
Positive = Annotated[int, msgspec.Meta(gt=0)]


class ErrorCode(enum.IntEnum):
    BAD_FRAME = 1  # not one decodable frame
    BAD_REQUEST = 2  # decodable, but values are invalid
    NOT_HELLO = 3  # an operation before Hello
    VERSION_MISMATCH = 4
    AUTH_FAILED = 5
    UNKNOWN_WORKER = 6
    UNKNOWN_LEASE = 7
    BLOCK_OUT_OF_RANGE = 8
    SEGMENT_ERROR = 9  # a worker's SHM segment cannot be mapped or is too small
    LAYOUT_MISMATCH = 10  # chunk bytes differ from what the namespace already holds
    SHUTTING_DOWN = 11
    INTERNAL = 12


class Role(enum.IntEnum):
    CLIENT = 0  # tools, tests, bench
    SCHEDULER = 1  # vLLM scheduler: lookups for every rank
    WORKER = 2  # one vLLM rank: registers KV memory, stores, retrieves


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
    """Where a worker's KV pages live inside its SHM segments.

    Page (layer l, block b) is ``page_bytes`` contiguous bytes at
    ``segments[layer_segments[l]] + layer_offsets[l] + b * block_stride``::

        segment k:  |<- layer_offsets[l] ->|page b=0|...|page b=1|...   (block_stride apart)
    """

    num_layers: Positive
    num_blocks: Positive
    block_size: Positive  # tokens per block
    page_bytes: Positive
    block_stride: Positive
    layer_offsets: Annotated[list[NonNeg], msgspec.Meta(max_length=MAX_LAYERS)]
    layer_segments: Annotated[list[NonNeg], msgspec.Meta(max_length=MAX_LAYERS)]


# ---------------------------------------------------------------- requests


class Hello(msgspec.Struct, array_like=True, tag="hello"):
    rid: int
    version: int
    role: Role
    namespace: Namespace
    auth_token: Text | None = None
    client_name: Text = ""
    pid: int = 0


class Ping(msgspec.Struct, array_like=True, tag="ping"):
    rid: int


class RegisterWorker(msgspec.Struct, array_like=True, tag="register"):
    """Share a worker's KV memory once.

    ``device`` "cpu": ``segment_names`` are POSIX SHM segments the server maps (see
    ``lmcd.server.workers`` for who unlinks them when). A CPU worker that copies itself through
    the server's shared pool (lmcache_driven) sends no names: its KV stays in its own memory,
    the server never maps it, and ``segment_sizes`` only bound the layout's offsets.
    ``device`` "cuda": ``ipc_handles`` holds one CUDA IPC memory handle per segment (a
    segment is one allocation holding KV pages; ``segment_names`` stays empty),
    ``device_pci`` names the worker's GPU by PCI address ("dddd:bb:dd"), and
    ``event_handle`` is the worker's interprocess event: the server's stream waits on it
    before every copy for this worker.
    """

    rid: int
    layout: KVLayout
    segment_names: Annotated[list[Text], msgspec.Meta(max_length=MAX_SEGMENTS)]
    segment_sizes: Annotated[list[NonNeg], msgspec.Meta(min_length=1, max_length=MAX_SEGMENTS)]
    device: Text = "cpu"
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
    chunk_hashes: HashList
    lease: bool = True
    slots: bool = False


class Store(msgspec.Struct, array_like=True, gc=False, tag="store"):
    """Copy blocks into the pool. ``block_ids`` holds chunk_size/block_size ids per chunk."""

    rid: int
    worker_id: int
    chunk_hashes: HashList
    block_ids: BlockIdList


class Retrieve(msgspec.Struct, array_like=True, gc=False, tag="retrieve"):
    """Copy cached chunks into blocks; consumes this rank's part of ``lease_id`` if given."""

    rid: int
    worker_id: int
    chunk_hashes: HashList
    block_ids: BlockIdList
    lease_id: int | None = None
    skip_blocks: NonNeg = 0  # leading blocks of the first chunk not to write (the engine has them)


class Release(msgspec.Struct, array_like=True, gc=False, tag="release"):
    """End a lease (``rank`` None), or only rank ``rank``'s part of it: that worker copied its chunks."""

    rid: int
    lease_id: int
    rank: NonNeg | None = None
    copy_seconds: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # a worker's copy of its part took this long


class Reserve(msgspec.Struct, array_like=True, gc=False, tag="reserve"):
    """lmcache_driven store, step 1: allocate slots the worker fills itself (in the shared pool)."""

    rid: int
    worker_id: int
    chunk_hashes: HashList


class Commit(msgspec.Struct, array_like=True, gc=False, tag="commit"):
    """lmcache_driven store, step 2: the reserved chunks are written (ok) or abandoned.

    ``slot_offsets`` non-empty: the chunks were written into these GRANTED slots (one per hash),
    no Reserve came first; each becomes the chunk's slot, or goes back to the pool if the chunk
    is already cached. ``want_slots``: grant this many fresh slots in the reply.
    """

    rid: int
    worker_id: int
    chunk_hashes: HashList
    ok: bool = True
    slot_offsets: Annotated[list[NonNeg], msgspec.Meta(max_length=MAX_CHUNKS_PER_REQUEST)] = []
    want_slots: NonNeg = 0
    copy_seconds: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # how long the worker's copy took (for the log)


class Grant(msgspec.Struct, array_like=True, gc=False, tag="grant"):
    """lmcache_driven: hand this worker free slots it fills before it names the chunks (Commit
    with ``slot_offsets``), so a store needs no request before its copy. Granted slots belong to
    the worker until committed, or until it unregisters or disconnects."""

    rid: int
    worker_id: int
    num_slots: NonNeg


class Pin(msgspec.Struct, array_like=True, gc=False, tag="pin"):
    """lmcache_driven retrieve: pin the leading cached chunks and say where they are; the worker
    copies them out of the shared pool, then sends ``Release(pin_id)``."""

    rid: int
    worker_id: int
    chunk_hashes: HashList
    lease_id: int | None = None


class Clear(msgspec.Struct, array_like=True, tag="clear"):
    rid: int


class GetStatus(msgspec.Struct, array_like=True, tag="status"):
    rid: int


Request = (
    Hello | Ping | RegisterWorker | UnregisterWorker | Lookup | Store | Retrieve | Release | Clear | GetStatus
    | Reserve | Commit | Pin | Grant
)

# ---------------------------------------------------------------- replies


class Error(msgspec.Struct, array_like=True, tag="error"):
    rid: int
    code: ErrorCode
    message: str


class HelloReply(msgspec.Struct, array_like=True, tag="hello_ok"):
    rid: int
    server_version: str
    protocol_version: int
    chunk_size: int
    hash_algorithm: str
    capabilities: list[str]
    session_id: int
    pool_segment: str = ""  # the shared pool's SHM name (server --share-pool), else ""
    lease_ttl_s: float = 0.0  # how long a lookup's pins live (server --lease-timeout)


class Pong(msgspec.Struct, array_like=True, tag="pong"):
    rid: int


class Registered(msgspec.Struct, array_like=True, tag="registered"):
    """``event_handle`` (CUDA workers): the server's interprocess event, recorded after every copy
    for this worker and before its reply."""

    rid: int
    worker_id: int
    chunk_bytes: int
    event_handle: bytes = b""


class Unregistered(msgspec.Struct, array_like=True, tag="unregistered"):
    rid: int


class LookupReply(msgspec.Struct, array_like=True, gc=False, tag="lookup_ok"):
    """``slot_offsets`` (Lookup ``slots``): per rank of the session's namespace (every rank for a
    scheduler), the pool offsets of the pinned chunks, valid while the lease lives."""

    rid: int
    num_hit_chunks: int
    lease_id: int | None
    slot_offsets: list[list[int]] = []


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


class Cleared(msgspec.Struct, array_like=True, tag="cleared"):
    rid: int
    num_chunks: int


class Reserved(msgspec.Struct, array_like=True, gc=False, tag="reserved"):
    """Per chunk: a status, and for STORED chunks the slot's byte offset in the shared pool (else -1)."""

    rid: int
    statuses: list[ChunkStatus]
    slot_offsets: list[int]
    message: str = ""


class Committed(msgspec.Struct, array_like=True, gc=False, tag="committed"):
    """``num_chunks`` chunks became readable. For a commit of granted slots: ``statuses`` per
    chunk (STORED, or PRESENT: already cached, the slot went back to the pool), and
    ``granted`` the fresh slots asked for with ``want_slots``."""

    rid: int
    num_chunks: int
    statuses: list[ChunkStatus] = []
    granted: list[int] = []


class Granted(msgspec.Struct, array_like=True, gc=False, tag="granted"):
    """The granted slots' pool offsets (fewer than asked when the pool is full of pinned chunks)."""

    rid: int
    slot_offsets: list[int]


class Pinned(msgspec.Struct, array_like=True, gc=False, tag="pinned"):
    """Offsets of the leading cached chunks, pinned until ``Release(pin_id)`` (or a disconnect)."""

    rid: int
    slot_offsets: list[int]
    pin_id: int | None


class StatusReply(msgspec.Struct, array_like=True, tag="status_ok"):
    rid: int
    status: dict[str, object]


Reply = (
    Error | HelloReply | Pong | Registered | Unregistered | LookupReply | StoreReply | RetrieveReply | Released
    | Cleared | StatusReply | Reserved | Committed | Pinned | Granted
)

encoder = msgspec.msgpack.Encoder()
request_decoder: msgspec.msgpack.Decoder[Request] = msgspec.msgpack.Decoder(Request)
reply_decoder: msgspec.msgpack.Decoder[Reply] = msgspec.msgpack.Decoder(Reply)


def peek_rid(frame: bytes) -> int:
    """Best-effort request id of an undecodable frame, so its Error reply can be matched (else 0)."""
    try:
        raw = msgspec.msgpack.decode(frame)
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError):  # deep nesting: RecursionError
        return 0
    if isinstance(raw, list) and len(raw) > 1 and isinstance(raw[1], int) and not isinstance(raw[1], bool):
        return raw[1]
    return 0
