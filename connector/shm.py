"""A worker's KV in shared memory (sealed memfds), laid out as vLLM's CPU backend lays it out, for tools and tests.

``CpuKVCache`` holds per layer ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` (layout
LBHNC) in shared memory segments (``lmcd.shm.ShmSegment``: sealed memfds), so page (layer, block)
is one contiguous run of ``num_kv_heads * block_size * 2 * head_size * dtype_bytes`` bytes, and
registers them for server copies. ``lmcache bench`` and the tests are its users; vLLM's own KV is described from its
tensors (``lmcd.connector.layout``).
"""

from __future__ import annotations

import numpy as np

from lmcd import protocol as p
from lmcd.connector.client import CacheClient, WorkerInfo
from lmcd.shm import ShmSegment


class CpuKVCache:
    """A vLLM-CPU-shaped KV cache in SHM segments (one per layer, or one shared by all layers)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                 dtype_bytes: int = 2, one_segment: bool = False) -> None:
        self.page_bytes = num_kv_heads * block_size * 2 * head_size * dtype_bytes
        layer_bytes = num_blocks * self.page_bytes
        if one_segment:
            self.segments = [ShmSegment(num_layers * layer_bytes)]
            offsets, segs = [i * layer_bytes for i in range(num_layers)], [0] * num_layers
        else:
            self.segments = [ShmSegment(layer_bytes) for _ in range(num_layers)]
            offsets, segs = [0] * num_layers, list(range(num_layers))
        self.layout = p.KVLayout(num_layers, num_blocks, block_size, self.page_bytes, self.page_bytes, offsets, segs)
        self.geometry = f"L{num_layers}.H{num_kv_heads}.N{block_size}.C{2 * head_size}.B{dtype_bytes}.LBHNC"

    def pages(self, layer: int) -> np.ndarray:
        """Layer ``layer`` as a [num_blocks, page_bytes] uint8 array (a view of shared memory)."""
        seg = self.segments[self.layout.plane_segments[layer]]
        start = self.layout.plane_offsets[layer]
        return seg.array[start : start + self.layout.num_blocks * self.page_bytes].reshape(-1, self.page_bytes)

    def register(self, client: CacheClient) -> WorkerInfo:
        """Register for server copies: the segments' fds are handed over, and the server maps them."""
        return client.register_worker(self.layout, p.Device.CPU, p.Copier.SERVER, [s.nbytes for s in self.segments],
                                      segment_fds=[s.fd for s in self.segments])

    def close(self) -> None:
        for seg in self.segments:
            seg.close()
