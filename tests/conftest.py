"""Shared fixtures: real `lmcache server` processes on 127.0.0.1, real clients, real SHM.

``server_factory(*flags)`` starts ``python -m lmcd server --port 0 --http-port 0 ...`` and waits
for its "LMCache cache server is running on <url> ... HTTP <http_url>" line. Every server is
stopped with SIGTERM at teardown (SIGKILL if it does not exit in time).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import multiprocessing
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import numpy as np
import pytest

from lmcd import protocol as p
from lmcd.connector.client import CacheClient
from lmcd.connector.shm import CpuKVCache

RUNNING = re.compile(r"LMCache cache server is running on (\S+) \(pool .*HTTP (\S+?)\)")


@dataclass
class RunningServer:
    proc: subprocess.Popen[str]
    url: str = ""
    http_url: str = ""
    lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def log(self) -> str:
        return "".join(self.lines)

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = regex.search(line)
                if m:
                    return m
            time.sleep(0.02)
        raise AssertionError(f"log line {pattern!r} not seen within {timeout} s; log:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def free_port() -> int:
    """A free TCP port of 127.0.0.1 BELOW the kernel's ephemeral range, for a server a test starts on a
    port of its choosing. A port the kernel hands out (``bind(0)``) can be handed out again before
    the test binds it, to any process asking for one (vLLM's own sockets, servers on ``--port 0``);
    one below that range is never handed out, so nothing but another test can take it meanwhile."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(max(1024, low - 16384), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port below {low} on 127.0.0.1")


def run_as_uid(uid: int, fn: Callable[..., dict], *args: object, timeout: float = 60.0) -> dict:
    """``fn(*args)`` in a child forked from this process (its modules already imported: a dropped uid
    may not read the venv) that first drops to ``uid`` (groups, gid and uid); returns the dict it
    returns, or ``{"error": <traceback>}``. The child is killed if it has not ended 10 s after it reported."""
    def child(out: Connection) -> None:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            out.send(fn(*args))
        except BaseException:
            out.send({"error": traceback.format_exc()})

    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=child, args=(there,))
    proc.start()
    try:
        assert here.poll(timeout), f"the child of uid {uid} did not report within {timeout} s"
        return here.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def routed_ipv4() -> str | None:
    """The non-loopback IPv4 address this machine would send from (a UDP connect sends nothing; it only
    picks a route), or None where there is none."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.connect(("10.255.255.255", 1))
        address = sock.getsockname()[0]
    except OSError:
        return None
    finally:
        sock.close()
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def server_command(*flags: str) -> list[str]:
    return [sys.executable, "-m", "lmcd", "server", "--host", "127.0.0.1", "--port", "0", "--http-port", "0",
            *flags]


def start_server(*flags: str, env: dict[str, str] | None = None, timeout: float = 60.0,
                 preexec_fn: Callable[[], None] | None = None, command: list[str] | None = None) -> RunningServer:
    """A running server; ``preexec_fn`` runs in the server's process before it starts (e.g. a limit);
    ``command`` replaces ``server_command(*flags)`` (a user's command line, verbatim)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(command or server_command(*flags), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=full_env, preexec_fn=preexec_fn)
    server = RunningServer(proc)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            server.lines.append(line)

    server._reader = threading.Thread(target=read, daemon=True)
    server._reader.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(server.lines):
            m = RUNNING.search(line)
            if m:
                server.url, server.http_url = m.group(1), m.group(2)
                return server
        if proc.poll() is not None:
            server.stop()
            raise AssertionError(f"server exited with {proc.returncode} before running:\n{server.log()}")
        time.sleep(0.02)
    server.stop(signal.SIGKILL)
    raise AssertionError(f"server not running within {timeout} s:\n{server.log()}")


@pytest.fixture
def server_factory() -> Iterator[Callable[..., RunningServer]]:
    started: list[RunningServer] = []

    def factory(*flags: str, env: dict[str, str] | None = None) -> RunningServer:
        server = start_server(*flags, env=env)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    return server_factory("--l1-size-gb", "0.25")


def namespace(model: str | None = None, geometry: str = "test", rank: int | None = 0, world_size: int = 1,
              kv_dtype: str = "bf16") -> p.Namespace:
    return p.Namespace(model or f"test-{uuid.uuid4().hex[:8]}", kv_dtype, geometry, world_size, rank)


def connect(url: str, ns: p.Namespace | None = None, role: p.Role = p.Role.WORKER, **kwargs: object) -> CacheClient:
    return CacheClient(url, ns or namespace(), role=role, timeout_s=kwargs.pop("timeout_s", 10.0),  # type: ignore[arg-type]
                       **kwargs)  # type: ignore[arg-type]


def shm_names(pid: int | None = None) -> set[str]:
    """lmcd segment names in /dev/shm (of one process, if ``pid`` is given): none since segments are
    memfds; older versions named them there."""
    prefix = "lmcache_kv_" if pid is None else f"lmcache_kv_{pid}_"
    return {n for n in os.listdir("/dev/shm") if n.startswith(prefix)}


def memfd_names(pid: int, prefix: str = "lmcache_") -> set[str]:
    """Names of the memfds process ``pid`` holds open whose name starts with ``prefix`` (a mapping
    holds one too: Python's mmap keeps a duplicate of the fd while it is open)."""
    names = set()
    with contextlib.suppress(FileNotFoundError, PermissionError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/memfd:" + prefix):
                    names.add(target.removeprefix("/memfd:").removesuffix(" (deleted)"))
    return names


def fill_random(kv: CpuKVCache, seed: int) -> None:
    """Fill every SHM segment of ``kv`` with seeded random bytes."""
    rng = np.random.default_rng(seed)
    for seg in kv.segments:
        seg.array[:] = rng.integers(0, 256, seg.nbytes, dtype=np.uint8)


def counters(client: CacheClient) -> dict[str, object]:
    """The server's ``/status`` counters, read over the client's session."""
    return client.status()["counters"]  # type: ignore[return-value]


class PoolView:
    """The server's shared pool (``--share-pool``), mapped here from the fd the server's handoff socket
    sends (as to a worker that copies itself), so a test writes and reads the pool's bytes itself."""

    def __init__(self, client: CacheClient) -> None:
        assert client.hello is not None and client.hello.pool_segment, \
            "the server does not share its pool (start it with --share-pool true)"
        fd = client.shared_pool_fd()
        try:
            self._mmap = mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.array = np.frombuffer(self._mmap, dtype=np.uint8)

    def write(self, slot: int, data: np.ndarray) -> None:
        self.array[slot : slot + len(data)] = data

    def read(self, slot: int, nbytes: int) -> np.ndarray:
        return self.array[slot : slot + nbytes].copy()

    def close(self) -> None:
        del self.array
        self._mmap.close()


# ---------------------------------------------------------------- a private /dev/shm (unshare -m)

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# for scripts run by run_in_private_shm: start(*flags) a server (its url, or None within timeout), stop(proc)
PRELUDE = """
import json, os, signal, socket, subprocess, sys, threading, time, re
import numpy as np
from lmcd import protocol as p
from lmcd.connector.client import CacheClient
from lmcd.connector.keys import chunk_keys
from lmcd.connector.shm import CpuKVCache
RUNNING = re.compile(r"LMCache cache server is running on (\\S+) ")
def start(*flags, timeout=60):
    proc = subprocess.Popen([sys.executable, "-m", "lmcd", "server", "--host", "127.0.0.1", "--port", "0",
                             "--http-port", "0", *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for line in list(lines):
            m = RUNNING.search(line)
            if m:
                return proc, m.group(1), lines
        time.sleep(0.02)
    proc.kill()
    return proc, None, lines
def stop(proc, timeout=20):
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return "hung"
"""


def run_in_private_shm(script: str) -> dict:
    """Run a Python ``script`` (``PRELUDE`` + the test's part) in a mount namespace of its own with an
    8 MiB tmpfs on /dev/shm, and return the JSON it printed after ``RESULT ``; skips where that
    cannot be made (not root: unshare and mount need CAP_SYS_ADMIN)."""
    if os.geteuid() != 0:
        pytest.skip("a private /dev/shm needs root (unshare -m and mount need CAP_SYS_ADMIN)")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=8m tmpfs /dev/shm"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private /dev/shm with unshare -m (needs CAP_SYS_ADMIN): {probe.stderr.strip()}")
    command = f"mount -t tmpfs -o size=8m tmpfs /dev/shm && exec {sys.executable} -c \"$0\""
    done = subprocess.run(["unshare", "-m", "sh", "-c", command, textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=180, cwd=ROOT_DIR, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result (exit {done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))
