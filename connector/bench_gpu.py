"""``lmcache bench --device cuda``: whole-path GPU store/retrieve GB/s through the real worker code.

This process is the GPU worker. It builds KV the way vLLM does (ONE int8 buffer, per-layer
views ``[blocks, heads, block_size, 2*head_dim]``; default Llama-3-8B: 32 layers, 8 KV heads,
head_dim 128, bf16, block 16), registers through ``WorkerState`` and times, for 256, 4096 and
16384 tokens at random block ids:

- store: ``WorkerState.store`` until ``WorkerState.stores_done`` says the copy has ended, as the
  connector learns it (server copies: the server's event; worker copies: the copy's own event,
  after which the Commit goes out);
- retrieve: ``WorkerState.load`` until this worker's stream has passed the copy. With worker
  copies the load reads the slots of a lookup made before it, untimed, as vLLM's scheduler makes
  it before the step that loads.

Who copies follows ``--transfer-mode`` and the server (worker copies against a ``--share-pool``
server). Every byte of the last round is checked; the baseline is the same-run pinned D2H / H2D
copy of the same bytes (one contiguous torch copy). ``--load`` repeats the measurement while a
second stream in this process runs back-to-back bf16 matmuls, and reports copy GB/s under load
and the matmul TFLOP/s against matmuls alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import uuid
from typing import Any

import numpy as np
import torch

from lmcd import protocol as p
from lmcd.connector.client import LmcdError
from lmcd.connector.scheduler import LoadSpec, StoreSpec
from lmcd.connector.settings import ConnectorSettings
from lmcd.connector.shared_pool import SharedPool
from lmcd.connector.worker import WorkerState


def _events_ms(fn: Any, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times[1:]


class Matmuls:
    """Back-to-back bf16 matmuls on their own stream in a thread; TFLOP/s over a window."""

    def __init__(self, device: int, n: int) -> None:
        self.device, self.n = device, n
        self.a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        self.b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        self.c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
        self.stream = torch.cuda.Stream(device)
        self._stop = threading.Event()
        self.count = 0

    def _loop(self) -> None:
        torch.cuda.set_device(self.device)
        pending: list[torch.cuda.Event] = []
        with torch.cuda.stream(self.stream):
            while not self._stop.is_set():
                for _ in range(4):
                    torch.mm(self.a, self.b, out=self.c)
                ev = torch.cuda.Event()
                ev.record(self.stream)
                pending.append(ev)
                if len(pending) > 2:  # two batches in flight; waiting releases the GIL
                    pending.pop(0).synchronize()
                    self.count += 4
            for ev in pending:
                ev.synchronize()
                self.count += 4

    def run(self, body: Any) -> float:
        """Run ``body()`` while matmuls run; returns matmul TFLOP/s over the window."""
        self._stop.clear()
        self.count = 0
        thread = threading.Thread(target=self._loop, daemon=True)
        t0 = time.perf_counter()
        thread.start()
        body()
        self._stop.set()
        thread.join()
        elapsed = time.perf_counter() - t0
        return 2 * self.n**3 * self.count / elapsed / 1e12


class GpuBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = args.gpu
        torch.cuda.set_device(self.device)
        self.rng = np.random.default_rng()
        settings = ConnectorSettings.from_extra_config(
            {"lmcache.mp.host": args.host, "lmcache.mp.port": args.port, "lmcache.mp.request_timeout": args.timeout,
             "lmcache.mp.mp_transfer_mode": getattr(args, "transfer_mode", "auto"),
             **({"lmcache.mp.auth_token": args.auth_token} if args.auth_token else {})})
        self.block = args.block_size
        self.layers, self.heads, self.head = args.layers, args.kv_heads, args.head_size
        self.dtype = {1: torch.float8_e4m3fn, 2: torch.bfloat16, 4: torch.float32}[args.dtype_bytes]
        geometry = f"L{self.layers}.H{self.heads}.N{self.block}.D{self.head}.LBHNC.gpu"
        ns = p.Namespace(f"lmcd-bench-gpu-{uuid.uuid4().hex[:8]}", str(self.dtype), geometry, 1, 0)
        self.worker = WorkerState(settings, ns, "bench GPU worker")
        self.sizes = [int(t) for t in args.tokens.split(",") if t.strip()]
        self.num_blocks = 2 * (max(self.sizes) // self.block) + 2
        page_elems = self.heads * self.block * 2 * self.head
        self.page_bytes = page_elems * args.dtype_bytes
        # vLLM: one int8 buffer, per-layer views [blocks, heads, block_size, 2*head_dim]
        self.buffer = torch.randint(-128, 127, (self.layers * self.num_blocks * self.page_bytes,), dtype=torch.int8,
                                    device=self.device)
        self.kv = {f"model.layers.{i}.self_attn.attn": self.buffer[i * self.num_blocks * self.page_bytes:]
                   [: self.num_blocks * self.page_bytes].view(self.dtype)
                   .view(self.num_blocks, self.heads, self.block, 2 * self.head) for i in range(self.layers)}
        self.worker.register_kv_caches(self.kv, self.num_blocks, self.block)
        if self.worker.plane is None:
            raise LmcdError("registration failed: is the server running, with GPU support (--cuda on) or "
                            "--share-pool?")
        self.worker_copies = isinstance(self.worker.plane, SharedPool)
        self.bpc = self.worker.blocks_per_chunk
        self.chunk = self.bpc * self.block
        self.phases: list[tuple[float, float]] = []  # (request answered, then GPU done) seconds

    def pages(self, layer: int) -> torch.Tensor:
        return self.kv[f"model.layers.{layer}.self_attn.attn"].view(self.num_blocks, -1).view(torch.int8)

    def _round(self, tokens: int) -> tuple[list[bytes], list[int], list[int]]:
        n = tokens // self.chunk * self.bpc
        half = self.num_blocks // 2
        src = self.rng.choice(np.arange(1, half), n, replace=False).tolist()
        dst = (half + self.rng.choice(half, n, replace=False)).tolist()
        return [os.urandom(p.HASH_BYTES) for _ in range(tokens // self.chunk)], src, dst

    def store(self, keys: list[bytes], blocks: list[int]) -> None:
        t0 = time.perf_counter()
        self.worker.store(StoreSpec(keys, blocks, self.bpc))
        t1 = time.perf_counter()
        plane = self.worker.plane
        stored = (plane.in_flight if isinstance(plane, SharedPool) else
                  self.worker.cuda is not None and self.worker.cuda.stores_pending)
        if not stored:
            raise LmcdError("the server did not store the chunks (pool full or server gone)")
        while not self.worker.stores_done():  # how the connector learns it
            pass
        self.phases.append((t1 - t0, time.perf_counter() - t1))

    def wait_ready(self, keys: list[bytes]) -> None:
        """Until the server has booked the store (after the copy's event, which this worker has seen):
        untimed, so that a retrieve finds every chunk."""
        for _ in range(5000):
            found = self.worker.session.call(lambda client: client.lookup(keys, lease=False), None, "lookup")
            if found is not None and found.num_hit_chunks == len(keys):
                return
            time.sleep(0.0002)
        raise LmcdError("stored chunks never became ready on the server")

    def retrieve(self, keys: list[bytes], blocks: list[int]) -> float:
        """Seconds from the connector call until this worker's stream has passed the copy."""
        spec = LoadSpec(keys, blocks, self.bpc, 0, None)
        if self.worker_copies:  # the scheduler's lookup, before the step (untimed)
            found = self.worker.session.call(lambda client: client.lookup_for_load(keys), None, "lookup")
            if found is None or found.num_hit_chunks != len(keys):
                raise LmcdError("the lookup before the load missed chunks that were just stored")
            spec = LoadSpec(keys, blocks, self.bpc, 0, found.lease_id, found.slots, found.slots_valid_until)
        t0 = time.perf_counter()
        failed = self.worker.load(spec)
        t1 = time.perf_counter()
        if failed:
            raise LmcdError(f"retrieve missed {len(failed)} blocks of chunks that were just stored")
        torch.cuda.current_stream(self.device).synchronize()
        t2 = time.perf_counter()
        self.phases.append((t1 - t0, t2 - t1))
        return t2 - t0

    def check(self, src: list[int], dst: list[int]) -> None:
        s = torch.tensor(src, device=self.device)
        d = torch.tensor(dst, device=self.device)
        for layer in range(self.layers):
            pages = self.pages(layer)
            if not torch.equal(pages[s], pages[d]):
                raise LmcdError(f"retrieved bytes differ from stored bytes (layer {layer})")

    def ceiling(self, nbytes: int, repeats: int) -> tuple[float, float]:
        host = torch.empty(nbytes, dtype=torch.int8, pin_memory=True)
        dev = self.buffer[:nbytes]
        d2h = statistics.median(_events_ms(lambda: host.copy_(dev, non_blocking=True), repeats))
        h2d = statistics.median(_events_ms(lambda: dev.copy_(host, non_blocking=True), repeats))
        return nbytes / d2h / 1e6, nbytes / h2d / 1e6

    def size(self, tokens: int, repeats: int) -> dict[str, float]:
        nbytes = tokens // self.chunk * self.bpc * self.layers * self.page_bytes
        store_s, retrieve_s, last = [], [], None
        store_ph, retrieve_ph = [], []
        for _ in range(repeats + 1):
            keys, src, dst = self._round(tokens)
            t0 = time.perf_counter()
            self.store(keys, src)
            store_s.append(time.perf_counter() - t0)
            store_ph.append(self.phases[-1])
            self.wait_ready(keys)
            retrieve_s.append(self.retrieve(keys, dst))
            retrieve_ph.append(self.phases[-1])
            last = (src, dst)
        assert last is not None
        self.check(*last)
        d2h, h2d = self.ceiling(nbytes, repeats)
        gb = nbytes / 1e9
        def ms(values: list[tuple[float, float]], i: int) -> float:
            return round(1e3 * statistics.median(v[i] for v in values[1:]), 3)

        return {"tokens": tokens, "bytes": nbytes, "store_gbps": gb / statistics.median(store_s[1:]),
                "retrieve_gbps": gb / statistics.median(retrieve_s[1:]), "d2h_gbps": d2h, "h2d_gbps": h2d,
                "store_reply_ms": ms(store_ph, 0), "store_gpu_wait_ms": ms(store_ph, 1),
                "retrieve_reply_ms": ms(retrieve_ph, 0), "retrieve_gpu_wait_ms": ms(retrieve_ph, 1)}

    def loaded(self, tokens: int, seconds: float, matmuls: Matmuls) -> dict[str, float]:
        nbytes = tokens // self.chunk * self.bpc * self.layers * self.page_bytes
        moved = [0, 0.0, 0, 0.0]  # store bytes, store seconds, retrieve bytes, retrieve seconds

        def body() -> None:
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                keys, src, dst = self._round(tokens)
                t0 = time.perf_counter()
                self.store(keys, src)
                t1 = time.perf_counter()
                self.wait_ready(keys)
                moved[3] += self.retrieve(keys, dst)
                moved[0] += nbytes
                moved[1] += t1 - t0
                moved[2] += nbytes

        tflops = matmuls.run(body)
        return {"tokens": tokens, "store_gbps": moved[0] / moved[1] / 1e9,
                "retrieve_gbps": moved[2] / moved[3] / 1e9, "matmul_tflops": tflops}


def run_gpu(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("lmcache bench: error: --device cuda needs a CUDA GPU visible to torch", file=sys.stderr)
        return 1
    try:
        bench = GpuBench(args)
    except (LmcdError, ValueError) as exc:
        print(f"lmcache bench: error: {exc}", file=sys.stderr)
        return 1
    try:
        results = [bench.size(t, args.repeats) for t in bench.sizes]
        name = torch.cuda.get_device_name(bench.device)
        who = ("the worker, through the server's shared pool" if bench.worker_copies
               else "the server, over CUDA IPC")
        print(f"lmcd GPU bench: copies by {who}; GPU {bench.device} ({name}), {bench.layers} layers, "
              f"{bench.heads} KV heads, head {bench.head}, {bench.dtype}, block {bench.block}, chunk {bench.chunk}; "
              f"median of {args.repeats} rounds; ceiling: same-run pinned torch copy of the same bytes")
        print(f"{'tokens':>7} {'MiB':>8} {'store':>7} {'D2H':>7} {'ratio':>6} {'retr':>7} {'H2D':>7} "
              f"{'ratio':>6}  GB/s")
        for r in results:
            print(f"{r['tokens']:>7} {r['bytes'] / 2**20:>8.0f} {r['store_gbps']:>7.1f} {r['d2h_gbps']:>7.1f} "
                  f"{r['store_gbps'] / r['d2h_gbps']:>6.2f} {r['retrieve_gbps']:>7.1f} {r['h2d_gbps']:>7.1f} "
                  f"{r['retrieve_gbps'] / r['h2d_gbps']:>6.2f}   (reply / then GPU wait, ms: store "
                  f"{r['store_reply_ms']} / {r['store_gpu_wait_ms']}, retrieve {r['retrieve_reply_ms']} / "
                  f"{r['retrieve_gpu_wait_ms']})")
        out: dict[str, Any] = {"results": results, "worker_copies": bench.worker_copies}
        if args.load:
            matmuls = Matmuls(bench.device, args.matmul_size)
            alone = matmuls.run(lambda: time.sleep(args.load_seconds))
            tokens = max(bench.sizes)
            idle = results[-1]
            loaded = bench.loaded(tokens, args.load_seconds, matmuls)
            out["matmul_alone_tflops"], out["loaded"] = alone, loaded
            print(f"matmuls alone: {alone:.0f} TFLOP/s ({args.matmul_size}^3 bf16)")
            print(f"copies during matmuls, {tokens} tokens: store {loaded['store_gbps']:.1f} GB/s "
                  f"(idle {idle['store_gbps']:.1f}), retrieve {loaded['retrieve_gbps']:.1f} GB/s "
                  f"(idle {idle['retrieve_gbps']:.1f}); matmuls {loaded['matmul_tflops']:.0f} TFLOP/s "
                  f"({100 * (1 - loaded['matmul_tflops'] / alone):.0f}% slower)")
        if args.json:
            print(json.dumps(out))
        return 0
    except LmcdError as exc:
        print(f"lmcache bench: error: {exc}", file=sys.stderr)
        return 1
    finally:
        bench.worker.close()
