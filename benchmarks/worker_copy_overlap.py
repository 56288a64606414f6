"""How long a worker-copies store delays the engine's next step on the same GPU (needs a GPU).

Inside vLLM, worker copies (``lmcache_driven``) queue a store of a whole prefill step after its
forward: 64 chunks, 2 GiB of DMA at 16K tokens of Llama-3-8B. The engine's streams share the GPU's
few hardware queues with the store's, so the engine's next step can land behind the queued store
and wait for all of it. This benchmark measures that without vLLM, in one process as vLLM has it:

- an engine step (about 10 ms of bf16 matmuls, a 4 KiB H2D input copy and a 4 KiB D2H output copy)
  on each of several streams (the default stream, streams made before the copier as vLLM makes
  its own, and after), alone and right after a store of 64 chunks of 32 MiB is queued;
- the store queued whole (lmcd before: ``StagedPipeline.copy``) and through ``PoolCopier.store``
  1, 2, 4 and 8 chunks at a time (the next ones once those have left the GPU; lmcd uses 1);
- the store's GB/s in each, and with the engine's thread busy in Python for the whole store (the
  feeder thread needs the GIL for each chunk).

    python benchmarks/worker_copy_overlap.py --json out.json   # CUDA_DEVICE_MAX_CONNECTIONS as set

Prints one table; the JSON has every step time.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import time

import numpy as np
import torch

from lmcd.connector.cuda import PoolCopier
from lmcd.copyplan import check_blocks

PAGE_BYTES = 32 << 10  # one (layer, K or V) page of a 16-token block: 16 x 8 heads x 128 x bf16
PLANES = 64  # 32 layers x K/V
BLOCKS_PER_CHUNK = 16  # 256-token chunks: 32 MiB
CHUNKS = 64  # 16K tokens: 2 GiB


class Engine:
    """A stand-in for one engine step on a stream: matmuls, a small H2D and a small D2H copy."""

    def __init__(self, matmuls: int) -> None:
        self.a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        self.b = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        self.host_in = torch.zeros(1024, dtype=torch.int32).pin_memory()
        self.host_out = torch.zeros(2048, dtype=torch.bfloat16).pin_memory()
        self.matmuls = matmuls
        self.outs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def step(self, stream: torch.cuda.Stream) -> float:
        """Submit one step on ``stream`` and wait for its output; seconds on the host."""
        key = int(stream.cuda_stream)
        if key not in self.outs:
            with torch.cuda.stream(stream):
                self.outs[key] = (torch.empty(4096, 4096, device="cuda", dtype=torch.bfloat16),
                                  torch.empty(1024, device="cuda", dtype=torch.int32))
        c, dev_in = self.outs[key]
        done = torch.cuda.Event()
        started = time.perf_counter()
        with torch.cuda.stream(stream):
            dev_in.copy_(self.host_in, non_blocking=True)
            for _ in range(self.matmuls):
                torch.mm(self.a, self.b, out=c)
            self.host_out.copy_(c[0, :2048], non_blocking=True)
            done.record(stream)
        done.synchronize()
        return time.perf_counter() - started


def calibrate(engine: Engine, stream: torch.cuda.Stream, target_s: float) -> None:
    engine.matmuls = 10
    engine.step(stream)
    per = statistics.median(engine.step(stream) for _ in range(5)) / 10
    engine.matmuls = max(1, round(target_s / per))


def busy_python(seconds: float) -> None:
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write every measurement here")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("worker_copy_overlap: no CUDA GPU here", file=sys.stderr)
        return 2
    torch.cuda.init()
    device = torch.cuda.current_device()
    num_blocks = 2 * CHUNKS * BLOCKS_PER_CHUNK
    kv = torch.zeros(num_blocks * PLANES * PAGE_BYTES, dtype=torch.uint8, device="cuda")
    base = kv.data_ptr()
    planes = [base + p * PAGE_BYTES for p in range(PLANES)]
    block_stride = PLANES * PAGE_BYTES
    chunk_bytes = PLANES * BLOCKS_PER_CHUNK * PAGE_BYTES
    pools = {w: mmap.mmap(-1, CHUNKS * chunk_bytes, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
             for w in (1, 2, 4, 8)}  # one per copier: a host range is registered with CUDA once
    addresses = {w: np.frombuffer(pool, dtype=np.uint8).ctypes.data for w, pool in pools.items()}
    before = [torch.cuda.Stream() for _ in range(8)]  # as vLLM's, made before the connector registers
    copiers = {w: PoolCopier(device, planes, num_blocks, PAGE_BYTES, block_stride, BLOCKS_PER_CHUNK, addresses[w],
                             CHUNKS * chunk_bytes, window=w) for w in (1, 2, 4, 8)}
    after = [torch.cuda.Stream() for _ in range(4)]
    streams = {"default": torch.cuda.default_stream(), **{f"before{i}": s for i, s in enumerate(before)},
               **{f"after{i}": s for i, s in enumerate(after)}}
    rng = np.random.default_rng(0)
    ids = rng.permutation(num_blocks)[: CHUNKS * BLOCKS_PER_CHUNK].tolist()
    blocks = check_blocks(ids, CHUNKS, BLOCKS_PER_CHUNK, num_blocks, 0)
    slots = [i * chunk_bytes for i in range(CHUNKS)]
    engine = Engine(10)
    calibrate(engine, streams["default"], 0.010)

    def store(mode: str) -> PoolCopier:
        if mode == "whole":
            copier = copiers[8]
            assert copier.pipeline is not None
            mark = torch.cuda.Event()
            mark.record()
            copier.pipeline.copy([addresses[8] + s for s in slots], blocks, True, after=int(mark.cuda_event))
            return copier
        copier = copiers[int(mode.removeprefix("window"))]
        copier.store(slots, blocks)
        return copier

    def store_seconds(mode: str, busy: bool) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        copier = store(mode)
        if busy:
            busy_python(0.040)
        copier.synchronize()
        return time.perf_counter() - started

    modes = ["whole", "window1", "window2", "window4", "window8"]
    for mode in modes:  # warm-up: the feeders exist, the kernels are loaded
        store_seconds(mode, False)
    results: dict[str, dict[str, object]] = {}
    alone = {name: [engine.step(s) for _ in range(args.reps)] for name, s in streams.items()}
    results["alone"] = {"steps": alone}
    for mode in modes:
        steps: dict[str, list[float]] = {}
        for name, s in streams.items():
            steps[name] = []
            for _ in range(args.reps):
                torch.cuda.synchronize()
                copier = store(mode)
                steps[name].append(engine.step(s))
                copier.synchronize()
        idle = [store_seconds(mode, False) for _ in range(args.reps)]
        busy = [store_seconds(mode, True) for _ in range(args.reps)]
        results[mode] = {"steps": steps, "store_idle_s": idle, "store_gil_busy_s": busy}
    gib = CHUNKS * chunk_bytes / 1e9
    base_ms = statistics.median([v for vs in alone.values() for v in vs]) * 1e3
    print(f"CUDA_DEVICE_MAX_CONNECTIONS={os.environ.get('CUDA_DEVICE_MAX_CONNECTIONS', '(default)')}; "
          f"engine step alone {base_ms:.2f} ms ({engine.matmuls} matmuls); store {CHUNKS} x "
          f"{chunk_bytes >> 20} MiB")
    print(f"{'store queued':>14} {'step delay p50':>15} {'worst stream':>13} {'streams > 5 ms':>15} "
          f"{'store GB/s idle':>16} {'GIL busy':>9}")
    for mode in modes:
        r = results[mode]
        measured = r["steps"]
        assert isinstance(measured, dict)
        delays = {n: statistics.median(v) * 1e3 - statistics.median(alone[n]) * 1e3 for n, v in measured.items()}
        worst = max(delays, key=lambda n: delays[n])
        slow = sum(d > 5 for d in delays.values())
        idle_s, busy_s = r["store_idle_s"], r["store_gil_busy_s"]
        assert isinstance(idle_s, list) and isinstance(busy_s, list)
        print(f"{mode:>14} {statistics.median(delays.values()):>12.2f} ms {delays[worst]:>7.2f} ms "
              f"({worst}) {slow:>4} of {len(delays)} {gib / statistics.median(idle_s):>13.1f} "
              f"{gib / statistics.median(busy_s):>9.1f}")
        r["delay_ms"] = delays
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"connections": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"), "matmuls": engine.matmuls,
                       "alone_ms": base_ms, "results": results}, f, indent=1)
    for copier in copiers.values():
        copier.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
