"""Registered workers and their KV memory as the server sees it: mapped POSIX SHM segments (CPU,
server copies), opened CUDA IPC handles (GPU, server copies), or nothing (worker copies).

Ownership: the registry is touched only by the request loop thread. Copy threads read a
worker's ``planes`` and the mapped bytes while ``inflight > 0``; the loop never unmaps a
worker with copies in flight (it marks it ``closing`` and unmaps when the last copy ends).

Segment names: a worker's segment is named ``/dev/shm/lmcache_kv_<pid>_<idx>`` for the
worker's lifetime, and the worker holds a shared ``flock`` on it. The server maps it by
name. When a worker goes (unregister, disconnect, server shutdown), the server unlinks
each of its segments whose lock it can take exclusively: the owner is dead, so nothing is
left in /dev/shm after a crash; a live owner keeps its names (and unlinks them itself).
Process exit releases the lock a moment after the socket closes, so a segment still locked
at disconnect is checked again a few times (``recheck``).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import mmap
import os
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from lmcd import protocol as p
from lmcd.copyplan import plane_addresses

if TYPE_CHECKING:
    from lmcd.server.gpu import CudaHost, GpuWorker

log = logging.getLogger("lmcd.workers")

SHM_DIR = "/dev/shm"
RECHECK_DELAYS_S = (0.05, 0.25, 1.0, 3.0)
SEGMENT_NAME = re.compile(r"^/?(lmcache_kv_[A-Za-z0-9_.-]{1,200})$")


@dataclass(frozen=True, slots=True)
class SegmentFile:
    path: str
    dev: int
    ino: int

    def unlink_if_orphaned(self) -> bool | None:
        """Unlink the name if its owner is dead: True if unlinked, False if the owner lives,
        None if the name is gone or now names another file."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (self.dev, self.ino):
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return True
        finally:
            os.close(fd)


ORPHAN_NAME = re.compile(r"^(lmcache_kv|lmcache_pool)_[A-Za-z0-9_.-]{1,200}$")


def sweep_orphans() -> list[str]:
    """Unlink every /dev/shm/lmcache_kv_* (worker) or lmcache_pool_* (shared pool) segment whose
    owner is dead (no process holds its lock).

    Catches workers that crashed while no server was running. Returns the names removed.
    """
    removed: list[str] = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        if ORPHAN_NAME.match(name) is None:
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            continue
        if SegmentFile(path, st.st_dev, st.st_ino).unlink_if_orphaned():
            removed.append(name)
    return removed


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
    files: list[SegmentFile] = field(default_factory=list)
    mmaps: list[mmap.mmap] = field(default_factory=list)
    gpu: GpuWorker | None = None  # server copies on CUDA: IPC mappings, events, the staged copy
    inflight: int = 0
    closing: bool = False

    def unmap(self) -> None:
        assert self.inflight == 0, "unmap with copies in flight"
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


def map_segment(name: str, declared_size: int) -> tuple[mmap.mmap, SegmentFile]:
    """Open and map one worker segment by name."""
    match = SEGMENT_NAME.match(name)
    if match is None:
        raise RegistrationError(
            f"segment name {name!r} is not allowed: names must look like /lmcache_kv_<pid>_<idx>"
        )
    path = os.path.join(SHM_DIR, match.group(1))
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except PermissionError as exc:  # a 0600 segment of another user (e.g. a root vLLM beside a non-root server)
        try:
            owner = f"uid {os.stat(path, follow_symlinks=False).st_uid}"
        except OSError:
            owner = "another user"
        raise RegistrationError(
            f"cannot open SHM segment {name}: it belongs to {owner} and this server runs as uid {os.geteuid()}; "
            "run the worker and the server as the same user (in Docker: docker run --user)"
        ) from exc
    except OSError as exc:
        raise RegistrationError(
            f"cannot open SHM segment {name}: {exc.strerror}; the worker and the server must share "
            "/dev/shm (same host; in Docker run both with --ipc host)"
        ) from exc
    try:
        st = os.fstat(fd)
        if st.st_size < declared_size:
            raise RegistrationError(f"segment {name} holds {st.st_size} bytes, {declared_size} were declared")
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mapping = mmap.mmap(fd, declared_size, flags=flags)
        with contextlib.suppress(AttributeError, OSError):  # huge pages where shmem THP is "advise"
            mapping.madvise(mmap.MADV_HUGEPAGE)
        return mapping, SegmentFile(path, st.st_dev, st.st_ino)
    finally:
        os.close(fd)


class WorkerRegistry:
    def __init__(self, cuda: CudaHost | None = None, cuda_problem: str = "CUDA was not probed",
                 pool_shared: bool = False) -> None:
        self.cuda = cuda
        self.cuda_problem = cuda_problem
        self.pool_shared = pool_shared
        self.workers: dict[int, Worker] = {}
        self._ids = itertools.count(1)
        self._rechecks: list[tuple[float, int, SegmentFile]] = []  # (when, attempt, file)

    def register(self, session_id: int, pid: int, ns_id: int, rank: int, req: p.RegisterWorker,
                 chunk_size: int) -> Worker:
        """Check ``req`` against what its ``copier`` and ``device`` need, and map the worker's memory
        where the server copies; RegistrationError says what is wrong."""
        blocks_per_chunk = validate_layout(req.layout, req.segment_sizes, chunk_size)
        worker = Worker(next(self._ids), session_id, pid, ns_id, rank, req.device, req.copier, req.layout,
                        blocks_per_chunk, req.layout.num_planes * blocks_per_chunk * req.layout.page_bytes)
        if req.copier == p.Copier.WORKER:
            if req.segment_names or req.ipc_handles:
                raise RegistrationError("a worker that copies itself shares no KV memory: send no segment names "
                                        "or CUDA IPC handles")
        elif req.device == p.Device.CUDA:
            worker.gpu = self._open_cuda(req, blocks_per_chunk)
        else:
            worker.mmaps, worker.files, worker.planes = self._map_cpu(req)
        self.workers[worker.worker_id] = worker
        return worker

    @staticmethod
    def _map_cpu(req: p.RegisterWorker) -> tuple[list[mmap.mmap], list[SegmentFile], np.ndarray]:
        names, sizes = req.segment_names, req.segment_sizes
        if not names or req.ipc_handles or len(names) != len(sizes):
            raise RegistrationError(f"server copies of a CPU worker need one SHM segment name per segment size "
                                    f"and no CUDA IPC handles: got {len(names)} names for {len(sizes)} sizes")
        mmaps: list[mmap.mmap] = []
        files: list[SegmentFile] = []
        try:
            for name, size in zip(names, sizes, strict=True):
                mapping, segment_file = map_segment(name, size)
                mmaps.append(mapping)
                files.append(segment_file)
        except BaseException:
            for mapping in mmaps:
                mapping.close()
            raise
        starts = [np.frombuffer(mapping, dtype=np.uint8).ctypes.data for mapping in mmaps]
        return mmaps, files, plane_addresses(req.layout, starts)

    def _open_cuda(self, req: p.RegisterWorker, blocks_per_chunk: int) -> GpuWorker:
        if self.cuda is None:
            raise RegistrationError(f"this server cannot copy for GPU workers: {self.cuda_problem}; or let the "
                                    "workers copy themselves (server --share-pool, lmcache_driven)")
        if req.segment_names or len(req.ipc_handles) != len(req.segment_sizes):
            raise RegistrationError(f"server copies of a GPU worker need one CUDA IPC handle per segment size and "
                                    f"no SHM names: got {len(req.ipc_handles)} handles for {len(req.segment_sizes)} "
                                    "sizes")
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
        now = time.monotonic()
        for segment_file in worker.files:
            if segment_file.unlink_if_orphaned() is False:
                self._rechecks.append((now + RECHECK_DELAYS_S[0], 0, segment_file))

    @property
    def has_rechecks(self) -> bool:
        return bool(self._rechecks)

    def recheck(self, now: float) -> None:
        """Unlink segments of departed workers whose owner has died since (see module docstring)."""
        due = [item for item in self._rechecks if item[0] <= now]
        if not due:
            return
        self._rechecks = [item for item in self._rechecks if item[0] > now]
        for _, attempt, segment_file in due:
            if segment_file.unlink_if_orphaned() is False and attempt + 1 < len(RECHECK_DELAYS_S):
                self._rechecks.append((now + RECHECK_DELAYS_S[attempt + 1], attempt + 1, segment_file))

    def copy_done(self, worker: Worker) -> None:
        worker.inflight -= 1
        if worker.closing and worker.inflight == 0:
            worker.unmap()

    def for_session(self, session_id: int) -> list[Worker]:
        return [w for w in self.workers.values() if w.session_id == session_id]

    def close_all(self) -> None:
        for worker in list(self.workers.values()):
            self.remove(worker)
        self._rechecks.clear()
        removed = sweep_orphans()
        if removed:
            log.info("Removed %d SHM segments of workers that died: %s", len(removed), ", ".join(removed[:8]))
