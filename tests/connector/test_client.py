"""Client behaviour that does not need a particular server state."""

import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import zmq

from lmcd import protocol as p
from lmcd.connector.client import CacheClient, LmcdError, LookupResult, ProtocolError, ServerError, server_url
from lmcd.connector.keys import chunk_keys
from lmcd.connector.shm import CpuKVCache
from tests.conftest import connect, free_port, memfd_names, namespace, shm_names


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
        keys = chunk_keys(range(512), client.chunk_size)
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


def test_segments_live_as_long_as_their_worker_holds_them(server):
    me = os.getpid()
    before = memfd_names(me)
    kv = CpuKVCache(num_layers=3, num_blocks=4, block_size=128, num_kv_heads=1, head_size=32)
    names = {seg.name for seg in kv.segments}
    assert len(names) == 3 and memfd_names(me) == before | names and shm_names(me) == set()
    with connect(server.url, namespace(geometry=kv.geometry)) as client:
        first = kv.register(client)
        client.unregister_worker(first.worker_id)
        assert memfd_names(me) == before | names  # the owner keeps its memory
        second = kv.register(client)  # the same memory can be registered again
        assert second.worker_id != first.worker_id
    kv.close()
    assert memfd_names(me) == before




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
        keys = chunk_keys(range(256), client.chunk_size)
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


# ---------------------------------------------------------------- typed replies


def hello_ok(request: p.Hello, algorithm: str = p.HASH_ALGORITHM) -> p.Reply:
    return p.HelloReply(request.rid, "stub", p.PROTOCOL_VERSION, 256, algorithm, [], 1, "", 30.0)


class StubServer:
    """A ROUTER socket in this process that answers Hello with ``hello(request)`` (a proper HelloReply
    by default) and every other request with ``answer(request)``."""

    def __init__(self, answer: Callable[[p.Request], p.Reply],
                 hello: Callable[[p.Hello], p.Reply] = hello_ok) -> None:
        self.answer, self.hello = answer, hello
        self.ctx: zmq.Context = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.url = f"tcp://127.0.0.1:{port}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(50):
                continue
            ident, frame = self.sock.recv_multipart()
            request = p.request_decoder.decode(frame)
            reply = self.hello(request) if isinstance(request, p.Hello) else self.answer(request)
            self.sock.send_multipart([ident, p.encoder.encode(reply)])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close(0)


@pytest.fixture
def stub() -> Iterator[Callable[..., StubServer]]:
    made: list[StubServer] = []

    def make(answer: Callable[[p.Request], p.Reply], **hello: Callable[[p.Hello], p.Reply]) -> StubServer:
        made.append(StubServer(answer, **hello))
        return made[-1]

    yield make
    for server in made:
        server.close()


def test_a_reply_of_the_wrong_type_is_a_protocol_error(stub):
    srv = stub(lambda req: p.Pong(req.rid))  # a Pong is never a refusal, nor an answer to anything but Ping
    with connect(srv.url) as client:
        assert client.ping() < 5
        for call in (lambda: client.lookup([b"k" * 32]), lambda: client.store(1, [b"k" * 32], [0]),
                     lambda: client.retrieve(1, [b"k" * 32], [0]), lambda: client.release(1),
                     lambda: client.pin(1, [b"k" * 32]), lambda: client.clear(), lambda: client.status()):
            with pytest.raises(ProtocolError, match="answered Pong, expected") as err:
                call()
            assert isinstance(err.value, LmcdError) and not isinstance(err.value, AssertionError)


def test_a_hello_of_the_wrong_kind_or_hash_algorithm_is_a_protocol_error(stub):
    pong = stub(lambda req: p.Pong(req.rid), hello=lambda req: p.Pong(req.rid))
    with pytest.raises(ProtocolError, match="hello: .* answered Pong, expected HelloReply"):
        connect(pong.url)
    other_keys = stub(lambda req: p.Pong(req.rid), hello=lambda req: hello_ok(req, "sha256-chain"))
    with pytest.raises(ProtocolError, match=f"keys chunks with sha256-chain, this client with {p.HASH_ALGORITHM}"):
        connect(other_keys.url)


def test_an_error_reply_is_a_server_error_with_its_code(stub):
    srv = stub(lambda req: p.Error(req.rid, p.ErrorCode.UNKNOWN_LEASE, "lease 9 is gone"))
    with connect(srv.url) as client:
        with pytest.raises(ServerError, match="UNKNOWN_LEASE: lease 9 is gone") as err:
            client.release(9)
        assert err.value.code == p.ErrorCode.UNKNOWN_LEASE and err.value.message == "lease 9 is gone"
        rid = client.post_grant(1, 4)  # a posted request's Error is raised by collect
        with pytest.raises(ServerError, match="UNKNOWN_LEASE"):
            deadline = time.monotonic() + 5
            while client.collect(rid, 0.5) is None and time.monotonic() < deadline:
                pass


def test_the_retired_client_calls_are_gone():
    for name in ("send_raw", "reserve", "commit", "grant", "post_commit_granted", "post_release_rank"):
        assert not hasattr(CacheClient, name), name


def test_lookup_results_are_typed_and_lookup_for_load_asks_for_slots_only_from_a_shared_pool(server_factory):
    kv = CpuKVCache(num_layers=1, num_blocks=4, block_size=256, num_kv_heads=1, head_size=32)
    try:
        for flags in (("--l1-size-gb", "0.1"), ("--l1-size-gb", "0.1", "--share-pool", "true")):
            srv = server_factory(*flags)
            ns = namespace(geometry=kv.geometry)
            every_rank = namespace(ns.model, kv.geometry, rank=None)
            with connect(srv.url, ns) as worker, connect(srv.url, every_rank, role=p.Role.SCHEDULER) as scheduler:
                info = kv.register(worker)
                keys = chunk_keys(range(512), 256)
                assert worker.store(info.worker_id, keys, [0, 1]).num_stored == 2
                assert scheduler.lookup(keys, lease=False) == LookupResult(2, None)
                asked = time.monotonic()
                hit = scheduler.lookup_for_load(keys)
                assert hit.num_hit_chunks == 2 and hit.lease_id is not None
                if "--share-pool" in flags:
                    assert scheduler.hello is not None and scheduler.hello.pool_segment
                    assert hit.slots is not None and len(hit.slots) == 1 and len(hit.slots[0]) == 2
                    ttl = scheduler.hello.lease_ttl_s
                    assert asked <= hit.slots_valid_until - ttl / 2 <= time.monotonic()  # half the lease's ttl
                else:
                    assert (hit.slots, hit.slots_valid_until) == (None, 0.0)
                assert scheduler.release(hit.lease_id) == 2
                assert scheduler.lookup(keys[:1] + [b"m" * 32]).num_hit_chunks == 1
    finally:
        kv.close()


def test_registration_must_match_its_copier(server_factory):
    layout = p.KVLayout(1, 4, 256, 16384, 16384, [0], [0])
    plain = server_factory("--l1-size-gb", "0.1")
    with connect(plain.url) as client:
        with pytest.raises(ServerError, match="--share-pool") as err:  # worker copies need the shared pool
            client.register_worker(layout, p.Device.CPU, p.Copier.WORKER, [4 * 16384])
        assert err.value.code == p.ErrorCode.BAD_REQUEST
        with pytest.raises(ServerError, match="one handed-over memory fd per segment size") as err:
            client.register_worker(layout, p.Device.CPU, p.Copier.SERVER, [4 * 16384])
        assert err.value.code == p.ErrorCode.SEGMENT_ERROR
    shared = server_factory("--l1-size-gb", "0.1", "--share-pool", "true")
    kv = CpuKVCache(num_layers=1, num_blocks=4, block_size=256, num_kv_heads=1, head_size=32)
    try:
        with connect(shared.url, namespace(geometry=kv.geometry)) as client:
            with pytest.raises(ServerError, match="shares no KV memory"):
                client.register_worker(kv.layout, p.Device.CPU, p.Copier.WORKER, [kv.segments[0].nbytes],
                                       segment_fds=[kv.segments[0].fd])
            keys = chunk_keys(range(256), 256)
            server_copies = kv.register(client)
            with pytest.raises(ServerError, match="Grant, Commit, Pin and Loaded are for workers registered for "
                               "worker copies") as err:
                client.pin(server_copies.worker_id, keys)
            assert err.value.code == p.ErrorCode.BAD_REQUEST
            with pytest.raises(ServerError, match="unregister it first") as err:  # one worker per session
                client.register_worker(kv.layout, p.Device.CPU, p.Copier.WORKER, [kv.segments[0].nbytes])
            assert err.value.code == p.ErrorCode.LIMIT
            client.unregister_worker(server_copies.worker_id)
            worker_copies = client.register_worker(kv.layout, p.Device.CPU, p.Copier.WORKER, [kv.segments[0].nbytes])
            assert worker_copies.blocks_per_chunk == 1 and worker_copies.chunk_bytes == kv.page_bytes
            with pytest.raises(ServerError, match="Store and Retrieve are for workers registered for server copies"):
                client.store(worker_copies.worker_id, keys, [0])
    finally:
        kv.close()
