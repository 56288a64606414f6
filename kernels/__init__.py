"""lmcd.kernels: the GPU page gather (KV blocks -> pool slots) and scatter (pool slots -> KV blocks).

The CUDA C source is ``page_copy.cu`` beside this file. It is compiled by NVRTC through
``cupy.RawModule`` at first use, for the GPU that is actually present (so sm_80, sm_90,
sm_100 and sm_120 all work with no build step); the module is kept per device for the life of
the process, and CuPy caches the binary on disk across processes.

``PageCopier`` is one KV registration on one device: it holds the per-plane base addresses on
the device and launches ONE kernel per request over every plane and block, on the caller's
stream, after validating every input on the host (block ids against the registered block
count, sizes, alignment): nothing invalid is ever launched. A one-chunk request carries its
block ids inside the launch (no argument upload before the kernel).

``StagedCopier`` wraps a ``PageCopier`` for the server's default engine: each chunk crosses
PCIe as one contiguous copy-engine copy through a staging buffer in GPU memory, and the kernel
(one launch per chunk, on every SM) only moves pages between that buffer and the KV blocks.

The copy is layout-agnostic: vLLM's per-layer views ``[blocks, heads, block_size, 2*head_dim]``
(LBHNC) or ``[blocks, block_size, heads, 2*head_dim]`` (LBNHC), MLA's ``[blocks, 1, block_size,
576]`` and a ``[2, blocks, ...]`` K/V split all have one contiguous page per (plane, block), and
the kernel moves pages as bytes (bf16, fp16 and fp8 alike).

CuPy is imported lazily: importing this package needs no GPU.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from importlib import resources
from typing import Any

import numpy as np

from lmcd.cudadrv import CUDA_ERROR_NOT_READY, check, compile_cubin, fast_driver, load_functions

BLOCK_THREADS = 512
MAX_INLINE_BLOCKS = 64  # block ids of one chunk that travel inside a launch (page_copy.cu: OneChunk)
DEFAULT_GRID = 16  # CTAs: 16 saturate PCIe on an H100 (../docs/BENCHMARKS.md); more cost the engine SMs
SOURCE_NAME = "page_copy.cu"


class KernelInputError(ValueError):
    """A copy request the kernel must not run; the message says what was wrong."""


@functools.cache
def source() -> str:
    return (resources.files(__name__) / SOURCE_NAME).read_text()


@functools.cache
def _module(device: int) -> Any:
    import cupy

    with cupy.cuda.Device(device):
        module = cupy.RawModule(code=source(), options=("--std=c++17", f"-DMAX_INLINE_BLOCKS={MAX_INLINE_BLOCKS}"))
        module.compile()  # now, on this device, so that a launch never waits on NVRTC
        return module


@functools.cache
def one_chunk_functions(device: int, arch: str) -> tuple[int, int]:
    """The one-chunk entries (16-byte, byte) as CUfunction handles, compiled with NVRTC and loaded into
    the current context: for a process without CuPy (a worker that copies itself); ``device`` keys
    the cache."""
    cubin = compile_cubin(source(), SOURCE_NAME, ["--std=c++17", f"-DMAX_INLINE_BLOCKS={MAX_INLINE_BLOCKS}"], arch)
    v16, v1 = load_functions(cubin, ["lmcd_page_copy_one_v16", "lmcd_page_copy_one_v1"])
    return v16, v1


class OneChunkLaunch:
    """Launches of a one-chunk entry: the chunk's slot (or staging buffer) and block ids travel inside
    the launch (``__grid_constant__ OneChunk``), its other parameters are prepared once."""

    def __init__(self, function: int, layer_bases_address: int, num_planes: int, blocks_per_chunk: int,
                 page_bytes: int, block_stride: int) -> None:
        if blocks_per_chunk > MAX_INLINE_BLOCKS:
            raise KernelInputError(f"{blocks_per_chunk} blocks per chunk exceed the {MAX_INLINE_BLOCKS} a launch "
                                   "carries")
        self.function = function
        self.blocks_per_chunk = blocks_per_chunk
        self._chunk = (ctypes.c_int64 * (1 + MAX_INLINE_BLOCKS))()
        self._words = np.ctypeslib.as_array(self._chunk)
        self._skip = ctypes.c_int32(0)
        self._to_pool = ctypes.c_int32(0)
        self._values = [ctypes.c_uint64(layer_bases_address), self._chunk, ctypes.c_int32(num_planes),
                        ctypes.c_int32(blocks_per_chunk), ctypes.c_int64(page_bytes), ctypes.c_int64(block_stride),
                        self._skip, self._to_pool]
        self._params = (ctypes.c_void_p * len(self._values))(*(ctypes.addressof(v) for v in self._values))

    def __call__(self, slot: int, blocks: np.ndarray | Sequence[int], skip_blocks: int, to_pool: bool,
                 stream_ptr: int, grid: int) -> None:
        """Copy one chunk between ``slot`` (an address) and its blocks; the inputs were checked by the caller."""
        self._words[0] = slot
        self._words[1 : 1 + self.blocks_per_chunk] = blocks
        self._skip.value = skip_blocks
        self._to_pool.value = 1 if to_pool else 0
        check(fast_driver().cuLaunchKernel(self.function, grid, 1, 1, BLOCK_THREADS, 1, 1, 0, stream_ptr,
                                           self._params, None), "cuLaunchKernel (page copy)")


def kernel(device: int, vec16: bool, one_chunk: bool = False) -> Any:
    """The copy kernel for 16-byte aligned pages (else the byte kernel); ``one_chunk``: the entry that
    takes one chunk's arguments inline."""
    return _module(device).get_function(f"lmcd_page_copy{'_one' if one_chunk else ''}_{'v16' if vec16 else 'v1'}")


STAGING_SLOTS = 8


class _Staging:
    """One request's arguments on their way to the GPU: a pinned host buffer and a device buffer."""

    def __init__(self, cupy: Any) -> None:
        self.cupy = cupy
        self.capacity = 0
        self.host: Any = None
        self.words = np.empty(0, dtype=np.int64)  # the pinned host buffer as int64
        self.dev: Any = None
        self.used = cupy.cuda.Event(block=False, disable_timing=True)
        self.used.record()  # "done" until a launch records it on its stream

    def reserve(self, nbytes: int) -> None:
        if fast_driver().cuEventQuery(self.used.ptr) == CUDA_ERROR_NOT_READY:
            self.used.synchronize()  # the launch that read these buffers last is still running (rare)
        if nbytes > self.capacity:
            self.capacity = max(nbytes, 2 * self.capacity, 4096)
            self.host = self.cupy.cuda.alloc_pinned_memory(self.capacity)
            self.words = np.frombuffer(self.host, dtype=np.int64, count=self.capacity // 8)
            self.dev = self.cupy.empty(self.capacity // 8, dtype=self.cupy.int64)


def check_blocks(block_ids: np.ndarray | Sequence[int], num_chunks: int, blocks_per_chunk: int, num_blocks: int,
                 skip_blocks: int = 0) -> np.ndarray:
    """The block ids of a copy of ``num_chunks`` chunks as int64, checked before anything is launched:
    ``blocks_per_chunk`` per chunk, each in 0..num_blocks-1, and ``skip_blocks`` below a chunk's."""
    blocks = np.asarray(block_ids, dtype=np.int64).ravel()
    bpc = blocks_per_chunk
    if len(blocks) != num_chunks * bpc:
        raise KernelInputError(f"{num_chunks} chunks need {num_chunks * bpc} block ids ({bpc} per chunk), "
                               f"got {len(blocks)}")
    if len(blocks):
        low, high = int(blocks.min()), int(blocks.max())
        if low < 0 or high >= num_blocks:
            bad = low if low < 0 else high
            raise KernelInputError(f"block id {bad} is out of range: {num_blocks} blocks are registered "
                                   f"(0..{num_blocks - 1})")
    if not 0 <= skip_blocks < bpc:
        raise KernelInputError(f"skip_blocks {skip_blocks} must be in 0..{bpc - 1}")
    return blocks


class PageCopier:
    """Gather/scatter launches for one worker's KV registration on one device.

    ``layer_bases``: device address of page (plane, block 0) for every plane; page (plane, b)
    is ``page_bytes`` contiguous bytes at ``layer_bases[plane] + b * block_stride``.
    ``blocks_per_chunk``: engine blocks per pool chunk; a pool slot holds a chunk plane-major.

    A launch is a handful of driver calls through ctypes (``lmcd.cudadrv.fast_driver``) with the
    kernel's parameters prepared once: the request loop spends microseconds, not CuPy's argument
    processing, between a request's arrival and its copy.
    """

    def __init__(self, device: int, layer_bases: Sequence[int], num_blocks: int, page_bytes: int,
                 block_stride: int, blocks_per_chunk: int, grid: int = DEFAULT_GRID) -> None:
        import cupy

        if not layer_bases:
            raise KernelInputError("no KV planes to copy")
        if num_blocks <= 0 or page_bytes <= 0 or blocks_per_chunk <= 0 or grid <= 0:
            raise KernelInputError(f"num_blocks {num_blocks}, page_bytes {page_bytes}, blocks_per_chunk "
                                   f"{blocks_per_chunk} and grid {grid} must be positive")
        if num_blocks > 1 and block_stride < page_bytes:
            raise KernelInputError(f"block_stride {block_stride} is smaller than page_bytes {page_bytes}")
        self.device = device
        self.num_planes = len(layer_bases)
        self.num_blocks = num_blocks
        self.page_bytes = page_bytes
        self.block_stride = block_stride
        self.blocks_per_chunk = blocks_per_chunk
        self.chunk_bytes = self.num_planes * blocks_per_chunk * page_bytes
        self.grid = grid
        bases = np.asarray(layer_bases, dtype=np.int64)
        self.vec16 = page_bytes % 16 == 0 and block_stride % 16 == 0 and not bool((bases % 16).any())
        with cupy.cuda.Device(device):
            self.layer_bases = cupy.asarray(bases)
            self._function = kernel(device, self.vec16).kernel.ptr
            one_function = kernel(device, self.vec16, one_chunk=True).kernel.ptr
            self._staging = [_Staging(cupy) for _ in range(STAGING_SLOTS)]
        self._next = 0
        # the kernel's parameters (see page_copy.cu), filled in per launch: req, num_chunks, skip, to_pool
        self._req = ctypes.c_uint64(0)
        self._num_chunks = ctypes.c_int32(0)
        self._skip = ctypes.c_int32(0)
        self._to_pool = ctypes.c_int32(0)
        self._values = [ctypes.c_uint64(self.layer_bases.data.ptr), self._req, self._num_chunks,
                        ctypes.c_int32(self.num_planes), ctypes.c_int32(blocks_per_chunk), ctypes.c_int64(page_bytes),
                        ctypes.c_int64(block_stride), self._skip, self._to_pool]
        self._params = (ctypes.c_void_p * len(self._values))(*(ctypes.addressof(v) for v in self._values))
        # the one-chunk entry: the chunk's words (slot, block ids) replace req and num_chunks
        self.inline = blocks_per_chunk <= MAX_INLINE_BLOCKS
        self._one = (OneChunkLaunch(one_function, self.layer_bases.data.ptr, self.num_planes, blocks_per_chunk,
                                    page_bytes, block_stride) if self.inline else None)

    def launch(self, slot_addresses: np.ndarray, block_ids: np.ndarray, to_pool: bool, stream: Any,
               skip_blocks: int = 0) -> None:
        """Copy ``len(slot_addresses)`` chunks (to the pool if ``to_pool``, else out of it) on ``stream``
        (a CuPy stream or a CUstream handle), whose device must be current on this thread.

        The request's arguments travel through a small ring of pinned host and device buffers
        owned by this copier (no allocation per request); a buffer is reused only once the
        launch that last read it has completed.
        """
        slots, blocks = self.check(slot_addresses, block_ids, skip_blocks)
        stream_ptr = getattr(stream, "ptr", stream)
        num_chunks = len(slots)
        if num_chunks == 1 and self.inline:
            self.launch_one(int(slots[0]), blocks, skip_blocks, to_pool, stream_ptr)
            return
        staging, words = self.argument_buffer(num_chunks + len(blocks))
        words[:num_chunks] = slots
        words[num_chunks:] = blocks
        self.upload_arguments(staging, words.nbytes, stream_ptr)
        self.launch_kernel(staging.dev.data.ptr, num_chunks, skip_blocks, to_pool, stream_ptr)
        check(fast_driver().cuEventRecord(staging.used.ptr, stream_ptr), "cuEventRecord")

    def argument_buffer(self, count: int) -> tuple[_Staging, np.ndarray]:
        """The next argument buffer of the ring, with room for ``count`` int64 words (host view)."""
        staging = self._staging[self._next % STAGING_SLOTS]
        self._next += 1
        staging.reserve(8 * count)
        return staging, staging.words[:count]

    @staticmethod
    def upload_arguments(staging: _Staging, nbytes: int, stream_ptr: int) -> None:
        check(fast_driver().cuMemcpyHtoDAsync_v2(staging.dev.data.ptr, staging.host.ptr, nbytes, stream_ptr),
              "cuMemcpyHtoDAsync (copy arguments)")

    def launch_kernel(self, req: int, num_chunks: int, skip_blocks: int, to_pool: bool, stream_ptr: int,
                      grid: int | None = None) -> None:
        """One kernel over ``num_chunks`` chunks whose arguments are at device address ``req`` (see
        page_copy.cu); the inputs were checked by the caller."""
        self._req.value = req
        self._num_chunks.value = num_chunks
        self._skip.value = skip_blocks
        self._to_pool.value = 1 if to_pool else 0
        check(fast_driver().cuLaunchKernel(self._function, grid or self.grid, 1, 1, BLOCK_THREADS, 1, 1, 0,
                                           stream_ptr, self._params, None), "cuLaunchKernel (page copy)")

    def launch_one(self, slot: int, blocks: np.ndarray, skip_blocks: int, to_pool: bool, stream_ptr: int,
                   grid: int | None = None) -> None:
        """One chunk (slot address, its ``blocks_per_chunk`` block ids), arguments inside the launch
        (``self.inline``); the inputs were checked by the caller."""
        assert self._one is not None
        self._one(slot, blocks, skip_blocks, to_pool, stream_ptr, grid or self.grid)

    def check(self, slot_addresses: np.ndarray, block_ids: np.ndarray, skip_blocks: int = 0
              ) -> tuple[np.ndarray, np.ndarray]:
        """Validate a request on the host; returns (slots, block ids) as int64 arrays."""
        slots = np.asarray(slot_addresses, dtype=np.int64).ravel()
        if len(slots) == 0:
            raise KernelInputError("no chunks to copy")
        blocks = check_blocks(block_ids, len(slots), self.blocks_per_chunk, self.num_blocks, skip_blocks)
        if self.vec16 and bool((slots % 16).any()):
            raise KernelInputError("pool slot addresses must be 16-byte aligned")
        return slots, blocks

    def copied_bytes(self, num_chunks: int, skip_blocks: int = 0) -> int:
        return num_chunks * self.chunk_bytes - skip_blocks * self.num_planes * self.page_bytes


STAGE_BYTES = 256 << 20  # staging memory per worker: chunks in flight = STAGE_BYTES // chunk bytes, 2..8


def stages_for(chunk_bytes: int) -> int:
    """Staging buffers (chunks in flight) for chunks of ``chunk_bytes``: 8 for Llama-3-8B's 32 MiB."""
    return max(2, min(8, STAGE_BYTES // chunk_bytes))


class StagedCopier:
    """Copies through staging buffers in GPU memory, so that the PCIe crossing is one contiguous copy
    per chunk done by the copy engines (the fastest way across the link) and the kernel only moves
    pages inside GPU memory (thousands of GB/s: microseconds per chunk).

    store:    kernel gathers chunk c's pages into buffer c%K -> copy engine: buffer -> pool slot
    retrieve: copy engine: pool slot -> buffer c%K -> kernel scatters it into chunk c's blocks

    The first step of every chunk runs on a side stream, the second on the caller's stream, one
    chunk after another, with an event per buffer each way (filled, freed): the first steps run
    up to K (``stages_for``) chunks ahead, and the copy engine crosses PCIe one chunk at a time
    (one contiguous copy is what the link does best; several at once do worse). Under an engine's
    compute the server's kernels wait for time slices; K chunks gathered ahead keep the link busy
    meanwhile. A one-chunk request runs both steps on the caller's stream.

    Ordering: the side stream starts where the caller's stream is (so buffers a previous request
    still reads are not overwritten); ``after`` (the worker's event) comes before the first step
    that touches the worker's blocks: the first gather (store), or the first scatter (retrieve:
    the pool's chunks cross PCIe into the buffers meanwhile). The caller's stream ends after the
    whole copy, so the caller records its completion events as for ``PageCopier.launch``.
    """

    def __init__(self, copier: PageCopier, grid: int = 0, stages: int = 0) -> None:
        import cupy

        self.copier = copier
        self.stages = stages or stages_for(copier.chunk_bytes)
        device = cupy.cuda.Device(copier.device)
        # the kernel moves a chunk inside GPU memory: every SM makes that microseconds (16 CTAs: ~100 us)
        self.grid = grid or int(device.attributes["MultiProcessorCount"])
        with device:
            self._buffers = [cupy.empty(copier.chunk_bytes, dtype=cupy.uint8) for _ in range(self.stages)]
            self.buffer_addresses = np.asarray([b.data.ptr for b in self._buffers], dtype=np.int64)
            self.side = cupy.cuda.Stream(non_blocking=True)
            self._forked = cupy.cuda.Event(block=False, disable_timing=True)
            self._filled = [cupy.cuda.Event(block=False, disable_timing=True) for _ in self._buffers]
            self._freed = [cupy.cuda.Event(block=False, disable_timing=True) for _ in self._buffers]

    def launch(self, slot_addresses: np.ndarray, block_ids: np.ndarray, to_pool: bool, stream: Any,
               skip_blocks: int = 0, after: int | None = None) -> None:
        """As ``PageCopier.launch``; ``after``: an event (CUevent) to wait on before the worker's blocks
        are read (store) or written (retrieve)."""
        copier = self.copier
        slots, blocks = copier.check(slot_addresses, block_ids, skip_blocks)
        lib = fast_driver()
        main = getattr(stream, "ptr", stream)
        num_chunks, bpc, chunk_bytes, k = len(slots), copier.blocks_per_chunk, copier.chunk_bytes, self.stages
        first = main if num_chunks == 1 else self.side.ptr  # the stream of each chunk's first step
        per_chunk = blocks.reshape(num_chunks, bpc)
        if to_pool and after is not None:  # the gathers read the worker's blocks
            check(lib.cuStreamWaitEvent(main, after, 0), "cuStreamWaitEvent (worker's event)")
        staging = None
        if not copier.inline:  # more block ids than a launch carries: one upload of per-chunk records
            staging, words = copier.argument_buffer(num_chunks * (1 + bpc))
            records = words.reshape(num_chunks, 1 + bpc)
            records[:, 0] = self.buffer_addresses[np.arange(num_chunks) % k]
            records[:, 1:] = per_chunk
            copier.upload_arguments(staging, words.nbytes, main)
        if first != main:  # the side stream starts where the caller's stream is now
            check(lib.cuEventRecord(self._forked.ptr, main), "cuEventRecord (fork)")
            check(lib.cuStreamWaitEvent(first, self._forked.ptr, 0), "cuStreamWaitEvent (fork)")

        def move_pages(c: int, s: int, buffer: int) -> None:
            skip = skip_blocks if c == 0 else 0
            if staging is None:
                copier.launch_one(buffer, per_chunk[c], skip, to_pool, s, self.grid)
            else:
                copier.launch_kernel(staging.dev.data.ptr + 8 * c * (1 + bpc), 1, skip, to_pool, s, self.grid)

        for c in range(num_chunks):
            b = c % k
            buffer = int(self.buffer_addresses[b])
            if first != main and c >= k:  # the buffer's previous chunk has left it
                check(lib.cuStreamWaitEvent(first, self._freed[b].ptr, 0), "cuStreamWaitEvent (buffer freed)")
            if to_pool:
                move_pages(c, first, buffer)
            else:
                check(lib.cuMemcpyAsync(buffer, int(slots[c]), chunk_bytes, first), "cuMemcpyAsync (from the pool)")
            if first != main:
                check(lib.cuEventRecord(self._filled[b].ptr, first), "cuEventRecord (buffer filled)")
                check(lib.cuStreamWaitEvent(main, self._filled[b].ptr, 0), "cuStreamWaitEvent (buffer filled)")
            if to_pool:
                check(lib.cuMemcpyAsync(int(slots[c]), buffer, chunk_bytes, main), "cuMemcpyAsync (to the pool)")
            else:
                if c == 0 and after is not None:  # the scatters write the worker's blocks
                    check(lib.cuStreamWaitEvent(main, after, 0), "cuStreamWaitEvent (worker's event)")
                move_pages(c, main, buffer)
            if first != main and c + k < num_chunks:
                check(lib.cuEventRecord(self._freed[b].ptr, main), "cuEventRecord (buffer freed)")
        if staging is not None:
            check(lib.cuEventRecord(staging.used.ptr, main), "cuEventRecord")

    def close(self) -> None:
        self.side.synchronize()
        self._buffers = []
