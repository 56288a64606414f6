"""Registered workers: each one's KV memory, mapped from its POSIX SHM segments.

Ownership: the registry is touched only by the request loop thread. Copy threads read a
worker's ``layer_addresses`` and the mapped bytes while ``inflight > 0``; the loop never
unmaps a worker with copies in flight (it marks it ``closing`` and unmaps when the last
copy ends).

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

import numpy as np

from lmcd.protocol import KVLayout
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
    device: str
    layout: KVLayout
    blocks_per_chunk: int
    chunk_bytes: int
    layer_addresses: np.ndarray  # int64 absolute address of page (layer, block 0)
    files: list[SegmentFile] = field(default_factory=list)
    mmaps: list[mmap.mmap] = field(default_factory=list)
    views: list[np.ndarray] = field(default_factory=list)
    gpu: GpuWorker | None = None  # a CUDA worker: IPC mappings, stream, events
    inflight: int = 0
    closing: bool = False

    @property
    def copies_itself(self) -> bool:
        """A worker registered without SHM segments or CUDA IPC handles: it copies through the shared pool."""
        return self.gpu is None and not self.views

    def unmap(self) -> None:
        assert self.inflight == 0, "unmap with copies in flight"
        if self.gpu is not None:
            self.gpu.close()
        self.views.clear()
        for mapping in self.mmaps:
            mapping.close()
        self.mmaps.clear()


def validate_layout(layout: KVLayout, segment_sizes: list[int], chunk_size: int) -> int:
    """Check the page geometry against the segments; returns blocks per chunk."""
    if chunk_size % layout.block_size:
        raise RegistrationError(
            f"the server's chunk size ({chunk_size} tokens) is not a multiple of the engine's block size "
            f"({layout.block_size}); start the server with --chunk-size a multiple of {layout.block_size}"
        )
    if len(layout.layer_offsets) != layout.num_layers or len(layout.layer_segments) != layout.num_layers:
        raise RegistrationError(
            f"layout lists {len(layout.layer_offsets)} layer offsets and {len(layout.layer_segments)} layer "
            f"segments for {layout.num_layers} layers; they must match"
        )
    if layout.page_bytes > layout.block_stride and layout.num_blocks > 1:
        raise RegistrationError(f"page_bytes {layout.page_bytes} exceeds block_stride {layout.block_stride}")
    span = (layout.num_blocks - 1) * layout.block_stride + layout.page_bytes
    for layer, (offset, seg) in enumerate(zip(layout.layer_offsets, layout.layer_segments, strict=True)):
        if seg >= len(segment_sizes):
            raise RegistrationError(f"layer {layer} names segment {seg}, but only {len(segment_sizes)} were sent")
        if offset + span > segment_sizes[seg]:
            raise RegistrationError(
                f"layer {layer} needs bytes up to {offset + span} of segment {seg}, "
                f"which holds {segment_sizes[seg]} bytes"
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
                 grid: int = 16, copy_engine: str = "staged") -> None:
        self.cuda = cuda
        self.cuda_problem = cuda_problem
        self.grid = grid
        self.copy_engine = copy_engine
        self.workers: dict[int, Worker] = {}
        self._ids = itertools.count(1)
        self._rechecks: list[tuple[float, int, SegmentFile]] = []  # (when, attempt, file)

    def register(
        self, session_id: int, pid: int, device: str, layout: KVLayout,
        names: list[str], sizes: list[int], chunk_size: int, *, ns_id: int, rank: int,
        ipc_handles: list[bytes] | None = None, device_pci: str = "", event_handle: bytes = b"",
    ) -> Worker:
        if device == "cuda" and (ipc_handles or names):
            return self._register_cuda(session_id, pid, layout, sizes, chunk_size, ns_id=ns_id, rank=rank,
                                       ipc_handles=ipc_handles or [], device_pci=device_pci,
                                       event_handle=event_handle)
        if device not in ("cpu", "cuda"):  # cuda without IPC handles: a GPU worker that copies itself
            raise RegistrationError(f"device {device!r} is unknown: register 'cpu' (SHM) or 'cuda' (CUDA IPC)")
        if names and len(names) != len(sizes):
            raise RegistrationError(f"{len(names)} segment names but {len(sizes)} segment sizes")
        blocks_per_chunk = validate_layout(layout, sizes, chunk_size)
        mmaps: list[mmap.mmap] = []
        files: list[SegmentFile] = []
        try:
            for name, size in zip(names, sizes if names else [], strict=True):
                mapping, segment_file = map_segment(name, size)
                mmaps.append(mapping)
                files.append(segment_file)
        except BaseException:
            for mapping in mmaps:
                mapping.close()
            raise
        views = [np.frombuffer(mapping, dtype=np.uint8) for mapping in mmaps]
        if views:
            seg_base = np.array([view.ctypes.data for view in views], dtype=np.int64)
            layer_addresses = seg_base[np.asarray(layout.layer_segments)] + np.asarray(layout.layer_offsets,
                                                                                      np.int64)
        else:  # self-copying worker (lmcache_driven, no SHM): nothing of it is mapped here
            layer_addresses = np.zeros(layout.num_layers, dtype=np.int64)
        worker = Worker(
            worker_id=next(self._ids), session_id=session_id, pid=pid, ns_id=ns_id, rank=rank, device=device,
            layout=layout,
            blocks_per_chunk=blocks_per_chunk,
            chunk_bytes=layout.num_layers * blocks_per_chunk * layout.page_bytes,
            layer_addresses=layer_addresses, files=files, mmaps=mmaps, views=views,
        )
        self.workers[worker.worker_id] = worker
        return worker

    def _register_cuda(
        self, session_id: int, pid: int, layout: KVLayout, sizes: list[int], chunk_size: int, *, ns_id: int,
        rank: int, ipc_handles: list[bytes], device_pci: str, event_handle: bytes,
    ) -> Worker:
        if self.cuda is None:
            raise RegistrationError(f"this server cannot take GPU workers: {self.cuda_problem}")
        if len(ipc_handles) != len(sizes):
            raise RegistrationError(f"{len(ipc_handles)} CUDA IPC handles but {len(sizes)} segment sizes")
        if not event_handle:
            raise RegistrationError("a CUDA worker must send its interprocess event handle")
        blocks_per_chunk = validate_layout(layout, sizes, chunk_size)
        try:
            gpu = GpuWorker(self.cuda, device_pci, ipc_handles, layout, blocks_per_chunk, event_handle, self.grid,
                            self.copy_engine)
        except LookupError as exc:
            raise RegistrationError(str(exc)) from None
        except Exception as exc:  # CUDA refused a handle: say which and why
            raise RegistrationError(
                f"cannot open the worker's CUDA IPC memory on GPU {device_pci}: {exc}; the worker and the server "
                "must run on the same host and see the same GPU (docker: --ipc host --gpus all)"
            ) from None
        worker = Worker(
            worker_id=next(self._ids), session_id=session_id, pid=pid, ns_id=ns_id, rank=rank, device="cuda",
            layout=layout, blocks_per_chunk=blocks_per_chunk,
            chunk_bytes=layout.num_layers * blocks_per_chunk * layout.page_bytes,
            layer_addresses=gpu.layer_addresses, gpu=gpu,
        )
        self.workers[worker.worker_id] = worker
        return worker

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
