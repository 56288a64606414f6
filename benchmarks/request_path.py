"""Latency and CPU of ONE small request, from the worker's call to the server's reply (not a test).

Starts a real ``lmcache server`` and, in this process, a CPU ``WorkerState`` (engine_driven)
with a tiny geometry (2 layers, one 512-byte page per block, 16 blocks per 256-token chunk), so
the memmove is negligible and what is left is Python, ZMQ and the copy thread's hop. The server
logs at INFO (as in production) to a file. Per kind of request, over ``--requests`` requests:

- ``lat``: the median latency of the call;
- ``wcpu``: the median CPU time of the calling thread per call (Python plus its syscalls; the
  wait for the reply is not CPU);
- ``scpu``: the server's CPU time per request, every thread (ZMQ's I/O thread and the copy
  thread included), from /proc/PID/task/*/schedstat.

Kinds: ``zmq`` (a bare DEALER round trip of an encoded Ping: the floor), ``ping``
(``CacheClient.ping``), ``client_store`` / ``store`` (one fresh chunk through ``CacheClient.store``
/ ``WorkerState.store``), ``load`` (``WorkerState.load`` of one cached chunk: a Retrieve).

Then the server is started again with its loop instrumented (the ``--serve`` mode of this file
monkeypatches it; nothing of this is in the product) and the same requests are timed inside it,
wall time and (``*_cpu``) loop-thread CPU: ``handle`` (frame received -> request handled: copy
submitted, or reply sent), ``hop`` (copy submitted -> its completion runs on the loop: the copy
thread, memmove included, and the wake-up of the loop), ``finish`` (completion -> reply sent,
bookkeeping and log line included) and ``total`` (frame received -> reply sent, what the server
logs at DEBUG). ``--profile-worker FILE`` / ``--profile-server FILE`` write cProfile stats of the
worker's store loop / of the whole server.

    python benchmarks/request_path.py [--requests 2000] [--pin] [--json]
"""

from __future__ import annotations

import argparse
import atexit
import cProfile
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

PAGE_HEADS, BLOCK, HEAD, LAYERS, NUM_BLOCKS, CHUNK = 1, 16, 8, 2, 1024, 256
BPC = CHUNK // BLOCK
RUNNING = re.compile(r"LMCache cache server is running on (\S+) ")
SERVER_FLAGS = ["--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--l1-size-gb", "1",
                "--chunk-size", str(CHUNK), "--max-workers", "1", "--cuda", "off"]
PHASES = ("handle", "handle_cpu", "hop", "finish", "finish_cpu", "total")


# ------------------------------------------------------------------ server side (--serve)

def serve(stats_path: str, profile_path: str, server_args: list[str]) -> int:
    """Run the real server with its loop instrumented; write per-request phase times on exit."""
    from lmcd.cli import main
    from lmcd.server.daemon import CacheServer
    from lmcd.server.service import CacheService

    records: list[tuple[object, ...]] = []  # op, then PHASES in seconds
    wall, cpu = time.perf_counter, time.thread_time
    now: dict[str, float] = {}  # the request in flight (the benchmark sends one at a time)
    op = [""]
    on_frames, handle, post, send_reply = (CacheServer._on_frames, CacheService.handle, CacheServer.post,
                                           CacheServer._send_reply)

    def timed_on_frames(self: CacheServer, frames: list) -> None:
        now.clear()
        now["t0"], now["c0"] = wall(), cpu()
        on_frames(self, frames)
        now["t1"], now["c1"] = wall(), cpu()
        if "sent" in now:  # replied at once (ping, or nothing to copy)
            records.append((op[0], now["t1"] - now["t0"], now["c1"] - now["c0"], 0.0, 0.0, 0.0,
                            now["sent"] - now["t0"]))

    def timed_handle(self: CacheService, session: object, request: object, started: float) -> object:
        op[0] = type(request).__name__.lower()
        return handle(self, session, request, started)  # type: ignore[arg-type]

    def timed_post(self: CacheServer, fn: Callable[[], None]) -> None:
        def run() -> None:
            t3, c3 = wall(), cpu()
            fn()
            t4, c4 = wall(), cpu()
            if "t1" in now:
                records.append((op[0], now["t1"] - now["t0"], now["c1"] - now["c0"], t3 - now["t1"], t4 - t3,
                                c4 - c3, now["sent"] - now["t0"]))

        post(self, run)

    def timed_send_reply(self: CacheServer, *args: object) -> None:
        send_reply(self, *args)  # type: ignore[arg-type]
        now["sent"] = wall()

    CacheServer._on_frames = timed_on_frames  # type: ignore[method-assign]
    CacheService.handle = timed_handle  # type: ignore[method-assign]
    CacheServer.post = timed_post  # type: ignore[method-assign]
    CacheServer._send_reply = timed_send_reply  # type: ignore[method-assign]

    def dump() -> None:
        with open(stats_path, "w") as f:
            json.dump(records, f)

    atexit.register(dump)
    if not profile_path:
        return main(["server", *server_args])
    profiler = cProfile.Profile()
    try:
        return profiler.runcall(main, ["server", *server_args])
    finally:
        profiler.dump_stats(profile_path)


def server_phases(stats_path: str, n: int) -> dict[str, dict[str, float]]:
    with open(stats_path) as f:
        records = json.load(f)
    by_op: dict[str, list[list[float]]] = {}
    for op, *times in records:
        by_op.setdefault(op, []).append(times)
    return {op: {name: median_us([r[k] for r in rows[-n:]]) for k, name in enumerate(PHASES)}
            for op, rows in by_op.items() if len(rows) >= n}  # not hello, register, ...


# ------------------------------------------------------------------ processes

def start(command: list[str], log_path: str, cpu: int | None) -> tuple[subprocess.Popen[bytes], str]:
    """Start a server logging to ``log_path``; returns it and its ZMQ url once it runs. A file,
    not a pipe: no reader thread competes with the worker."""
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                preexec_fn=None if cpu is None else lambda: os.sched_setaffinity(0, {cpu}))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        with open(log_path) as f:
            match = RUNNING.search(f.read())
        if match:
            return proc, match.group(1)
        time.sleep(0.05)
    proc.kill()
    with open(log_path) as f:
        raise RuntimeError(f"the server did not start:\n{f.read()}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def cpu_s(pid: int) -> float:
    """CPU time of every thread of ``pid`` so far (ns resolution, unlike /proc/PID/stat)."""
    total = 0
    task_dir = f"/proc/{pid}/task"
    for tid in os.listdir(task_dir):
        try:
            with open(f"{task_dir}/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:  # the thread ended meanwhile
            pass
    return total / 1e9


# ------------------------------------------------------------------ worker side

def median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def timed(n: int, fn: Callable[[int], object]) -> tuple[list[float], list[float]]:
    """Wall time and calling-thread CPU time of ``fn(i)`` for i < n."""
    walls, cpus = [], []
    wall, cpu = time.perf_counter, time.thread_time
    for i in range(n):
        t0, c0 = wall(), cpu()
        fn(i)
        c1, t1 = cpu(), wall()
        walls.append(t1 - t0)
        cpus.append(c1 - c0)
    return walls, cpus


def worker_run(url: str, server_pid: int, n: int, profile_path: str = "") -> dict[str, dict[str, float]]:
    import numpy as np
    import torch
    import zmq

    from lmcd import protocol as p
    from lmcd.connector.scheduler import LoadSpec, StoreSpec
    from lmcd.connector.settings import ConnectorSettings
    from lmcd.connector.worker import WorkerState

    layer = NUM_BLOCKS * PAGE_HEADS * BLOCK * 2 * HEAD
    raw = torch.zeros(LAYERS * layer, dtype=torch.bfloat16)
    kv = {f"layers.{i}": raw[i * layer : (i + 1) * layer].view(NUM_BLOCKS, PAGE_HEADS, BLOCK, 2 * HEAD)
          for i in range(LAYERS)}
    host, port = url.rsplit(":", 1)
    settings = ConnectorSettings(host=host, port=int(port), transfer_mode="engine_driven")
    ns = p.Namespace(f"bench-{os.urandom(4).hex()}", "bf16", "tiny", 1, 0)
    state = WorkerState(settings, ns, "request_path bench")
    state.register_kv_caches(kv, NUM_BLOCKS, BLOCK)
    client = state.session.client
    assert client is not None and state.worker_id is not None
    worker_id = state.worker_id
    rng = np.random.default_rng(0)
    warm = n // 10
    out: dict[str, dict[str, float]] = {}

    def fresh(count: int) -> list[StoreSpec]:
        return [StoreSpec([os.urandom(32)], rng.choice(NUM_BLOCKS, BPC, replace=False).tolist(), BPC)
                for _ in range(count)]

    def measure(name: str, fn: Callable[[int], object]) -> None:
        timed(warm, fn)
        server_before = cpu_s(server_pid)
        walls, cpus = timed(n, lambda i: fn(warm + i))
        out[name] = {"lat": median_us(walls), "wcpu": median_us(cpus),
                     "scpu": (cpu_s(server_pid) - server_before) / n * 1e6}

    try:
        # the floor: a bare DEALER round trip with the same server (a Pong comes back)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(client.url)
        sock.send(p.encoder.encode(client._hello_request(1)))
        sock.recv()
        ping = p.encoder.encode(p.Ping(2))
        measure("zmq", lambda i: (sock.send(ping), sock.recv()))
        sock.close(0)
        measure("ping", lambda i: client.ping())
        specs = fresh(warm + n)
        measure("client_store", lambda i: client.store(worker_id, specs[i].chunk_keys, specs[i].block_ids))
        specs = fresh(warm + n)
        profiler = cProfile.Profile() if profile_path else None
        if profiler is not None:
            profiler.enable()
        measure("store", lambda i: state.store(specs[i]))
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile_path)
        loads = [LoadSpec(s.chunk_keys, s.block_ids, BPC, 0, None) for s in specs]
        assert state.load(loads[0]) == set()
        measure("load", lambda i: state.load(loads[i]))
    finally:
        state.close()
    return out


def main() -> None:
    if "--serve" in sys.argv:  # the instrumented server: --serve STATS [--server-profile FILE] -- FLAGS
        args = sys.argv[1:]
        split = args.index("--")
        opts = args[:split]
        profile_path = opts[opts.index("--server-profile") + 1] if "--server-profile" in opts else ""
        sys.exit(serve(opts[opts.index("--serve") + 1], profile_path, args[split + 1 :]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--pin", action="store_true", help="this process on CPU 0, the server on CPU 1")
    parser.add_argument("--profile-worker", default="", help="write cProfile stats of the store loop here")
    parser.add_argument("--profile-server", default="", help="write cProfile stats of the server here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    server_cpu = None
    if args.pin:
        os.sched_setaffinity(0, {0})
        server_cpu = 1

    log_path, stats_path = f"/tmp/request_path_{os.getpid()}.log", f"/tmp/request_path_{os.getpid()}.json"
    proc, url = start([sys.executable, "-m", "lmcd", "server", *SERVER_FLAGS], log_path, server_cpu)
    try:
        plain = worker_run(url, proc.pid, args.requests, args.profile_worker)
    finally:
        stop(proc)
    extra = ["--serve", stats_path] + (["--server-profile", args.profile_server] if args.profile_server else [])
    proc, url = start([sys.executable, os.path.abspath(__file__), *extra, "--", *SERVER_FLAGS], log_path,
                      server_cpu)
    try:
        worker_run(url, proc.pid, args.requests)
    finally:
        stop(proc)
    phases = server_phases(stats_path, args.requests)
    os.unlink(stats_path)
    os.unlink(log_path)

    print(f"us per request, medians over {args.requests} (plain server)")
    print(f"  {'':13s} {'lat':>8s} {'wcpu':>8s} {'scpu':>8s}")
    for name, row in plain.items():
        print(f"  {name:13s} " + " ".join(f"{v:8.1f}" for v in row.values()))
    print("inside the server, us, medians (instrumented server)")
    print(f"  {'':13s} " + " ".join(f"{k:>10s}" for k in PHASES))
    for op, row in phases.items():
        print(f"  {op:13s} " + " ".join(f"{row[k]:10.1f}" for k in PHASES))
    if args.json:
        print(json.dumps({"worker": plain, "server": phases}))


if __name__ == "__main__":
    main()
