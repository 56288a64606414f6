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


def error_name(result: int) -> str:
    """``CUDA_ERROR_... (n)`` for a CUresult."""
    name = ctypes.c_char_p()
    driver().cuGetErrorName(result, ctypes.byref(name))
    return f"{(name.value or b'?').decode()} ({result})"
