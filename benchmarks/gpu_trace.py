"""Where the server's time per GPU request goes (run on the GPU machine; not a test).

Runs the real server in this process, with timing wrappers around the steps of a request
(decode and dispatch, index bookkeeping, the copy set-up, the CUDA calls of the submit, the
reply), and ``lmcache bench --device cuda`` as the worker in a child process. Prints, per step,
the median and 90th percentile in microseconds over the requests of each size, then the
bench's own whole-path figures::

    python benchmarks/gpu_trace.py --tokens 256,4096 --repeats 20 [server flags...]

``--timeline`` instead stamps each Store/Retrieve at its hand-offs on both sides (one clock:
``time.perf_counter`` is CLOCK_MONOTONIC, shared by the two processes) and prints the median
of each leg: the worker's work before the send, the trip to the server, the server up to the
launch, the reply, the trip back, the worker after the reply, and the wait for the GPU.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
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

    client.p.encoder = Encoder()


def worker_main(port: int, tokens: str, repeats: int, timeline: bool) -> int:
    """The bench as the worker, instrumented; prints its own step table (or its stamps)."""
    if timeline:
        timeline_worker()
    else:
        instrument_worker()
    if os.environ.get("LMCD_TRACE_CPU_WAIT"):  # experiment: the worker waits for a load on the CPU, not the GPU
        from lmcd.connector import cuda

        cuda.CudaShare.after_load = lambda self: self.server_event.synchronize()
    from lmcd import cli

    rc = cli.main(["bench", "--device", "cuda", "--host", "127.0.0.1", "--port", str(port), "--tokens", tokens,
                   "--repeats", str(repeats)])
    if timeline:
        print("TIMELINE " + json.dumps({str(rid): stamps for rid, stamps in STAMPS.items()}))
    else:
        report()
    return rc


LEGS = (("call", "sent", "worker: call -> request sent"),
        ("sent", "arrived", "trip to the server"),
        ("arrived", "submitted", "server: arrival -> copy submitted"),
        ("submitted", "replied", "server: -> reply sent"),
        ("replied", "polled", "trip back (reply seen by the worker)"),
        ("polled", "returned", "worker: reply -> return"),
        ("returned", "done", "worker: return -> GPU copy seen done"),
        ("call", "done", "whole path"),
        ("submitted", "server_done", "(spin) submitted -> server sees the copy done"),
        ("server_done", "done", "(spin) server sees it done -> worker does"))
STAMPS: dict[int, dict[str, Any]] = collections.defaultdict(dict)  # rid -> stamp name -> perf_counter
NOW: dict[str, Any] = {"rid": None, "call": 0.0}


def timeline_server() -> None:
    from lmcd import protocol as p
    from lmcd.server import daemon, gpu

    on_frames, submit, send_reply = daemon.CacheServer._on_frames, gpu.GpuWorker.submit, daemon.CacheServer._send_reply

    def on_frames_stamped(self: Any, frames: Any) -> None:
        arrived = time.perf_counter()
        NOW.clear()
        on_frames(self, frames)
        if "submitted" in NOW:
            STAMPS[p.peek_rid(frames[-1].bytes)].update(arrived=arrived, **NOW)

    def submit_stamped(self: Any, *args: Any, **kwargs: Any) -> None:
        import cupy

        with cupy.cuda.Device(self.device):  # GPU time from the server's first call to the copy's end
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(self.stream)
            submit(self, *args, **kwargs)
            end.record(self.stream)
        NOW["submitted"] = time.perf_counter()
        NOW["gpu_events"] = (start, end)
        if os.environ.get("LMCD_TRACE_SPIN"):  # when the server itself could see the copy done (delays the reply)
            while cupy.cuda.runtime.eventQuery(end.ptr) != 0:
                pass
            NOW["server_done"] = time.perf_counter()

    def send_reply_stamped(*args: Any, **kwargs: Any) -> None:
        send_reply(*args, **kwargs)
        NOW.setdefault("replied", time.perf_counter())

    daemon.CacheServer._on_frames = on_frames_stamped
    gpu.GpuWorker.submit = submit_stamped
    daemon.CacheServer._send_reply = send_reply_stamped


def timeline_worker() -> None:
    import zmq.sugar.poll as zpoll
    import zmq.sugar.socket as zsocket

    from lmcd.connector import bench_gpu, client

    encoder = client.p.encoder
    send, poll, poller_poll = zsocket.Socket.send, zsocket.Socket.poll, zpoll.Poller.poll

    def call_stamped(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            NOW.update(rid=None, call=time.perf_counter())
            try:
                return fn(*args, **kwargs)
            finally:
                if NOW["rid"] is not None:
                    STAMPS[NOW["rid"]]["done"] = time.perf_counter()
        return wrapper

    class Encoder:
        @staticmethod
        def encode(msg: Any) -> bytes:
            if type(msg).__name__ in ("Store", "Retrieve"):
                NOW["rid"] = msg.rid
                STAMPS[msg.rid].update(call=NOW["call"], op=type(msg).__name__)
            return encoder.encode(msg)

    def send_stamped(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = send(self, *args, **kwargs)
        if NOW["rid"] is not None:
            STAMPS[NOW["rid"]].setdefault("sent", time.perf_counter())
        return out

    def polled(fn: Any) -> Any:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            out = fn(self, *args, **kwargs)
            if NOW["rid"] is not None and "sent" in STAMPS[NOW["rid"]]:
                STAMPS[NOW["rid"]].setdefault("polled", time.perf_counter())
            return out
        return wrapper

    def returned(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            if NOW["rid"] is not None:
                STAMPS[NOW["rid"]]["returned"] = time.perf_counter()
            return out
        return wrapper

    client.p.encoder = Encoder()
    zsocket.Socket.send, zsocket.Socket.poll, zpoll.Poller.poll = send_stamped, polled(poll), polled(poller_poll)
    from lmcd.connector import worker

    worker.WorkerState.store = returned(worker.WorkerState.store)
    worker.WorkerState.load = returned(worker.WorkerState.load)
    bench_gpu.GpuBench.store = call_stamped(bench_gpu.GpuBench.store)
    bench_gpu.GpuBench.retrieve = call_stamped(bench_gpu.GpuBench.retrieve)


def timeline_report(worker_stamps: dict[str, dict[str, Any]]) -> None:
    rows: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
    for rid, stamps in worker_stamps.items():
        server = STAMPS.get(int(rid))
        if server and "op" in stamps:
            rows[str(stamps["op"])].append({**stamps, **server})
    import cupy

    for op, requests in rows.items():
        requests = requests[1:]  # the first is a warm-up
        print(f"--- {op}: {len(requests)} requests, median us per leg")
        for start, end, name in LEGS:
            values = [r[end] - r[start] for r in requests if start in r and end in r]
            if values:
                print(f"  {name:42s} {statistics.median(values) * 1e6:9.1f}")
        gpu = [cupy.cuda.get_elapsed_time(*r["gpu_events"]) / 1e3 for r in requests if "gpu_events" in r]
        if gpu:
            print(f"  {'GPU: server stream, first call -> copy end':42s} {statistics.median(gpu) * 1e6:9.1f}")


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
    parser.add_argument("--timeline", action="store_true", help="stamp each request's hand-offs instead")
    parser.add_argument("--worker-port", type=int, default=0, help=argparse.SUPPRESS)
    args, server_flags = parser.parse_known_args()
    if args.worker_port:
        return worker_main(args.worker_port, args.tokens, args.repeats, args.timeline)
    if args.timeline:
        timeline_server()
    else:
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
            STAMPS.clear()
            bench = subprocess.run(
                [sys.executable, __file__, "--worker-port", str(port), "--tokens", tokens, "--repeats",
                 str(args.repeats), *(["--timeline"] if args.timeline else [])],
                capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            print(f"===== {tokens} tokens: bench rc {bench.returncode}")
            lines = bench.stdout.splitlines()
            print("\n".join(line for line in lines if "LMCache INFO" not in line and
                            not line.startswith("TIMELINE "))[-3000:])
            if bench.returncode:
                print(bench.stderr[-3000:])
            if args.timeline:
                stamps = next((ln for ln in lines if ln.startswith("TIMELINE ")), None)
                if stamps is not None:
                    timeline_report(json.loads(stamps[len("TIMELINE "):]))
            else:
                report()
    finally:
        server.stop()
        thread.join(timeout=30)
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
