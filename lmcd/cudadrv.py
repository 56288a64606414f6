"""The CUDA driver (libcuda) through ctypes, for the few calls CuPy and torch do not expose.

Both sides use it: the worker (IPC export, on torch's context) and the server (event waits that
release the GIL, batched copies, on CuPy's context). Loaded on first use: importing this module
needs no GPU.
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


@functools.cache
def fast_driver() -> ctypes.PyDLL:
    """libcuda for the calls of a launch, which never wait (launch, record, query, stream wait,
    async copies): loaded as a PyDLL they keep the GIL, so no other thread takes it mid-request,
    and their argument types are declared once, so a call costs about a microsecond."""
    lib = ctypes.PyDLL("libcuda.so.1")
    vp, u32 = ctypes.c_void_p, ctypes.c_uint
    lib.cuLaunchKernel.argtypes = [vp, u32, u32, u32, u32, u32, u32, u32, vp, vp, vp]
    lib.cuEventRecord.argtypes = [vp, vp]
    lib.cuEventQuery.argtypes = [vp]
    lib.cuStreamWaitEvent.argtypes = [vp, vp, u32]
    lib.cuMemcpyHtoDAsync_v2.argtypes = [ctypes.c_uint64, vp, ctypes.c_size_t, vp]
    lib.cuMemcpyAsync.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, vp]
    return lib


CUDA_ERROR_NOT_READY = 600


class CudaError(RuntimeError):
    """A CUDA driver call failed; the message names the call and the CUresult."""


def check(result: int, what: str, error: type[Exception] = CudaError) -> None:
    """Raise ``error("<what> failed: CUDA_ERROR_... (n)")`` unless ``result`` is CUDA_SUCCESS."""
    if result:
        raise error(f"{what} failed: {error_name(result)}")


def error_name(result: int) -> str:
    """``CUDA_ERROR_... (n)`` for a CUresult."""
    name = ctypes.c_char_p()
    driver().cuGetErrorName(result, ctypes.byref(name))
    return f"{(name.value or b'?').decode()} ({result})"
