"""The CUDA driver (libcuda) through ctypes: the calls the staged copy makes, in both processes.

The server (CuPy) and a vLLM worker (torch) run the same copy pipeline (``lmcd.kernels.staged``),
so its streams, events and buffers are made here, with driver calls that work on whichever
context the calling thread has current (the device's primary context, which CuPy and torch both
use). Loaded on first use: importing this module needs no GPU.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import sys

import numpy as np

CUDA_ERROR_OUT_OF_MEMORY = 2
CUDA_ERROR_NOT_READY = 600
CU_STREAM_NON_BLOCKING = 1
CU_EVENT_BLOCKING_SYNC = 1  # a host wait yields instead of spinning a core
CU_EVENT_DISABLE_TIMING = 2
CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16
CU_MEMHOSTREGISTER_PORTABLE = 1


@functools.cache
def driver() -> ctypes.CDLL:
    """libcuda for calls that may wait (synchronize, allocate): a CDLL releases the GIL meanwhile."""
    lib = ctypes.CDLL("libcuda.so.1")
    vp = ctypes.c_void_p
    lib.cuEventSynchronize.argtypes = [vp]
    lib.cuStreamSynchronize.argtypes = [vp]
    lib.cuEventElapsedTime.argtypes = [ctypes.POINTER(ctypes.c_float), vp, vp]
    lib.cuMemHostRegister_v2.argtypes = [vp, ctypes.c_size_t, ctypes.c_uint]
    lib.cuMemHostUnregister.argtypes = [vp]
    return lib


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
    lib.cuMemcpyAsync.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, vp]
    return lib


class CudaError(RuntimeError):
    """A CUDA driver call failed; the message names the call and the CUresult."""

    def __init__(self, message: str, result: int = 0) -> None:
        super().__init__(message)
        self.result = result


def check(result: int, what: str, error: type[Exception] = CudaError) -> None:
    """Raise ``error("<what> failed: CUDA_ERROR_... (n)")`` unless ``result`` is CUDA_SUCCESS."""
    if result:
        message = f"{what} failed: {error_name(result)}"
        raise CudaError(message, result) if error is CudaError else error(message)


def error_name(result: int) -> str:
    """``CUDA_ERROR_... (n)`` for a CUresult."""
    name = ctypes.c_char_p()
    driver().cuGetErrorName(result, ctypes.byref(name))
    return f"{(name.value or b'?').decode()} ({result})"


# ---------------------------------------------------------------- contexts, streams, events, memory


def current_context() -> int:
    context = ctypes.c_void_p()
    check(driver().cuCtxGetCurrent(ctypes.byref(context)), "cuCtxGetCurrent")
    if not context.value:
        raise CudaError("no CUDA context is current on this thread (select the device first)")
    return int(context.value)


def set_context(context: int) -> None:
    check(driver().cuCtxSetCurrent(ctypes.c_void_p(context)), "cuCtxSetCurrent")


def multiprocessor_count() -> int:
    """SMs of the current context's device."""
    device, count = ctypes.c_int(), ctypes.c_int()
    check(driver().cuCtxGetDevice(ctypes.byref(device)), "cuCtxGetDevice")
    check(driver().cuDeviceGetAttribute(ctypes.byref(count), CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, device),
          "cuDeviceGetAttribute")
    return count.value


def free_memory() -> int:
    """Free bytes of the current context's GPU."""
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    check(driver().cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)), "cuMemGetInfo")
    return free.value


def stream_create() -> int:
    """A non-blocking stream of the current context (it never waits on the legacy default stream)."""
    stream = ctypes.c_void_p()
    check(driver().cuStreamCreate(ctypes.byref(stream), CU_STREAM_NON_BLOCKING), "cuStreamCreate")
    return int(stream.value or 0)


def stream_destroy(stream: int) -> None:
    driver().cuStreamDestroy_v2(ctypes.c_void_p(stream))


def stream_synchronize(stream: int) -> None:
    check(driver().cuStreamSynchronize(stream), "cuStreamSynchronize")


def event_create(flags: int = CU_EVENT_DISABLE_TIMING) -> int:
    event = ctypes.c_void_p()
    check(driver().cuEventCreate(ctypes.byref(event), flags), "cuEventCreate")
    return int(event.value or 0)


def event_destroy(event: int) -> None:
    driver().cuEventDestroy_v2(ctypes.c_void_p(event))


def event_record(event: int, stream: int) -> None:
    check(fast_driver().cuEventRecord(event, stream), "cuEventRecord")


def stream_wait(stream: int, event: int) -> None:
    """``stream`` waits (on the GPU) for the work before ``event``'s last record."""
    check(fast_driver().cuStreamWaitEvent(stream, event, 0), "cuStreamWaitEvent")


def event_done(event: int) -> bool:
    """Whether the work before ``event``'s last record has finished (never waits)."""
    result = fast_driver().cuEventQuery(event)
    if result == CUDA_ERROR_NOT_READY:
        return False
    check(result, "cuEventQuery")
    return True


def event_synchronize(event: int) -> None:
    """Wait for ``event`` (the GIL is released meanwhile)."""
    check(driver().cuEventSynchronize(event), "cuEventSynchronize")


def elapsed_seconds(start: int, end: int) -> float:
    ms = ctypes.c_float()
    check(driver().cuEventElapsedTime(ctypes.byref(ms), start, end), "cuEventElapsedTime")
    return ms.value / 1e3


def memcpy_async(dst: int, src: int, nbytes: int, stream: int) -> None:
    """Copy between any two addresses the device sees (GPU memory, pinned or registered host memory)."""
    check(fast_driver().cuMemcpyAsync(dst, src, nbytes, stream), "cuMemcpyAsync")


class DeviceBuffer:
    """``nbytes`` of GPU memory of the current context, freed by ``free``; CudaError
    (``result == CUDA_ERROR_OUT_OF_MEMORY``) when the GPU is full."""

    def __init__(self, nbytes: int) -> None:
        address = ctypes.c_uint64()
        check(driver().cuMemAlloc_v2(ctypes.byref(address), ctypes.c_size_t(nbytes)),
              f"cuMemAlloc of {nbytes / 2**20:.1f} MiB")
        self.address = address.value
        self.nbytes = nbytes

    def upload(self, data: np.ndarray) -> None:
        """Copy ``data`` (at most ``nbytes``) to the buffer's start, synchronously."""
        data = np.ascontiguousarray(data)
        assert data.nbytes <= self.nbytes
        check(driver().cuMemcpyHtoD_v2(ctypes.c_uint64(self.address), data.ctypes.data_as(ctypes.c_void_p),
                                       ctypes.c_size_t(data.nbytes)), "cuMemcpyHtoD")

    def free(self) -> None:
        if self.address:
            driver().cuMemFree_v2(ctypes.c_uint64(self.address))
            self.address = 0


def host_register(address: int, nbytes: int) -> None:
    """Pin host memory mapped in this process for the GPUs (``cuMemHostRegister``, portable)."""
    check(driver().cuMemHostRegister_v2(address, nbytes, CU_MEMHOSTREGISTER_PORTABLE), "cuMemHostRegister")


def host_unregister(address: int) -> None:
    driver().cuMemHostUnregister(address)


# ---------------------------------------------------------------- NVRTC and modules


NVRTC_NAMES = ("libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12")


@functools.cache
def nvrtc() -> ctypes.CDLL:
    """NVRTC for a process without CuPy (a vLLM worker): by name, else from the nvidia-* wheels beside torch."""
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
