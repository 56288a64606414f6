"""Nothing of a dead worker stays in /dev/shm: its memory is a memfd without a name. What older lmcd
versions left there (named segments, share-locked by their owner) goes at the server's start once
its owner is dead; a live owner's segments are never touched."""

import os
import signal
import subprocess
import sys

from lmcd import protocol as p
from tests.conftest import PRELUDE, connect, namespace, run_in_private_shm, shm_names

OLD_HOLDER = """
import fcntl, os, sys, time
# what lmcd before protocol 3 made: /dev/shm/lmcache_kv_<pid>_<idx>, share-locked while its owner lives
names = []
for idx in range(2):
    name = f"lmcache_kv_{os.getpid()}_{idx}"
    fd = os.open("/dev/shm/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    os.ftruncate(fd, 4096)
    names.append(name)
print(" ".join(names), flush=True)
time.sleep(120)
"""

WORKER = """
import sys, time
from lmcd import protocol as p
from lmcd.connector.client import CacheClient
from lmcd.connector.shm import CpuKVCache
kv = CpuKVCache(num_layers=2, num_blocks=4, block_size=128, num_kv_heads=1, head_size=32)
client = CacheClient(sys.argv[1], p.Namespace("cleanup", "bf16", kv.geometry, 1, 0), role=p.Role.WORKER)
kv.register(client)
print("REGISTERED", flush=True)
time.sleep(120)
"""


OLD_SEGMENTS = PRELUDE + """
holders = [subprocess.Popen([sys.executable, "-c", OLD_HOLDER], stdout=subprocess.PIPE, text=True) for _ in range(2)]
dead, alive = holders
names = [set(h.stdout.readline().split()) for h in holders]
dead.kill(); dead.wait(10)
out = {"before": sorted(os.listdir("/dev/shm"))}
proc, url, lines = start("--l1-size-gb", "0.05")
out["after_start"] = sorted(os.listdir("/dev/shm"))
out["exit"] = stop(proc) if url else None
out["after_stop"] = sorted(os.listdir("/dev/shm"))
out["dead"], out["alive"], out["log"] = sorted(names[0]), sorted(names[1]), "".join(lines)
alive.kill(); alive.wait(10)
print("RESULT " + json.dumps(out), flush=True)
"""


def start(script: str, *args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline()


def test_server_start_removes_segments_of_older_workers_that_died():
    """In a /dev/shm of its own (nobody else's server sweeps it meanwhile)."""
    out = run_in_private_shm(f"OLD_HOLDER = {OLD_HOLDER!r}\n" + OLD_SEGMENTS)
    dead, alive = set(out["dead"]), set(out["alive"])
    assert len(dead) == 2 and len(alive) == 2 and dead | alive == set(out["before"])
    sockets = {name for name in out["after_start"] if name.endswith(".sock")}
    assert set(out["after_start"]) - sockets == alive  # the dead owner's names went; the live owner's stay
    assert "Removed 2 leftovers of earlier lmcd processes" in out["log"], out["log"]
    assert out["exit"] == 0 and set(out["after_stop"]) == alive  # shutdown leaves live owners alone too


def test_a_worker_killed_leaves_nothing_in_dev_shm(server):
    before = set(os.listdir("/dev/shm"))
    worker, line = start(WORKER, server.url)
    try:
        assert line.strip() == "REGISTERED"
        assert shm_names(worker.pid) == set()  # registered, and nothing of it is named in /dev/shm
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        with connect(server.url, namespace(), role=p.Role.CLIENT) as client:
            assert client.ping() < 5
        assert {n for n in set(os.listdir("/dev/shm")) - before if n.startswith("lmcache_")} == set()
    finally:
        worker.kill()
        worker.wait(10)
        assert worker.stdout is not None
        worker.stdout.close()
