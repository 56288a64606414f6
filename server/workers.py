"""Registered workers and their KV memory as the server sees it: mapped memfds (CPU, server copies),
opened CUDA IPC handles (GPU, server copies), or nothing (worker copies).

Ownership: the registry is touched only by the request loop thread. Copy threads read a
worker's ``planes`` and the mapped bytes while ``inflight > 0``; the loop never unmaps a
worker with copies in flight (it marks it ``closing`` and unmaps when the last copy ends).

A CPU worker's memory comes only as file descriptors its session handed over
(``lmcd.server.handoff``: sealed memfds, so it holds that memory and nobody can truncate it);
the server maps them without faulting anything in (a registration is O(1) on the loop thread)
and closes the fds; a thread then maps in the pages the worker has already touched
(``prefault_resident``), so copies take no page faults on them, and allocates none it never did.
Nothing of it has a name in /dev/shm, so nothing is left there when a worker dies.
``sweep_leftovers`` removes what older versions and crashed servers left there.
"""

from __future__ import annotations

import ctypes
import fcntl
import itertools
import logging
import mmap
import os
import re
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from lmcd import protocol as p
from lmcd.copyplan import plane_addresses
from lmcd.server.handoff import HandedFd
from lmcd.shm import MADV_POPULATE_WRITE, libc, map_shared

if TYPE_CHECKING:
    from lmcd.server.gpu import CudaHost, GpuWorker

log = logging.getLogger("lmcd.workers")

SHM_DIR = "/dev/shm"
LEFTOVER_FILE = re.compile(r"^(lmcache_kv|lmcache_pool)_[A-Za-z0-9_.-]{1,200}$")
LEFTOVER_SOCKET = re.compile(r"^lmcd_[0-9]+_[0-9a-f]{1,64}\.sock$")
PREFAULT_WINDOW = 64 << 20


def sweep_leftovers() -> list[str]:
    """Remove from /dev/shm what lmcd left there and nobody uses: SHM segments of older versions
    (``lmcache_kv_*``, ``lmcache_pool_*``) that no process holds locked, and handoff sockets of
    servers that died (``lmcd_*.sock``, connect refused). Only regular files and sockets of this
    process's user are touched; nothing else is opened or followed (a FIFO or a directory of that
    name is left alone). Returns the names removed."""
    removed: list[str] = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        is_file, is_socket = LEFTOVER_FILE.match(name) is not None, LEFTOVER_SOCKET.match(name) is not None
        if not (is_file or is_socket):
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            st = os.lstat(path)
            if st.st_uid != os.geteuid():
                continue
            unused = ((stat.S_ISREG(st.st_mode) and is_file and _unlocked(path, st))
                      or (stat.S_ISSOCK(st.st_mode) and is_socket and _refused(path)))
            if unused and _same_file(path, st):
                os.unlink(path)
                removed.append(name)
        except OSError:
            continue
    return removed


def _same_file(path: str, st: os.stat_result) -> bool:
    now = os.lstat(path)
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _unlocked(path: str, st: os.stat_result) -> bool:
    """Whether nobody holds the regular file ``path`` (still the file ``st`` describes) locked."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    finally:
        os.close(fd)


def _refused(path: str) -> bool:
    """Whether nobody listens on the Unix socket ``path`` any more."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        try:
            sock.connect(path)
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    return False


class RegistrationError(ValueError):
    """A registration request that cannot be honoured; the message says why and what to do."""


@dataclass(slots=True, eq=False)
class Worker:
    worker_id: int
    session_id: int
    pid: int
    ns_id: int
    rank: int
    device: p.Device
    copier: p.Copier
    layout: p.KVLayout
    blocks_per_chunk: int
    chunk_bytes: int
    planes: np.ndarray | None = None  # server copies on CPU: int64 address of page (plane, block 0), mapped here
    mmaps: list[mmap.mmap] = field(default_factory=list)
    gpu: GpuWorker | None = None  # server copies on CUDA: IPC mappings, events, the staged copy
    inflight: int = 0
    closing: bool = False
    unmapping: threading.Event = field(default_factory=threading.Event)  # stops the prefault thread

    def unmap(self) -> None:
        assert self.inflight == 0, "unmap with copies in flight"
        self.unmapping.set()
        if self.gpu is not None:
            self.gpu.close()
        self.planes = None
        for mapping in self.mmaps:
            mapping.close()
        self.mmaps.clear()


MAX_LAYOUT_BYTES = 1 << 48  # any size, offset or span of a layout: int64 address arithmetic never nears 2**63


def validate_layout(layout: p.KVLayout, segment_sizes: list[int], chunk_size: int) -> int:
    """Check every field of the page geometry against the segments, whatever ``num_blocks`` is, so
    that every page of every plane lies inside its segment and no address computed from it can
    overflow int64; returns blocks per chunk. RegistrationError names the field and its bound."""
    if chunk_size % layout.block_size:
        raise RegistrationError(
            f"the server's chunk size ({chunk_size} tokens) is not a multiple of the engine's block size "
            f"({layout.block_size}); start the server with --chunk-size a multiple of {layout.block_size}"
        )
    if len(layout.plane_segments) != layout.num_planes:
        raise RegistrationError(f"layout lists {layout.num_planes} plane offsets and {len(layout.plane_segments)} "
                                "plane segments; they must match")
    if layout.num_layers > layout.num_planes:
        raise RegistrationError(f"{layout.num_layers} layers cannot fit in {layout.num_planes} planes")
    for name, value in (("page_bytes", layout.page_bytes), ("block_stride", layout.block_stride),
                        ("num_blocks", layout.num_blocks), ("the largest segment size", max(segment_sizes)),
                        ("the largest plane offset", max(layout.plane_offsets))):
        if value > MAX_LAYOUT_BYTES:
            raise RegistrationError(f"layout {name} {value} exceeds {MAX_LAYOUT_BYTES} (2**48); describe the KV "
                                    "memory with the sizes it really has")
    if layout.page_bytes > layout.block_stride:
        raise RegistrationError(f"page_bytes {layout.page_bytes} exceeds block_stride {layout.block_stride}: pages "
                                "of one plane would overlap")
    span = (layout.num_blocks - 1) * layout.block_stride + layout.page_bytes
    for plane, (offset, seg) in enumerate(zip(layout.plane_offsets, layout.plane_segments, strict=True)):
        if seg >= len(segment_sizes):
            raise RegistrationError(f"plane {plane} names segment {seg}, but only {len(segment_sizes)} were sent")
        if offset + span > segment_sizes[seg]:
            raise RegistrationError(
                f"plane {plane} needs bytes up to {offset + span} of segment {seg} ({layout.num_blocks} blocks "
                f"{layout.block_stride} bytes apart from offset {offset}), which holds {segment_sizes[seg]} bytes"
            )
    return chunk_size // layout.block_size


def map_handed(handed: list[HandedFd], sizes: list[int]) -> list[mmap.mmap]:
    """Map each handed-over memfd for its declared size, without faulting anything in."""
    mmaps: list[mmap.mmap] = []
    try:
        for index, (item, size) in enumerate(zip(handed, sizes, strict=True)):
            if item.nbytes < size:
                raise RegistrationError(f"memory fd {index} holds {item.nbytes} bytes, {size} were declared")
            try:
                mmaps.append(map_shared(item.fd, size))
            except OSError as exc:
                raise RegistrationError(f"cannot map memory fd {index}: {exc.strerror}; hand over a memfd opened "
                                        "read-write and not sealed against writes") from None
    except BaseException:
        for mapping in mmaps:
            mapping.close()
        raise
    return mmaps


def prefault_resident(address: int, nbytes: int, stop: threading.Event) -> int:
    """Map in this process the pages of ``[address, address + nbytes)`` (a shared mapping) that are
    already in memory (``mincore``), so that copies take no page faults on them; pages never touched
    stay unallocated. Returns the bytes mapped. The libc calls release the GIL."""
    page = mmap.PAGESIZE
    vec = (ctypes.c_ubyte * (PREFAULT_WINDOW // page))()
    mapped = 0
    for start in range(0, nbytes, PREFAULT_WINDOW):
        length = min(PREFAULT_WINDOW, nbytes - start)
        if stop.is_set() or libc.mincore(ctypes.c_void_p(address + start), ctypes.c_size_t(length), vec) != 0:
            break
        resident = np.frombuffer(memoryview(vec), dtype=np.uint8, count=-(-length // page)) & 1
        edges = np.flatnonzero(np.diff(resident, prepend=0, append=0))
        for first, end in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
            if stop.is_set():
                return mapped
            run = min(end * page, length) - first * page
            if libc.madvise(ctypes.c_void_p(address + start + first * page), ctypes.c_size_t(run),
                             MADV_POPULATE_WRITE) == 0:
                mapped += run
    return mapped


def start_prefault(worker: Worker) -> None:
    """``prefault_resident`` for each of a CPU worker's mappings, on a thread of its own."""
    spans = [(np.frombuffer(m, dtype=np.uint8).ctypes.data, len(m)) for m in worker.mmaps]

    def run() -> None:
        started = time.monotonic()
        mapped = sum(prefault_resident(address, nbytes, worker.unmapping) for address, nbytes in spans)
        log.debug("Worker %d: mapped %.1f MiB the worker had touched in %.3f s", worker.worker_id, mapped / 2**20,
                  time.monotonic() - started)

    threading.Thread(target=run, name=f"lmcd-prefault-{worker.worker_id}", daemon=True).start()


class WorkerRegistry:
    def __init__(self, cuda: CudaHost | None = None, cuda_problem: str = "CUDA was not probed",
                 pool_shared: bool = False) -> None:
        self.cuda = cuda
        self.cuda_problem = cuda_problem
        self.pool_shared = pool_shared
        self.workers: dict[int, Worker] = {}
        self._ids = itertools.count(1)

    def register(self, session_id: int, pid: int, ns_id: int, rank: int, req: p.RegisterWorker,
                 chunk_size: int, handed: list[HandedFd]) -> Worker:
        """Check ``req`` against what its ``copier`` and ``device`` need, and map the worker's memory
        (``handed``: the session's handed-over fds, which the caller closes afterwards) where the
        server copies; RegistrationError says what is wrong."""
        if req.segment_names:
            raise RegistrationError("segment names are retired (protocol 3): the server maps only memory handed over "
                                    "as file descriptors through its handoff socket; upgrade the worker's lmcd")
        blocks_per_chunk = validate_layout(req.layout, req.segment_sizes, chunk_size)
        worker = Worker(next(self._ids), session_id, pid, ns_id, rank, req.device, req.copier, req.layout,
                        blocks_per_chunk, req.layout.num_planes * blocks_per_chunk * req.layout.page_bytes)
        if req.copier == p.Copier.WORKER:
            if handed or req.ipc_handles:
                raise RegistrationError("a worker that copies itself shares no KV memory: hand over no memory fds "
                                        "and send no CUDA IPC handles")
        elif req.device == p.Device.CUDA:
            if handed:
                raise RegistrationError("a GPU worker shares its KV over CUDA IPC: hand over no memory fds")
            worker.gpu = self._open_cuda(req, blocks_per_chunk)
        else:
            worker.mmaps, worker.planes = self._map_cpu(req, handed)
            start_prefault(worker)
        self.workers[worker.worker_id] = worker
        return worker

    @staticmethod
    def _map_cpu(req: p.RegisterWorker, handed: list[HandedFd]) -> tuple[list[mmap.mmap], np.ndarray]:
        sizes = req.segment_sizes
        if not handed or req.ipc_handles or len(handed) != len(sizes):
            raise RegistrationError(f"server copies of a CPU worker need one handed-over memory fd per segment size "
                                    f"and no CUDA IPC handles: got {len(handed)} fds for {len(sizes)} sizes (hand "
                                    "them over first: CacheClient.register_worker(segment_fds=...))")
        mmaps = map_handed(handed, sizes)
        starts = [np.frombuffer(mapping, dtype=np.uint8).ctypes.data for mapping in mmaps]
        return mmaps, plane_addresses(req.layout, starts)

    def _open_cuda(self, req: p.RegisterWorker, blocks_per_chunk: int) -> GpuWorker:
        if self.cuda is None:
            raise RegistrationError(f"this server cannot copy for GPU workers: {self.cuda_problem}; or let the "
                                    "workers copy themselves (server --share-pool, lmcache_driven)")
        if len(req.ipc_handles) != len(req.segment_sizes):
            raise RegistrationError(f"server copies of a GPU worker need one CUDA IPC handle per segment size: got "
                                    f"{len(req.ipc_handles)} handles for {len(req.segment_sizes)} sizes")
        if len(req.event_handle) != p.IPC_HANDLE_BYTES:
            raise RegistrationError("a GPU worker whose KV the server copies must send its interprocess event handle")
        from lmcd.server.gpu import GpuSetupError, GpuWorker  # CuPy is imported only where GPU workers come

        try:
            return GpuWorker(self.cuda, req.device_pci, req.ipc_handles, req.layout, blocks_per_chunk,
                             req.event_handle, self.pool_shared)
        except (LookupError, GpuSetupError) as exc:
            raise RegistrationError(str(exc)) from None

    def get(self, worker_id: int) -> Worker | None:
        worker = self.workers.get(worker_id)
        return None if worker is None or worker.closing else worker

    def remove(self, worker: Worker) -> None:
        """Forget a worker; unmap now, or when its last copy ends."""
        self.workers.pop(worker.worker_id, None)
        worker.closing = True
        if worker.inflight == 0:
            worker.unmap()

    def copy_done(self, worker: Worker) -> None:
        worker.inflight -= 1
        if worker.closing and worker.inflight == 0:
            worker.unmap()

    def for_session(self, session_id: int) -> list[Worker]:
        return [w for w in self.workers.values() if w.session_id == session_id]

    def close_all(self) -> None:
        for worker in list(self.workers.values()):
            self.remove(worker)
        removed = sweep_leftovers()
        if removed:
            log.info("Removed %d leftovers of earlier lmcd processes from %s: %s", len(removed), SHM_DIR,
                     ", ".join(removed[:8]))
