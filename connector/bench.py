"""``lmcache bench``: whole-path store/retrieve GB/s and lookup latency against a running server.

A synthetic CPU worker (SHM segments in vLLM's CPU page layout) stores random KV for
256, 4096 and 16384 tokens at random block ids, retrieves it into other blocks, checks every
byte, and compares with a same-run single-thread memcpy of the same number of bytes.
Lookup latency is measured for a 32K-token prompt whose chunks are all cached.

A size is measured only where the server's pool holds ``MIN_ROUNDS`` rounds of its chunks at once (see
``PoolRoom``); the others are skipped, each with one line saying what it needs. Only where no size fits
is it an error.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from dataclasses import dataclass

import numpy as np

from lmcd import protocol as p
from lmcd.connector.client import CacheClient, LmcdError, server_url
from lmcd.connector.shm import CpuKVCache

MIN_ROUNDS = 2  # a warm-up round and one timed round: every round's chunks stay cached until it is retrieved


@dataclass
class Geometry:
    layers: int
    kv_heads: int
    head_size: int
    block_size: int
    dtype_bytes: int

    @property
    def bytes_per_token(self) -> int:
        return self.layers * self.kv_heads * 2 * self.head_size * self.dtype_bytes


@dataclass(frozen=True)
class PoolRoom:
    """The server's pool as its /status reports it: slabs of ``slab_bytes``, each carved into slots of one
    chunk size."""

    capacity_bytes: int
    slab_bytes: int
    num_slabs: int

    def num_slots(self, chunk_bytes: int) -> int:
        """Chunks of ``chunk_bytes`` the bench can keep at once. Where there are several slabs one is left to
        other chunk sizes: the pool evicts a chunk of the size being stored before it takes back another
        size's slab (the lookup prompt's of an earlier run, say), so the bench's rounds get only the rest."""
        return max(1, self.num_slabs - 1) * (self.slab_bytes // chunk_bytes)


def plan_sizes(sizes: list[int], chunk: int, chunk_bytes: int,
               room: PoolRoom) -> tuple[list[int], list[dict[str, object]]]:
    """The sizes to measure (rounded down to whole chunks) and those skipped, each with why."""
    slots = room.num_slots(chunk_bytes)
    measured: list[int] = []
    skipped: list[dict[str, object]] = []
    for tokens in sizes:
        num_chunks = tokens // chunk
        need = MIN_ROUNDS * num_chunks
        if num_chunks == 0:
            skipped.append({"tokens": tokens, "reason": f"fewer tokens than one chunk ({chunk} tokens)"})
        elif need > slots:
            skipped.append({
                "tokens": tokens, "needed_bytes": need * chunk_bytes, "room_bytes": slots * chunk_bytes,
                "reason": f"{MIN_ROUNDS} rounds of {num_chunks} chunks ({need * chunk_bytes / 2**20:.1f} MiB) must be "
                          f"in the pool at once, and the server's {room.capacity_bytes / 2**30:.2f} GiB pool holds "
                          f"{slots} chunks of this size ({slots * chunk_bytes / 2**20:.1f} MiB); for it, start the "
                          "server with a larger --l1-size-gb"})
        else:
            measured.append(num_chunks * chunk)
    return measured, skipped


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="measure store/retrieve/lookup against a running server",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--host", default="localhost", help="server host, IP, tcp://host or ipc:///path")
    parser.add_argument("--port", type=int, default=5555)
    parser.add_argument("--auth-token", default=os.environ.get("LMCD_AUTH_TOKEN"))
    parser.add_argument("--tokens", default="256,4096,16384", help="comma-separated prompt lengths")
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions per size (median reported)")
    parser.add_argument("--layers", type=int, default=None, help="default: 12 (cpu), 32 (cuda: Llama-3-8B)")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=None, help="default: 64 (cpu), 128 (cuda)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="engine block size (default: vLLM's, 128 on CPU, 16 on GPU)")
    parser.add_argument("--dtype-bytes", type=int, default=2)
    parser.add_argument("--lookup-tokens", type=int, default=32768)
    parser.add_argument("--lookup-iters", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of results")
    gpu = parser.add_argument_group("GPU worker (--device cuda; torch in this environment)")
    gpu.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                     help="cpu: a synthetic SHM worker (server copies); cuda: a torch GPU worker (lmcd.connector)")
    gpu.add_argument("--gpu", type=int, default=0, help="CUDA device index of the GPU worker")
    gpu.add_argument("--transfer-mode", default="auto", choices=["auto", "engine_driven", "lmcache_driven"],
                     help="who copies: the server over CUDA IPC (engine_driven) or the worker through the "
                          "server's shared pool (lmcache_driven; server --share-pool); auto: the worker where the "
                          "pool is shared")
    gpu.add_argument("--load", action="store_true", help="also measure while bf16 matmuls run in this process")
    gpu.add_argument("--load-seconds", type=float, default=4.0, help="seconds per loaded measurement")
    gpu.add_argument("--matmul-size", type=int, default=8192)
    parser.set_defaults(func=run)


def memcpy_seconds(src: np.ndarray, dst: np.ndarray) -> float:
    started = time.perf_counter()
    np.copyto(dst, src)
    return time.perf_counter() - started


def bench_size(client: CacheClient, kv: CpuKVCache, worker_id: int, tokens: int, repeats: int,
               rng: np.random.Generator, scratch: tuple[np.ndarray, np.ndarray], num_slots: int) -> dict[str, float]:
    chunk = client.chunk_size
    num_chunks = tokens // chunk
    bpc = chunk // kv.layout.block_size
    num_blocks = num_chunks * bpc
    nbytes = num_blocks * kv.layout.num_layers * kv.page_bytes
    half = kv.layout.num_blocks // 2
    repeats = min(repeats, num_slots // num_chunks - 1)  # every round's chunks must stay cached (plan_sizes)
    src, dst = scratch
    # Each phase runs back to back (memcpy, then stores, then retrieves), each timed in its own
    # steady state; the first round of each phase warms up and is not counted. The memcpy walks
    # through the whole scratch buffer so that, like the real copies, it is not served from cache.
    span = max(1, len(src) // nbytes)
    copy_s = [memcpy_seconds(src[(r % span) * nbytes:][:nbytes], dst[(r % span) * nbytes:][:nbytes])
              for r in range(repeats + 1)][1:]
    rounds = []
    store_s = []
    for _ in range(repeats + 1):
        keys = [os.urandom(p.HASH_BYTES) for _ in range(num_chunks)]
        src_blocks = rng.choice(half, num_blocks, replace=False).tolist()
        t0 = time.perf_counter()
        result = client.store(worker_id, keys, src_blocks)
        store_s.append(time.perf_counter() - t0)
        if result.num_stored != num_chunks:
            raise LmcdError(f"store kept {result.num_stored} of {num_chunks} chunks: {result.message}")
        rounds.append((keys, src_blocks))
    retrieve_s = []
    for i, (keys, src_blocks) in enumerate(rounds):
        dst_blocks = (half + rng.choice(half, num_blocks, replace=False)).tolist()
        t0 = time.perf_counter()
        got = client.retrieve(worker_id, keys, dst_blocks)
        retrieve_s.append(time.perf_counter() - t0)
        if got != num_chunks:
            raise LmcdError(f"retrieve found {got} of {num_chunks} chunks that were just stored")
        # every byte of the last round; one page per layer of the others (a full check between
        # rounds would disturb the next round's timing: the tests check every byte anyway)
        check = slice(None) if i == len(rounds) - 1 else slice(i % num_blocks, i % num_blocks + 1)
        for layer in range(kv.layout.num_layers):
            pages = kv.pages(layer)
            if not np.array_equal(pages[src_blocks[check]], pages[dst_blocks[check]]):
                raise LmcdError(f"retrieved bytes differ from stored bytes (layer {layer}, {tokens} tokens)")
    del store_s[0], retrieve_s[0]
    gb = nbytes / 1e9
    return {"tokens": tokens, "bytes": nbytes, "repeats": repeats, "store_gbps": gb / statistics.median(store_s),
            "retrieve_gbps": gb / statistics.median(retrieve_s), "memcpy_gbps": gb / statistics.median(copy_s)}


def bench_lookup(url: str, args: argparse.Namespace, chunk: int) -> tuple[float, float, int]:
    """p50/p99 ms of a lease-taking lookup of ``--lookup-tokens`` tokens, all cached."""
    tiny = Geometry(1, 1, 32, chunk, 1)
    ns = p.Namespace(f"lmcd-bench-lookup-{uuid.uuid4().hex[:8]}", "int8", "tiny", 1, 0)
    num_chunks = args.lookup_tokens // chunk
    keys = [os.urandom(p.HASH_BYTES) for _ in range(num_chunks)]
    kv = CpuKVCache(1, num_chunks, tiny.block_size, 1, 32, 1)
    with CacheClient(url, ns, role=p.Role.WORKER, auth_token=args.auth_token, timeout_s=args.timeout) as worker:
        info = kv.register(worker)
        stored = worker.store(info.worker_id, keys, list(range(num_chunks)))
        if stored.num_stored + stored.statuses.count(p.ChunkStatus.PRESENT) != num_chunks:
            raise LmcdError(f"could not cache the lookup prompt: {stored.message}")
        scheduler_ns = p.Namespace(ns.model, ns.kv_dtype, ns.geometry, 1, None)
        with CacheClient(url, scheduler_ns, role=p.Role.SCHEDULER, auth_token=args.auth_token,
                         timeout_s=args.timeout) as scheduler:
            times = []
            for _ in range(args.lookup_iters):
                t0 = time.perf_counter()
                result = scheduler.lookup(keys, lease=True)
                times.append(time.perf_counter() - t0)
                if result.lease_id is not None:
                    scheduler.release(result.lease_id)
            if result.num_hit_chunks != num_chunks:
                raise LmcdError(f"lookup found {result.num_hit_chunks} of {num_chunks} cached chunks")
        worker.unregister_worker(info.worker_id)
    kv.close()
    ms = np.array(times) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), num_chunks


def run(args: argparse.Namespace) -> int:
    cuda = args.device == "cuda"
    args.layers = args.layers or (32 if cuda else 12)
    args.head_size = args.head_size or (128 if cuda else 64)
    args.block_size = args.block_size or (16 if cuda else 128)
    if cuda:
        from lmcd.connector.bench_gpu import run_gpu

        return run_gpu(args)
    url = server_url(args.host, args.port)
    geo = Geometry(args.layers, args.kv_heads, args.head_size, args.block_size, args.dtype_bytes)
    sizes = [int(t) for t in args.tokens.split(",") if t.strip()]
    try:
        return _run(url, args, geo, sizes)
    except LmcdError as exc:
        print(f"lmcache bench: error: {exc}", file=sys.stderr)
        return 1


def _run(url: str, args: argparse.Namespace, geo: Geometry, sizes: list[int]) -> int:
    ns_base = p.Namespace(f"lmcd-bench-{uuid.uuid4().hex[:8]}", f"{8 * geo.dtype_bytes}bit", "", 1, 0)
    probe = CacheClient(url, ns_base, auth_token=args.auth_token, timeout_s=args.timeout)
    chunk = probe.chunk_size
    pool = probe.status()["pool"]
    assert isinstance(pool, dict)
    room = PoolRoom(int(pool["capacity_bytes"]), int(pool["slab_bytes"]), int(pool["num_slabs"]))
    probe.close()
    chunk_bytes = chunk * geo.bytes_per_token
    sizes, skipped = plan_sizes(sizes, chunk, chunk_bytes, room)
    if not sizes:
        why = "; ".join(f"{s['tokens']} tokens: {s['reason']}" for s in skipped)
        raise LmcdError(f"the server's pool ({room.capacity_bytes / 2**30:.2f} GiB) is too small for every size "
                        f"asked: {why}")
    num_slots = room.num_slots(chunk_bytes)
    biggest = max(sizes) * geo.bytes_per_token
    num_blocks = 2 * (max(sizes) // geo.block_size) + 2
    kv = CpuKVCache(geo.layers, num_blocks, geo.block_size, geo.kv_heads, geo.head_size, geo.dtype_bytes)
    ns = p.Namespace(ns_base.model, ns_base.kv_dtype, kv.geometry, 1, 0)
    rng = np.random.default_rng()
    for seg in kv.segments:
        seg.array[:] = np.frombuffer(rng.bytes(seg.nbytes), dtype=np.uint8)
    scratch = (np.frombuffer(rng.bytes(biggest), dtype=np.uint8).copy(), np.ones(biggest, dtype=np.uint8))
    results = []
    with CacheClient(url, ns, role=p.Role.WORKER, auth_token=args.auth_token, timeout_s=args.timeout) as client:
        info = kv.register(client)
        for tokens in sizes:
            results.append(bench_size(client, kv, info.worker_id, tokens, args.repeats, rng, scratch, num_slots))
        client.unregister_worker(info.worker_id)
    kv.close()
    _report(url, args, geo, chunk, results, skipped, bench_lookup(url, args, chunk))
    return 0


def _report(url: str, args: argparse.Namespace, geo: Geometry, chunk: int, results: list[dict[str, float]],
            skipped: list[dict[str, object]], lookup: tuple[float, float, int]) -> None:
    p50, p99, lookup_chunks = lookup
    print(f"lmcd bench against {url}: {geo.layers} layers, {geo.kv_heads} KV heads, head size {geo.head_size}, "
          f"block {geo.block_size}, {geo.dtype_bytes}-byte dtype ({geo.bytes_per_token / 1024:.0f} KiB/token), "
          f"chunk {chunk}, median of up to {args.repeats} rounds (fewer where the pool holds fewer)")
    print(f"{'tokens':>8} {'MiB':>8} {'store GB/s':>11} {'retrieve GB/s':>14} {'memcpy GB/s':>12} "
          f"{'store/memcpy':>13} {'retr/memcpy':>12}")
    for r in results:
        print(f"{r['tokens']:>8} {r['bytes'] / 2**20:>8.1f} {r['store_gbps']:>11.2f} {r['retrieve_gbps']:>14.2f} "
              f"{r['memcpy_gbps']:>12.2f} {r['store_gbps'] / r['memcpy_gbps']:>13.2f} "
              f"{r['retrieve_gbps'] / r['memcpy_gbps']:>12.2f}")
    for s in skipped:
        print(f"skipped {s['tokens']} tokens: {s['reason']}")
    print(f"lookup of {lookup_chunks * chunk} tokens ({lookup_chunks} chunks, all cached, with lease): "
          f"p50 {p50:.3f} ms, p99 {p99:.3f} ms")
    if args.json:
        out = {"results": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in results],
               "skipped": skipped, "lookup_p50_ms": round(p50, 4), "lookup_p99_ms": round(p99, 4)}
        print(json.dumps(out))
