"""Where the server's time per GPU request goes (run on the GPU machine; not a test).

Runs the real server in this process, with timing wrappers around the steps of a request
(decode and dispatch, index bookkeeping, the copy set-up, the CUDA calls of the submit, the
reply), and ``lmcache bench --device cuda`` as the worker in a child process. Prints, per step,
the median and 90th percentile in microseconds over the requests of each size, then the
bench's own whole-path figures::

    python benchmarks/gpu_trace.py --tokens 256,4096 --repeats 20 [server flags...]
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

TIMES: dict[str, list[float]] = collections.defaultdict(list)


def timed(name: str | Callable[..., str], fn: Any) -> Any:
    """``fn`` with its calls' durations (µs) recorded under ``name``, or under ``name(*args)``."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name(*args) if callable(name) else name].append((time.perf_counter() - t0) * 1e6)

    return wrapper


def instrument() -> None:
    from lmcd import cudadrv, kernels
    from lmcd.server import daemon, gpu, service

    daemon.CacheServer._on_frames = timed("request total (decode -> reply sent)", daemon.CacheServer._on_frames)
    daemon.CacheServer._send_reply = timed("  send reply", daemon.CacheServer._send_reply)
    service.CacheService.store = timed("  service.store", service.CacheService.store)
    service.CacheService.retrieve = timed("  service.retrieve", service.CacheService.retrieve)
    service.CacheService._copy = timed("    _copy (set-up + submit)", service.CacheService._copy)
    service.CacheService._pin_leading = timed("    pin leading chunks", service.CacheService._pin_leading)
    gpu.GpuWorker.submit = timed("      GpuWorker.submit", gpu.GpuWorker.submit)
    kernels.PageCopier.launch = timed("        PageCopier.launch", kernels.PageCopier.launch)
    kernels.PageCopier.check = timed("          check", kernels.PageCopier.check)
    kernels._Staging.reserve = timed("          staging reserve", kernels._Staging.reserve)
    lib = cudadrv.fast_driver()
    lib.cuStreamWaitEvent = timed("        cuStreamWaitEvent (IPC event)", lib.cuStreamWaitEvent)
    lib.cuLaunchKernel = timed("          cuLaunchKernel", lib.cuLaunchKernel)
    service.CacheService.handle = timed(  # type: ignore[method-assign]
        lambda _self, _session, request, _started: f" handle {type(request).__name__}", service.CacheService.handle)


def instrument_worker() -> None:
    from lmcd.connector import client, cuda, session, worker

    worker.WorkerState.store = timed("worker: WorkerState.store", worker.WorkerState.store)
    worker.WorkerState.load = timed("worker: WorkerState.load", worker.WorkerState.load)
    cuda.CudaShare.before_copy = timed("worker:   before_copy (event record)", cuda.CudaShare.before_copy)
    cuda.CudaShare.after_load = timed("worker:   after_load (stream wait)", cuda.CudaShare.after_load)
    session.ServerSession.call = timed("worker:   session.call", session.ServerSession.call)
    client.CacheClient._exchange = timed("worker:     _exchange (encode, send, wait, decode)",
                                         client.CacheClient._exchange)

    class Encoder:  # msgspec's Encoder.encode cannot be replaced on the instance
        encode = staticmethod(timed("worker:       encode", client.p.encoder.encode))

    client.p.encoder = Encoder()  # type: ignore[assignment]


def worker_main(port: int, tokens: str, repeats: int) -> int:
    """The bench as the worker, instrumented; prints its own step table."""
    instrument_worker()
    from lmcd import cli

    rc = cli.main(["bench", "--device", "cuda", "--host", "127.0.0.1", "--port", str(port), "--tokens", tokens,
                   "--repeats", str(repeats)])
    report()
    return rc


def report() -> None:
    print(f"{'step':48s} {'n':>5s} {'median us':>10s} {'p90 us':>10s}")
    for name, values in TIMES.items():
        values = sorted(values)
        print(f"{name:48s} {len(values):5d} {statistics.median(values):10.1f} "
              f"{values[int(0.9 * (len(values) - 1))]:10.1f}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="256,4096")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--worker-port", type=int, default=0, help=argparse.SUPPRESS)
    args, server_flags = parser.parse_known_args()
    if args.worker_port:
        return worker_main(args.worker_port, args.tokens, args.repeats)
    instrument()
    from lmcd.server.config import add_arguments, resolve
    from lmcd.server.daemon import CacheServer

    port = free_port()
    sp = argparse.ArgumentParser()
    add_arguments(sp)
    config = resolve(sp.parse_args(["--host", "127.0.0.1", "--port", str(port), "--http-port", "0",
                                    "--l1-size-gb", "12", "--cuda", "on", *server_flags]))
    server = CacheServer(config)
    server.startup()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for tokens in args.tokens.split(","):
            TIMES.clear()
            bench = subprocess.run(
                [sys.executable, __file__, "--worker-port", str(port), "--tokens", tokens, "--repeats",
                 str(args.repeats)],
                capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            print(f"===== {tokens} tokens: bench rc {bench.returncode}")
            print("\n".join(line for line in bench.stdout.splitlines() if "LMCache INFO" not in line)[-3000:])
            if bench.returncode:
                print(bench.stderr[-3000:])
            report()
    finally:
        server.stop()
        thread.join(timeout=30)
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
