"""Real ``redis-server`` processes for the Redis tier's tests: one server, a 3-master cluster, a proxy.

``start_redis(...)`` runs ``redis-server`` on 127.0.0.1 on a free port (no persistence, its own temp
dir) and waits until it answers PING; ``start_cluster()`` runs three with ``--cluster-enabled yes``
and joins them with ``redis-cli --cluster create``. Every wait is bounded; the fixtures
(``redis_factory``, ``redis_server``, ``redis_cluster``) stop every process they started at teardown.
Tests skip only when ``redis-server`` is not installed (CI installs it).

``RoundTripProxy`` forwards TCP to a server and counts round trips: a client send that follows a
server reply (or opens the connection) starts one.
"""

from __future__ import annotations

import contextlib
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import redis

from tests.conftest import free_port

START_TIMEOUT_S = 10.0


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not installed (apt-get install redis-server)")
    return binary


def answers_ping(port: int, timeout: float = 0.5) -> bool:
    """Whether 127.0.0.1:port answers a PING (PONG, or NOAUTH from a server with a password)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            reply = s.recv(64)
    except OSError:
        return False
    return reply.startswith((b"+PONG", b"-NOAUTH"))


@dataclass
class RedisProc:
    """One redis-server process; ``restart()`` starts it again on the same port, with the same flags."""

    port: int
    args: list[str]
    dir: str
    password: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    own_dir: bool = True

    def launch(self) -> None:
        self.proc = subprocess.Popen([redis_server_binary(), *self.args], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, cwd=self.dir)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not answers_ping(self.port):
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server {self.args} exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"redis-server on port {self.port} not answering within {START_TIMEOUT_S} s")
            time.sleep(0.02)

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5.0,
                           socket_connect_timeout=5.0, **kwargs)  # type: ignore[arg-type]

    def info(self, section: str) -> dict:
        with self.client() as c:
            return c.info(section)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, the server answers nothing (a hung server)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)  # a paused server would not act on SIGTERM
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def restart(self) -> None:
        self.stop()
        self.launch()

    def remove(self) -> None:
        self.stop()
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def start_redis(port: int | None = None, *, maxmemory: str | None = None, policy: str = "allkeys-lru",
                password: str | None = None, extra: tuple[str, ...] = (), dir: str | None = None) -> RedisProc:
    """A running redis-server on 127.0.0.1 (``port`` or a free one)."""
    redis_server_binary()
    port = port or free_port()
    workdir = dir or tempfile.mkdtemp(prefix="lmcd-redis-")
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir]
    if maxmemory is not None:
        args += ["--maxmemory", maxmemory, "--maxmemory-policy", policy]
    if password is not None:
        args += ["--requirepass", password]
    server = RedisProc(port, [*args, *extra], workdir, password, own_dir=dir is None)
    try:
        server.launch()
    except BaseException:
        server.remove()
        raise
    return server


@dataclass
class RedisClusterProcs:
    """A cluster of redis-server masters, no replicas; ``dir`` holds every node's nodes-P.conf."""

    nodes: list[RedisProc]
    dir: str

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", n.port) for n in self.nodes]

    def stop(self) -> None:
        for node in self.nodes:
            node.remove()
        shutil.rmtree(self.dir, ignore_errors=True)


def cluster_ok(node: RedisProc) -> bool:
    try:
        with node.client() as c:
            info = c.execute_command("CLUSTER INFO")  # parsed by redis-py into a dict
    except redis.RedisError:
        return False
    try:
        return info.get("cluster_state") == "ok"
    except AttributeError:
        return False


def start_cluster(num_masters: int = 3, timeout: float = 30.0) -> RedisClusterProcs:
    """``num_masters`` redis-server masters joined by ``redis-cli --cluster create``, every node's state ok."""
    redis_server_binary()
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli not installed (apt-get install redis-server; it ships redis-cli)")
    workdir = tempfile.mkdtemp(prefix="lmcd-redis-cluster-")
    cluster = RedisClusterProcs([], workdir)
    try:
        for _ in range(num_masters):
            port, bus_port = free_port(), free_port()
            cluster.nodes.append(start_redis(port, dir=workdir, extra=(
                "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-port", str(bus_port), "--cluster-node-timeout", "5000")))
        addresses = [f"127.0.0.1:{n.port}" for n in cluster.nodes]
        subprocess.run(["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while not all(cluster_ok(n) for n in cluster.nodes):
            if time.monotonic() > deadline:
                raise AssertionError(f"cluster {addresses} not cluster_state:ok within {timeout} s")
            time.sleep(0.1)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@dataclass
class RoundTripProxy:
    """127.0.0.1:port forwarding to 127.0.0.1:upstream_port on one thread; ``round_trips`` counts
    client sends that follow a server reply on their connection (or open it)."""

    upstream_port: int
    port: int = 0
    round_trips: int = 0
    _listener: socket.socket = field(default_factory=socket.socket)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RoundTripProxy:
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, None)
        # per socket: (its peer, whether it is the client side, [the connection's last direction])
        while not self._stop.is_set():
            for key, _ in sel.select(0.05):
                if key.data is None:
                    client, _ = self._listener.accept()
                    server = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5.0)
                    last: list[str] = ["reply"]
                    sel.register(client, selectors.EVENT_READ, (server, True, last))
                    sel.register(server, selectors.EVENT_READ, (client, False, last))
                    continue
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                peer, from_client, last = key.data
                data = sock.recv(1 << 20)
                if not data:
                    for s in (sock, peer):
                        with contextlib.suppress(KeyError, ValueError):
                            sel.unregister(s)
                        s.close()
                    continue
                if from_client and last[0] == "reply":
                    self.round_trips += 1
                last[0] = "request" if from_client else "reply"
                peer.sendall(data)
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)


@pytest.fixture
def redis_factory() -> Iterator[Callable[..., RedisProc]]:
    """``redis_factory(**start_redis kwargs)``: servers stopped (and their dirs removed) at teardown."""
    started: list[RedisProc] = []

    def factory(*args: object, **kwargs: object) -> RedisProc:
        server = start_redis(*args, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield factory
    for server in started:
        server.remove()


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisProc]) -> RedisProc:
    return redis_factory()


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterProcs]:
    cluster = start_cluster()
    yield cluster
    cluster.stop()
