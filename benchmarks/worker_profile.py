"""Where a self-copying GPU worker's host time goes (lmcache_driven), per store and per load.

Runs the GPU bench's worker (``lmcd.connector.bench_gpu.GpuBench``) against a ``--share-pool``
server at one size, first timing each step of the whole path with perf_counter stamps (median
over rounds), then under cProfile (top functions by own time). Usage on the GPU machine:

    python3 worker_profile.py --port PORT [--tokens 256] [--rounds 200]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch

from lmcd.connector import bench_gpu
from lmcd.connector.bench import add_parser


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--rounds", type=int, default=200)
    mine, rest = extra.parse_known_args()
    args = parser.parse_args(["bench", "--device", "cuda", "--transfer-mode", "lmcache_driven", "--layers", "32",
                              "--head-size", "128", "--block-size", "16", *rest])
    bench = bench_gpu.GpuBench(args)
    tokens = bench.sizes[0]
    stamps: dict[str, list[float]] = {"store call": [], "store until done": [], "load call": [], "load until done": []}

    def one_round() -> None:
        hashes, src, dst = bench._round(tokens)
        t0 = time.perf_counter()
        bench.worker.store(bench_gpu.StoreSpec(hashes, src))
        t1 = time.perf_counter()
        while not bench.worker.stores_done():
            pass
        t2 = time.perf_counter()
        stamps["store call"].append(t1 - t0)
        stamps["store until done"].append(t2 - t1)
        bench.wait_ready(hashes)
        found = bench.worker.session.call(lambda client: client.lookup_for_load(hashes), None, "lookup")
        assert found is not None
        spec = bench_gpu.LoadSpec(hashes, dst, 0, found[1], found[2], found[3])
        t3 = time.perf_counter()
        bench.worker.load(spec, bench.bpc)
        t4 = time.perf_counter()
        torch.cuda.current_stream().synchronize()
        t5 = time.perf_counter()
        stamps["load call"].append(t4 - t3)
        stamps["load until done"].append(t5 - t4)

    spent: dict[str, float] = {}

    def timed(owner: object, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*a: object, **k: object) -> object:
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - t

        setattr(owner, name, wrapper)

    from lmcd.connector import client, cuda, worker

    for owner, name in ((worker.WorkerState, "_settle"), (worker.WorkerState, "_store_into_grants"),
                        (worker.WorkerState, "_load_from_pool"), (cuda.PoolCopier, "store"), (cuda.PoolCopier, "load"),
                        (cuda.PoolCopier, "_rows"), (client.CacheClient, "post"), (client.CacheClient, "collect"),
                        (torch, "index_select"), (torch.cuda, "Event"), (torch.Tensor, "index_copy_")):
        timed(owner, name, f"{getattr(owner, '__name__', owner)}.{name}")
    for _ in range(10):
        one_round()
    spent.clear()
    for values in stamps.values():
        values.clear()
    for _ in range(mine.rounds):
        one_round()
    for name, values in stamps.items():
        print(f"{name:>18}: median {1e6 * statistics.median(values):7.1f} us")
    for label, total in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"{label:>40}: {1e6 * total / mine.rounds:7.1f} us per round (store + load + polls)")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(mine.rounds):
        one_round()
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    bench.worker.close()


if __name__ == "__main__":
    main()
