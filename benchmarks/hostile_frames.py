"""Hostile frames for ``benchmarks/reliability.py`` (its ``hostile`` part), and the bare sessions that send them.

Everything here is deliberately what no well-behaved client sends: random bytes, truncated and
over-long msgpack, wrong tags and types, lengths that claim more than the frame holds, deep
nesting, several frames in one message, and decodable requests with hostile values (built from
``lmcd.protocol``'s Structs, whose values msgspec checks only on decode). The only place of this
benchmark that writes message layouts by hand. Seeded: the same seed sends the same frames.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import zmq

from lmcd import protocol as p


def enc(obj: object) -> bytes:
    return msgspec.msgpack.encode(obj)


JUNK: list[object] = [None, True, -1, 2**64 - 1, -(2**63), 1.5, float("nan"), "", "x" * 5000, b"", b"\0" * 33,
                      [], [[]], {}, {"a": 1}, [None] * 3, "\udcff".encode("utf-8", "surrogatepass")]
REQUEST_TAGS = ["hello", "ping", "register", "unregister", "lookup", "store", "retrieve", "release", "grant", "commit",
                "pin", "loaded", "clear", "status"]
WRONG_TAGS: list[object] = ["frobnicate", "error", "pong", "hello_ok", "store_ok", "LOOKUP", "lookup\0", "", 7,
                            None, b"lookup", ["lookup"], "reserve"]
HUGE_HEADERS = [b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff",
                b"\xc9\xff\xff\xff\xff\x01", b"\xdc\xff\xff", b"\xda\xff\xff", b"\xcf"]
NEST = [b"\x91", b"\x81\xa1k", b"\xdc\x00\x01", b"\x92\xc0"]


def hostile_value(rng: random.Random) -> int:
    return rng.choice([0, 1, 2, 3, 255, 2**31, 2**32 + 1, 2**53 + 1, 2**63 - 1, 2**64 - 1, rng.getrandbits(63)])


def hostile_layout(rng: random.Random) -> p.KVLayout:
    planes = rng.choice([1, 2, 8])
    return p.KVLayout(hostile_value(rng) or 1, hostile_value(rng) or 1, rng.choice([1, 16, 128, 2**40]),
                      hostile_value(rng) or 1, hostile_value(rng) or 1, [hostile_value(rng) for _ in range(planes)],
                      [rng.choice([0, 1, 4095, 2**40]) for _ in range(planes)])


def hostile_request(rng: random.Random, rid: int) -> p.Request:
    """A decodable request whose values no well-behaved client sends (unknown workers and leases,
    block ids out of range, huge counts, a Hello of another version or a rank past the world)."""
    keys = [rng.randbytes(p.HASH_BYTES) for _ in range(rng.choice([0, 1, 1, 3, 16, 4096]))]
    worker, lease = hostile_value(rng), hostile_value(rng)
    blocks = rng.choice([[], [hostile_value(rng)], [hostile_value(rng) for _ in range(16)], list(range(1000))])
    ns = p.Namespace(rng.choice(["m", "\u2603" * 100, ""]), "bf16", "g", rng.choice([1, 2, 4096, 4097, 2**31]),
                     rng.choice([None, 0, 1, 4096, 2**31]))
    role = rng.choice([p.Role.CLIENT, p.Role.SCHEDULER, p.Role.WORKER, 7])
    version = rng.choice([p.PROTOCOL_VERSION, p.PROTOCOL_VERSION, 0, 1, p.PROTOCOL_VERSION + 1, 2**31])
    names = [f"/lmcache_kv_nonexistent_{rng.getrandbits(32)}", "../../etc/passwd", "/dev/zero", "x" * 300]
    seconds = rng.choice([0.0, 1e308, float("inf"), float("nan")])
    makers: list[Callable[[], p.Request]] = [
        lambda: p.Lookup(rid, keys, rng.random() < 0.5, rng.random() < 0.3),
        lambda: p.Store(rid, worker, keys, blocks),
        lambda: p.Retrieve(rid, worker, keys, blocks, rng.choice([None, lease]), rng.choice([0, 1, 2**40])),
        lambda: p.Release(rid, lease),
        lambda: p.UnregisterWorker(rid, worker),
        lambda: p.Grant(rid, worker, rng.choice([0, 1, 10**6, 2**62])),
        lambda: p.Commit(rid, worker, keys, [hostile_value(rng) for _ in keys], hostile_value(rng), seconds),
        lambda: p.Pin(rid, worker, keys, rng.choice([None, lease])),
        lambda: p.Loaded(rid, worker, lease, keys, rng.choice([0, 2**40]), seconds),
        lambda: p.Hello(rid, version, role, ns, rng.choice([None, "wrong-token"]), "hostile", os.getpid()),  # type: ignore[arg-type]
        lambda: p.RegisterWorker(rid, hostile_layout(rng), rng.choice([p.Device.CPU, p.Device.CUDA]),
                                 rng.choice([p.Copier.SERVER, p.Copier.WORKER]), [rng.choice([1, 2**40, 2**62])],
                                 rng.sample(names, rng.randint(0, 2)), rng.choice([[], [b"\0" * 64]]),
                                 rng.choice(["", "0000:00:00.0", "zz"]), rng.choice([b"", b"\1" * 64])),
        lambda: p.GetStatus(rid),
        lambda: p.Ping(rid),
    ]
    if rng.random() < 0.002:  # rare: it drops every chunk
        return p.Clear(rid)
    return rng.choice(makers)()


def hostile_frame(rng: random.Random, rid: int) -> bytes | list[bytes]:
    """One hostile message: mostly one frame that must not decode, or a decodable one with hostile
    values, sometimes several frames."""
    kind = rng.choices(range(9), weights=[15, 12, 5, 8, 15, 6, 3, 6, 30])[0]
    rid_bytes = enc(rid)
    if kind == 0:  # random bytes
        return rng.randbytes(int(10 ** rng.uniform(0, 3.6)) if rng.random() > 0.001 else 1 << 20)
    if kind == 1:  # a valid prefix, truncated
        frame = p.encoder.encode(hostile_request(rng, rid))
        return frame[:rng.randrange(1, len(frame))] if len(frame) > 1 else b""
    if kind == 2:  # a valid message, then more bytes
        return p.encoder.encode(hostile_request(rng, rid)) + rng.randbytes(rng.randint(1, 16))
    if kind == 3:  # wrong tags
        return enc([rng.choice(WRONG_TAGS), rid, *rng.sample(JUNK, rng.randint(0, 3))]) if rng.random() < 0.9 \
            else b"\x92\xa3\xff\xfe\xfd" + rid_bytes  # a tag that is not UTF-8
    if kind == 4:  # a known tag and a rid, then fields of the wrong types
        fields = [rng.choice(JUNK) for _ in range(rng.randint(0, 9))]
        rid_field: object = rid if rng.random() < 0.85 else rng.choice([True, 1.5, "17", -5, None])
        return enc([rng.choice(REQUEST_TAGS), rid_field, *fields])
    if kind == 5:  # lengths that claim more than the frame holds, or more than the bounds allow
        if rng.random() < 0.02:
            return enc(["lookup", rid, [b"k" * p.HASH_BYTES] * (p.MAX_CHUNKS_PER_REQUEST + 1)])
        head = b"\x93\xa6lookup" + rid_bytes if rng.random() < 0.5 else b""
        return head + rng.choice(HUGE_HEADERS) + rng.randbytes(rng.randint(0, 64))
    if kind == 6:  # deep nesting, log-uniform depth up to 200,000
        head = b"\x93\xa6lookup" + rid_bytes if rng.random() < 0.5 else b""
        return head + rng.choice(NEST) * int(10 ** rng.uniform(1, 5.3)) + b"\xc0"
    if kind == 7:  # several frames in one message
        parts = [rng.choice([b"", p.encoder.encode(p.Ping(rid)), rng.randbytes(8)]) for _ in range(rng.randint(2, 5))]
        return parts
    return p.encoder.encode(hostile_request(rng, rid))


def expected_rid(payload: bytes | list[bytes]) -> int:
    """The rid the server's one reply must carry: ``peek_rid`` of one frame, 0 for several."""
    return p.peek_rid(payload) if isinstance(payload, bytes) else 0


# ------------------------------------------------------------------ hostile: the clients

@dataclass
class Tally:
    """What one hostile client sent and got back."""

    sent: int = 0
    answered: int = 0
    recoverable: int = 0  # messages whose rid the server can read (peek_rid != 0)
    rid_matched: int = 0  # replies carrying one of those rids
    unexpected_rid: int = 0  # replies whose rid no outstanding message had
    unanswered: int = 0
    bad_replies: int = 0  # more than one frame, or undecodable
    sessions: int = 0
    codes: Counter[str] = field(default_factory=Counter)

    def add(self, other: Tally) -> None:
        for name in ("sent", "answered", "recoverable", "rid_matched", "unexpected_rid", "unanswered",
                     "bad_replies", "sessions"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.codes.update(other.codes)


class RawSession:
    """A bare DEALER session: up to ``window`` messages in flight, replies matched by rid."""

    def __init__(self, url: str, tally: Tally, window: int = 32, timeout_s: float = 10.0) -> None:
        self.sock: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)
        self.tally, self.window, self.timeout_ms = tally, window, int(timeout_s * 1000)
        self.outstanding: Counter[int] = Counter()
        tally.sessions += 1

    def send(self, payload: bytes | list[bytes]) -> None:
        rid = expected_rid(payload)
        if isinstance(payload, list):
            self.sock.send_multipart(payload)
        else:
            self.sock.send(payload)
        self.outstanding[rid] += 1
        self.tally.sent += 1
        self.tally.recoverable += rid != 0
        while self.outstanding.total() >= self.window:
            if not self.receive():
                return

    def receive(self) -> bool:
        if not self.sock.poll(self.timeout_ms, zmq.POLLIN):
            return False
        frames = self.sock.recv_multipart()
        self.tally.answered += 1
        try:
            assert len(frames) == 1
            reply = p.reply_decoder.decode(frames[0])
        except (AssertionError, msgspec.DecodeError, ValueError):
            self.tally.bad_replies += 1
            return True
        self.tally.codes[reply.code.name if isinstance(reply, p.Error) else type(reply).__name__] += 1
        if self.outstanding[reply.rid] > 0:
            self.outstanding[reply.rid] -= 1
            self.tally.rid_matched += reply.rid != 0
        else:
            self.tally.unexpected_rid += 1
        return True

    def close(self) -> None:
        while self.outstanding.total() and self.receive():
            pass
        self.tally.unanswered += self.outstanding.total()
        self.sock.close(0)


def raw_client(url: str, index: int, num_frames: int, per_session: int, seed: int, tally: Tally) -> None:
    """Sessions of ``per_session`` hostile messages; client ``index % 3`` says Hello at once (0),
    half-way (1) or never (2), so every kind of frame comes before and after Hello."""
    rng = random.Random(seed * 1000 + index)
    base = (index + 1) << 40
    done = 0
    while done < num_frames:
        n = min(per_session, num_frames - done)
        hello_at = {0: 0, 1: n // 2, 2: -1}[index % 3]
        session = RawSession(url, tally)
        try:
            for i in range(n):
                rid = base + done + i
                if i == hello_at:
                    ns = p.Namespace(f"hostile-{index}", "bf16", "g", 1, 0)
                    session.send(p.encoder.encode(p.Hello(rid, p.PROTOCOL_VERSION, p.Role.WORKER, ns, None,
                                                          "reliability hostile", os.getpid())))
                else:
                    session.send(hostile_frame(rng, rid))
        finally:
            session.close()
        done += n


def oversize_frames(url: str, num: int) -> int:
    """Frames above ``MAX_FRAME_BYTES``, each on a fresh session: ZMQ drops the connection before
    the server sees a byte of them, so no reply is due. Returns the replies that came anyway."""
    payload = b"\x92\xa4ping\x01" + b"\0" * p.MAX_FRAME_BYTES
    replies = 0
    for _ in range(num):
        sock: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(url)
        sock.send(payload)
        replies += bool(sock.poll(500, zmq.POLLIN))
        sock.close(0)
    return replies
