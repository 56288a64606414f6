"""Reliability figures of issue 13 against real ``lmcache server`` processes (not a test).

Every part starts its own server on 127.0.0.1 (``--port 0 --http-port 0``, the ports parsed from
its "LMCache cache server is running on <url> ... HTTP <http_url>" line), talks to it only through
``lmcd.connector.client.CacheClient``, the connector's synthetic CPU worker ``CpuKVCache`` (what
``lmcache bench`` uses) and ``lmcd.protocol``'s Structs and encoder (hand-made bytes only in the
deliberately hostile frames), reads ``/status`` and ``/healthcheck`` from its HTTP sidecar, and
stops it at the end. Children die with this process (``PR_SET_PDEATHSIG``) and are killed in a
``finally``. Parts (docs/RELIABILITY.md says what each figure means):

- ``hostile``: ``--frames`` seeded hostile messages from ``--raw-clients`` bare DEALER sessions (before
  and after Hello, reconnecting every ``--frames-per-session``) and ``--api-clients`` registered
  workers calling the client with hostile values; every message must get one reply (with its rid
  where ``protocol.peek_rid`` can read it), the server must live, RSS before/after; plus
  ``--oversize`` frames above ``MAX_FRAME_BYTES``, which ZMQ drops with the connection (no reply due);
- ``kill``: ``--kills`` times, a worker process registers, stores and retrieves 16 MiB in a loop
  holding a lease, and is SIGKILLed while a store or retrieve is in flight; the time until
  ``/status`` shows no session, worker or lease; its /dev/shm names; at the end a pinned fill of the
  whole pool shows whether any chunk stayed pinned;
- ``soak``: ``--soak-workers`` workers store fresh 1 MiB chunks into a 0.25 GiB pool (eviction all the
  time) and retrieve and check earlier ones for ``--soak-seconds``; server RSS every
  ``--sample-seconds``, its slope, the counters, every error;
- ``load``: for each of ``--load-sessions``, that many sessions (threads of ``--load-processes``
  processes) each looking up, storing and retrieving 16 KiB chunks for ``--load-seconds``:
  requests/s and p50/p99 per operation, errors.

    python benchmarks/reliability.py all --json /tmp/reliability.json   # the full run, about 14 minutes
    python benchmarks/reliability.py hostile --frames 100000             # about 30 s
    python benchmarks/reliability.py kill --kills 100                    # 1-2 minutes
    python benchmarks/reliability.py soak --soak-seconds 600             # 10 minutes
    python benchmarks/reliability.py load --load-sessions 32,128 --load-seconds 30   # about 80 s
    # development run: all --frames 20000 --kills 20 --soak-seconds 60 --load-seconds 10
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import msgspec
import numpy as np

from lmcd import __version__
from lmcd import protocol as p
from lmcd.connector.client import CacheClient, LmcdError, ProtocolError, ServerError, ServerTimeout, StoreResult
from lmcd.connector.shm import CpuKVCache

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hostile_frames import Tally, hostile_layout, oversize_frames, raw_client  # noqa: E402

RUNNING = re.compile(r"LMCache cache server is running on (\S+) \(pool .*HTTP (\S+?)\)")
SHM_NAME = re.compile(r"^(lmcache|lmcd)_")
CHILDREN: list[subprocess.Popen[bytes]] = []
PROBLEM_LINES = ("Traceback", "Internal error", "CRITICAL")


# ------------------------------------------------------------------ processes

def dies_with_parent(sig: int) -> Callable[[], None]:
    """A preexec_fn: the child gets ``sig`` when this process dies, however it dies."""
    def preexec() -> None:
        ctypes.CDLL(None).prctl(1, sig)  # PR_SET_PDEATHSIG
    return preexec


def spawn(args: list[str], sig: int = signal.SIGKILL, **kwargs: object) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(args, preexec_fn=dies_with_parent(sig), **kwargs)  # type: ignore[call-overload]
    CHILDREN.append(proc)
    return proc


def child(kind: str, **params: object) -> subprocess.Popen[bytes]:
    """This file run as a child process (``_child KIND JSON``), lines on stdout, orders on stdin."""
    return spawn([sys.executable, os.path.abspath(__file__), "_child", kind, json.dumps(params)],
                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def kill_children() -> None:
    for proc in CHILDREN:
        if proc.poll() is None:
            proc.kill()
    for proc in CHILDREN:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def read_line(proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    """The child's next stdout line within ``timeout_s`` ("" if it ended or said nothing)."""
    assert proc.stdout is not None
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout_s)
    return out[0].decode().strip() if out else ""


def http_json(url: str, timeout_s: float = 5.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except OSError:
        return 0, {}


class Server:
    """One real server on 127.0.0.1 logging to a file; ``stop`` ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, size_gb: float, *flags: str, log_level: str = "INFO") -> None:
        fd, self.log_path = tempfile.mkstemp(prefix="reliability_server_", suffix=".log")
        self.command = [sys.executable, "-m", "lmcd", "server", "--host", "127.0.0.1", "--port", "0",
                        "--http-host", "127.0.0.1", "--http-port", "0", "--l1-size-gb", str(size_gb),
                        "--cuda", "off", "--log-level", log_level, *flags]
        with os.fdopen(fd, "wb") as log_file:
            self.proc = spawn(self.command, signal.SIGTERM, stdout=log_file, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.poll() is None:
            match = RUNNING.search(self.log())
            if match:
                self.url, self.http_url = match.group(1), match.group(2)
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the server did not start:\n{self.log()[-4000:]}")

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def problems(self) -> dict[str, int]:
        text = self.log()
        return {word: text.count(word) for word in PROBLEM_LINES}

    def memory_kib(self) -> dict[str, int]:
        """VmRSS and VmHWM of the server process."""
        out = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0])
        return out

    def status(self) -> dict:
        code, body = http_json(f"{self.http_url}/status")
        if code != 200:
            raise RuntimeError(f"/status answered {code or 'nothing'}")
        return body

    def alive(self) -> bool:
        """The process runs and /healthcheck answers 200."""
        return self.proc.poll() is None and http_json(f"{self.http_url}/healthcheck")[0] == 200

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def finish(self) -> dict[str, object]:
        """Stop the server; the figures of its end. Its log is kept (and named) if anything is wrong."""
        exit_code = self.stop()
        problems = self.problems()
        left = len(shm_names(self.proc.pid))
        kept = exit_code != 0 or left or any(problems.values())
        if not kept:
            with contextlib.suppress(OSError):
                os.unlink(self.log_path)
        return {"server exit code after SIGTERM": exit_code, "server's /dev/shm names left after it stopped": left,
                "log lines: Traceback / Internal error / CRITICAL": " / ".join(str(problems[w]) for w in PROBLEM_LINES),
                "server log kept": self.log_path if kept else "-"}


def shm_names(pid: int | None = None) -> set[str]:
    """/dev/shm entries named lmcache_* or lmcd_* (of process ``pid`` only, if given)."""
    names = {n for n in os.listdir("/dev/shm") if SHM_NAME.match(n)}
    if pid is None:
        return names
    return {n for n in names if f"_{pid}_" in n or n.endswith(f"_{pid}")}


def count(value: object) -> int:
    """A /status entry as a number: an int, or the length of a list or mapping."""
    if isinstance(value, int):
        return value
    return len(value) if isinstance(value, list | dict) else 0


# ------------------------------------------------------------------ the synthetic worker

@dataclass(frozen=True)
class Geometry:
    layers: int
    blocks: int
    block_size: int
    heads: int
    head_size: int


SMALL = Geometry(2, 64, 16, 1, 8)  # 512-byte pages, 16 KiB chunks: a request costs Python and ZMQ
LARGE = Geometry(2, 64, 128, 8, 64)  # 256 KiB pages, 1 MiB chunks: a store of 16 chunks copies 16 MiB


class Worker:
    """A registered synthetic CPU worker (server copies, as ``lmcache bench`` makes it): one session,
    its KV in SHM, its worker id. Chunk i of a store holds its own key, repeated, in every page, so
    a retrieve can be checked against the keys alone. Used by one thread."""

    def __init__(self, url: str, geo: Geometry, model: str, name: str, timeout_s: float = 10.0) -> None:
        self.kv = CpuKVCache(geo.layers, geo.blocks, geo.block_size, geo.heads, geo.head_size)
        try:
            ns = p.Namespace(model, "bf16", self.kv.geometry, 1, 0)
            self.client = CacheClient(url, ns, role=p.Role.WORKER, timeout_s=timeout_s, client_name=name)
            self.info = self.kv.register(self.client)
        except BaseException:
            self.kv.close()
            raise
        self.worker_id = self.info.worker_id
        self.bpc = self.info.blocks_per_chunk

    def blocks(self, first_chunk: int, num_chunks: int) -> list[int]:
        return list(range(first_chunk * self.bpc, (first_chunk + num_chunks) * self.bpc))

    def _pattern(self, key: bytes) -> np.ndarray:
        return np.frombuffer(key * (self.kv.page_bytes // len(key)), dtype=np.uint8)

    def fill(self, keys: list[bytes], blocks: list[int]) -> None:
        for i, key in enumerate(keys):
            for layer in range(self.kv.layout.num_layers):
                self.kv.pages(layer)[blocks[i * self.bpc:(i + 1) * self.bpc]] = self._pattern(key)

    def holds(self, keys: list[bytes], blocks: list[int]) -> bool:
        return all(np.array_equal(self.kv.pages(layer)[b], self._pattern(key))
                   for i, key in enumerate(keys) for b in blocks[i * self.bpc:(i + 1) * self.bpc]
                   for layer in range(self.kv.layout.num_layers))

    def close(self) -> None:
        self.client.close()
        self.kv.close()


def new_keys(n: int) -> list[bytes]:
    return [os.urandom(p.HASH_BYTES) for _ in range(n)]


# ------------------------------------------------------------------ hostile

def api_client(url: str, index: int, num_calls: int, seed: int, model: str, tally: Tally) -> None:
    """A registered worker calling the client's own methods with hostile values; every call is one
    request, answered by a typed reply or a ServerError."""
    rng = random.Random(seed * 1000 + 500 + index)
    worker = Worker(url, LARGE, model, f"reliability api {index}")
    tally.sessions += 1
    try:
        calls = api_calls(worker, rng)
        for _ in range(num_calls):
            tally.sent += 1
            tally.recoverable += 1
            try:
                outcome = rng.choice(calls)()
                tally.codes[outcome] += 1
            except ServerError as exc:
                tally.codes[exc.code.name] += 1
            except ServerTimeout:
                tally.unanswered += 1
                continue
            except (ProtocolError, LmcdError):
                tally.bad_replies += 1
            except Exception as exc:  # a bug of this benchmark: counted, and the client goes on
                tally.codes[f"benchmark bug: {type(exc).__name__}"] += 1
            tally.answered += 1
            tally.rid_matched += 1  # the client matched it by rid
    finally:
        worker.close()


def api_calls(w: Worker, rng: random.Random) -> list[Callable[[], str]]:
    """Hostile calls of one worker's client; each returns what came back (an Error raises)."""
    c, wid, bpc, num_blocks = w.client, w.worker_id, w.bpc, w.kv.layout.num_blocks
    held: list[int] = []

    def collect(rid: int) -> str:
        reply = c.collect(rid, c.timeout_s)
        if reply is None:
            raise ServerTimeout("no reply to a posted request")
        return type(reply).__name__

    def roundtrip() -> str:  # real work in between: a store, a leased lookup, a retrieve, checked
        keys = new_keys(2)
        w.fill(keys, w.blocks(0, 2))
        c.store(wid, keys, w.blocks(0, 2))
        hit = c.lookup(keys)
        got = c.retrieve(wid, keys[:hit.num_hit_chunks], w.blocks(2, hit.num_hit_chunks), hit.lease_id)
        if not w.holds(keys[:got], w.blocks(2, got)):
            return "roundtrip: BYTES DIFFER"
        return "roundtrip ok" if got == 2 else "roundtrip short (a hostile Clear came between)"

    def lease() -> str:
        keys = new_keys(1)
        c.store(wid, keys, w.blocks(0, 1))
        hit = c.lookup(keys)
        if hit.lease_id is not None:
            held.append(hit.lease_id)
        if not held:
            return "no lease (a hostile Clear came between)"
        c.release(held[0])  # the first time it ends the lease, then UNKNOWN_LEASE
        return "Released"

    def stored(result: StoreResult) -> str:
        return f"stored {result.num_stored} of {len(result.statuses)}"

    def unregister_unknown() -> str:
        c.unregister_worker(wid + 1 + rng.randrange(2**32))
        return "Unregistered"

    def register_bogus() -> str:
        c.register_worker(hostile_layout(rng), rng.choice([p.Device.CPU, p.Device.CUDA]), p.Copier.SERVER,
                          [rng.choice([1, 2**40])])
        return "Registered"

    return [
        lambda: stored(c.store(wid, new_keys(1), [num_blocks + rng.randrange(2**40)] * bpc)),
        lambda: stored(c.store(wid, new_keys(2), [0])),  # too few block ids
        lambda: stored(c.store(wid + 1 + rng.randrange(2**32), new_keys(1), w.blocks(0, 1))),
        lambda: stored(c.store(wid, [b"k" * p.HASH_BYTES] * 2, w.blocks(0, 2))),  # one key twice
        lambda: f"retrieved {c.retrieve(wid, new_keys(1), w.blocks(0, 1), rng.getrandbits(63))}",  # unknown lease
        lambda: f"retrieved {c.retrieve(wid, new_keys(1), w.blocks(0, 1), None, 2**40)}",
        lambda: f"retrieved {c.retrieve(wid, new_keys(1), [2**40] * bpc)}",
        lambda: f"released {c.release(rng.getrandbits(63))}",
        lease, lease,
        unregister_unknown,
        lambda: f"pinned {c.pin(wid, new_keys(1))}",  # a server-copies worker may not Pin
        lambda: collect(c.post_grant(wid, 2**40)),
        lambda: collect(c.post_commit(wid, new_keys(1), [2**40], 5, 0.0)),
        lambda: collect(c.post_loaded(wid, rng.getrandbits(63), new_keys(1), 0, 0.0)),
        lambda: f"hits {c.lookup(new_keys(1), True, True).num_hit_chunks}",  # slots from a pool that is not shared
        lambda: f"hits {c.lookup(new_keys(4096)).num_hit_chunks}",
        register_bogus, roundtrip, roundtrip,
    ]


def part_hostile(args: argparse.Namespace) -> dict:
    server = Server(args.pool_gb)
    try:
        time.sleep(0.5)
        before = server.memory_kib()
        started = time.monotonic()
        api_frames = split(int(args.frames * args.api_share) if args.api_clients else 0, args.api_clients)
        raw_frames = split(args.frames - sum(api_frames), args.raw_clients)
        tallies = [Tally() for _ in range(args.raw_clients + args.api_clients)]
        threads = [threading.Thread(target=raw_client, daemon=True,
                                    args=(server.url, i, raw_frames[i], args.frames_per_session, args.seed, tallies[i]))
                   for i in range(args.raw_clients)]
        model = f"reliability-{uuid.uuid4().hex[:8]}"
        api_tallies = tallies[args.raw_clients:]
        threads += [threading.Thread(target=api_client, daemon=True,
                                     args=(server.url, i, api_frames[i], args.seed, model, api_tallies[i]))
                    for i in range(args.api_clients)]
        for t in threads:
            t.start()
        deadline = started + args.hostile_timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        timed_out = sum(t.is_alive() for t in threads)
        seconds = time.monotonic() - started
        oversize_replies = oversize_frames(server.url, args.oversize)
        time.sleep(1.0)
        after = server.memory_kib()
        total = Tally()
        for tally in tallies:
            total.add(tally)
        alive = server.alive()
        counters = server.status()["counters"] if alive else {}
        roundtrip = check_roundtrip(server.url) if alive else "server dead"
    finally:
        end = server.finish()
    return {
        "messages sent": total.sent, "raw sessions / api clients": f"{args.raw_clients} / {args.api_clients}",
        "sessions opened": total.sessions, "replies": total.answered, "unanswered": total.unanswered,
        "recoverable rids": total.recoverable, "replies with the matching rid": total.rid_matched,
        "replies with an unexpected rid": total.unexpected_rid, "bad replies (several frames, undecodable, "
        "wrong type)": total.bad_replies, "clients still running at the deadline": timed_out,
        "seconds": round(seconds, 1), "messages/s": round(total.sent / seconds),
        "oversize frames sent / replies": f"{args.oversize} / {oversize_replies}",
        "server alive (poll None and /healthcheck 200)": alive, "real store/lookup/retrieve afterwards": roundtrip,
        **end,
        "RSS before / after (MiB)": f"{before['VmRSS'] / 1024:.0f} / {after['VmRSS'] / 1024:.0f}",
        "VmHWM before / after (MiB)": f"{before['VmHWM'] / 1024:.0f} / {after['VmHWM'] / 1024:.0f}",
        "server bad_frames counter": counters.get("bad_frames"),
        "server errors by code": dict(sorted(counters.get("errors", {}).items())),
        "replies by kind": dict(total.codes.most_common()),
    }


def split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` shares that differ by at most one."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def check_roundtrip(url: str) -> str:
    worker = Worker(url, LARGE, f"reliability-check-{uuid.uuid4().hex[:8]}", "reliability check")
    try:
        keys = new_keys(4)
        worker.fill(keys, worker.blocks(0, 4))
        worker.client.store(worker.worker_id, keys, worker.blocks(0, 4))
        hit = worker.client.lookup(keys)
        got = worker.client.retrieve(worker.worker_id, keys, worker.blocks(4, 4), hit.lease_id)
        return "ok" if got == 4 and worker.holds(keys, worker.blocks(4, 4)) else f"WRONG ({got} of 4 chunks)"
    except LmcdError as exc:
        return f"FAILED: {exc}"
    finally:
        worker.close()


# ------------------------------------------------------------------ kill -9 mid-copy

def kill_worker_main(url: str, model: str, flag_path: str) -> None:
    """The worker that is killed: stores 16 MiB and retrieves it under a lease, forever, holding one
    more lease besides; byte 0 of ``flag_path`` is 1 while a store or retrieve is in flight."""
    fd = os.open(flag_path, os.O_RDWR)
    flag = mmap.mmap(fd, 4096)
    worker = Worker(url, LARGE, model, "reliability kill")
    c, wid, dangling = worker.client, worker.worker_id, None
    print("ready", flush=True)
    while True:
        keys = new_keys(16)
        flag[0] = 1
        c.store(wid, keys, worker.blocks(0, 16))
        flag[0] = 0
        hit = c.lookup(keys)
        flag[0] = 1
        c.retrieve(wid, keys[:hit.num_hit_chunks], worker.blocks(16, hit.num_hit_chunks), hit.lease_id)
        flag[0] = 0
        if dangling is not None:
            c.release(dangling)
        dangling = c.lookup(keys).lease_id  # a lease the kill leaves behind


def held(status: dict) -> tuple[int, int, int]:
    """Sessions, workers and leases the server holds."""
    return count(status.get("sessions")), count(status.get("workers")), count(status.get("leases"))


def one_kill(server: Server, model: str, flag: mmap.mmap, flag_path: str, rng: random.Random,
             shm_wait_s: float) -> dict:
    proc = child("kill_worker", url=server.url, model=model, flag_path=flag_path)
    if read_line(proc, 30) != "ready":
        proc.kill()
        raise RuntimeError("the kill worker did not register within 30 s")
    time.sleep(rng.uniform(0.05, 0.4))
    wait_until = time.monotonic() + 1.0
    between = flag[0] != 1
    while flag[0] != 1 and time.monotonic() < wait_until:
        pass
    if between:  # the request was just sent: into its copy (16 MiB take milliseconds), not its send
        time.sleep(rng.uniform(0.0005, 0.002))
    in_flight = flag[0] == 1
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    freed_s = None
    while time.monotonic() - t0 < 10:
        if held(server.status()) == (0, 0, 0):
            freed_s = time.monotonic() - t0
            break
        time.sleep(0.005)
    proc.wait(5)
    shm_s = None
    while time.monotonic() - t0 < shm_wait_s:
        if not shm_names(proc.pid):
            shm_s = time.monotonic() - t0
            break
        time.sleep(0.01)
    return {"in_flight": in_flight, "freed_s": freed_s, "shm_s": shm_s, "shm_left": len(shm_names(proc.pid))}


def pinned_fill(server: Server, model: str) -> dict:
    """Store the pool's capacity in chunks, each batch pinned by a lease: a chunk a killed worker
    left pinned takes a slot nothing can evict, so the fill is refused that many chunks."""
    worker = Worker(server.url, LARGE, model, "reliability fill")
    capacity = int(server.status()["pool"]["capacity_bytes"])
    num_chunks = capacity // worker.info.chunk_bytes
    refused = stored = 0
    leases = []
    try:
        while stored + refused < num_chunks:
            keys = new_keys(min(16, num_chunks - stored - refused))
            result = worker.client.store(worker.worker_id, keys, worker.blocks(0, len(keys)))
            stored += result.num_stored
            refused += len(keys) - result.num_stored
            hit = worker.client.lookup([k for k, s in zip(keys, result.statuses, strict=True)
                                        if s == p.ChunkStatus.STORED])
            if hit.lease_id is not None:
                leases.append(hit.lease_id)
        for lease_id in leases:
            worker.client.release(lease_id)
    finally:
        worker.close()
    return {"chunks": num_chunks, "stored": stored, "refused": refused}


def part_kill(args: argparse.Namespace) -> dict:
    server = Server(args.pool_gb)
    rng = random.Random(args.seed)
    model = f"reliability-{uuid.uuid4().hex[:8]}"
    fd, flag_path = tempfile.mkstemp(prefix="reliability_flag_")
    os.ftruncate(fd, 4096)
    flag = mmap.mmap(fd, 4096)
    shm_before = shm_names()
    results = []
    started = time.monotonic()
    try:
        for _ in range(args.kills):
            results.append(one_kill(server, model, flag, flag_path, rng, args.shm_wait))
            if server.proc.poll() is not None:
                break
        fill = pinned_fill(server, model) if server.alive() else {}
        alive = server.alive()
        counters = server.status()["counters"] if alive else {}
    finally:
        end = server.finish()
        flag.close()
        os.close(fd)
        os.unlink(flag_path)
    freed = sorted(r["freed_s"] for r in results if r["freed_s"] is not None)
    shm = sorted(r["shm_s"] for r in results if r["shm_s"] is not None)
    return {
        "kills": len(results), "kills with a store or retrieve in flight": sum(r["in_flight"] for r in results),
        "freed (sessions, workers, leases gone from /status) within 2 s": sum(s <= 2.0 for s in freed),
        "not freed within 10 s": len(results) - len(freed),
        "seconds to free: median / p90 / max": quantiles(freed),
        "seconds until the worker's /dev/shm names are gone: median / max": quantiles(shm, (0.5, 1.0)),
        f"/dev/shm names of killed workers left after {args.shm_wait:.0f} s": sum(r["shm_left"] for r in results),
        "new lmcache_*/lmcd_* names in /dev/shm (any process)": len(shm_names() - shm_before),
        "pinned fill after the kills: chunks / stored / refused":
            f"{fill.get('chunks')} / {fill.get('stored')} / {fill.get('refused')}",
        "server stores / retrieves / disconnects": f"{counters.get('stores')} / {counters.get('retrieves')} / "
                                                   f"{counters.get('disconnects')}",
        "server errors by code": dict(sorted(counters.get("errors", {}).items())),
        "server alive": alive, **end,
        "seconds": round(time.monotonic() - started, 1),
    }


def quantiles(values: list[float], qs: tuple[float, ...] = (0.5, 0.9, 1.0)) -> str:
    if not values:
        return "-"
    return " / ".join(f"{float(np.quantile(values, q)):.3f}" for q in qs)


# ------------------------------------------------------------------ drivers: soak and load

@dataclass
class DriverResult:
    """One driver process's sessions together, sent back as one JSON line."""

    iterations: int = 0
    window_s: float = 0.0
    latencies_us: dict[str, list[int]] = field(default_factory=dict)
    ops: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    refused_chunks: int = 0
    retrieve_misses: int = 0  # a leased lookup's hits evicted before the retrieve: never expected


def add_counts(into: dict[str, int], more: dict[str, int]) -> None:
    for key, n in more.items():
        into[key] = into.get(key, 0) + n


def session_loop(worker: Worker, chunks: int, seconds: float, check: bool, keep: bool, out: DriverResult,
                 lock: threading.Lock) -> None:
    """Store fresh chunks, look up one of the last 16 stores (leased) and retrieve its hits, until
    ``seconds`` have passed; errors are counted and the loop goes on."""
    c, wid = worker.client, worker.worker_id
    src, dst = worker.blocks(0, chunks), worker.blocks(chunks, chunks)
    recent: deque[list[bytes]] = deque(maxlen=16)
    rng = random.Random()
    lat: dict[str, list[int]] = {"lookup": [], "store": [], "retrieve": []}
    ops, errors, samples = Counter[str](), Counter[str](), list[str]()
    iterations = refused = misses = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            keys = new_keys(chunks)
            if check:
                worker.fill(keys, src)
            t0 = time.perf_counter()
            result = c.store(wid, keys, src)
            t1 = time.perf_counter()
            refused += sum(s in (p.ChunkStatus.REFUSED_FULL, p.ChunkStatus.REFUSED_TOO_LARGE) for s in result.statuses)
            if p.ChunkStatus.FAILED in result.statuses:
                errors["store FAILED"] += 1
            recent.append(keys)
            target = recent[rng.randrange(len(recent))]
            hit = c.lookup(target)
            t2 = time.perf_counter()
            ops.update(("store", "lookup"))
            if keep:
                lat["store"].append(int((t1 - t0) * 1e6))
                lat["lookup"].append(int((t2 - t1) * 1e6))
            n = hit.num_hit_chunks
            if n:
                got = c.retrieve(wid, target[:n], dst[:n * worker.bpc], hit.lease_id)
                ops["retrieve"] += 1
                if keep:
                    lat["retrieve"].append(int((time.perf_counter() - t2) * 1e6))
                misses += got != n
                if check and not worker.holds(target[:got], dst[:got * worker.bpc]):
                    errors["retrieved bytes differ"] += 1
            iterations += 1
        except (LmcdError, OSError) as exc:
            errors[type(exc).__name__] += 1
            if len(samples) < 5:
                samples.append(str(exc)[:300])
    with lock:
        out.iterations += iterations
        add_counts(out.ops, ops)
        add_counts(out.errors, errors)
        out.error_samples += samples[:5 - len(out.error_samples)]
        out.refused_chunks += refused
        out.retrieve_misses += misses
        for op, values in lat.items():
            out.latencies_us.setdefault(op, []).extend(values)


def driver_main(url: str, model: str, sessions: int, geometry: str, chunks: int, seconds: float, check: bool,
                keep: bool) -> None:
    """Register ``sessions`` workers, say "ready", wait for "go" on stdin, run them as threads for
    ``seconds``, then print one JSON line of the result."""
    geo = SMALL if geometry == "small" else LARGE
    out = DriverResult()
    workers = []
    for i in range(sessions):
        try:
            workers.append(Worker(url, geo, model, f"reliability driver {os.getpid()}.{i}", timeout_s=30.0))
        except (LmcdError, OSError) as exc:
            add_counts(out.errors, {f"register: {type(exc).__name__}": 1})
            out.error_samples.append(str(exc)[:300])
    print("ready", flush=True)
    sys.stdin.readline()
    lock = threading.Lock()
    threads = [threading.Thread(target=session_loop, args=(w, chunks, seconds, check, keep, out, lock), daemon=True)
               for w in workers]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    out.window_s = time.monotonic() - started
    for w in workers:
        w.close()
    print(json.dumps(msgspec.to_builtins(out)), flush=True)


def run_drivers(server: Server, num: int, per_driver: list[int], seconds: float, during: Callable[[], None],
                **params: object) -> DriverResult:
    """Start ``num`` drivers, start them together once all are ready, call ``during`` while they
    run (it returns by itself), and add up their results."""
    model = f"reliability-{uuid.uuid4().hex[:8]}"
    procs = [child("driver", url=server.url, model=model, sessions=per_driver[i], seconds=seconds, **params)
             for i in range(num)]
    for proc in procs:
        if read_line(proc, 120) != "ready":
            raise RuntimeError("a driver did not get ready within 120 s")
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
    during()
    total = DriverResult()
    for proc in procs:
        line = read_line(proc, seconds + 120)
        if not line:
            add_counts(total.errors, {"driver gave no result": 1})
            continue
        result = msgspec.convert(json.loads(line), DriverResult)
        total.iterations += result.iterations
        total.window_s = max(total.window_s, result.window_s)
        add_counts(total.ops, result.ops)
        add_counts(total.errors, result.errors)
        total.error_samples += result.error_samples
        total.refused_chunks += result.refused_chunks
        total.retrieve_misses += result.retrieve_misses
        for op, values in result.latencies_us.items():
            total.latencies_us.setdefault(op, []).extend(values)
        proc.wait(10)
    return total


def part_soak(args: argparse.Namespace) -> dict:
    server = Server(args.pool_gb)
    samples: list[tuple[float, int, int]] = []  # seconds, VmRSS KiB, evicted chunks
    time.sleep(0.5)
    at_start = server.memory_kib()["VmRSS"]
    started = time.monotonic()

    def sample() -> None:
        end = time.monotonic() + args.soak_seconds
        while time.monotonic() < end and server.proc.poll() is None:
            try:
                counters = server.status()["counters"]
            except RuntimeError:  # /status does not answer: the end figures say why
                break
            samples.append((time.monotonic() - started, server.memory_kib()["VmRSS"], counters["evicted_chunks"]))
            time.sleep(min(args.sample_seconds, max(0.0, end - time.monotonic())))

    try:
        result = run_drivers(server, args.soak_workers, [1] * args.soak_workers, args.soak_seconds, sample,
                             geometry="large", chunks=4, check=True, keep=False)
        alive = server.alive()
        counters = server.status()["counters"] if alive else {}
        memory = server.memory_kib() if alive else {"VmRSS": 0, "VmHWM": 0}
    finally:
        end = server.finish()
    t = np.array([s[0] for s in samples]) / 60
    rss = np.array([s[1] for s in samples]) / 1024
    warm = t >= min(1.0, t[-1] / 5) if len(t) else t  # after the first minute (a fifth of a short run)
    slope = float(np.polyfit(t[warm], rss[warm], 1)[0]) if warm.sum() >= 3 else float("nan")
    server_errors = dict(sorted(counters.get("errors", {}).items()))
    return {
        "seconds": round(time.monotonic() - started, 1), "workers (1 session each)": args.soak_workers,
        "pool GiB": args.pool_gb, "RSS samples": len(samples), "RSS before the workers (MiB)": round(at_start / 1024),
        "RSS first / last / max (MiB)": f"{rss[0]:.0f} / {rss[-1]:.0f} / {rss.max():.0f}" if len(rss) else "-",
        "RSS after warm-up: first / last (MiB)": f"{rss[warm][0]:.0f} / {rss[warm][-1]:.0f}" if warm.any() else "-",
        "RSS slope after warm-up (MiB/min)": round(slope, 3), "VmHWM at the end (MiB)": round(memory["VmHWM"] / 1024),
        "server stores / retrieves / evicted chunks": f"{counters.get('stores')} / {counters.get('retrieves')} / "
                                                      f"{counters.get('evicted_chunks')}",
        "first eviction at (s)": next((round(s[0]) for s in samples if s[2]), None),
        "client errors (exceptions, FAILED, bytes differ)": dict(result.errors),
        "error samples": result.error_samples, "server Error replies by code": server_errors,
        "refused chunks (REFUSED_*)": result.refused_chunks, "leased hits missing at retrieve": result.retrieve_misses,
        "server alive": alive, **end,
        "rss_samples_mib": [[round(float(a), 3), round(float(b), 1)] for a, b in zip(t, rss, strict=True)],
    }


def part_load(args: argparse.Namespace) -> dict:
    out = {}
    for sessions in [int(s) for s in args.load_sessions.split(",") if s.strip()]:
        num = min(sessions, args.load_processes)
        per_driver = split(sessions, num)
        server = Server(args.pool_gb)
        try:
            result = run_drivers(server, num, per_driver, args.load_seconds, lambda: time.sleep(args.load_seconds),
                                 geometry="small", chunks=1, check=False, keep=True)
            alive = server.alive()
            counters = server.status()["counters"] if alive else {}
        finally:
            end = server.finish()
        row: dict[str, object] = {"processes x threads": f"{num} x {per_driver[0]}",
                                  "seconds": round(result.window_s, 1),
                                  "requests/s": round(sum(result.ops.values()) / result.window_s)}
        for op in ("lookup", "store", "retrieve"):
            ms = np.array(result.latencies_us.get(op, [0])) / 1000
            row[f"{op}/s"] = round(result.ops.get(op, 0) / result.window_s)
            row[f"{op} p50 / p99 ms"] = f"{np.percentile(ms, 50):.2f} / {np.percentile(ms, 99):.2f}"
        row.update({"client errors": dict(result.errors), "error samples": result.error_samples,
                    "server Error replies by code": dict(sorted(counters.get("errors", {}).items())),
                    "evicted chunks": counters.get("evicted_chunks"), "server alive": alive, **end})
        out[f"{sessions} sessions"] = row
    return out


# ------------------------------------------------------------------ report

def machine() -> dict[str, object]:
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    return {"nproc": len(os.sched_getaffinity(0)), "memory GiB": round(mem_kib / 2**20, 1), "cpu": model,
            "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "python": platform.python_version(), "kernel": platform.release(), "lmcd": __version__,
            "commit": commit, "date (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def markdown(report: dict) -> Iterator[str]:
    yield f"Command: `{report['command']}`"
    yield ""
    yield "Machine: " + ", ".join(f"{k} {v}" for k, v in report["machine"].items())
    for part, figures in report["parts"].items():
        tables = figures if part == "load" and "part failed" not in figures else {part: figures}
        for title, rows in tables.items():
            yield ""
            yield f"### {part}" + (f": {title}" if part == "load" else "")
            yield ""
            yield "| figure | value |"
            yield "|---|---|"
            for key, value in rows.items():
                if key != "rss_samples_mib":
                    shown = ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else value
                    yield f"| {key} | {shown if shown not in ('', [], None) else '-'} |"


PARTS = {"hostile": part_hostile, "kill": part_kill, "soak": part_soak, "load": part_load}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":  # a child process of this script
        params = json.loads(sys.argv[3])
        run_child: dict[str, Callable[..., None]] = {"kill_worker": kill_worker_main, "driver": driver_main}
        run_child[sys.argv[2]](**params)
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="+", choices=[*PARTS, "all"])
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--pool-gb", type=float, default=0.25, help="--l1-size-gb of every server")
    parser.add_argument("--frames", type=int, default=100_000, help="hostile: messages in all")
    parser.add_argument("--raw-clients", type=int, default=12)
    parser.add_argument("--api-clients", type=int, default=4)
    parser.add_argument("--api-share", type=float, default=0.1, help="hostile: share of messages by api clients")
    parser.add_argument("--frames-per-session", type=int, default=1000, help="hostile: a raw client reconnects after")
    parser.add_argument("--oversize", type=int, default=4, help="hostile: frames above MAX_FRAME_BYTES")
    parser.add_argument("--hostile-timeout", type=float, default=600)
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--shm-wait", type=float, default=10.0, help="kill: seconds to wait for /dev/shm names")
    parser.add_argument("--soak-seconds", type=float, default=600)
    parser.add_argument("--soak-workers", type=int, default=4)
    parser.add_argument("--sample-seconds", type=float, default=5)
    parser.add_argument("--load-sessions", default="32,128")
    parser.add_argument("--load-seconds", type=float, default=30)
    parser.add_argument("--load-processes", type=int, default=4, help="load: sessions are threads of these")
    parser.add_argument("--json", default="", help="also write every figure to this file")
    args = parser.parse_intermixed_args()
    parts = list(PARTS) if "all" in args.parts else list(dict.fromkeys(args.parts))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally below kills the children
    report: dict = {"command": " ".join(["python", "benchmarks/reliability.py", *sys.argv[1:]]), "machine": machine(),
                    "parts": {}}
    try:
        for part in parts:
            print(f"reliability: {part} ...", file=sys.stderr, flush=True)
            try:
                report["parts"][part] = PARTS[part](args)
            except Exception as exc:  # a part that cannot finish (the server died, say) is a figure too
                traceback.print_exc()
                report["parts"][part] = {"part failed": f"{type(exc).__name__}: {exc}"}
            kill_children()
    finally:
        kill_children()
    print("\n".join(markdown(report)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
