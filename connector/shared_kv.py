"""Server copies (``engine_driven``), the worker's side: its KV memory is shared with the server,
which copies between those pages and its pool on ``Store`` and ``Retrieve``.

CPU: vLLM's KV tensors live in shared memory segments, sealed memfds (moved there at registration,
``lmcd.connector.layout.migrate_to_shm``), whose fds the server gets through its handoff socket; a store or load is one
request, answered once the server's copy has ended. CUDA: the KV allocations are shared over
CUDA IPC (``CudaShare``); the server answers at launch, and interprocess events order its copies
with the engine's stream (a load makes the forward wait on the GPU; a store is done when
``stores_done`` sees the server's event complete).
"""

from __future__ import annotations

import logging

from lmcd import protocol as p
from lmcd.connector.client import CacheClient, WorkerInfo
from lmcd.connector.cuda import CudaShare
from lmcd.connector.scheduler import LoadSpec, StoreSpec
from lmcd.shm import ShmSegment

log = logging.getLogger("lmcd.connector")


class SharedKV:
    """The worker's memory as registered for server copies: SHM ``segments`` (CPU) or ``cuda`` (GPU)."""

    def __init__(self, layout: p.KVLayout, segments: list[ShmSegment] | None = None,
                 cuda: CudaShare | None = None) -> None:
        assert (segments is None) != (cuda is None)
        self.layout = layout
        self.segments = segments or []
        self.cuda = cuda
        self.worker_id: int | None = None

    def register(self, client: CacheClient) -> WorkerInfo:
        cuda = self.cuda
        if cuda is None:
            info = client.register_worker(self.layout, p.Device.CPU, p.Copier.SERVER,
                                          [seg.nbytes for seg in self.segments],
                                          segment_fds=[seg.fd for seg in self.segments])
        else:
            cuda.export()
            log.info("Sharing %d CUDA allocations (%.1f MiB) of GPU %d (PCI %s) over CUDA IPC",
                     len(cuda.starts), sum(cuda.sizes) / 2**20, cuda.device, cuda.pci)
            info = client.register_worker(self.layout, p.Device.CUDA, p.Copier.SERVER, cuda.sizes,
                                          ipc_handles=cuda.handles, device_pci=cuda.pci,
                                          event_handle=cuda.event_handle)
            cuda.open_server_event(info.event_handle)
        self.worker_id = info.worker_id
        return info

    def load(self, client: CacheClient, spec: LoadSpec) -> int:
        """Copy the spec's chunks into vLLM's blocks; returns how many leading chunks loaded."""
        assert self.worker_id is not None
        if self.cuda is not None:
            self.cuda.before_copy()
        got = client.retrieve(self.worker_id, spec.chunk_keys, spec.block_ids, spec.lease_id, spec.skip_blocks)
        if self.cuda is not None and got:
            self.cuda.after_load()
        return got

    def store(self, client: CacheClient, spec: StoreSpec) -> None:
        assert self.worker_id is not None
        if self.cuda is not None:
            self.cuda.before_copy()
        result = client.store(self.worker_id, spec.chunk_keys, spec.block_ids)
        if self.cuda is not None and p.ChunkStatus.STORED in result.statuses:
            self.cuda.stores_pending = True

    def settle(self, client: CacheClient) -> None:
        """Nothing is sent after a server copy."""

    def stores_done(self) -> bool:
        """Whether the stores sent so far are complete (GPU: polled; CPU: they complete in the call)."""
        return self.cuda is None or self.cuda.stores_done()

    def fence_stores(self) -> None:
        if self.cuda is not None:
            self.cuda.fence_stores()

    def close(self) -> None:
        """The memory stays (vLLM still uses it); only the registration ends with the session."""
        self.worker_id = None
