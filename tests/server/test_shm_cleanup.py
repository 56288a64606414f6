"""Nothing of a dead worker stays in /dev/shm; a live worker's segments are never touched."""

import os
import signal
import subprocess
import sys

from tests.conftest import shm_names

HOLDER = """
import sys, time
from lmcd.connector.shm import CpuKVCache
kv = CpuKVCache(num_layers=2, num_blocks=4, block_size=128, num_kv_heads=1, head_size=32)
print(" ".join(seg.name for seg in kv.segments), flush=True)
time.sleep(120)
"""


def start_holder() -> tuple[subprocess.Popen[str], set[str]]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    names = set(proc.stdout.readline().split())
    assert len(names) == 2 and names <= shm_names(proc.pid)
    return proc, names


def test_server_start_removes_segments_of_workers_that_died_without_a_server(server_factory):
    dead, dead_names = start_holder()
    alive, alive_names = start_holder()
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait(10)
        assert shm_names(dead.pid) == dead_names  # nobody was there to clean up
        server = server_factory("--l1-size-gb", "0.05")
        assert shm_names(dead.pid) == set()
        assert shm_names(alive.pid) == alive_names  # the live owner's names are left alone
        assert "stale SHM segments" in server.log()
        assert server.stop() == 0
        assert shm_names(alive.pid) == alive_names  # shutdown leaves live owners alone too
    finally:
        alive.kill()
        alive.wait(10)
        dead.stdout.close()
        alive.stdout.close()
        for name in shm_names(alive.pid):  # killed with no server running: clean up by hand
            os.unlink(f"/dev/shm/{name}")
