"""Chunk keys: a hash chain over full chunks, shared by the connector, tests and bench."""

import hashlib

import numpy as np
import pytest

from lmcd.connector.keys import SEED, chunk_keys


def test_one_key_per_full_chunk_only():
    assert len(chunk_keys(range(255), 256)) == 0
    assert len(chunk_keys(range(256), 256)) == 1
    assert len(chunk_keys(range(1000), 256)) == 3


def test_chain_matches_definition():
    tokens = np.arange(512, dtype=np.int64) * 7919 % 50000
    h0 = hashlib.blake2b(SEED + tokens[:256].astype("<u4").tobytes(), digest_size=32).digest()
    h1 = hashlib.blake2b(h0 + tokens[256:].astype("<u4").tobytes(), digest_size=32).digest()
    assert chunk_keys(tokens, 256) == [h0, h1]


def test_keys_name_the_whole_prefix():
    a = list(range(768))
    b = a[:256] + [9] + a[257:]  # differs inside chunk 1
    ka, kb = chunk_keys(a, 256), chunk_keys(b, 256)
    assert ka[0] == kb[0]
    assert ka[1] != kb[1] and ka[2] != kb[2]  # everything after a difference differs
    assert chunk_keys(a + [1, 2, 3], 256) == ka  # a partial tail adds no key


def test_lists_and_arrays_agree():
    tokens = list(range(100, 612))
    assert chunk_keys(tokens, 128) == chunk_keys(np.array(tokens, dtype=np.int32), 128)


@pytest.mark.parametrize("bad", [[-1] * 256, [2**32] * 256, [[1, 2]] * 128])
def test_invalid_token_ids_raise(bad):
    with pytest.raises(ValueError):
        chunk_keys(bad, 256)


def test_invalid_chunk_size_raises():
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_keys(range(10), 0)
