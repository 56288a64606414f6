"""lmcd: a KV-cache server daemon for LLM inference.

Import layout: ``lmcd.server`` (the daemon), ``lmcd.connector`` (client side: the
client library, chunk keys, SHM worker memory, bench), ``lmcd.kernels`` (GPU copy
kernels), and ``lmcd.protocol`` (the wire protocol both sides import).
"""

__version__ = "0.1.0"
