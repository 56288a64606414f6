"""lmcd.kernels: GPU gather/scatter kernels (CUDA C compiled by NVRTC through CuPy).

The GPU path is not part of this release: CPU workers use POSIX shared memory and the
server's memmove copies (``lmcd.server.transfer``).
"""
