"""KV built the way vLLM builds it, a pinned pool, and torch references, for the kernel tests.

vLLM allocates ONE int8 buffer and hands the connector per-layer views of it; ``build_kv`` does
the same for every layout the copy must handle, and checks that ``describe_pages`` (what the
connector sends) and the tensors agree on every plane's address. A *plane* is one array of pages
(a layer's tensor, or each K/V half of a ``[2, blocks, ...]`` layer). ``Rig`` runs one store or
load through a ``StagedPipeline`` on fresh ids, slots and data, with the destination poisoned,
and checks every byte of it against torch.

Torch is imported here; only GPU tests import this module (inside their functions). ``DEVICE``
is where the KV lives: the GPU, except in a dry run of these helpers on a CPU.
"""

from __future__ import annotations

import contextlib
import math
import mmap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lmcd import cudadrv
from lmcd import protocol as p
from lmcd.connector.layout import describe_pages
from lmcd.copyplan import check_blocks, plane_addresses
from lmcd.kernels import KernelFunctions, PageKernel
from lmcd.kernels.staged import StagedPipeline

LAYERS, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM, MLA_DIM = 4, 40, 16, 8, 64, 576
STRIDE_PAD = 256  # STRIDED: bytes between one page's end and the next block's page (16-byte aligned)
POISON = 0x5A
TAIL = 4096  # pool bytes after the last slot: a copy that runs past its slot shows there
DEVICE = "cuda"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}


@dataclass(frozen=True)
class Geometry:
    """One worker's KV: ``layers`` tensors of ``num_blocks`` blocks in ``layout``:

    LBHNC ``[blocks, heads, block_size, 2*head_dim]``, LBNHC ``[blocks, block_size, heads, 2*head_dim]``,
    MLA ``[blocks, 1, block_size, 576]``, KV_SPLIT ``[2, blocks, block_size, heads, head_dim]``, and
    STRIDED (LBHNC pages ``STRIDE_PAD`` bytes apart: block stride > page size, as padded pages of
    hybrid models have).
    """

    layout: str
    dtype: str = "bf16"
    num_blocks: int = BLOCKS
    block_size: int = BLOCK_SIZE
    heads: int = HEADS
    head_dim: int = HEAD_DIM
    layers: int = LAYERS

    @property
    def item(self) -> int:
        return torch.empty(0, dtype=DTYPES[self.dtype]).element_size()

    @property
    def page_shape(self) -> tuple[int, ...]:
        n, h, d = self.block_size, self.heads, self.head_dim
        return {"LBHNC": (h, n, 2 * d), "STRIDED": (h, n, 2 * d), "LBNHC": (n, h, 2 * d), "MLA": (1, n, MLA_DIM),
                "KV_SPLIT": (n, h, d)}[self.layout]

    @property
    def planes_per_layer(self) -> int:
        return 2 if self.layout == "KV_SPLIT" else 1

    @property
    def page_bytes(self) -> int:
        return math.prod(self.page_shape) * self.item

    @property
    def block_stride(self) -> int:
        return self.page_bytes + (STRIDE_PAD if self.layout == "STRIDED" else 0)

    @property
    def layer_bytes(self) -> int:
        return self.planes_per_layer * self.num_blocks * self.block_stride


def layer_views(buffer: torch.Tensor, g: Geometry) -> dict[str, torch.Tensor]:
    """vLLM's per-layer KV tensors: views of the int8 ``buffer``."""
    views = {}
    for i in range(g.layers):
        raw = buffer[i * g.layer_bytes : (i + 1) * g.layer_bytes].view(DTYPES[g.dtype])
        if g.layout == "KV_SPLIT":
            tensor = raw.view(2, g.num_blocks, *g.page_shape)
        elif g.layout == "STRIDED":
            rows = raw.view(g.num_blocks, g.block_stride // g.item)[:, : g.page_bytes // g.item]
            tensor = rows.view(g.num_blocks, *g.page_shape)
        else:
            tensor = raw.view(g.num_blocks, *g.page_shape)
        views[f"model.layers.{i}.self_attn.attn"] = tensor
    return views


def plane_pages(tensors: dict[str, torch.Tensor], g: Geometry) -> list[torch.Tensor]:
    """Every plane's pages as an int8 ``[num_blocks, page_bytes]`` view (never a copy), in the order
    ``describe_pages`` lists planes: layers in order, K before V."""
    pages = []
    for tensor in tensors.values():
        for plane in ((tensor[0], tensor[1]) if g.layout == "KV_SPLIT" else (tensor,)):
            pages.append(plane.view(g.num_blocks, -1).view(torch.int8))
    return pages


@dataclass
class KV:
    geometry: Geometry
    buffer: torch.Tensor  # the one int8 allocation on the GPU
    planes: list[torch.Tensor]  # plane_pages(buffer)
    layout: p.KVLayout  # what describe_pages says of it

    @property
    def plane_addresses(self) -> list[int]:
        return [int(a) for a in plane_addresses(self.layout, [self.buffer.data_ptr()])]

    def views_of(self, other: torch.Tensor) -> list[torch.Tensor]:
        """The planes of another buffer of the same geometry (an expected image of ``buffer``)."""
        return plane_pages(layer_views(other, self.geometry), self.geometry)

    def fresh(self) -> None:
        self.buffer.random_(-128, 128)

    def locate(self, offset: int) -> str:
        """Which page a byte offset into ``buffer`` belongs to."""
        layout = self.layout
        for plane, start in enumerate(layout.plane_offsets):
            rel = offset - start
            if 0 <= rel < layout.num_blocks * layout.block_stride and rel % layout.block_stride < layout.page_bytes:
                return f"plane {plane}, block {rel // layout.block_stride}, byte {rel % layout.block_stride}"
        return "between pages"


def build_kv(g: Geometry) -> KV:
    buffer = torch.randint(-128, 128, (g.layers * g.layer_bytes,), dtype=torch.int8, device=DEVICE)
    tensors = layer_views(buffer, g)
    layout = describe_pages(tensors, [buffer.data_ptr()], [buffer.numel()], g.num_blocks, g.block_size)
    kv = KV(g, buffer, plane_pages(tensors, g), layout)
    assert layout.num_layers == g.layers and layout.num_planes == g.layers * g.planes_per_layer
    assert (layout.page_bytes, layout.block_stride) == (g.page_bytes, g.block_stride)
    assert kv.plane_addresses == [plane.data_ptr() for plane in kv.planes], \
        "describe_pages and the tensors disagree on where the planes start"
    return kv


def ids(values: Sequence[int] | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.int64), device=DEVICE)


class Pool:
    """Pinned host memory used through its address; a slot is a byte offset into it. ``mapped``:
    anonymous shared memory instead, as the server's pool is mapped (not pinned: whoever copies
    registers it with CUDA)."""

    def __init__(self, num_slots: int, chunk_bytes: int, mapped: bool = False) -> None:
        self.num_slots, self.chunk_bytes = num_slots, chunk_bytes
        nbytes = num_slots * chunk_bytes + TAIL
        if mapped:
            self.map = mmap.mmap(-1, nbytes, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
            self.tensor = torch.from_numpy(np.frombuffer(self.map, dtype=np.int8))
        else:
            self.tensor = torch.empty(nbytes, dtype=torch.int8, pin_memory=DEVICE == "cuda")
        self.address = self.tensor.data_ptr()

    def pick(self, rng: np.random.Generator, num_chunks: int, exclude: Sequence[int] = ()) -> list[int]:
        free = np.setdiff1d(np.arange(self.num_slots), np.asarray(exclude, dtype=np.int64) // self.chunk_bytes)
        return [int(s) * self.chunk_bytes for s in rng.choice(free, num_chunks, replace=False)]

    def addresses(self, slots: Sequence[int]) -> list[int]:
        return [self.address + slot for slot in slots]

    def chunk(self, slot: int) -> torch.Tensor:
        return self.tensor[slot : slot + self.chunk_bytes]


def gathered(kv: KV, row: np.ndarray, planes: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The reference of one chunk in its slot: plane-major, the chunk's blocks in order (on the GPU)."""
    index = ids(row)
    return torch.cat([plane[index].reshape(-1) for plane in (planes or kv.planes)])


def expected_kv(kv: KV, pool: Pool, slots: Sequence[int], blocks: np.ndarray, skip_blocks: int) -> torch.Tensor:
    """``kv.buffer`` as it must be after loading ``slots`` into ``blocks`` (the first chunk's first
    ``skip_blocks`` blocks left alone), computed with torch from the pool's bytes."""
    want = kv.buffer.clone()
    views = kv.views_of(want)
    bpc, page = blocks.shape[1], kv.layout.page_bytes
    for j, (slot, row) in enumerate(zip(slots, blocks, strict=True)):
        data = pool.chunk(slot).to(DEVICE).view(len(views), bpc, page)
        first = skip_blocks if j == 0 else 0
        index = ids(row[first:])
        for plane, view in enumerate(views):
            view[index] = data[plane, first:]
    return want


def expected_pool(kv: KV, pool: Pool, slots: Sequence[int], blocks: np.ndarray) -> torch.Tensor:
    """The pool after storing ``blocks`` into ``slots`` of a poisoned pool."""
    want = torch.full_like(pool.tensor, POISON, device="cpu")
    for slot, row in zip(slots, blocks, strict=True):
        want[slot : slot + pool.chunk_bytes] = gathered(kv, row).cpu()
    return want


def assert_kv(kv: KV, want: torch.Tensor, what: str) -> None:
    if torch.equal(kv.buffer, want):
        return
    diff = (kv.buffer != want).nonzero().flatten()
    first = int(diff[0])
    raise AssertionError(f"{what}: {diff.numel()} KV bytes differ, the first at byte {first} ({kv.locate(first)})")


def assert_pool(pool: Pool, want: torch.Tensor, slots: Sequence[int], what: str) -> None:
    if torch.equal(pool.tensor, want):
        return
    diff = (pool.tensor != want).nonzero().flatten()
    first = int(diff[0])
    where = next((f"slot {j} at {slot}, byte {first - slot} of the chunk" for j, slot in enumerate(slots)
                  if slot <= first < slot + pool.chunk_bytes), "outside every slot copied to")
    raise AssertionError(f"{what}: {diff.numel()} pool bytes differ, the first at byte {first} ({where})")


@dataclass
class Rig:
    """A pipeline on ``kv`` and a pool: one checked store or load per call."""

    pipeline: StagedPipeline
    kv: KV
    pool: Pool
    blocks_per_chunk: int
    rng: np.random.Generator

    def blocks(self, num_chunks: int, exclude: np.ndarray | None = None) -> np.ndarray:
        """Random distinct block ids (not in ``exclude``), checked as the server checks a request's."""
        bpc, num_blocks = self.blocks_per_chunk, self.kv.layout.num_blocks
        free = np.setdiff1d(np.arange(num_blocks), exclude if exclude is not None else [])
        chosen = self.rng.choice(free, num_chunks * bpc, replace=False)
        return check_blocks(chosen.tolist(), num_chunks, bpc, num_blocks)

    def store(self, num_chunks: int) -> None:
        blocks, slots = self.blocks(num_chunks), self.pool.pick(self.rng, num_chunks)
        self.kv.fresh()
        self.pool.tensor.fill_(POISON)
        torch.cuda.synchronize()  # the pipeline's streams do not wait for torch's
        events = self.pipeline.copy(self.pool.addresses(slots), blocks, True)
        cudadrv.event_synchronize(events.done)
        assert_pool(self.pool, expected_pool(self.kv, self.pool, slots, blocks), slots, f"store of {num_chunks} chunks")
        assert self.pipeline.seconds(events) > 0

    def load(self, num_chunks: int, skip_blocks: int = 0) -> None:
        blocks, slots = self.blocks(num_chunks), self.pool.pick(self.rng, num_chunks)
        self.kv.fresh()
        self.pool.tensor.random_(-128, 128)
        want = expected_kv(self.kv, self.pool, slots, blocks, skip_blocks)
        torch.cuda.synchronize()  # ``want`` is read before the scatters write the blocks
        events = self.pipeline.copy(self.pool.addresses(slots), blocks, False, skip_blocks)
        cudadrv.event_synchronize(events.done)
        assert_kv(self.kv, want, f"load of {num_chunks} chunks, skip_blocks {skip_blocks}")
        assert self.pipeline.seconds(events) > 0


def new_kernel(functions: KernelFunctions, kv: KV, blocks_per_chunk: int) -> PageKernel:
    layout = kv.layout
    return PageKernel(functions, kv.plane_addresses, layout.num_blocks, layout.page_bytes, layout.block_stride,
                      blocks_per_chunk)


@contextlib.contextmanager
def page_kernel(functions: KernelFunctions, kv: KV, blocks_per_chunk: int) -> Iterator[PageKernel]:
    """A kernel used on its own (no pipeline owns it)."""
    kernel = new_kernel(functions, kv, blocks_per_chunk)
    try:
        yield kernel
    finally:
        kernel.close()


@contextlib.contextmanager
def rig_for(functions: KernelFunctions, kv: KV, blocks_per_chunk: int, stages: int, num_slots: int) -> Iterator[Rig]:
    pipeline = StagedPipeline(new_kernel(functions, kv, blocks_per_chunk), stages)  # it owns (and closes) the kernel
    try:
        yield Rig(pipeline, kv, Pool(num_slots, pipeline.chunk_bytes), blocks_per_chunk, np.random.default_rng())
    finally:
        pipeline.close()
