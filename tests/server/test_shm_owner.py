"""A worker of another user than the server's (a non-root vLLM beside a root server, or the reverse)
registers its own KV memory: it hands the memory over as file descriptors, so no file permission is
in the way, and the server copies exactly. The server runs as root without capabilities (setpriv),
which is the file-permission check a non-root server meets; the worker is forked from this process
and drops to another uid."""

from __future__ import annotations

import os
import shutil

import numpy as np
import numpy.random  # noqa: F401  (imported before the child drops to a uid that cannot read the venv)
import pytest

import tests.conftest as conftest
from lmcd import protocol as p
from lmcd.connector.client import CacheClient
from lmcd.connector.keys import chunk_keys
from lmcd.connector.shm import CpuKVCache

OTHER_UID = 4321

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root (to drop to another uid) and setpriv (util-linux)")


def worker_of_another_user(url: str) -> dict:
    """Run as OTHER_UID (``conftest.run_as_uid``)."""
    kv = CpuKVCache(num_layers=2, num_blocks=8, block_size=128, num_kv_heads=2, head_size=32)
    conftest.fill_random(kv, 7)
    ns = p.Namespace("other-user", "bf16", kv.geometry, 1, 0)
    with CacheClient(url, ns, role=p.Role.WORKER) as client:
        info = kv.register(client)
        keys = chunk_keys(range(512), 256)
        stored = client.store(info.worker_id, keys, [0, 1, 2, 3]).num_stored
        got = client.retrieve(info.worker_id, keys, [4, 5, 6, 7])
        exact = all(np.array_equal(kv.pages(layer)[:4], kv.pages(layer)[4:]) for layer in range(2))
    kv.close()
    return {"uid": os.getuid(), "stored": stored, "retrieved": got, "exact": exact}


def test_a_worker_of_another_user_registers_its_own_memory(server_factory, monkeypatch):
    plain = conftest.server_command
    monkeypatch.setattr(conftest, "server_command",
                        lambda *flags: ["setpriv", "--bounding-set", "-all", "--inh-caps", "-all", *plain(*flags)])
    srv = server_factory("--l1-size-gb", "0.25")
    result = conftest.run_as_uid(OTHER_UID, worker_of_another_user, srv.url)
    assert "error" not in result, result["error"]
    assert result == {"uid": OTHER_UID, "stored": 2, "retrieved": 2, "exact": True}
    srv.wait_for_log(r"Registered KV cache for CPU")
