"""Hostile and broken input: the request loop never dies, every frame is answered and counted.

Raw ``zmq.DEALER`` sockets send what no well-behaved client would: garbage bytes, truncated
and over-long messages, wrong types, unknown tags, multi-frame messages, huge lists, deep
nesting. Every frame must get exactly one ``Error`` reply (``BAD_FRAME`` when it does not
decode, carrying the request id whenever ``peek_rid`` can read it), the counters and the
Prometheus metrics must add up, and the same server must keep serving real work.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import typing
from collections import Counter
from collections.abc import Iterator

import httpx
import msgspec
import numpy as np
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from lmcd import protocol as p
from lmcd.connector.client import CacheClient, ServerError, ServerTimeout, hand_over
from lmcd.connector.keys import chunk_keys
from lmcd.connector.shm import CpuKVCache
from tests.conftest import RunningServer, connect, fill_random, namespace

BAD = p.ErrorCode.BAD_FRAME
CPU, SERVER = p.Device.CPU, p.Copier.SERVER
REPLY_TIMEOUT_MS = 10_000
HASH = b"\x11" * p.HASH_BYTES

# ---------------------------------------------------------------- helpers


class Raw:
    """A bare DEALER session: send anything, read replies with a deadline."""

    def __init__(self, url: str) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)

    def send(self, payload: bytes | list[bytes]) -> None:
        if isinstance(payload, list):
            self.sock.send_multipart(payload)
        else:
            self.sock.send(payload)

    def send_msg(self, msg: object) -> None:
        self.sock.send(p.encoder.encode(msg))

    def recv(self, timeout_ms: int = REPLY_TIMEOUT_MS) -> p.Reply:
        assert self.sock.poll(timeout_ms, zmq.POLLIN), f"no reply within {timeout_ms} ms"
        frames = self.sock.recv_multipart()
        assert len(frames) == 1, f"a reply must be one frame, got {len(frames)}"
        return p.reply_decoder.decode(frames[0])

    def call(self, msg: object) -> p.Reply:
        self.send_msg(msg)
        reply = self.recv()
        assert reply.rid == msg.rid  # type: ignore[attr-defined]
        return reply

    def expect_error(self, msg: object, code: p.ErrorCode) -> p.Error:
        reply = self.call(msg)
        assert isinstance(reply, p.Error), f"expected {code.name}, got {reply!r}"
        assert reply.code == code, f"expected {code.name}, got {reply.code.name}: {reply.message}"
        return reply

    def nothing_more(self, timeout_ms: int = 500) -> bool:
        return not self.sock.poll(timeout_ms, zmq.POLLIN)

    def close(self) -> None:
        self.sock.close(0)


@pytest.fixture
def raw_factory() -> Iterator:
    made: list[Raw] = []

    def make(url: str) -> Raw:
        made.append(Raw(url))
        return made[-1]

    yield make
    for r in made:
        r.close()


def hello(rid: int, ns: p.Namespace | None = None, *, version: int = p.PROTOCOL_VERSION,
          role: p.Role = p.Role.WORKER, token: str | None = None) -> p.Hello:
    return p.Hello(rid, version, role, ns or namespace(), token, "robustness", os.getpid())


def metric_samples(server: RunningServer, token: str | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]],
                                                                           float]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(f"{server.http_url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    text = response.text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def error_metric(samples: dict, code: str) -> float:
    return samples.get(("lmcd_request_errors_total", (("code", code),)), 0.0)


def assert_server_healthy(server: RunningServer) -> None:
    assert server.proc.poll() is None, f"server died:\n{server.log()}"
    assert "Traceback" not in server.log(), server.log()


def roundtrip_end_to_end(server: RunningServer) -> None:
    """Hello, register real SHM KV memory, store, lookup, retrieve: exact bytes."""
    kv = CpuKVCache(num_layers=2, num_blocks=8, block_size=128, num_kv_heads=1, head_size=16)
    try:
        fill_random(kv, 7)
        ns = namespace(geometry=kv.geometry)
        with connect(server.url, ns) as client:
            info = kv.register(client)
            hashes = chunk_keys(list(range(2 * client.chunk_size)), client.chunk_size)
            assert client.store(info.worker_id, hashes, [0, 1, 2, 3]).statuses == [p.ChunkStatus.STORED] * 2
            hit = client.lookup(hashes)
            assert hit.num_hit_chunks == 2 and hit.lease_id is not None
            assert client.retrieve(info.worker_id, hashes, [7, 6, 5, 4], lease_id=hit.lease_id) == 2
            for layer in range(2):
                pages = kv.pages(layer)
                assert np.array_equal(pages[[0, 1, 2, 3]], pages[[7, 6, 5, 4]])
    finally:
        kv.close()


def enc(obj: object) -> bytes:
    return msgspec.msgpack.encode(obj)


# ---------------------------------------------------------------- the barrage


def hostile_frames(rng: np.random.Generator) -> Iterator[tuple[bytes | list[bytes], int | None]]:
    """(payload, expected rid) for frames that must not decode; rid None: whatever peek_rid reads."""
    ns = namespace()
    valid = [
        p.encoder.encode(hello(11, ns)),
        p.encoder.encode(p.Lookup(12, [HASH, HASH], True)),
        p.encoder.encode(p.Store(13, 1, [HASH], [0, 1])),
        p.encoder.encode(p.Retrieve(14, 1, [HASH], [0, 1], 5)),
        p.encoder.encode(p.RegisterWorker(15, p.KVLayout(1, 4, 128, 64, 64, [0], [0]), p.Device.CPU, p.Copier.SERVER,
                                          [256], ["/lmcache_kv_x"])),
        p.encoder.encode(p.Commit(16, 1, [HASH], [4096], 2, 0.5)),
        p.encoder.encode(p.Loaded(17, 1, 3, [HASH], 1, 0.25)),
    ]
    # fixed oddities, rid known exactly
    fixed: list[tuple[bytes | list[bytes], int | None]] = [
        (b"", 0),
        (b"\xc1", 0),  # the one byte msgpack never uses
        (enc(None), 0), (enc(42), 0), (enc("lookup"), 0), (enc({"rid": 5}), 0), (enc([]), 0),
        (enc(["lookup"]), 0),
        (enc(["lookup", 1, "notalist"]), 1),
        (enc(["lookup", 2, [b"short"]]), 2),  # hash of the wrong length
        (enc(["lookup", 3, [b"x" * 33]]), 3),
        (enc(["lookup", 4, [HASH], "yes"]), 4),
        (enc(["store", 5, 1, [HASH], [-1, 0]]), 5),  # negative block id
        (enc(["store", 6, "w", [HASH], [0, 1]]), 6),
        (enc(["retrieve", 7, 1, [HASH], [0, 1], "lease"]), 7),
        (enc(["release", 8]), 8),
        (enc(["release", 9, "lease"]), 9),
        (enc(["frobnicate", 10]), 10),  # unknown tag
        (enc(["error", 16, 1, "a reply is not a request"]), 16),
        (enc(["ping", True]), 0),  # a bool is not a rid
        (enc(["ping", 1.5]), 0),
        (enc(["ping", "17"]), 0),
        (enc([17, "ping"]), 0),
        (enc(["hello", 18, 1, 9, ["m", "bf16", "g", 1, 0]]), 18),  # unknown role
        (enc(["hello", 19, 1, 2, ["m", "bf16", "g", 0, 0]]), 19),  # world size 0
        (enc(["hello", 20, 1, 2, ["m", "bf16", "g", 1, -1]]), 20),  # negative rank
        (enc(["hello", 21, 1, 2, ["m" * (p.MAX_TEXT + 1), "bf16", "g", 1, 0]]), 21),
        (enc(["register", 22, [1, 4, 128, 64, 64, [0], [0]], 0, 0, []]), 22),  # no segments
        (enc(["register", 23, [0, 4, 128, 64, 64, [], []], 0, 0, [1], ["/lmcache_kv_x"]]), 23),
        (enc(["register", 35, [1, 4, 128, 64, 64, [0], [0]], 2, 0, [256]]), 35),  # no such device
        (enc(["register", 36, [1, 4, 128, 64, 64, [0], [0]], 0, 5, [256]]), 36),  # no such copier
        (enc(["register", 37, [1, 4, 128, 64, 64, [0], [0]], 0, 0, [256], ["/lmcache_kv_x"], [b"x" * 63]]), 37),
        (enc(["grant", 38, 1, -1]), 38),
        (enc(["commit", 39, 1, [HASH], [-4096]]), 39),  # a negative slot
        (enc(["commit", 40, 1, [HASH], [0], 0, -0.5]), 40),  # negative seconds
        (enc(["loaded", 41, 1]), 41),  # no lease
        (enc(["loaded", 42, 1, None, [HASH]]), 42),
        (enc(["pin", 43, 1, [b"short"]]), 43),
        (enc(["reserve", 44, 1, [HASH]]), 44),  # version 1's Reserve is retired: an unknown tag now
        (enc(["commit", 45, 1, [HASH]]), 45),  # version 1's commit by key (no slots)
        (enc(["unregister", 24, None]), 24),
        (enc(["lookup", 25, [HASH] * (p.MAX_CHUNKS_PER_REQUEST + 1)]), 25),  # beyond the bound
        (enc(["store", 26, 1, [HASH], [0] * (p.MAX_BLOCKS_PER_REQUEST + 1)]), 26),
        (b"\x92\xa4ping\xcf" + b"\xff" * 7, 0),  # truncated uint64
        (b"\x92\xa4ping\x1b" + b"\x00", 27),  # trailing bytes after a valid Ping: the header names the rid
        (b"\xdd\xff\xff\xff\xff", 0),  # array header claiming 4 G items, no items
        (b"\xdb\xff\xff\xff\xff" + b"a" * 16, 0),  # str header claiming 4 GB
        (b"\x93\xa6lookup\x1c" + b"\x91" * 200_000 + b"\xc0", None),  # deep nesting
        (b"\x91" * 200_000 + b"\xc0", 0),
        (b"\x81" * 100_000 + b"\xc0", 0),  # deeply nested maps
        (b"\x93\xa4ping\x2e" + b"\x91" * 50_000 + b"\xc0", 46),  # deep nesting in a field past the last one
        (b"\x93\xa4ping\x2f" + b"\x81\xa1k" * 20_000 + b"\xc0", 47),
        (b"\xd4\x05\x00", 0),  # an ext type
        (b"\xd6\xff" + b"\xff" * 4, 0),  # a timestamp ext
        (b"\xc7\x03\xff\x00\x00\x00", 0),  # a malformed timestamp ext
        (b"\xa3\xff\xfe\xfd", 0),  # invalid utf-8
        (enc(["ping", 29]) + enc(["ping", 30]), 29),  # two messages in one frame
        ([enc(["ping", 31]), enc(["ping", 32])], 0),  # multi-frame messages
        ([b"", enc(["ping", 33])], 0),  # REQ-style envelope
        ([b"", b""], 0),
        ([enc(["ping", 34])] * 5, 0),
    ]
    yield from fixed
    for i in range(3000):
        kind = i % 6
        if kind == 0:  # random garbage
            yield rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes(), None
        elif kind == 1:  # truncated valid messages: the rid if the header is whole
            frame = valid[i % len(valid)]
            yield frame[: int(rng.integers(1, len(frame)))], None
        elif kind == 2:  # valid messages with trailing bytes: the header names the rid
            frame = valid[i % len(valid)]
            yield frame + rng.integers(0, 256, int(rng.integers(1, 8)), dtype=np.uint8).tobytes(), 11 + i % len(valid)
        elif kind == 3:  # a known tag with a rid and nonsense after it
            tags = ["hello", "lookup", "store", "retrieve", "register", "release", "unregister", "grant", "commit",
                    "pin", "loaded"]
            tag = tags[i % len(tags)]
            junk = [[["x"]], "s", None, {"a": 1}, 3.25, b"b" * 31][int(rng.integers(0, 6))]
            yield enc([tag, 1000 + i, junk, junk]), 1000 + i
        elif kind == 4:  # unknown tags
            yield enc([f"op{i}", 1000 + i]), 1000 + i
        else:  # multi-frame
            yield [enc(["ping", 1000 + i])] * int(rng.integers(2, 4)), 0


def test_barrage_of_bad_frames_is_answered_counted_and_survived(server_factory, raw_factory):
    # the barrage comes before Hello and may take longer than the handshake timeout on a slow host
    server = server_factory("--l1-size-gb", "0.25", env={"LMCD_HANDSHAKE_TIMEOUT_S": "120"})
    rng = np.random.default_rng(20240601)
    raw = raw_factory(server.url)
    sent_bad = 0
    not_hello = 0
    started = time.monotonic()
    batch: list[tuple[bytes | list[bytes], int]] = []

    def flush() -> None:
        for payload, rid in batch:
            reply = raw.recv()
            assert isinstance(reply, p.Error), f"{payload!r:.200}: expected an Error, got {reply!r}"
            assert reply.code == BAD, f"{payload!r:.200}: {reply.code.name}: {reply.message}"
            assert reply.rid == rid, f"{payload!r:.200}: reply rid {reply.rid}, expected {rid}"
            assert reply.message
        batch.clear()

    for payload, rid in hostile_frames(rng):
        if rid is None:
            assert isinstance(payload, bytes)
            rid = p.peek_rid(payload)
        if isinstance(payload, bytes) and payload:
            # msgspec.DecodeError, UnicodeDecodeError for a bad tag, RecursionError for deep nesting
            with pytest.raises((ValueError, RecursionError)):
                p.request_decoder.decode(payload)  # the frame really is bad
        raw.send(payload)
        batch.append((payload, rid))
        sent_bad += 1
        if len(batch) >= 64:
            flush()
        if sent_bad % 500 == 0:  # valid requests in between: before Hello they are refused, not dropped
            raw.send_msg(p.Ping(sent_bad))
            flush()
            reply = raw.recv()
            assert isinstance(reply, p.Error) and reply.code == p.ErrorCode.NOT_HELLO and reply.rid == sent_bad
            assert raw.expect_error(p.Lookup(sent_bad + 1, [HASH]), p.ErrorCode.NOT_HELLO).rid == sent_bad + 1
            not_hello += 2
    flush()
    assert sent_bad >= 3000
    assert raw.nothing_more(), "a reply too many"
    assert time.monotonic() - started < 45

    # the same session can still say Hello and work
    assert isinstance(raw.call(hello(1)), p.HelloReply)
    assert isinstance(raw.call(p.Ping(2)), p.Pong)
    raw.send(enc(["lookup", 3, [b"short"]]))
    reply = raw.recv()
    assert isinstance(reply, p.Error) and reply.code == BAD and reply.rid == 3
    sent_bad += 1

    samples = metric_samples(server)
    assert samples[("lmcd_bad_frames_total", ())] == sent_bad
    assert error_metric(samples, "BAD_FRAME") == sent_bad
    assert error_metric(samples, "NOT_HELLO") == not_hello
    assert samples[("lmcd_requests_total", (("op", "ping"),))] == not_hello // 2 + 1
    assert samples[("lmcd_requests_total", (("op", "lookup"),))] == not_hello // 2
    with connect(server.url) as client:
        counters = client.status()["counters"]
    assert counters["bad_frames"] == sent_bad
    assert counters["errors"] == {"BAD_FRAME": sent_bad, "NOT_HELLO": not_hello}

    roundtrip_end_to_end(server)
    assert_server_healthy(server)
    assert server.stop() == 0


# ---------------------------------------------------------------- the worst frames an unauthenticated peer can send

MEMORY_BOUND_KIB = 256 * 1024  # four frames' worth: the one frame ZMQ holds, with room for the allocator


def resident_peak_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def worst_frames() -> list[tuple[str, bytes, int]]:
    """(what, frame, rid): 64 MiB frames that decode into the most objects or the deepest nesting."""
    size = p.MAX_FRAME_BYTES
    items = size - 13  # header: array32 (5) + "lookup" (7) + a fixint rid (1)
    many = b"\xdd" + (items + 2).to_bytes(4, "big") + b"\xa6lookup\x4d" + b"\x90" * items  # 64 M empty arrays
    depth = size - 10
    deep = b"\x93\xa6lookup\x4e" + b"\x91" * depth + b"\xc0"
    assert len(many) == len(deep) == size
    return [("64 M empty arrays", many, 0x4D), ("64 M nested arrays", deep, 0x4E)]


def test_a_64_mib_frame_before_hello_costs_little_memory_and_no_stall(server_factory, raw_factory):
    server = server_factory("--l1-size-gb", "0.05")
    pinger = raw_factory(server.url)
    assert isinstance(pinger.call(hello(1)), p.HelloReply)
    assert isinstance(pinger.call(p.Ping(2)), p.Pong)
    before_kib = resident_peak_kib(server.proc.pid)
    ping_waits: list[float] = []
    done = threading.Event()

    def ping_all_along() -> None:  # another client, served while the frames arrive
        rid = 100
        while not done.is_set():
            rid += 1
            started = time.monotonic()
            pinger.send_msg(p.Ping(rid))
            if not pinger.sock.poll(10_000, zmq.POLLIN):
                ping_waits.append(float("inf"))
                return
            reply = p.reply_decoder.decode(pinger.sock.recv())
            ping_waits.append(time.monotonic() - started)
            assert isinstance(reply, p.Pong) and reply.rid == rid
            time.sleep(0.02)

    thread = threading.Thread(target=ping_all_along)
    thread.start()
    try:
        for authenticated in (False, True):
            raw = raw_factory(server.url)
            if authenticated:  # the same frames after Hello: the typed decoder, still no object per item
                assert isinstance(raw.call(hello(3)), p.HelloReply)
            for what, frame, rid in worst_frames():
                started = time.monotonic()
                raw.send(frame)
                reply = raw.recv(timeout_ms=30_000)
                waited = time.monotonic() - started
                assert isinstance(reply, p.Error) and reply.code == BAD, (what, reply)
                assert reply.rid == rid, (what, reply)
                if not authenticated:
                    assert "before Hello" in reply.message, reply.message
                assert waited < 2.0, f"{what}: the reply took {waited:.1f} s"
                grown_kib = resident_peak_kib(server.proc.pid) - before_kib
                assert grown_kib < MEMORY_BOUND_KIB, f"{what}: the server grew by {grown_kib / 1024:.0f} MiB"
            del frame
    finally:
        done.set()
        thread.join(15)
    assert ping_waits and max(ping_waits) < 2.0, f"a Ping waited {max(ping_waits):.1f} s"
    print(f"server peak RSS grew by {(resident_peak_kib(server.proc.pid) - before_kib) / 1024:.0f} MiB; "
          f"{len(ping_waits)} pings, the slowest {max(ping_waits) * 1e3:.0f} ms")
    roundtrip_end_to_end(server)
    assert_server_healthy(server)


def test_peek_rid_reads_only_the_header():
    assert p.peek_rid(enc(["lookup", 7, "anything"])) == 7
    assert p.peek_rid(enc(["lookup", 2**64 - 1])) == 2**64 - 1
    assert p.peek_rid(enc(["x" * 70_000, -(2**63)])) == -(2**63)
    assert p.peek_rid(enc(["ping", 300])[:-1]) == 0  # the rid itself cut short
    assert p.peek_rid(enc(["store", 9, 1, [HASH], [0]])[:12]) == 9  # cut after the rid
    for frame in (b"", enc(["ping"]), enc(["ping", True]), enc(["ping", 1.5]), enc([1, 2]), enc({"rid": 1}),
                  b"\xdd\xff\xff\xff\xff", b"\x92\xdb\xff\xff\xff\xff"):
        assert p.peek_rid(frame) == 0, frame
    for _what, frame, rid in worst_frames():
        assert p.peek_rid(frame) == rid
        assert p.peek_rid(memoryview(frame)) == rid


# ---------------------------------------------------------------- semantic errors on valid frames


def test_semantic_errors_on_valid_frames(server, raw_factory):
    codes: Counter[str] = Counter()

    def expect(raw: Raw, msg: object, code: p.ErrorCode) -> p.Error:
        codes[code.name] += 1
        return raw.expect_error(msg, code)

    raw = raw_factory(server.url)
    for rid, msg in enumerate([p.Ping(1), p.Lookup(2, [HASH]), p.Store(3, 1, [HASH], [0]), p.Release(4, 1),
                               p.GetStatus(5), p.Clear(6), p.UnregisterWorker(7, 1)], start=1):
        assert expect(raw, msg, p.ErrorCode.NOT_HELLO).rid == rid
    mismatch = expect(raw, hello(8, version=p.PROTOCOL_VERSION + 41), p.ErrorCode.VERSION_MISMATCH)
    assert f"version {p.PROTOCOL_VERSION + 41}" in mismatch.message
    assert f"speaks {p.PROTOCOL_VERSION}" in mismatch.message
    expect(raw, p.Ping(9), p.ErrorCode.NOT_HELLO)  # a refused Hello opens no session
    assert "not below" in expect(raw, hello(10, namespace(rank=2, world_size=2)), p.ErrorCode.BAD_REQUEST).message
    expect(raw, hello(11, namespace(rank=5, world_size=3)), p.ErrorCode.BAD_REQUEST)
    expect(raw, hello(12, namespace(rank=0, world_size=10**12), role=p.Role.SCHEDULER), p.ErrorCode.BAD_REQUEST)
    expect(raw, hello(13, namespace(rank=None), role=p.Role.WORKER), p.ErrorCode.BAD_REQUEST)

    kv = CpuKVCache(num_layers=2, num_blocks=8, block_size=128, num_kv_heads=1, head_size=16)
    try:
        fill_random(kv, 3)
        ns = namespace(geometry=kv.geometry)
        welcome = raw.call(hello(20, ns))
        assert isinstance(welcome, p.HelloReply)
        fds = [seg.fd for seg in kv.segments]
        # unknown workers and leases
        assert "register first" in expect(raw, p.UnregisterWorker(21, 999), p.ErrorCode.UNKNOWN_WORKER).message
        expect(raw, p.Store(22, 999, [HASH], [0, 1]), p.ErrorCode.UNKNOWN_WORKER)
        expect(raw, p.Retrieve(23, 999, [HASH], [0, 1], None), p.ErrorCode.UNKNOWN_WORKER)
        expect(raw, p.Release(24, 123456), p.ErrorCode.UNKNOWN_LEASE)
        expect(raw, p.Release(25, 2**64 - 1), p.ErrorCode.UNKNOWN_LEASE)

        # registration failures: segment names (retired), no memory handed over, layouts too large
        layout = kv.layout
        sizes = [seg.nbytes for seg in kv.segments]
        for bad_name in ("/etc/passwd", "/dev/shm/lmcache_kv_1", "/lmcache_kv_../../etc/passwd", "lmcache_kv_",
                         "/sem.lmcache_kv_1", ""):
            msg = expect(raw, p.RegisterWorker(30, layout, CPU, SERVER, sizes, [bad_name, bad_name]),
                         p.ErrorCode.SEGMENT_ERROR)
            assert "retired" in msg.message
        msg = expect(raw, p.RegisterWorker(31, layout, CPU, SERVER, sizes), p.ErrorCode.SEGMENT_ERROR)
        assert "got 0 fds for 2 sizes" in msg.message
        big = msgspec.structs.replace(layout, num_blocks=layout.num_blocks + 1)
        hand_over(welcome.handoff_path, welcome.handoff_nonce, fds)
        msg = expect(raw, p.RegisterWorker(32, big, CPU, SERVER, sizes), p.ErrorCode.SEGMENT_ERROR)
        assert "needs bytes up to" in msg.message
        hand_over(welcome.handoff_path, welcome.handoff_nonce, fds)
        msg = expect(raw, p.RegisterWorker(33, layout, CPU, SERVER, [s * 2 for s in sizes]),
                     p.ErrorCode.SEGMENT_ERROR)
        assert "were declared" in msg.message
        expect(raw, p.Store(34, 1, [HASH], [0, 1]), p.ErrorCode.UNKNOWN_WORKER)  # nothing got registered

        hand_over(welcome.handoff_path, welcome.handoff_nonce, fds)
        registered = raw.call(p.RegisterWorker(40, layout, CPU, SERVER, sizes))
        assert isinstance(registered, p.Registered), registered
        wid = registered.worker_id
        hashes = chunk_keys(list(range(512)), 256)  # the default chunk size: 2 blocks of 128 per chunk

        # out of range: error, nothing stored
        for rid, block_ids in enumerate(([0, 1, 2, 8], [8, 0, 1, 2], [0, 1, 2, 2**63], [0, 1, 2, 2**64 - 1]),
                                        start=41):
            msg = expect(raw, p.Store(rid, wid, hashes, block_ids), p.ErrorCode.BLOCK_OUT_OF_RANGE)
            assert f"block id {max(block_ids)} is out of range" in msg.message
        lookup = raw.call(p.Lookup(45, hashes, False))
        assert isinstance(lookup, p.LookupReply) and lookup.num_hit_chunks == 0
        # wrong number of block ids
        for rid, block_ids in enumerate(([0, 1, 2], [0, 1, 2, 3, 4], []), start=46):
            msg = expect(raw, p.Store(rid, wid, hashes, block_ids), p.ErrorCode.BAD_REQUEST)
            assert "need 4 block ids" in msg.message
        expect(raw, p.Retrieve(49, wid, hashes, [0, 1, 2], None), p.ErrorCode.BAD_REQUEST)
        lookup = raw.call(p.Lookup(50, hashes, False))
        assert isinstance(lookup, p.LookupReply) and lookup.num_hit_chunks == 0

        stored = raw.call(p.Store(51, wid, hashes, [0, 1, 2, 3]))
        assert isinstance(stored, p.StoreReply) and stored.statuses == [p.ChunkStatus.STORED] * 2
        before = [kv.pages(layer).copy() for layer in range(2)]
        expect(raw, p.Retrieve(52, wid, hashes, [4, 5, 6, 8], None), p.ErrorCode.BLOCK_OUT_OF_RANGE)
        expect(raw, p.Retrieve(53, wid, hashes, [4, 5, 6, 2**64 - 1], None), p.ErrorCode.BLOCK_OUT_OF_RANGE)
        expect(raw, p.Retrieve(54, wid, hashes, [4, 5, 6, 7], 777), p.ErrorCode.UNKNOWN_LEASE)
        for layer in range(2):
            assert np.array_equal(kv.pages(layer), before[layer]), "a refused retrieve copied bytes"
        assert not np.array_equal(before[0][0], before[0][4])

        # a lease is consumed by its retrieve: using it again is UNKNOWN_LEASE, releasing it too
        hit = raw.call(p.Lookup(55, hashes, True))
        assert isinstance(hit, p.LookupReply) and hit.num_hit_chunks == 2 and hit.lease_id is not None
        got = raw.call(p.Retrieve(56, wid, hashes, [4, 5, 6, 7], hit.lease_id))
        assert isinstance(got, p.RetrieveReply) and got.num_retrieved_chunks == 2
        expect(raw, p.Retrieve(57, wid, hashes, [4, 5, 6, 7], hit.lease_id), p.ErrorCode.UNKNOWN_LEASE)
        expect(raw, p.Release(58, hit.lease_id), p.ErrorCode.UNKNOWN_LEASE)
        for layer in range(2):
            assert np.array_equal(kv.pages(layer)[[4, 5, 6, 7]], before[layer][[0, 1, 2, 3]])

        # another session cannot use this session's worker
        other = raw_factory(server.url)
        assert isinstance(other.call(hello(60, ns)), p.HelloReply)
        codes["UNKNOWN_WORKER"] += 2
        other.expect_error(p.Store(61, wid, hashes, [0, 1, 2, 3]), p.ErrorCode.UNKNOWN_WORKER)
        other.expect_error(p.UnregisterWorker(62, wid), p.ErrorCode.UNKNOWN_WORKER)

        assert isinstance(raw.call(p.UnregisterWorker(63, wid)), p.Unregistered)
        expect(raw, p.UnregisterWorker(64, wid), p.ErrorCode.UNKNOWN_WORKER)
        expect(raw, p.Retrieve(65, wid, hashes, [4, 5, 6, 7], None), p.ErrorCode.UNKNOWN_WORKER)
        assert raw.nothing_more(200) and other.nothing_more(0)
    finally:
        kv.close()

    samples = metric_samples(server)
    for code in p.ErrorCode:
        assert error_metric(samples, code.name) == codes[code.name], code.name
    assert samples[("lmcd_bad_frames_total", ())] == 0
    with connect(server.url) as client:
        assert client.status()["counters"]["errors"] == dict(codes)
    roundtrip_end_to_end(server)
    assert_server_healthy(server)


def test_auth_token_is_required_when_configured(server_factory, raw_factory):
    server = server_factory("--l1-size-gb", "0.25", "--auth-token", "s3cret-s3cret-s3cret")
    ns = namespace()
    for token in (None, "", "wrong", "s3cret-s3cret-s3cret ", "S3CRET-S3CRET-S3CRET", "s3cret-s3cret-s3cre"):
        with pytest.raises(ServerError) as info:
            connect(server.url, ns, auth_token=token)
        assert info.value.code == p.ErrorCode.AUTH_FAILED
        assert "auth token" in str(info.value)
    raw = raw_factory(server.url)
    assert raw.expect_error(hello(1, ns, token="nope"), p.ErrorCode.AUTH_FAILED).rid == 1
    assert raw.expect_error(p.Ping(2), p.ErrorCode.NOT_HELLO).rid == 2  # a failed Hello opens nothing
    assert isinstance(raw.call(hello(3, ns, token="s3cret-s3cret-s3cret")), p.HelloReply)
    assert isinstance(raw.call(p.Ping(4)), p.Pong)
    with connect(server.url, ns, auth_token="s3cret-s3cret-s3cret") as client:
        assert client.ping() >= 0
        counters = client.status()["counters"]
    assert counters["errors"] == {"AUTH_FAILED": 7, "NOT_HELLO": 1}
    assert httpx.get(f"{server.http_url}/metrics", timeout=10).status_code == 401
    samples = metric_samples(server, "s3cret-s3cret-s3cret")
    assert error_metric(samples, "AUTH_FAILED") == 7
    assert error_metric(samples, "NOT_HELLO") == 1
    assert samples[("lmcd_bad_frames_total", ())] == 0
    assert_server_healthy(server)


# ---------------------------------------------------------------- exactly one reply per request


def test_exactly_one_reply_per_request_when_pipelined(server, raw_factory):
    kv = CpuKVCache(num_layers=2, num_blocks=64, block_size=128, num_kv_heads=1, head_size=16)
    raw = raw_factory(server.url)
    try:
        ns = namespace(geometry=kv.geometry)
        welcome = raw.call(hello(1, ns))
        assert isinstance(welcome, p.HelloReply)
        hand_over(welcome.handoff_path, welcome.handoff_nonce, [seg.fd for seg in kv.segments])
        registered = raw.call(p.RegisterWorker(2, kv.layout, CPU, SERVER, [seg.nbytes for seg in kv.segments]))
        assert isinstance(registered, p.Registered)
        wid = registered.worker_id
        rng = np.random.default_rng(5)
        expected: dict[int, type | p.ErrorCode] = {}
        rid = 1000
        for i in range(200):
            rid += 1
            kind = i % 10
            h = chunk_keys(list(range(i * 256, i * 256 + 256)), 256)
            blocks = [int(b) for b in rng.choice(64, 2, replace=False)]
            if kind == 0:
                raw.send_msg(p.Ping(rid))
                expected[rid] = p.Pong
            elif kind == 1:  # copies: replied later, from the copy thread's completion
                raw.send_msg(p.Store(rid, wid, h, blocks))
                expected[rid] = p.StoreReply
            elif kind == 2:
                raw.send_msg(p.Retrieve(rid, wid, h, blocks, None))
                expected[rid] = p.RetrieveReply
            elif kind == 3:
                raw.send_msg(p.Lookup(rid, h, False))
                expected[rid] = p.LookupReply
            elif kind == 4:
                raw.send(enc(["lookup", rid, "notalist"]))
                expected[rid] = p.ErrorCode.BAD_FRAME
            elif kind == 5:
                raw.send(enc(["store", rid, wid, h, [-1, 0]]))
                expected[rid] = p.ErrorCode.BAD_FRAME
            elif kind == 6:
                raw.send_msg(p.Release(rid, 10**9 + i))
                expected[rid] = p.ErrorCode.UNKNOWN_LEASE
            elif kind == 7:
                raw.send_msg(p.Store(rid, wid, h, [0, 64]))
                expected[rid] = p.ErrorCode.BLOCK_OUT_OF_RANGE
            elif kind == 8:
                raw.send_msg(p.Store(rid, wid + 100, h, blocks))
                expected[rid] = p.ErrorCode.UNKNOWN_WORKER
            else:
                raw.send(enc([f"nope{i}", rid]))
                expected[rid] = p.ErrorCode.BAD_FRAME
        replies: dict[int, p.Reply] = {}
        for _ in range(200):
            reply = raw.recv()
            assert reply.rid not in replies, f"two replies for rid {reply.rid}"
            replies[reply.rid] = reply
        assert set(replies) == set(expected)
        assert raw.nothing_more(500), "a reply too many"
        for rid, want in expected.items():
            reply = replies[rid]
            if isinstance(want, p.ErrorCode):
                assert isinstance(reply, p.Error) and reply.code == want, (rid, reply)
            else:
                assert isinstance(reply, want), (rid, reply)
        assert isinstance(raw.call(p.Ping(5000)), p.Pong)
    finally:
        kv.close()
    assert_server_healthy(server)


# ---------------------------------------------------------------- no server


def test_client_raises_server_timeout_when_nobody_listens():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    started = time.monotonic()
    with pytest.raises(ServerTimeout) as info:
        CacheClient(url, namespace(), timeout_s=1.0)
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 3.0, elapsed
    assert url in str(info.value)
    assert isinstance(info.value, TimeoutError)


# ---------------------------------------------------------------- protocol version 2


LAYOUT = p.KVLayout(2, 8, 16, 4096, 4096, [0, 8 * 4096, 16 * 4096, 24 * 4096], [0, 0, 0, 0])
NS = p.Namespace("m", "bf16", "g", 2, 1)

REQUESTS: list[object] = [
    p.Hello(1, p.PROTOCOL_VERSION, p.Role.WORKER, NS, "token", "name", 42),
    p.Ping(2),
    p.RegisterWorker(3, LAYOUT, p.Device.CUDA, p.Copier.SERVER, [32 * 4096], [], [b"h" * 64], "0000:3b:00",
                     b"e" * 64),
    p.UnregisterWorker(4, 7),
    p.Lookup(5, [HASH, HASH], False, True),
    p.Store(6, 7, [HASH], [0, 1]),
    p.Retrieve(7, 7, [HASH], [2, 3], 9, 1),
    p.Release(8, 9),
    p.Grant(9, 7, 5),
    p.Commit(10, 7, [HASH], [4096], 3, 0.125),
    p.Pin(11, 7, [HASH], 9),
    p.Loaded(12, 7, 9, [HASH], 1, 0.25),
    p.Clear(13),
    p.GetStatus(14),
]
REPLIES: list[object] = [
    p.Error(1, p.ErrorCode.BAD_REQUEST, "why"),
    p.HelloReply(2, "0.1", p.PROTOCOL_VERSION, 256, p.HASH_ALGORITHM, ["leases"], 3, "/lmcache_pool_1_0", 60.0),
    p.Pong(3),
    p.Registered(4, 7, 1 << 20, 16, b"e" * 64),
    p.Unregistered(5),
    p.LookupReply(6, 2, 9, [[0, 4096], [8192, 12288]]),
    p.StoreReply(7, [p.ChunkStatus.STORED, p.ChunkStatus.PRESENT, p.ChunkStatus.REFUSED_FULL], "full"),
    p.RetrieveReply(8, 2),
    p.Released(9, 3),
    p.Granted(10, [0, 4096]),
    p.Committed(11, [p.ChunkStatus.STORED], [8192]),
    p.Pinned(12, [0], 9),
    p.Cleared(13, 4),
    p.StatusReply(14, {"pool": {"used_bytes": 0}}),
]


def test_every_request_and_reply_round_trips_and_tags_are_unique():
    assert {type(m) for m in REQUESTS} == set(typing.get_args(p.Request))  # every type, once
    assert {type(m) for m in REPLIES} == set(typing.get_args(p.Reply))
    assert len(REQUESTS) == len(typing.get_args(p.Request)) and len(REPLIES) == len(typing.get_args(p.Reply))
    for message, decoder in [(m, p.request_decoder) for m in REQUESTS] + [(m, p.reply_decoder) for m in REPLIES]:
        decoded = decoder.decode(p.encoder.encode(message))
        assert type(decoded) is type(message) and decoded == message, (message, decoded)
    tags = [t.__struct_config__.tag for t in typing.get_args(p.Request) + typing.get_args(p.Reply)]
    assert len(set(tags)) == len(tags), sorted(tags)
    for message in REQUESTS:  # a request never passes for a reply, nor the other way round
        with pytest.raises(msgspec.ValidationError):
            p.reply_decoder.decode(p.encoder.encode(message))
    for message in REPLIES:
        with pytest.raises(msgspec.ValidationError):
            p.request_decoder.decode(p.encoder.encode(message))


def test_the_evolution_rules_hold_for_shorter_and_longer_arrays():
    # an older peer's shorter array: the fields it lacks take their defaults
    commit = p.request_decoder.decode(enc(["commit", 1, 7, [HASH], [4096]]))
    assert commit == p.Commit(1, 7, [HASH], [4096], 0, 0.0)
    loaded = p.request_decoder.decode(enc(["loaded", 2, 7, 9, [HASH]]))
    assert loaded == p.Loaded(2, 7, 9, [HASH], 0, 0.0)
    register = p.request_decoder.decode(enc(["register", 3, list(msgspec.to_builtins(LAYOUT)), 0, 0, [1 << 20]]))
    assert register == p.RegisterWorker(3, LAYOUT, p.Device.CPU, p.Copier.SERVER, [1 << 20])
    # a newer peer's longer array: the fields this version does not know are ignored
    longer = enc(["hello", 4, 1, 2, ["m", "bf16", "g", 1, 0], None, "", 0, "", "a field of version 4"])
    assert p.request_decoder.decode(longer) == p.Hello(4, 1, p.Role.WORKER, p.Namespace("m", "bf16", "g", 1, 0))
    # Hello and Error keep version 1's leading shape, so any peer can read VERSION_MISMATCH
    assert msgspec.to_builtins(p.Error(5, p.ErrorCode.VERSION_MISMATCH, "m")) == ["error", 5, 4, "m"]
    assert msgspec.to_builtins(p.Hello(6, 1, p.Role.CLIENT, NS))[:4] == ["hello", 6, 1, 0]


def test_a_version_1_hello_gets_version_mismatch(server, raw_factory, monkeypatch):
    raw = raw_factory(server.url)
    mismatch = raw.expect_error(hello(1, version=1), p.ErrorCode.VERSION_MISMATCH)
    assert "protocol version 1" in mismatch.message and f"speaks {p.PROTOCOL_VERSION}" in mismatch.message
    assert "matching lmcd versions" in mismatch.message
    raw.expect_error(p.Ping(2), p.ErrorCode.NOT_HELLO)  # no session was opened
    assert isinstance(raw.call(hello(3)), p.HelloReply)  # the right version still can
    # the client says which version it speaks: a client of version 1 is told, as a ServerError
    monkeypatch.setattr(p, "PROTOCOL_VERSION", 1)
    with pytest.raises(ServerError) as err:
        connect(server.url)
    assert err.value.code == p.ErrorCode.VERSION_MISMATCH and "protocol version 1" in err.value.message
    monkeypatch.undo()
    with connect(server.url) as client:
        assert client.hello is not None and client.hello.protocol_version == p.PROTOCOL_VERSION == 3
        assert client.status()["counters"]["errors"] == {"VERSION_MISMATCH": 2, "NOT_HELLO": 1}
