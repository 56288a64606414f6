"""What the fs L2 tier (``lmcd.server.disktier.FsAdapter``) costs against the filesystem it writes to.

For N chunks of 256 tokens (default 6 MiB each, N = 200) in a directory under PATH, one run measures:

    raw write    one file, plain os.write of each chunk's buffer, sequential   (the filesystem's rate)
    fs write     encode_header (XXH3-64 of the payload) + FsAdapter.write, by 1 and 2 threads
    raw read     that file read back with readinto into one chunk-sized buffer
    fs read      FsAdapter.read_into + l2.verify (XXH3-64 again), by 1 and 2 threads

All in the same buffered I/O mode on the same filesystem; ``os.sync()`` (not timed) before every
phase so no phase pays for an earlier one's writeback. Reads find the pages the writes left in the
page cache unless ``--drop-caches`` (root) drops them first. GB/s counts payload bytes (1e9); the
table's last column is the ratio to the raw rate of the same direction.

    python benchmarks/l2_disk.py PATH [--chunk-mib 6] [--objects 200] [--threads 1,2] [--drop-caches] [--rounds N]

Prints a markdown table; with OUT set, JSON in $OUT/l2_disk.json too. The directories it makes
under PATH are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from lmcd.server import l2
from lmcd.server.disktier import FsAdapter

MIB = 1 << 20
POOL_CHUNKS = 16  # distinct payloads, cycled: the chunks are views of one pool buffer, as in the server
NAMESPACE = l2.namespace_text("bench-model", "bf16", "256-token chunks", 1)


@dataclass(slots=True)
class Row:
    operation: str
    threads: int
    seconds: float
    gb_per_s: float
    vs_raw: float


def chunk_id(i: int) -> l2.ObjectId:
    return l2.ObjectId(NAMESPACE, 0, i.to_bytes(32, "little"))


def settle(drop_caches: bool = False) -> None:
    os.sync()
    if drop_caches:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def in_threads(threads: int, objects: int, work: Callable[[int, range], None]) -> float:
    """Seconds for ``threads`` threads to run ``work(tid, their object indices)`` from one start line."""
    barrier = threading.Barrier(threads + 1)
    failures: list[BaseException] = []

    def run(tid: int) -> None:
        barrier.wait()
        try:
            work(tid, range(tid, objects, threads))
        except BaseException as e:
            failures.append(e)

    workers = [threading.Thread(target=run, args=(tid,)) for tid in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    began = time.perf_counter()
    for w in workers:
        w.join()
    took = time.perf_counter() - began
    if failures:
        raise failures[0]
    return took


def raw_write(path: str, chunks: list[memoryview], objects: int) -> float:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        began = time.perf_counter()
        for i in range(objects):
            view = chunks[i % len(chunks)]
            while view:
                view = view[os.write(fd, view):]
        return time.perf_counter() - began
    finally:
        os.close(fd)


def raw_read(path: str, chunk_bytes: int, objects: int) -> float:
    buf = memoryview(bytearray(chunk_bytes))
    with open(path, "rb", buffering=0) as f:
        began = time.perf_counter()
        for _ in range(objects):
            if f.readinto(buf) != chunk_bytes:
                raise RuntimeError(f"{path} is shorter than {objects} chunks")
        return time.perf_counter() - began


def fs_write(adapter: FsAdapter, chunks: list[memoryview], threads: int, objects: int) -> float:
    def work(_tid: int, indices: range) -> None:
        for i in indices:
            oid, payload = chunk_id(i), chunks[i % len(chunks)]
            if not adapter.write(oid.name, l2.encode_header(oid, payload), payload):
                raise RuntimeError(f"object {i} was there already")
    return in_threads(threads, objects, work)


def fs_read(adapter: FsAdapter, chunk_bytes: int, threads: int, objects: int) -> float:
    def work(_tid: int, indices: range) -> None:
        dest = memoryview(bytearray(chunk_bytes))
        for i in indices:
            oid = chunk_id(i)
            l2.verify(oid, adapter.read_into(oid.name, dest), dest)
    return in_threads(threads, objects, work)


def bench(path: str, chunk_bytes: int = 6 * MIB, objects: int = 200, threads: tuple[int, ...] = (1, 2),
          drop_caches: bool = False, fs_first: bool = False) -> list[Row]:
    """One run: raw write, fs write per thread count, raw read, fs read per thread count (see module doc);
    ``fs_first``: the fs phases of each direction before the raw one (rounds alternate, so that a
    filesystem that slows down during a run costs both sides alike)."""
    pool = memoryview(bytearray(os.urandom(chunk_bytes * min(POOL_CHUNKS, objects))))
    chunks = [pool[i * chunk_bytes:(i + 1) * chunk_bytes] for i in range(min(POOL_CHUNKS, objects))]
    total = chunk_bytes * objects
    root = os.path.join(path, f"lmcd-l2-bench-{os.getpid()}")
    os.makedirs(root)
    rows: list[Row] = []
    try:
        raw_file = os.path.join(root, "raw.bin")
        adapters = {}
        for t in threads:
            adapters[t] = FsAdapter(os.path.join(root, f"fs-{t}"), objects * (chunk_bytes + 4096), 0)
            adapters[t].start()
        fs_writes: dict[int, float] = {}
        fs_reads: dict[int, float] = {}

        def writes() -> None:
            for t, adapter in adapters.items():
                settle()
                fs_writes[t] = fs_write(adapter, chunks, t, objects)

        def reads() -> None:
            for t, adapter in adapters.items():
                settle(drop_caches)
                fs_reads[t] = fs_read(adapter, chunk_bytes, t, objects)

        if fs_first:
            writes()
        settle()
        write_raw = raw_write(raw_file, chunks, objects)
        if not fs_first:
            writes()
        rows.append(Row("raw write (os.write)", 1, write_raw, total / write_raw / 1e9, 1.0))
        rows += [Row("fs write (encode_header + write)", t, took, total / took / 1e9, write_raw / took)
                 for t, took in fs_writes.items()]
        if fs_first:
            reads()
        settle(drop_caches)
        read_raw = raw_read(raw_file, chunk_bytes, objects)
        if not fs_first:
            reads()
        rows.append(Row("raw read (readinto)", 1, read_raw, total / read_raw / 1e9, 1.0))
        rows += [Row("fs read (read_into + verify)", t, took, total / took / 1e9, read_raw / took)
                 for t, took in fs_reads.items()]
        for adapter in adapters.values():
            adapter.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| operation | threads | seconds | GB/s | vs raw |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r.operation} | {r.threads} | {r.seconds:.3f} | {r.gb_per_s:.2f} | {r.vs_raw:.2f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", help="a directory on the filesystem to measure (a subdirectory is made there)")
    parser.add_argument("--chunk-mib", type=float, default=6.0, help="bytes of one chunk, MiB (256 tokens: 6)")
    parser.add_argument("--objects", type=int, default=200)
    parser.add_argument("--threads", default="1,2", help="writer and reader thread counts, comma-separated")
    parser.add_argument("--drop-caches", action="store_true", help="drop the page cache before reads (root)")
    parser.add_argument("--rounds", type=int, default=1, help="runs, raw first and fs first by turns; all printed")
    args = parser.parse_args(argv)
    print(f"{args.objects} chunks of {args.chunk_mib:g} MiB under {os.path.abspath(args.path)}"
          f"{', page cache dropped before reads' if args.drop_caches else ''}\n")
    runs = []
    for round_ in range(args.rounds):
        rows = bench(args.path, int(args.chunk_mib * MIB), args.objects,
                     tuple(int(t) for t in args.threads.split(",")), args.drop_caches, fs_first=bool(round_ % 2))
        runs.append(rows)
        print(f"round {round_ + 1} ({'fs' if round_ % 2 else 'raw'} first)\n{table(rows)}\n")
    if args.rounds > 1:
        print("median ratio over the rounds: " + ", ".join(
            f"{r.operation.split(' (')[0]} x{r.threads}: {statistics.median(run[i].vs_raw for run in runs):.2f}"
            for i, r in enumerate(runs[0]) if not r.operation.startswith("raw")))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "l2_disk.json"), "w") as f:
            json.dump([[asdict(r) for r in rows] for rows in runs], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
