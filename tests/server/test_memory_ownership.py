"""The server maps a worker's memory only when the worker proves it holds it, and memory the server
does not control can neither kill it nor stop it from starting (issue 13, items 1, 2, 7 and 14).

The attacker runs as uid 65534: forked from this (root) process with its modules imported, since
/root is closed to that uid, and with nothing of the victim inherited (the victim is a process of
its own). The private /dev/shm tests run the server and the worker inside one mount namespace
(``unshare -m``) with a small tmpfs on /dev/shm.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from lmcd import protocol as p
from lmcd.connector.client import CacheClient, LmcdError, ServerError
from lmcd.connector.keys import chunk_keys
from lmcd.connector.shm import CpuKVCache
from tests.conftest import PRELUDE, connect, namespace, run_as_uid, run_in_private_shm

NOBODY = 65534
SECRET = b"TOP-SECRET-KV!"  # 14 bytes: never a divisor of a page, so it shows at any offset
ROOT = os.getuid() == 0
GEOMETRY = dict(num_layers=2, num_blocks=8, block_size=256, num_kv_heads=1, head_size=32)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VICTIM = f"""
import sys, time, numpy as np
from lmcd import protocol as p
from lmcd.connector.client import CacheClient
from lmcd.connector.shm import CpuKVCache
url, model, secret = sys.argv[1], sys.argv[2], sys.argv[3].encode()
kv = CpuKVCache(**{GEOMETRY})
for seg in kv.segments:
    seg.array[:] = np.frombuffer((secret * (seg.nbytes // len(secret) + 1))[: seg.nbytes], dtype=np.uint8)
before = [seg.array.copy() for seg in kv.segments]
client = CacheClient(url, p.Namespace(model, "bf16", kv.geometry, 1, 0), role=p.Role.WORKER)
info = kv.register(client)  # registered, never stores: the secret is only in its own memory
fds = [getattr(seg, "fd", getattr(seg, "_fd", -1)) for seg in kv.segments]
print("READY", info.worker_id, " ".join(seg.name for seg in kv.segments), " ".join(map(str, fds)), flush=True)
sys.stdin.readline()
intact = all(np.array_equal(b, seg.array) for b, seg in zip(before, kv.segments))
print("INTACT" if intact else "CHANGED", flush=True)
"""


def try_exploit(url: str, model: str, attempt: CacheClient, info_wid: int, results: dict) -> None:
    """A registration of the victim's memory got through: read it out and overwrite it, as issue 13 did."""
    own = CpuKVCache(**GEOMETRY)  # type: ignore[arg-type]
    for seg in own.segments:
        seg.array[:] = 0xAA
    keys = chunk_keys(range(256 * 4), 256)
    with CacheClient(url, p.Namespace(model, "bf16", own.geometry, 1, 0), role=p.Role.WORKER) as reader:
        own_info = own.register(reader)
        with_victim = attempt.store(info_wid, keys[:2], [0, 1])
        results["stored_from_victim"] = with_victim.num_stored
        reader.retrieve(own_info.worker_id, keys[:2], [4, 5])
        results["leaked"] = any(SECRET in bytes(seg.array) for seg in own.segments)
        reader.store(own_info.worker_id, keys[2:], [0, 1])
        attempt.retrieve(info_wid, keys[2:], [0, 1])  # would write 0xAA pages into the victim


def attack(url: str, model: str, victim_pid: int, names: list[str], fds: list[int], sizes: list[int]) -> dict:
    """Run as uid NOBODY (``run_as_uid``)."""
    results: dict = {"uid": os.getuid(), "proc_open": [], "refused": [], "registered": [], "leaked": False}
    for fd in fds:  # the victim's memory through /proc, opened by the attacker itself
        try:
            os.close(os.open(f"/proc/{victim_pid}/fd/{fd}", os.O_RDWR))
            results["proc_open"].append(fd)
        except OSError:
            pass
    kv = CpuKVCache(**GEOMETRY)  # type: ignore[arg-type]
    ns = p.Namespace(model, "bf16", kv.geometry, 1, 0)
    attempts = [["/" + name for name in names], [f"/proc/{victim_pid}/fd/{fd}" for fd in fds]]
    for segment_names in attempts:  # the old way: name the victim's memory
        with CacheClient(url, ns, role=p.Role.WORKER) as client:
            try:
                reply = client._call(lambda rid, n=segment_names: p.RegisterWorker(
                    rid, kv.layout, p.Device.CPU, p.Copier.SERVER, sizes, n), "register", p.Registered)
            except ServerError as exc:
                results["refused"].append(exc.message)
                continue
            results["registered"].append(segment_names)
            try_exploit(url, model, client, reply.worker_id, results)
    with CacheClient(url, ns, role=p.Role.WORKER) as client:  # its own memory: fine, and reaches only its own
        info = kv.register(client)
        keys = chunk_keys(range(512), 256)
        client.store(info.worker_id, keys, [0, 1])
        results["own_retrieved"] = client.retrieve(info.worker_id, keys, [4, 5])
        results["leaked"] |= any(SECRET in bytes(seg.array) for seg in kv.segments)
        try:
            client.shared_pool_fd()
            results["pool"] = "got the pool"
        except (LmcdError, AttributeError) as exc:
            results["pool"] = str(exc)
    kv.close()
    return results


@pytest.mark.skipif(not ROOT, reason="needs root: the attacker drops to uid 65534")
def test_a_process_of_another_uid_can_neither_read_nor_change_a_workers_kv(server_factory):
    server = server_factory("--l1-size-gb", "0.1", "--share-pool", "true")
    model = namespace().model
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, server.url, model, SECRET.decode()],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert victim.stdout is not None and victim.stdin is not None
        ready = victim.stdout.readline().split()
        assert ready and ready[0] == "READY", ready
        names, fds = ready[2:4], [int(fd) for fd in ready[4:6]]
        sizes = [8 * (1 * 256 * 2 * 32 * 2)] * 2  # per layer: 8 blocks of one page each
        results = run_as_uid(NOBODY, attack, server.url, model, victim.pid, names, fds, sizes)
        assert "error" not in results, results["error"]
        victim.stdin.write("check\n")
        victim.stdin.flush()
        verdict = victim.stdout.readline().strip()
    finally:
        victim.kill()
        victim.wait(10)
    assert results["uid"] == NOBODY
    assert results["proc_open"] == []  # the kernel keeps it out of the victim's /proc
    assert results["registered"] == [], results  # the server opens nothing by name for it
    assert len(results["refused"]) == 2 and all("retired" in m for m in results["refused"]), results["refused"]
    assert results["own_retrieved"] == 2  # its own memory registers and works
    assert not results["leaked"]
    assert "only processes of the server's user" in results["pool"] and f"uid {NOBODY}" in results["pool"]
    assert verdict == "INTACT"
    assert server.proc.poll() is None


# ---------------------------------------------------------------- truncation and unsealed memory


def test_a_segment_truncated_after_registration_cannot_kill_the_server(server):
    kv = CpuKVCache(**GEOMETRY)  # type: ignore[arg-type]
    try:
        with connect(server.url, namespace(geometry=kv.geometry)) as client:
            info = kv.register(client)
            for seg in kv.segments:
                fd = getattr(seg, "fd", getattr(seg, "_fd", -1))
                with pytest.raises(PermissionError):  # sealed: nobody can shrink it under the server's mapping
                    os.ftruncate(fd, 0)
            keys = chunk_keys(range(512), 256)
            assert client.store(info.worker_id, keys, [0, 1]).num_stored == 2
            assert client.retrieve(info.worker_id, keys, [4, 5]) == 2
            assert client.ping() < 5
    finally:
        kv.close()
    assert server.proc.poll() is None


def test_memory_that_could_be_truncated_is_refused_at_the_handoff(server):
    nbytes = 8 * 256 * 2 * 32 * 2
    unsealed = os.memfd_create("lmcache_kv_unsealed", os.MFD_CLOEXEC)
    tmpfs = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR, 0o600)
    directory = os.open("/dev/shm", os.O_RDONLY)
    try:
        for fd in (unsealed, tmpfs):
            os.ftruncate(fd, nbytes)
        with connect(server.url) as client:
            for fd, why in ((unsealed, "not sealed against shrinking"), (tmpfs, "not sealed against shrinking"),
                            (directory, "not a regular file")):
                with pytest.raises(LmcdError, match=why):
                    client.hand_over([fd])
            with pytest.raises(LmcdError, match="exceed the limit"):  # a cap on what one session hands over
                client.hand_over([unsealed] * 1025)
            layout = p.KVLayout(1, 8, 256, nbytes // 8, nbytes // 8, [0], [0])
            with pytest.raises(ServerError, match="one handed-over memory fd per segment size"):
                client.register_worker(layout, p.Device.CPU, p.Copier.SERVER, [nbytes])
            assert client.status()["workers"] == []
    finally:
        for fd in (unsealed, tmpfs, directory):
            os.close(fd)
    assert server.proc.poll() is None


# ---------------------------------------------------------------- /dev/shm: others' files, FIFOs, directories


# ---------------------------------------------------------------- a /dev/shm smaller than the memory


PRIVATE_SHM = PRELUDE + """
out = {"shm_size": os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize}
proc, url, lines = start("--l1-size-gb", "0.0625", "--share-pool", "true")  # 64 MiB pool, 8 MiB /dev/shm
out["shared_pool_started"] = url is not None
out["first_log"] = "".join(lines[-5:])
if url:
    kv = CpuKVCache(num_layers=1, num_blocks=64, block_size=256, num_kv_heads=8, head_size=64)  # 32 MiB, untouched
    with CacheClient(url, p.Namespace("m", "bf16", kv.geometry, 1, 0), role=p.Role.WORKER) as client:
        info = kv.register(client)
        keys = chunk_keys(range(256 * 16), 256)
        out["stored"] = client.store(info.worker_id, keys, list(range(16))).num_stored
    kv.close()
    proc.kill(); proc.wait(10)
    out["after_kill"] = sorted(os.listdir("/dev/shm"))
    proc, url, lines = start("--l1-size-gb", "0.0625", "--share-pool", "true")
    out["restarted"] = url is not None
    out["after_restart"] = sorted(os.listdir("/dev/shm"))
    if url:
        out["exit"] = stop(proc)
    out["after_stop"] = sorted(os.listdir("/dev/shm"))
proc.kill()
print("RESULT " + json.dumps(out), flush=True)
"""


LEFTOVERS = PRELUDE + """
os.mkfifo("/dev/shm/lmcache_kv_fifo")
os.mkdir("/dev/shm/lmcache_pool_dir")
for name in ("lmcache_kv_others", "lmcache_pool_others", "lmcache_pool_stale"):
    with open("/dev/shm/" + name, "wb") as f:
        f.write(b"x")
os.chown("/dev/shm/lmcache_kv_others", 4321, 4321)
os.chown("/dev/shm/lmcache_pool_others", 4321, 4321)
with socket.socket(socket.AF_UNIX) as sock:
    sock.bind("/dev/shm/lmcd_1_0123abcd.sock")  # a crashed server's socket: nobody listens, the file stays
started = time.monotonic()
proc, url, lines = start("--l1-size-gb", "0.05", timeout=15)
out = {"started": url is not None, "start_s": time.monotonic() - started, "log": "".join(lines[-20:])}
out["exit"] = stop(proc, 15) if url else None
out["left"] = sorted(os.listdir("/dev/shm"))
print("RESULT " + json.dumps(out), flush=True)
"""


def test_startup_and_shutdown_touch_only_our_own_regular_files_and_sockets():
    """A FIFO, a directory and another user's files named like lmcd's leftovers, in a /dev/shm of
    their own: neither startup nor shutdown hangs or fails, and only our own leftovers go."""
    out = run_in_private_shm(LEFTOVERS)
    assert out["started"] and out["start_s"] < 15, out["log"]
    assert out["exit"] == 0, out["log"]
    assert out["left"] == ["lmcache_kv_fifo", "lmcache_kv_others", "lmcache_pool_dir", "lmcache_pool_others"]
    assert "Removed 2 leftovers" in out["log"] and "lmcache_pool_stale" in out["log"], out["log"]


def test_a_dev_shm_smaller_than_the_memory_neither_kills_nor_blocks_the_server():
    out = run_in_private_shm(PRIVATE_SHM)
    assert out["shm_size"] == 8 << 20
    assert out["shared_pool_started"], out["first_log"]  # a 64 MiB shared pool beside an 8 MiB /dev/shm
    assert out["stored"] == 16  # 32 MiB of pages the worker never touched
    sockets = [name for name in out["after_kill"] if name.endswith(".sock")]
    assert out["after_kill"] == sockets and len(sockets) == 1  # a kill -9 leaves its socket, nothing else
    assert out["restarted"]
    assert sockets[0] not in out["after_restart"] and len(out["after_restart"]) == 1  # swept; its own socket
    assert out["exit"] == 0 and out["after_stop"] == []


# ---------------------------------------------------------------- registration keeps the loop free


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def test_a_large_untouched_registration_costs_no_memory_and_never_stalls_other_clients(server):
    kv = CpuKVCache(num_layers=1, num_blocks=4096, block_size=256, num_kv_heads=8, head_size=128,
                    one_segment=True)  # 4 GiB, never touched
    pings: list[float] = []
    stop = threading.Event()

    def ping_meanwhile() -> None:
        with connect(server.url, role=p.Role.CLIENT) as other:
            while not stop.is_set():
                pings.append(other.ping())

    pinger = threading.Thread(target=ping_meanwhile, daemon=True)
    try:
        rss_before = status_kib(server.proc.pid, "VmRSS")
        pinger.start()
        while not pings:
            time.sleep(0.01)
        with connect(server.url, namespace(geometry=kv.geometry)) as client:
            started = time.monotonic()
            info = kv.register(client)
            register_s = time.monotonic() - started
            grown_mib = (status_kib(server.proc.pid, "VmRSS") - rss_before) / 1024
            time.sleep(0.1)
            with pytest.raises(ServerError) as second:  # one worker per session
                kv.register(client)
            assert second.value.code == p.ErrorCode.LIMIT and "unregister it first" in second.value.message
            client.unregister_worker(info.worker_id)
    finally:
        stop.set()
        pinger.join(10)
        kv.close()
    print(f"4 GiB registration: {register_s * 1e3:.1f} ms, server RSS +{grown_mib:.1f} MiB, "
          f"{len(pings)} pings, slowest {max(pings) * 1e3:.1f} ms")
    assert grown_mib < 64, f"the server's RSS grew by {grown_mib:.0f} MiB on registering 4 GiB it never touched"
    assert register_s < 1.0 and max(pings) < 0.5
    np.testing.assert_equal(server.proc.poll(), None)


def test_idle_handoff_connections_are_capped_and_time_out(server):
    with connect(server.url) as client:
        assert client.hello is not None
        path = client.hello.handoff_path
        idle = []
        try:
            for _ in range(8):  # the most the server serves at once; they send nothing
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(path)
                idle.append(sock)
            time.sleep(0.3)
            with pytest.raises(LmcdError, match="serving 8 handoffs already"):
                client.hand_over([])
            started = time.monotonic()
            while time.monotonic() - started < 10:  # each idle one is dropped after 5 s
                try:
                    client.hand_over([])
                    break
                except LmcdError:
                    time.sleep(0.2)
            waited = time.monotonic() - started
            assert 4 < waited < 7, waited
        finally:
            for sock in idle:
                sock.close()
        assert client.ping() < 5
