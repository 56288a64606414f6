"""The CUDA driver (libcuda) through ctypes, for the few calls CuPy and torch do not expose.

Both sides use it: the worker (IPC export, on torch's context) and the server (event waits that
release the GIL, batched copies, on CuPy's context). Loaded on first use: importing this module
needs no GPU.
"""

from __future__ import annotations

import ctypes
import functools
import os


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


NVRTC_NAMES = ("libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12")


@functools.cache
def nvrtc() -> ctypes.CDLL:
    """NVRTC for a process without CuPy (a vLLM worker): by name, else from the nvidia-* wheels beside torch."""
    import glob
    import sys

    candidates = list(NVRTC_NAMES)
    for entry in sys.path:
        candidates += sorted(glob.glob(os.path.join(entry, "nvidia", "**", "libnvrtc.so*"), recursive=True))
    for name in candidates:
        if "builtins" in os.path.basename(name):
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise CudaError("NVRTC (libnvrtc.so) is not installed: it comes with torch's CUDA wheels (nvidia-cuda-nvrtc)")


def compile_cubin(source: str, name: str, options: list[str], arch: str) -> bytes:
    """CUDA C source -> CUBIN for ``arch`` ("sm_90") with NVRTC; CudaError with NVRTC's log on failure."""
    lib = nvrtc()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None):
        raise CudaError("nvrtcCreateProgram failed")
    try:
        opts = [o.encode() for o in [*options, f"--gpu-architecture={arch}"]]
        result = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        if result:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            text = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, text)
            raise CudaError(f"NVRTC could not compile {name} for {arch} (nvrtcResult {result}): "
                            f"{text.value.decode(errors='replace')[-2000:]}")
        size = ctypes.c_size_t()
        if lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)):
            raise CudaError("nvrtcGetCUBINSize failed")
        cubin = ctypes.create_string_buffer(size.value)
        if lib.nvrtcGetCUBIN(prog, cubin):
            raise CudaError("nvrtcGetCUBIN failed")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def load_functions(cubin: bytes, names: list[str]) -> list[int]:
    """Load a CUBIN into the current context; the CUfunction handles of ``names``."""
    module = ctypes.c_void_p()
    check(driver().cuModuleLoadData(ctypes.byref(module), cubin), "cuModuleLoadData")
    handles = []
    for name in names:
        function = ctypes.c_void_p()
        check(driver().cuModuleGetFunction(ctypes.byref(function), module, name.encode()),
              f"cuModuleGetFunction ({name})")
        handles.append(int(function.value or 0))
    return handles
