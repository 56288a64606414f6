"""Chunk keys: a hash chain over full chunks of token ids, computed on the client side.

    h_0 = H(SEED || tokens[0:C]),  h_i = H(h_{i-1} || tokens[i*C:(i+1)*C])

with H = BLAKE2b-256 and token ids as little-endian uint32, C = the server's chunk size.
A key therefore names the whole prefix up to and including its chunk: two prompts share
key i only if they share their first (i+1)*C tokens. Only full chunks get a key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from lmcd.protocol import HASH_BYTES

SEED = bytes(HASH_BYTES)
MAX_TOKEN_ID = 2**32 - 1


def token_bytes(token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Token ids as little-endian uint32; ValueError for ids outside 0..2**32-1."""
    arr = np.asarray(token_ids)
    if arr.ndim != 1:
        raise ValueError(f"token ids must be a flat sequence, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype("<u4")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got {arr.dtype}")
    if int(arr.min()) < 0 or int(arr.max()) > MAX_TOKEN_ID:
        raise ValueError(f"token ids must be within 0..{MAX_TOKEN_ID}")
    return arr.astype("<u4", copy=False)


def chunk_keys(token_ids: Sequence[int] | np.ndarray, chunk_size: int, seed: bytes = SEED) -> list[bytes]:
    """One 32-byte key per FULL chunk of ``token_ids`` (a trailing partial chunk has none)."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    tokens = token_bytes(token_ids)
    data = tokens.tobytes()
    step = chunk_size * 4
    out: list[bytes] = []
    prev = seed
    for start in range(0, (len(tokens) // chunk_size) * step, step):
        prev = hashlib.blake2b(prev + data[start : start + step], digest_size=HASH_BYTES).digest()
        out.append(prev)
    return out
