"""What the shared pool (server ``--share-pool``) costs each GPU worker: mapping it and registering
it with CUDA, at realistic pool sizes, from 1, 2 and 4 worker processes at once.

The pool is made as the server makes it with ``--share-pool``: one sealed memfd
(``lmcd.shm.ShmSegment``, prefix ``lmcache_pool``, huge pages advised; not in /dev/shm, so its size
does not bound it), faulted in with MADV_POPULATE_WRITE (``--backing memfd``: an unsealed memfd).
Workers open it as ``/proc/<pid>/fd/<fd>`` (the server hands the fd over instead). Then P
processes start at once (multiprocessing spawn), each with its own CUDA context on GPU 0 (torch),
and do what a worker that copies itself does (``lmcd.connector.shared_pool.MappedPool`` and
``lmcd.connector.cuda.PoolCopier``): map the whole pool (MAP_SHARED | MAP_POPULATE) and
register it with ``lmcd.cudadrv.host_register`` (cuMemHostRegister, portable) in one call. Each
reports its map and register seconds, its RSS and page-table (VmPTE) growth, and the GPU memory
it took (torch.cuda.mem_get_info before and after: device-wide, so with P > 1 it includes the
others' registrations made meanwhile; ``nvidia-smi`` per process where it can see our pids);
then it unregisters and exits. The parent never touches CUDA.

    python benchmarks/pool_register.py [--sizes-gib 32,64,96] [--procs 1,2,4] [--max-seconds 400]

One table row per (size, processes); with OUT set, JSON in $OUT/pool_register.json. Sizes that do
not fit in free memory (with every process's own overhead) are skipped with a message; each pool
is freed before the next size; the whole run stops at --max-seconds (stragglers are killed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import multiprocessing as mp
import os
import queue
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

GIB = 1 << 30
STEP = 256 << 20  # populate in steps, as the server's Pool does
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
PROC_OVERHEAD = 3 * GIB  # host memory of one worker process beyond the pool: torch, its CUDA context
PAGE_TABLES_PER_GIB = 4 << 20  # 4 KiB pages: 2 MiB of PTEs per GiB mapped, and as much for CUDA's pinning
MARGIN = 6 * GIB
STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmPTE", "VmPin", "VmLck")


# ---------------------------------------------------------------- what the kernel says


def proc_status() -> dict[str, int]:
    """Bytes of the /proc/self/status fields in STATUS_KEYS."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in STATUS_KEYS:
                out[key] = int(rest.split()[0]) * 1024
    return out


def smaps_rollup(field: str) -> int:
    with contextlib.suppress(OSError), open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def meminfo(field: str = "MemAvailable") -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def available_bytes() -> int:
    """Memory this run may still use: MemAvailable, or less where a cgroup limit is closer."""
    available = meminfo()
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = read_text(limit_path), read_text(usage_path)
        if limit.isdigit() and usage.isdigit():
            if int(limit) < 1 << 60:  # "max" or a huge number: no limit
                available = min(available, int(limit) - int(usage))
            break
    return available


def shm_free_bytes() -> int:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "?"


def gpu_apps() -> dict[int, float]:
    """MiB of GPU memory per pid, as nvidia-smi sees them (empty where it cannot)."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    apps = {}
    for line in out.splitlines():
        with contextlib.suppress(ValueError):
            pid, used = (part.strip() for part in line.split(","))
            apps[int(pid)] = float(used)
    return apps


# ---------------------------------------------------------------- the pool, as the server makes it


class PoolMemory:
    """``nbytes`` of shared memory faulted in: an lmcache_pool SHM segment, or a memfd (``path`` is
    what a worker opens to map it)."""

    def __init__(self, nbytes: int, backing: str) -> None:
        self.nbytes, self.backing = nbytes, backing
        self.segment: Any = None
        self.fd = -1
        if backing == "shm":  # the server's own: a sealed memfd
            from lmcd.shm import ShmSegment

            self.segment = ShmSegment(nbytes, prefix="lmcache_pool")  # madvises huge pages itself
            self.mapping = self.segment.mapping
            self.path = f"/proc/{os.getpid()}/fd/{self.segment.fd}"
        else:
            self.fd = os.memfd_create("lmcache_pool", 0)
            os.ftruncate(self.fd, nbytes)
            self.mapping = mmap.mmap(self.fd, nbytes, flags=mmap.MAP_SHARED)
            with contextlib.suppress(AttributeError, OSError):
                self.mapping.madvise(mmap.MADV_HUGEPAGE)
            self.path = f"/proc/{os.getpid()}/fd/{self.fd}"
        started = time.monotonic()
        self._populate()
        self.populate_seconds = time.monotonic() - started

    def _populate(self) -> None:
        for offset in range(0, self.nbytes, STEP):
            length = min(STEP, self.nbytes - offset)
            try:
                self.mapping.madvise(MADV_POPULATE_WRITE, offset, length)
            except OSError:  # before Linux 5.14: touch one byte per page
                for page in range(offset, offset + length, mmap.PAGESIZE):
                    self.mapping[page] = 0

    def close(self) -> None:
        if self.segment is not None:
            self.segment.close()
        else:
            self.mapping.close()
            os.close(self.fd)


# ---------------------------------------------------------------- one worker process


def worker(index: int, path: str, nbytes: int, barrier: Any, results: Any, release: Any, timeout_s: float) -> None:
    """Map and register the pool as a GPU worker that copies itself does, timing each step."""
    try:
        import numpy as np
        import torch

        from lmcd import cudadrv

        torch.cuda.set_device(0)
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()  # this process's CUDA context (a vLLM worker has one), current here
        gpu_free_before = torch.cuda.mem_get_info(0)[0]
        before = proc_status()
        barrier.wait(timeout_s)  # every process maps and registers at once
        started = time.monotonic()
        fd = os.open(path, os.O_RDWR)
        try:
            mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        finally:
            os.close(fd)
        mapped = time.monotonic()
        view = np.frombuffer(mapping, dtype=np.uint8)
        address = view.ctypes.data
        del view
        after_map = proc_status()
        cudadrv.host_register(address, nbytes)
        registered = time.monotonic()
        gpu_free_after = torch.cuda.mem_get_info(0)[0]
        after_register = proc_status()
        results.put({"index": index, "pid": os.getpid(), "started": started, "registered": registered,
                     "map_s": mapped - started, "register_s": registered - mapped,
                     "gpu_mib": (gpu_free_before - gpu_free_after) / 2**20,
                     "pmd_mapped_gib": smaps_rollup("ShmemPmdMapped") / GIB,
                     "map_growth": {k: after_map.get(k, 0) - before.get(k, 0) for k in STATUS_KEYS},
                     "register_growth": {k: after_register.get(k, 0) - after_map.get(k, 0) for k in STATUS_KEYS}})
        release.wait(timeout_s)  # the parent looks at the system while every registration holds
        unregistering = time.monotonic()
        cudadrv.host_unregister(address)
        results.put({"index": index, "unregister_s": time.monotonic() - unregistering})
        mapping.close()
    except BaseException as exc:
        barrier.abort()  # the others stop waiting for this one
        results.put({"index": index, "pid": os.getpid(), "error": f"{type(exc).__name__}: {exc}"})


def collect(results: Any, count: int, deadline: float, key: str) -> list[dict[str, Any]]:
    """``count`` messages that carry ``key`` (or an error), until ``deadline``."""
    got: list[dict[str, Any]] = []
    while len(got) < count and time.monotonic() < deadline:
        try:
            message = results.get(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
        except queue.Empty:
            continue
        if key in message or "error" in message:
            got.append(message)
    return got


def run_processes(pool: PoolMemory, procs: int, deadline: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    barrier, results, release = ctx.Barrier(procs), ctx.Queue(), ctx.Event()
    available_before = meminfo()
    timeout_s = max(1.0, deadline - time.monotonic())
    children = [ctx.Process(target=worker, args=(i, pool.path, pool.nbytes, barrier, results, release, timeout_s),
                            daemon=True, name=f"pool-register-{i}") for i in range(procs)]
    run: dict[str, Any] = {"size_gib": pool.nbytes / GIB, "procs": procs, "backing": pool.backing,
                           "populate_s": pool.populate_seconds}
    try:
        for child in children:
            child.start()
        registered = collect(results, procs, deadline, "register_s")
        run["mem_available_drop_gib"] = (available_before - meminfo()) / GIB  # every process, as it holds
        apps = gpu_apps()
        for message in registered:
            if "pid" in message and message["pid"] in apps:
                message["nvidia_smi_mib"] = apps[message["pid"]]
        release.set()
        holding = sum("error" not in m for m in registered)  # only these send a second message
        unregistered = {m["index"]: m.get("unregister_s") for m in collect(results, holding, deadline,
                                                                           "unregister_s")}
        for message in registered:
            message["unregister_s"] = unregistered.get(message["index"])
        run["processes"] = sorted(registered, key=lambda m: m["index"])
        ok = [m for m in registered if "error" not in m]
        if ok:
            run["wall_s"] = max(m["registered"] for m in ok) - min(m["started"] for m in ok)
        if len(registered) < procs:
            run["timed_out"] = True
    finally:
        release.set()
        stopping = sys.exc_info()[0] is not None  # SIGTERM or a failure here: no waiting on the children
        for child in children:
            child.join(0.1 if stopping else max(1.0, min(60.0, deadline - time.monotonic())))
        for child in children:
            if child.is_alive():
                child.kill()
                child.join(5)
    return run


# ---------------------------------------------------------------- the report


def row(run: dict[str, Any]) -> str:
    ok = [m for m in run.get("processes", []) if "error" not in m]
    errors = [m["error"] for m in run.get("processes", []) if "error" in m]

    def stat(values: list[float], fmt: str) -> str:
        return f"{max(values):{fmt}}/{sum(values) / len(values):{fmt}}" if values else "-"

    smi = [m["nvidia_smi_mib"] for m in ok if "nvidia_smi_mib" in m]
    text = (f"{run['size_gib']:>5g} {run['procs']:>5} {run['backing']:>6} {run['populate_s']:>8.1f} "
            f"{stat([m['map_s'] for m in ok], '.2f'):>11} {stat([m['register_s'] for m in ok], '.2f'):>11} "
            f"{(format(run['wall_s'], '.2f') if 'wall_s' in run else '-'):>7} "
            f"{stat([m['map_growth']['VmRSS'] / GIB for m in ok], '.1f'):>11} "
            f"{stat([m['register_growth']['RssAnon'] / 2**20 for m in ok], '.0f'):>11} "
            f"{stat([(m['map_growth']['VmPTE'] + m['register_growth']['VmPTE']) / 2**20 for m in ok], '.0f'):>11} "
            f"{stat([m['gpu_mib'] for m in ok], '.0f'):>11} {stat(smi, '.0f'):>11} "
            f"{run.get('mem_available_drop_gib', 0.0):>9.1f}")
    if errors:
        text += f"  errors: {'; '.join(errors)[:300]}"
    if run.get("timed_out"):
        text += "  (timed out)"
    for m in ok if run["procs"] > 1 else []:
        pte = (m["map_growth"]["VmPTE"] + m["register_growth"]["VmPTE"]) / 2**20
        text += (f"\n{'':>12} process {m['index']} (pid {m['pid']}): map {m['map_s']:.2f} s, register "
                 f"{m['register_s']:.2f} s, RSS +{m['map_growth']['VmRSS'] / GIB:.1f} GiB, PTE +{pte:.0f} MiB, "
                 f"GPU {m['gpu_mib']:.0f} MiB")
    return text


HEADER = (f"{'GiB':>5} {'procs':>5} {'backing':>6} {'populate':>8} {'map s':>11} {'register s':>11} {'wall s':>7} "
          f"{'RSS +GiB':>11} {'anon +MiB':>11} {'PTE +MiB':>11} {'GPU MiB':>11} {'smi MiB':>11} {'host -GiB':>9}")
LEGEND = ("per-process columns: max/mean over the processes. map s: mmap MAP_POPULATE; register s: cuMemHostRegister; "
          "wall s: first map to last registration; RSS: growth at map (shared pool pages counted); anon: growth at "
          "register; PTE: VmPTE growth; GPU MiB: torch.cuda.mem_get_info drop across the registration (device-wide); "
          "smi MiB: nvidia-smi per process (whole context); host -GiB: MemAvailable drop while all processes hold "
          "their registration (their contexts included)")


def plan_size(size: int, procs: list[int], backing: str) -> tuple[str | None, list[int], str]:
    """(backing to use or None to skip, process counts that fit, why)."""
    use = "shm" if backing == "auto" else backing  # a memfd: /dev/shm's size does not matter
    available = available_bytes()
    per_proc = PROC_OVERHEAD + 2 * PAGE_TABLES_PER_GIB * (size // GIB)
    fits = [n for n in procs if size + n * per_proc + MARGIN <= available]
    if not fits:
        return None, [], (f"needs {(size + min(procs) * per_proc + MARGIN) / GIB:.0f} GiB with its processes, "
                          f"{available / GIB:.1f} GiB are available")
    return use, fits, ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-gib", default="32,64,96", help="pool sizes in GiB")
    parser.add_argument("--procs", default="1,2,4", help="numbers of worker processes registering at once")
    parser.add_argument("--backing", choices=["auto", "shm", "memfd"], default="auto")
    parser.add_argument("--max-seconds", type=float, default=400.0, help="bound on the whole run")
    args = parser.parse_args()
    deadline = time.monotonic() + args.max_seconds
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still frees the pool and the children
    sizes = [int(float(s) * GIB) for s in args.sizes_gib.split(",") if s.strip()]
    procs = sorted({int(n) for n in args.procs.split(",") if n.strip()})
    machine = {"mem_total_gib": meminfo("MemTotal") / GIB, "mem_available_gib": available_bytes() / GIB,
               "shm_free_gib": shm_free_bytes() / GIB, "cpus": os.cpu_count(),
               "thp_enabled": read_text("/sys/kernel/mm/transparent_hugepage/enabled"),
               "thp_shmem": read_text("/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
               "kernel": os.uname().release}
    print("pool registration from GPU worker processes: " + ", ".join(f"{k} {v}" if not isinstance(v, float)
                                                                      else f"{k} {v:.1f}" for k, v in machine.items()))
    report: dict[str, Any] = {"machine": machine, "runs": [], "skipped": []}
    print(HEADER, flush=True)
    try:
        for size in sizes:
            backing, fits, why = plan_size(size, procs, args.backing)
            if backing is None or time.monotonic() > deadline - 10:
                why = why or "out of time (--max-seconds)"
                print(f"{size / GIB:>5g}  skipped: {why}", flush=True)
                report["skipped"].append({"size_gib": size / GIB, "why": why})
                continue
            if why:
                print(f"{size / GIB:>5g}  a memfd instead of SHM: {why}", flush=True)
            for n in sorted(set(procs) - set(fits)):
                report["skipped"].append({"size_gib": size / GIB, "procs": n, "why": "not enough free memory"})
                print(f"{size / GIB:>5g} {n:>5}  skipped: not enough free memory for the processes", flush=True)
            pool = PoolMemory(size, backing)
            try:
                for n in fits:
                    if time.monotonic() > deadline - 5:
                        report["skipped"].append({"size_gib": size / GIB, "procs": n, "why": "out of time"})
                        print(f"{size / GIB:>5g} {n:>5}  skipped: out of time (--max-seconds)", flush=True)
                        continue
                    run = run_processes(pool, n, deadline)
                    report["runs"].append(run)
                    print(row(run), flush=True)
            finally:
                pool.close()  # before the next size
    finally:
        print(LEGEND)
        out_dir = os.environ.get("OUT")
        if out_dir:
            path = os.path.join(out_dir, "pool_register.json")
            with open(path, "w") as f:
                json.dump(report, f, indent=1)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
