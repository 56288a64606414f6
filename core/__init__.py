"""lmcd: a KV-cache server daemon for LLM inference.

Import layout (source folder in brackets): ``lmcd`` [core/] holds what both sides share:
``lmcd.protocol`` (the wire protocol), ``lmcd.copyplan`` (block-id checks and the CPU copy plan),
``lmcd.shm`` (named POSIX shared memory), ``lmcd.cudadrv`` (the CUDA driver through ctypes),
``lmcd.cacheblend`` (LMCache's CacheBlend settings, refused until lmcd has it) and the ``lmcd`` command
(``lmcd.cli``); ``lmcd.server`` [server/] is the daemon; ``lmcd.connector``
[connector/] is the client side (the client library, chunk keys, the vLLM connector, bench);
``lmcd.kernels`` [kernels/] is the GPU page kernel and the staged copy built on it.
"""

__version__ = "0.2.0"
