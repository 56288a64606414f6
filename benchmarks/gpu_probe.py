"""Where the time of a GPU store/retrieve goes (run on the GPU machine; not a test).

1. Host-side cost of one ``PageCopier.launch`` and of the other CUDA calls the server makes per
   request (stream wait, event records, event creation), in microseconds.
2. Kernel-only GB/s (device events) for 256 / 4096 / 16384 tokens, Llama-3-8B geometry, against
   a same-run pinned copy, for kernel variants: UNROLL (loads in flight per thread), threads per
   CTA, and CTAs.
3. A pyzmq DEALER/ROUTER round trip between two processes with msgspec-sized frames.

``python benchmarks/gpu_probe.py staged`` instead compares, for the same sizes, the direct kernel
(``PageCopier``: pages cross PCIe one by one, zero-copy) with the staged copy (``StagedCopier``:
kernel inside GPU memory, copy engines across PCIe, one contiguous copy per chunk), by device
events and by host wall time from the first call to the completion seen on the host.
"""

from __future__ import annotations

import multiprocessing as mp
import pathlib
import statistics
import time
from typing import Any

import cupy
import numpy as np

from lmcd import kernels
from lmcd.kernels import PageCopier, StagedCopier

LAYERS, HEADS, BLOCK, HEAD = 32, 8, 16, 128
PAGE = HEADS * BLOCK * 2 * HEAD * 2
BPC = 256 // BLOCK


def median_us(fn, n: int = 200) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def setup() -> tuple[int, Any, list[int], Any, int, int, Any, Any, np.random.Generator]:
    """KV pages (Llama-3-8B geometry, room for two 16K-token requests), a stream, a pinned pool of
    64 chunks filled with 7s, a device buffer as large, and a seeded generator."""
    num_blocks = 2 * 16384 // BLOCK + 2
    kv = cupy.random.randint(-128, 127, LAYERS * num_blocks * PAGE, dtype=cupy.int8)
    bases = [kv.data.ptr + i * num_blocks * PAGE for i in range(LAYERS)]
    stream = cupy.cuda.Stream(non_blocking=True)
    chunk_bytes = LAYERS * BPC * PAGE
    pool_bytes = 64 * chunk_bytes
    pool = cupy.cuda.alloc_pinned_memory(pool_bytes)
    np.frombuffer(pool, dtype=np.uint8, count=pool_bytes)[:] = 7
    dev = cupy.empty(pool_bytes, dtype=cupy.int8)
    rng = np.random.default_rng(0)
    return num_blocks, kv, bases, stream, chunk_bytes, pool_bytes, pool, dev, rng


def chunk_bytes_of(copier: PageCopier | StagedCopier) -> int:
    return (copier.copier if isinstance(copier, StagedCopier) else copier).chunk_bytes


def kernel_gbps(copier: PageCopier | StagedCopier, slots: np.ndarray, blocks: np.ndarray, to_pool: bool, stream,
                rounds: int = 12, idle_s: float = 0.0) -> float:
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(rounds):
        if idle_s:  # the GPU idles between requests, as it does between a server's requests
            time.sleep(idle_s)
        start.record(stream)
        copier.launch(slots, blocks, to_pool, stream)
        end.record(stream)
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
    nbytes = len(slots) * chunk_bytes_of(copier)
    return nbytes / statistics.median(times[2:]) / 1e9


def wall_gbps(copier: PageCopier | StagedCopier, slots: np.ndarray, blocks: np.ndarray, to_pool: bool, stream,
              rounds: int = 20) -> float:
    """Host wall time from the launch call to the completion event seen (spin) on the host."""
    end = cupy.cuda.Event(block=False, disable_timing=True)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        copier.launch(slots, blocks, to_pool, stream)
        end.record(stream)
        end.synchronize()
        times.append(time.perf_counter() - t0)
    nbytes = len(slots) * chunk_bytes_of(copier)
    return nbytes / statistics.median(times[2:]) / 1e9


def staged() -> None:
    num_blocks, kv, bases, stream, chunk_bytes, pool_bytes, pool, dev, rng = setup()
    direct = PageCopier(0, bases, num_blocks, PAGE, PAGE, BPC, 16)
    stagers = {f"staged {g}": StagedCopier(PageCopier(0, bases, num_blocks, PAGE, PAGE, BPC, 16), g)
               for g in (16, 32, 132)}
    stagers["staged 32 x2"] = StagedCopier(PageCopier(0, bases, num_blocks, PAGE, PAGE, BPC, 16), 32, stages=2)
    for tokens in (256, 4096, 16384):
        n = tokens // 256
        nbytes = n * chunk_bytes
        t0, t1 = cupy.cuda.Event(), cupy.cuda.Event()
        ceil = []
        for to_host in (True, False):
            times = []
            for _ in range(12):
                t0.record(stream)
                if to_host:
                    dev[:nbytes].data.copy_to_host_async(pool.ptr, nbytes, stream)
                else:
                    dev[:nbytes].data.copy_from_host_async(pool.ptr, nbytes, stream)
                t1.record(stream)
                t1.synchronize()
                times.append(cupy.cuda.get_elapsed_time(t0, t1) / 1e3)
            ceil.append(nbytes / statistics.median(times[2:]) / 1e9)
        d2h, h2d = ceil
        print(f"tokens {tokens}: ceiling (one contiguous copy) D2H {d2h:.1f} H2D {h2d:.1f} GB/s")
        slots = pool.ptr + np.arange(n, dtype=np.int64) * chunk_bytes
        blocks = rng.choice(num_blocks, n * BPC, replace=False)
        variants: list[tuple[str, PageCopier | StagedCopier]] = [("direct 16", direct)]
        variants += list(stagers.items())
        for name, copier in variants:
            g = kernel_gbps(copier, slots, blocks, True, stream)
            sc = kernel_gbps(copier, slots, blocks, False, stream)
            wg = wall_gbps(copier, slots, blocks, True, stream)
            ws = wall_gbps(copier, slots, blocks, False, stream)
            print(f"  {name:12s} device: store {g:5.1f} ({g / d2h:.3f}) retrieve {sc:5.1f} ({sc / h2d:.3f})   "
                  f"host wall: store {wg:5.1f} ({wg / d2h:.3f}) retrieve {ws:5.1f} ({ws / h2d:.3f})")
    n = 1
    slots = pool.ptr + np.arange(n, dtype=np.int64) * chunk_bytes
    blocks = rng.choice(num_blocks, n * BPC, replace=False)
    print("256 tokens with the GPU idle 1 ms before each copy (device time):")
    for name, copier in [("direct 16", direct), ("staged 132", stagers["staged 132"])]:
        g = kernel_gbps(copier, slots, blocks, True, stream, 20, 0.001)
        sc = kernel_gbps(copier, slots, blocks, False, stream, 20, 0.001)
        print(f"  {name:12s} store {g:5.1f} GB/s  retrieve {sc:5.1f} GB/s")
    # bit-exactness of the staged path against the direct one
    n = 4
    slots = pool.ptr + np.arange(n, dtype=np.int64) * chunk_bytes
    other = pool.ptr + np.arange(n, 2 * n, dtype=np.int64) * chunk_bytes
    src = rng.choice(num_blocks // 2, n * BPC, replace=False)
    dst = num_blocks // 2 + rng.choice(num_blocks // 2, n * BPC, replace=False)
    stager = stagers["staged 32"]
    stager.launch(slots, src, True, stream)
    direct.launch(other, src, True, stream)
    stream.synchronize()
    host = np.frombuffer(pool, dtype=np.uint8, count=pool_bytes)
    same_store = np.array_equal(host[: n * chunk_bytes], host[n * chunk_bytes : 2 * n * chunk_bytes])
    stager.launch(slots, dst, False, stream, skip_blocks=3)
    stream.synchronize()
    pages = kv.reshape(LAYERS, num_blocks, PAGE)
    same_load = bool((pages[:, src[3:]] == pages[:, dst[3:]]).all()) and not bool(
        (pages[:, src[:3]] == pages[:, dst[:3]]).all())
    print(f"staged bit-exact: store {same_store}, retrieve (skip 3) {same_load}")


def variant_source(unroll: int) -> str:
    return kernels.source().replace("#define UNROLL 4", f"#define UNROLL {unroll}")


def zmq_peer(port: int) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(f"tcp://127.0.0.1:{port}")
    while True:
        ident, frame = sock.recv_multipart()
        if frame == b"stop":
            break
        sock.send_multipart([ident, frame[:64]])


def main() -> None:
    num_blocks, kv, bases, stream, chunk_bytes, pool_bytes, pool, dev, rng = setup()
    sources = {u: variant_source(u) for u in (4, 8)}
    for tokens in (256, 4096, 16384):
        n = tokens // 256
        t0 = cupy.cuda.Event()
        t1 = cupy.cuda.Event()
        t0.record(stream)
        dev[: n * chunk_bytes].data.copy_to_host_async(pool.ptr, n * chunk_bytes, stream)
        t1.record(stream)
        t1.synchronize()
        d2h = n * chunk_bytes / (cupy.cuda.get_elapsed_time(t0, t1) / 1e3) / 1e9
        t0.record(stream)
        dev[: n * chunk_bytes].data.copy_from_host_async(pool.ptr, n * chunk_bytes, stream)
        t1.record(stream)
        t1.synchronize()
        h2d = n * chunk_bytes / (cupy.cuda.get_elapsed_time(t0, t1) / 1e3) / 1e9
        print(f"tokens {tokens}: pinned copy D2H {d2h:.1f} H2D {h2d:.1f} GB/s")
        slots = pool.ptr + np.arange(n, dtype=np.int64) * chunk_bytes
        blocks = rng.choice(num_blocks, n * BPC, replace=False)
        for unroll in (4,):
            for threads in (512,):
                for grid in (16, 32):
                    kernels._module.cache_clear()
                    kernels.source = lambda s=sources[unroll]: s  # type: ignore[assignment]
                    kernels.BLOCK_THREADS = threads
                    copier = PageCopier(0, bases, num_blocks, PAGE, PAGE, BPC, grid)
                    g = kernel_gbps(copier, slots, blocks, True, stream)
                    s = kernel_gbps(copier, slots, blocks, False, stream)
                    print(f"  unroll {unroll} threads {threads:4d} grid {grid:3d}: gather {g:5.1f} ({g / d2h:.3f})  "
                          f"scatter {s:5.1f} ({s / h2d:.3f})")
    kernels.BLOCK_THREADS = 512
    copier = PageCopier(0, bases, num_blocks, PAGE, PAGE, BPC, 16)
    slots = pool.ptr + np.arange(1, dtype=np.int64) * chunk_bytes
    blocks = rng.choice(num_blocks, BPC, replace=False)
    ipc_event = cupy.cuda.Event(block=False, disable_timing=True, interprocess=True)
    print(f"host us per call: launch {median_us(lambda: copier.launch(slots, blocks, True, stream)):.1f}")
    stream.synchronize()
    print(f"  check {median_us(lambda: copier.check(slots, blocks)):.1f}")
    print(f"  Event() {median_us(lambda: cupy.cuda.Event(block=True, disable_timing=True)):.1f}")
    print(f"  record {median_us(lambda: ipc_event.record(stream)):.1f}")
    print(f"  Device ctx {median_us(lambda: cupy.cuda.Device(0).__enter__() and None):.1f}")
    print(f"  alloc_pinned {median_us(lambda: cupy.cuda.alloc_pinned_memory(1024)):.1f}")
    print(f"  cupy.empty {median_us(lambda: cupy.empty(128, dtype=cupy.int64)):.1f}")
    stream.synchronize()
    ev = cupy.cuda.Event(block=True, disable_timing=True)

    def launch_and_wait() -> None:
        copier.launch(slots, blocks, True, stream)
        ev.record(stream)
        ev.synchronize()

    def launch_and_spin() -> None:
        copier.launch(slots, blocks, True, stream)
        e = cupy.cuda.Event(block=False, disable_timing=True)
        e.record(stream)
        e.synchronize()

    print(f"256 tokens launch + blocking-sync wait {median_us(launch_and_wait, 100):.0f} us, "
          f"launch + spin wait {median_us(launch_and_spin, 100):.0f} us (copy alone ~{chunk_bytes / 53e3:.0f} us)")
    port = 5799
    proc = mp.get_context("spawn").Process(target=zmq_peer, args=(port,), daemon=True)
    proc.start()
    import zmq

    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{port}")
    payload = b"x" * 300

    def rtt() -> None:
        sock.send(payload)
        sock.recv()

    for _ in range(100):
        rtt()
    print(f"zmq round trip (tcp loopback, blocking recv): {median_us(rtt, 500):.0f} us")
    sock.send(b"stop")
    proc.join(5)


def pool_copies() -> None:
    """32 MiB copies between GPU memory and host memory as the server's pool is (an anonymous mmap
    registered with cudaHostRegister), with and without transparent huge pages, against
    cudaHostAlloc'd memory; each region is visited once cold, then again."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    piece, size = 32 << 20, 2 << 30
    dev = cupy.empty(piece, dtype=cupy.uint8)
    stream = cupy.cuda.Stream(non_blocking=True)
    t0, t1 = cupy.cuda.Event(), cupy.cuda.Event()
    thp = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
    print("THP:", thp.read_text().strip() if thp.exists() else "?")

    def sweep(base: int, label: str) -> None:
        for direction in ("H2D", "D2H"):
            for visit in ("cold", "warm"):
                times = []
                for off in range(0, size, piece):
                    t0.record(stream)
                    if direction == "H2D":
                        dev.data.copy_from_host_async(base + off, piece, stream)
                    else:
                        dev.data.copy_to_host_async(base + off, piece, stream)
                    t1.record(stream)
                    t1.synchronize()
                    times.append(cupy.cuda.get_elapsed_time(t0, t1) / 1e3)
                print(f"  {label:34s} {direction} {visit}: median {piece / statistics.median(times) / 1e9:5.1f} GB/s, "
                      f"first {piece / times[0] / 1e9:5.1f}, slowest {piece / max(times) / 1e9:5.1f}")

    pinned = cupy.cuda.alloc_pinned_memory(size)
    np.frombuffer(pinned, dtype=np.uint8, count=size)[::4096] = 1
    sweep(pinned.ptr, "cudaHostAlloc")
    for hint in (False, True):
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        if hint:
            libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(size), 14)  # MADV_HUGEPAGE
        np.frombuffer(m, dtype=np.uint8)[::4096] = 1
        huge = 0
        for line in pathlib.Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages"):
                huge = int(line.split()[1]) >> 10
        t = time.perf_counter()
        cupy.cuda.runtime.hostRegister(addr, size, 3)
        reg = time.perf_counter() - t
        sweep(addr, f"mmap{' +MADV_HUGEPAGE' if hint else ''} ({huge} MiB huge, reg {reg:.2f}s)")
        cupy.cuda.runtime.hostUnregister(addr)
        m.close()


if __name__ == "__main__":
    import sys

    {"staged": staged, "pool": pool_copies}.get(sys.argv[1] if sys.argv[1:] else "", main)()
