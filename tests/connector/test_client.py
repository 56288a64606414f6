"""Client behaviour that does not need a particular server state."""

import os

import pytest

from lmcd import protocol as p
from lmcd.connector.client import server_url
from lmcd.connector.keys import chunk_hashes
from lmcd.connector.shm import CpuKVCache
from tests.conftest import connect, namespace, shm_names


@pytest.mark.parametrize(
    ("host", "port", "url"),
    [
        ("localhost", 5555, "tcp://localhost:5555"),
        ("tcp://localhost", 6555, "tcp://localhost:6555"),
        ("10.0.0.1", 5555, "tcp://10.0.0.1:5555"),
        ("tcp://10.0.0.1/", 7000, "tcp://10.0.0.1:7000"),
        ("::1", 5555, "tcp://[::1]:5555"),
        ("ipc:///tmp/lmcd.sock", 5555, "ipc:///tmp/lmcd.sock"),
    ],
)
def test_server_url_forms(host, port, url):
    assert server_url(host, port) == url


def test_ipc_transport_end_to_end(server_factory, tmp_path):
    sock = tmp_path / "lmcd.sock"
    srv = server_factory("--l1-size-gb", "0.1", "--host", f"ipc://{sock}")
    assert srv.url == f"ipc://{sock}"
    kv = CpuKVCache(num_layers=1, num_blocks=4, block_size=256, num_kv_heads=1, head_size=32)
    kv.segments[0].array[:] = 7
    ns = namespace(geometry=kv.geometry)
    with connect(srv.url, ns) as client:
        info = kv.register(client)
        keys = chunk_hashes(range(512), client.chunk_size)
        assert client.store(info.worker_id, keys, [0, 1]).num_stored == 2
        assert client.lookup(keys, lease=False).num_hit_chunks == 2
        kv.segments[0].array[:] = 0
        assert client.retrieve(info.worker_id, keys, [0, 1]) == 2
        assert int(kv.pages(0)[:2].min()) == 7
    kv.close()
    assert srv.stop() == 0
    assert not sock.exists() or sock.is_socket()


def test_hello_reply_describes_the_server(server):
    with connect(server.url, role=p.Role.CLIENT) as client:
        assert client.hello is not None
        assert client.hello.chunk_size == 256
        assert client.hello.hash_algorithm == p.HASH_ALGORITHM
        assert client.hello.protocol_version == p.PROTOCOL_VERSION
        assert "cpu-shm" in client.hello.capabilities
        assert client.ping() < 5


def test_segments_are_named_while_their_worker_lives(server):
    me = os.getpid()
    before = shm_names(me)
    kv = CpuKVCache(num_layers=3, num_blocks=4, block_size=128, num_kv_heads=1, head_size=32)
    names = {seg.name for seg in kv.segments}
    assert len(names) == 3 and shm_names(me) == before | names
    with connect(server.url, namespace(geometry=kv.geometry)) as client:
        first = kv.register(client)
        client.unregister_worker(first.worker_id)
        assert shm_names(me) == before | names  # the owner lives: the server leaves its names alone
        second = kv.register(client)  # the same memory can be registered again
        assert second.worker_id != first.worker_id
    kv.close()
    assert shm_names(me) == before


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_client_and_worker_memory_survive_a_server_restart(how):
    import signal

    from lmcd.connector.client import ServerError
    from tests.conftest import start_server

    port = str(free_port())
    flags = ("--l1-size-gb", "0.1", "--touch-pool", "false")
    first = start_server(*flags[:2], *flags[2:], "--port", port)
    kv = CpuKVCache(num_layers=2, num_blocks=4, block_size=256, num_kv_heads=1, head_size=32)
    kv.segments[0].array[:] = 3
    ns = namespace(geometry=kv.geometry)
    second = None
    try:
        client = connect(f"tcp://127.0.0.1:{port}", ns, timeout_s=10.0)
        info = kv.register(client)
        keys = chunk_hashes(range(256), client.chunk_size)
        assert client.store(info.worker_id, keys, [0]).num_stored == 1
        assert first.stop(getattr(signal, how)) in (0, -9)
        second = start_server(*flags, "--port", port)
        assert client.lookup(keys, lease=False).num_hit_chunks == 0  # re-said Hello by itself
        with pytest.raises(ServerError) as err:
            client.store(info.worker_id, keys, [0])
        assert err.value.code == p.ErrorCode.UNKNOWN_WORKER
        again = kv.register(client)  # the worker's names outlived the old server
        assert client.store(again.worker_id, keys, [0]).num_stored == 1
        client.close()
    finally:
        kv.close()
        first.stop()
        if second is not None:
            assert second.stop() == 0
    assert shm_names(os.getpid()) == set()
