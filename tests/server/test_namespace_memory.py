"""Namespaces nobody uses are forgotten (issue 13, item 12): 20,000 distinct Hellos from a real
client leave the real server's memory where it was, and ``/status`` counts the live namespaces.

The bound: each Hello here names a namespace of 12 KB of text (three 4,000-character fields), so
a server that kept every namespace would grow by 20,000 x 12 KB = 240 MB (the issue measured 236
MB). A server that forgets them holds one namespace at a time; what the process may still grow
by is allocator and ZMQ buffer noise, a few MiB. The test allows a tenth of what keeping them
costs, 24 MiB, far above the noise and far below the leak."""

from __future__ import annotations

import pytest

from lmcd import protocol as p
from lmcd.connector.client import CacheClient
from tests.conftest import RunningServer, connect
from tests.server.test_cache_behaviour import wait_until

pytestmark = pytest.mark.timeout(300)
TEXT = "x" * 4000
NUM_HELLOS = 20_000
BOUND_BYTES = 24 << 20


def rss_bytes(server: RunningServer) -> int:
    with open(f"/proc/{server.proc.pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/<pid>/status")


def unique_namespace(tag: str, i: int) -> p.Namespace:
    return p.Namespace(f"{tag}-{i}-{TEXT}", TEXT, TEXT, 1, None)


def say_hellos(client: CacheClient, tag: str, n: int) -> None:
    for i in range(n):
        client.namespace = unique_namespace(tag, i)
        client.say_hello()


def namespaces(client: CacheClient) -> int:
    return client.status()["namespaces"]  # type: ignore[return-value]


def test_unique_hellos_leave_no_memory_behind(server_factory) -> None:
    server = server_factory("--l1-size-gb", "0.0625")
    client = connect(server.url, unique_namespace("first", 0), role=p.Role.CLIENT)
    with client:
        assert namespaces(client) == 1
        say_hellos(client, "warm-up", 2000)  # the allocator and ZMQ reach their steady state
        before = rss_bytes(server)
        say_hellos(client, "run", NUM_HELLOS)
        grown = rss_bytes(server) - before
        assert grown < BOUND_BYTES, f"the server grew by {grown / 2**20:.1f} MiB over {NUM_HELLOS} Hellos"
        assert namespaces(client) == 1  # only the one this session names now
        for i in range(100):  # sessions that come and go, each with its own namespace
            connect(server.url, unique_namespace("session", i), role=p.Role.CLIENT).close()
        assert wait_until(lambda: namespaces(client) == 1, 10.0)


def test_a_namespace_lives_while_its_chunks_do(server_factory) -> None:
    from tests.conftest import namespace
    from tests.server.test_cache_behaviour import scheduler, small_kv, stored_chunks

    server = server_factory("--l1-size-gb", "0.0625")
    kv = small_kv()
    ns = namespace(geometry=kv.geometry)
    worker, _, keys = stored_chunks(server, kv, ns, 2)
    worker.close()  # no session names the namespace any more, its chunks still do
    with connect(server.url, unique_namespace("watcher", 0), role=p.Role.CLIENT) as watcher:
        assert wait_until(lambda: watcher.status()["counters"]["disconnects"] >= 1, 10.0)
        assert namespaces(watcher) == 2
        with scheduler(server.url, ns) as sched:
            assert sched.lookup(keys, lease=False).num_hit_chunks == 2  # the same namespace, its chunks found
        assert wait_until(lambda: watcher.status()["counters"]["disconnects"] >= 2, 10.0)
        assert namespaces(watcher) == 2
        assert watcher.clear() == 2
        assert namespaces(watcher) == 1  # no session, no chunk: forgotten
    kv.close()
