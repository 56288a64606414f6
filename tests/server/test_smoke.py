"""The shortest end-to-end path: start, hello, store, lookup, retrieve, exact bytes, clean stop; and
the signals a daemon answers (stop cleanly, or log its status and keep serving)."""

import os
import re
import signal
import time

import httpx
import numpy as np
import pytest

from lmcd import protocol as p
from lmcd.connector.keys import chunk_keys
from lmcd.connector.shm import CpuKVCache
from tests.conftest import connect, fill_random, namespace, shm_names


def shm_left(pid: int) -> set[str]:
    """What server ``pid`` named in /dev/shm: its handoff socket (its pool, shared or not, has no name there),
    and any lmcache_* segment (what versions before protocol 3 left)."""
    return {n for n in os.listdir("/dev/shm") if re.match(rf"(lmcache_[a-z]+|lmcd)_{pid}_", n)}


def test_store_lookup_retrieve_roundtrip(server):
    kv = CpuKVCache(num_layers=2, num_blocks=16, block_size=128, num_kv_heads=2, head_size=32)
    fill_random(kv, 1)
    ns = namespace(geometry=kv.geometry)
    with connect(server.url, ns) as client:
        info = kv.register(client)
        assert info.chunk_bytes == 2 * 2 * kv.page_bytes
        hashes = chunk_keys(list(range(1000)), client.chunk_size)
        assert len(hashes) == 3
        result = client.store(info.worker_id, hashes, [0, 1, 5, 4, 9, 2])
        assert result.statuses == [p.ChunkStatus.STORED] * 3
        assert client.store(info.worker_id, hashes, [0, 1, 5, 4, 9, 2]).statuses == [p.ChunkStatus.PRESENT] * 3
        with connect(server.url, namespace(ns.model, kv.geometry, rank=None), role=p.Role.SCHEDULER) as sched:
            hit = sched.lookup(hashes)
            assert hit.num_hit_chunks == 3 and hit.lease_id is not None
        got = client.retrieve(info.worker_id, hashes, [10, 11, 12, 13, 14, 15], lease_id=None)
        assert got == 3
        for layer in range(2):
            pages = kv.pages(layer)
            assert np.array_equal(pages[[0, 1, 5, 4, 9, 2]], pages[[10, 11, 12, 13, 14, 15]])
    metrics = httpx.get(f"{server.http_url}/metrics").text
    assert 'lmcd_copy_seconds_count{direction="store"} 1.0' in metrics
    assert 'lmcd_copy_seconds_count{direction="retrieve"} 1.0' in metrics
    kv.close()
    assert shm_names(os.getpid()) == set()
    assert server.stop() == 0
    assert "Stored 768 tokens" in server.log()
    assert "Retrieved 768 tokens" in server.log()


def test_the_server_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys, lmcd.cli, lmcd.server.daemon, lmcd.server.http, lmcd.server.main; "
            "lmcd.cli.build_parser(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP], ids=lambda s: s.name)
def test_stop_signals_shut_down_cleanly(server_factory, sig):
    server = server_factory("--l1-size-gb", "0.05", "--share-pool", "true")
    pid = server.proc.pid
    with connect(server.url) as client:
        assert client.hello is not None and client.hello.pool_segment
    assert shm_left(pid), "the handoff socket is not in /dev/shm"
    assert server.stop(sig) == 0, server.log()
    assert f"Received {sig.name}: shutting down" in server.log()
    assert "LMCache cache server stopped" in server.log()
    assert shm_left(pid) == set(), f"left in /dev/shm after {sig.name}"
    assert "Traceback" not in server.log(), server.log()


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2], ids=lambda s: s.name)
def test_status_signals_log_one_line_and_keep_serving(server_factory, sig):
    server = server_factory("--l1-size-gb", "0.05", "--share-pool", "true")
    with connect(server.url) as client:
        server.proc.send_signal(sig)
        line = server.wait_for_log(rf"Status \({sig.name}\): pool .* used, \d+ chunks, 1 sessions on 1 connections, "
                                   r"0 workers, 0 leases")
        assert "INFO" in line.string
        assert client.ping() >= 0
        server.proc.send_signal(sig)
        deadline = time.monotonic() + 10
        while sum(f"Status ({sig.name})" in line for line in server.lines) < 2:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.02)
        assert client.ping() >= 0
    assert server.proc.poll() is None
    assert server.stop() == 0
    assert shm_left(server.proc.pid) == set()
