"""lmcd.kernels: the GPU page copy (``page_copy.cu``), compiled where it runs, and its launcher.

The CUDA C source is ``page_copy.cu`` beside this file. It is compiled by NVRTC for the GPU that
is present at first use (sm_80, sm_90, sm_100 and sm_120 alike, no build step), in one of two
ways that give the same functions:

- ``cupy_functions``: ``cupy.RawModule`` in the server (CuPy caches the binary on disk);
- ``nvrtc_functions``: NVRTC and the driver through ctypes (``lmcd.cudadrv``) in a vLLM worker,
  whose environment has torch but no CuPy.

``PageKernel`` is one KV registration on one device: the plane addresses on the device, and
launches that move ONE chunk's pages between its KV blocks and a buffer in GPU memory, with the
chunk's block ids inside the launch (up to ``MAX_LAUNCH_BLOCKS`` per launch; a chunk of more
blocks takes several launches). ``lmcd.kernels.staged`` builds the copy of whole requests on it.

The copy is layout-agnostic: vLLM's per-layer views ``[blocks, heads, block_size, 2*head_dim]``
(LBHNC) or ``[blocks, block_size, heads, 2*head_dim]`` (LBNHC), MLA's ``[blocks, 1, block_size,
576]`` and a ``[2, blocks, ...]`` K/V split all have one contiguous page per (plane, block), and
the kernel moves pages as bytes (bf16, fp16 and fp8 alike).

Importing this package needs no GPU; CuPy is imported only by ``cupy_functions``.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from importlib import resources
from typing import NamedTuple

import numpy as np

from lmcd import cudadrv
from lmcd.cudadrv import check, fast_driver

BLOCK_THREADS = 512
MAX_LAUNCH_BLOCKS = 64  # block ids that travel inside one launch (page_copy.cu: struct Pages)
SOURCE_NAME = "page_copy.cu"
OPTIONS = ("--std=c++17", f"-DMAX_LAUNCH_BLOCKS={MAX_LAUNCH_BLOCKS}")
ENTRIES = ("lmcd_page_copy_v16", "lmcd_page_copy_v1")


class KernelInputError(ValueError):
    """A copy the kernel must not run; the message says what was wrong."""


class KernelFunctions(NamedTuple):
    """CUfunction handles of the two entries, loaded in the current context."""

    v16: int  # pages, page strides and plane addresses all 16-byte aligned
    v1: int  # any alignment


@functools.cache
def source() -> str:
    return (resources.files(__name__) / SOURCE_NAME).read_text()


@functools.cache
def cupy_functions(device: int) -> KernelFunctions:
    """The entries compiled by ``cupy.RawModule`` for ``device`` (the server, which has CuPy)."""
    import cupy

    with cupy.cuda.Device(device):
        module = cupy.RawModule(code=source(), options=OPTIONS)
        module.compile()  # now, on this device, so that a launch never waits on NVRTC
        return KernelFunctions(*(int(module.get_function(name).kernel.ptr) for name in ENTRIES))


@functools.cache
def nvrtc_functions(device: int, arch: str) -> KernelFunctions:
    """The entries compiled by NVRTC for ``arch`` ("sm_90") and loaded into the current context (a
    worker without CuPy); ``device`` keys the cache."""
    cubin = cudadrv.compile_cubin(source(), SOURCE_NAME, list(OPTIONS), arch)
    return KernelFunctions(*cudadrv.load_functions(cubin, list(ENTRIES)))


class PageKernel:
    """Launches that move one chunk's pages for one KV registration on the current device.

    ``planes``: device address of page (plane, block 0) for every plane; page (plane, b) is
    ``page_bytes`` contiguous bytes at ``planes[plane] + b * block_stride``. A chunk of
    ``blocks_per_chunk`` blocks sits in a buffer plane-major (``chunk_bytes``). Inputs are checked
    by the caller (``lmcd.copyplan.check_blocks``); alignment is checked here, once.
    """

    def __init__(self, functions: KernelFunctions, planes: Sequence[int], num_blocks: int, page_bytes: int,
                 block_stride: int, blocks_per_chunk: int) -> None:
        if not planes:
            raise KernelInputError("no KV planes to copy")
        if num_blocks <= 0 or page_bytes <= 0 or blocks_per_chunk <= 0:
            raise KernelInputError(f"num_blocks {num_blocks}, page_bytes {page_bytes} and blocks_per_chunk "
                                   f"{blocks_per_chunk} must be positive")
        if num_blocks > 1 and block_stride < page_bytes:
            raise KernelInputError(f"block_stride {block_stride} is smaller than page_bytes {page_bytes}")
        self.num_planes = len(planes)
        self.num_blocks = num_blocks
        self.page_bytes = page_bytes
        self.blocks_per_chunk = blocks_per_chunk
        self.chunk_bytes = self.num_planes * blocks_per_chunk * page_bytes
        self.vec16 = page_bytes % 16 == 0 and block_stride % 16 == 0 and all(a % 16 == 0 for a in planes)
        self.grid = cudadrv.multiprocessor_count()  # a chunk moves inside GPU memory: every SM, microseconds
        self.planes_buffer = cudadrv.DeviceBuffer(8 * self.num_planes)
        self.planes_buffer.upload(np.asarray(planes, dtype=np.int64))
        # the kernel's parameters (page_copy.cu), prepared once; per launch: pages, num_blocks, skip, to_pool
        self._pages = (ctypes.c_int64 * (1 + MAX_LAUNCH_BLOCKS))()
        self._words = np.ctypeslib.as_array(self._pages)
        self._launch_blocks = ctypes.c_int32(0)
        self._skip = ctypes.c_int32(0)
        self._to_pool = ctypes.c_int32(0)
        self._values = [ctypes.c_uint64(self.planes_buffer.address), self._pages, ctypes.c_int32(self.num_planes),
                        ctypes.c_int32(blocks_per_chunk), self._launch_blocks, ctypes.c_int64(page_bytes),
                        ctypes.c_int64(block_stride), self._skip, self._to_pool]
        self._params = (ctypes.c_void_p * len(self._values))(*(ctypes.addressof(v) for v in self._values))
        self._function = functions.v16 if self.vec16 else functions.v1

    def check_buffer(self, address: int) -> None:
        if self.vec16 and address % 16:
            raise KernelInputError(f"buffer address {address:#x} must be 16-byte aligned")

    def launch(self, buffer: int, blocks: np.ndarray, skip_blocks: int, to_pool: bool, stream: int) -> None:
        """Gather (``to_pool``) one chunk's pages into ``buffer``, or scatter them from it, on ``stream``,
        leaving the first ``skip_blocks`` blocks alone; ``blocks``: the chunk's checked block ids."""
        lib = fast_driver()
        self._to_pool.value = 1 if to_pool else 0
        for start in range(0, self.blocks_per_chunk, MAX_LAUNCH_BLOCKS):
            count = min(MAX_LAUNCH_BLOCKS, self.blocks_per_chunk - start)
            skip = min(count, max(0, skip_blocks - start))
            if skip == count:
                continue
            self._words[0] = buffer + start * self.page_bytes
            self._words[1 : 1 + count] = blocks[start : start + count]
            self._launch_blocks.value = count
            self._skip.value = skip
            check(lib.cuLaunchKernel(self._function, self.grid, 1, 1, BLOCK_THREADS, 1, 1, 0, stream, self._params,
                                     None), "cuLaunchKernel (page copy)")

    def close(self) -> None:
        self.planes_buffer.free()
