"""The Redis L2 tier (``lmcd.server.redistier.RedisAdapter``) against raw redis-py on the same objects.

One redis-server the script starts on 127.0.0.1 (no persistence; stopped at exit). Per round and per
thread count T, four timed phases over N objects of --size-mib each (the objects split over T threads):

    adapter write   encode_header (XXH3-64) + RedisAdapter.write (EXISTS, then SET NX of header+payload,
                    the payload sent from its memoryview)
    adapter read    RedisAdapter.read_into (GET, header checks, copy into the destination) + verify (XXH3-64)
    raw write       redis-py pipelines of --pipeline SETs of prebuilt bytes values (header+payload)
    raw read        redis-py pipelines of --pipeline GETs, values dropped

Both clients read with the adapter's socket_read_size (SOCKET_READ_BYTES).
GB/s is N * size / seconds; the ratio is adapter / raw. Rounds interleave adapter and raw; the table
shows each phase's median. The database is flushed after every write+read pair.

    python benchmarks/l2_redis.py [--n 100] [--size-mib 6] [--pipeline 8] [--threads 1,2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import redis

from lmcd.server.l2 import ObjectId, encode_header, verify
from lmcd.server.redistier import SOCKET_READ_BYTES, RedisAdapter

MIB = 1 << 20


def start_redis_server(port: int, workdir: str, maxmemory_mib: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", workdir, "--maxmemory", f"{maxmemory_mib}mb",
                             "--maxmemory-policy", "noeviction"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"redis-server on port {port} did not answer within 10 s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def in_threads(num_threads: int, n: int, work: Callable[[range], None]) -> float:
    """Seconds for ``work`` over 0..n-1, split into ``num_threads`` contiguous ranges run at once."""
    bounds = [n * t // num_threads for t in range(num_threads + 1)]
    with ThreadPoolExecutor(num_threads) as pool:
        t0 = time.perf_counter()
        list(pool.map(work, [range(bounds[t], bounds[t + 1]) for t in range(num_threads)]))
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--size-mib", type=float, default=6.0)
    ap.add_argument("--pipeline", type=int, default=8, help="raw SET/GET pipeline depth")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server not installed (apt-get install redis-server)")
    size, n = int(args.size_mib * MIB), args.n
    thread_counts = [int(t) for t in args.threads.split(",")]

    # The "L1 pool": one buffer, objects are memoryview slices of it, as the cascade passes them.
    pool = bytearray(os.urandom(size)) * n
    view = memoryview(pool)
    payloads = [view[i * size:(i + 1) * size] for i in range(n)]
    oids = [ObjectId("bench\x1fbf16\x1fgeometry\x1f1", 0, i.to_bytes(32, "little")) for i in range(n)]
    dests = [memoryview(bytearray(size)) for _ in range(n)]
    values = [encode_header(oid, p) + bytes(p) for oid, p in zip(oids, payloads, strict=True)]  # raw: prebuilt

    workdir = tempfile.mkdtemp(prefix="lmcd-bench-redis-")
    port = free_port()
    server = start_redis_server(port, workdir, maxmemory_mib=int(2.5 * n * size / MIB) + 256)
    try:
        raw = redis.Redis(host="127.0.0.1", port=port, socket_timeout=30, socket_read_size=SOCKET_READ_BYTES)
        tier = RedisAdapter("resp", host="127.0.0.1", port=port, timeout_s=30.0, key_prefix="a:")
        tier.start()

        def adapter_write(part: range) -> None:
            for i in part:
                header = encode_header(oids[i], payloads[i])
                assert tier.write(oids[i].name, header, payloads[i])

        def adapter_read(part: range) -> None:
            for i in part:
                header = tier.read_into(oids[i].name, dests[i])
                verify(oids[i], header, dests[i])

        def raw_write(part: range) -> None:
            for start in range(part.start, part.stop, args.pipeline):
                pipe = raw.pipeline(transaction=False)
                for i in range(start, min(start + args.pipeline, part.stop)):
                    pipe.set(f"r:{i}", values[i])
                pipe.execute()

        def raw_read(part: range) -> None:
            for start in range(part.start, part.stop, args.pipeline):
                pipe = raw.pipeline(transaction=False)
                for i in range(start, min(start + args.pipeline, part.stop)):
                    pipe.get(f"r:{i}")
                assert all(v is not None for v in pipe.execute())

        results: dict[tuple[int, str], list[float]] = {}
        for _ in range(args.rounds):
            for t in thread_counts:
                for phase, fn in (("adapter write", adapter_write), ("adapter read", adapter_read),
                                  ("raw write", raw_write), ("raw read", raw_read)):
                    seconds = in_threads(t, n, fn)
                    results.setdefault((t, phase), []).append(n * size / seconds / 1e9)
                    if phase.endswith("read"):
                        raw.flushall()
        tier.close()
        raw.close()
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{n} objects of {size / MIB:g} MiB, redis-server {redis_version()}, redis-py {redis.__version__}, "
          f"raw pipeline {args.pipeline}, median of {args.rounds} rounds, {os.cpu_count()} CPUs\n")
    print("| threads | op | adapter GB/s | raw GB/s | ratio |")
    print("|---|---|---|---|---|")
    for t in thread_counts:
        for op in ("write", "read"):
            a = statistics.median(results[(t, f"adapter {op}")])
            r = statistics.median(results[(t, f"raw {op}")])
            print(f"| {t} | {op} | {a:.2f} | {r:.2f} | {a / r:.2f} |")
    sys.stdout.flush()


def redis_version() -> str:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=10).stdout
    return next((w.split("=")[1] for w in out.split() if w.startswith("v=")), "?")


if __name__ == "__main__":
    main()
