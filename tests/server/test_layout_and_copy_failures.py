"""A layout is validated in full at registration, and a copy's bookkeeping survives what raises
(issue 13, item 10).

The first test runs a real server: layouts the old check let through (one block, so the stride
was never checked: a stride of 2**63 made the copy raise) are refused at registration with the
field named, and the server stays healthy: a worker with a sound layout stores the same chunk,
/clear-cache and SIGTERM answer at once. The second runs the real ``CacheService`` in this
process (real pool, index, worker registry, copy threads and SHM), so that something raises
after a copy: the metrics hook, which the server gives the service (``observe_copy``), is
made to fail; every copy must still end and be answered."""

from __future__ import annotations

import os
import queue
import signal
import time
import urllib.request
from collections.abc import Callable

import pytest

from lmcd import protocol as p
from lmcd.connector.client import ServerError
from lmcd.connector.shm import CpuKVCache
from lmcd.server.config import ServerConfig
from lmcd.server.handoff import HandedFd, Peer, check_memory_fd
from lmcd.server.pool import Pool
from lmcd.server.service import CacheService
from lmcd.server.session import Session
from tests.conftest import connect, namespace
from tests.server.test_cache_behaviour import hashes

pytestmark = pytest.mark.timeout(120)


def one_block_kv() -> CpuKVCache:
    return CpuKVCache(num_layers=1, num_blocks=1, block_size=256, num_kv_heads=2, head_size=32)


def test_layouts_the_old_check_let_through_are_refused_and_the_server_stays_sound(server_factory) -> None:
    server = server_factory("--l1-size-gb", "0.0625")
    kv = one_block_kv()
    page, size, fd = kv.page_bytes, kv.segments[0].nbytes, kv.segments[0].fd
    ns = namespace(geometry=kv.geometry)
    bad = {
        "block_stride": p.KVLayout(1, 1, 256, page, 2**63, [0], [0]),  # made int64 address arithmetic overflow
        "block_stride 1": p.KVLayout(1, 1, 256, page, 2**62, [0], [0]),
        "pages of one plane would overlap": p.KVLayout(1, 1, 256, page, 1, [0], [0]),
    }
    with connect(server.url, ns) as client:
        for field, layout in bad.items():
            with pytest.raises(ServerError) as err:
                client.register_worker(layout, p.Device.CPU, p.Copier.SERVER, [size], segment_fds=[fd])
            assert err.value.code == p.ErrorCode.SEGMENT_ERROR
            assert field.split()[0] in err.value.message
        assert client.status()["workers"] == []
        info = kv.register(client)  # the sound layout of the same memory
        keys = hashes(1)
        assert client.store(info.worker_id, keys, [0]).statuses == [p.ChunkStatus.STORED]
        assert client.lookup(keys, lease=False).num_hit_chunks == 1
        started = time.monotonic()
        with urllib.request.urlopen(urllib.request.Request(f"{server.http_url}/clear-cache", method="POST"),
                                    timeout=5) as reply:
            assert reply.status == 200
        assert client.lookup(keys, lease=False).num_hit_chunks == 0
        assert client.store(info.worker_id, keys, [0]).statuses == [p.ChunkStatus.STORED]
        assert time.monotonic() - started < 2.0
    started = time.monotonic()
    assert server.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 5.0
    kv.close()


class InProcess:
    """The real service with the loop's two callbacks: replies are collected, posted calls queued."""

    def __init__(self) -> None:
        self.pool = Pool(16 << 20, touch=False)
        self.replies: list[p.Reply] = []
        self.posted: queue.Queue[Callable[[], None]] = queue.Queue()
        self.service = CacheService(ServerConfig(l1_size_gb=0.0625, max_workers=2), self.pool,
                                    lambda session, reply, op, started: self.replies.append(reply), self.posted.put)
        self.session = Session(1, b"in-process", None)

    def request(self, request: p.Request) -> p.Reply | None:
        """The reply, at once or after the copy (running what the copy posts back, as the loop does)."""
        reply = self.service.handle(self.session, request, time.perf_counter())
        if reply is not None:
            return reply
        self.posted.get(timeout=10)()
        assert len(self.replies) == 1, "a copy's request got no reply"
        return self.replies.pop()

    def close(self) -> None:
        self.service.server_copies.threads.shutdown()
        self.pool.close()


def test_a_failure_after_a_copy_still_ends_it_and_answers() -> None:
    kv = CpuKVCache(num_layers=2, num_blocks=8, block_size=128, num_kv_heads=2, head_size=32)
    loop = InProcess()
    svc = loop.service
    try:
        ns = namespace(geometry=kv.geometry)
        hello = loop.request(p.Hello(1, p.PROTOCOL_VERSION, p.Role.WORKER, ns))
        assert isinstance(hello, p.HelloReply)
        # what the handoff socket does with the worker's fds: checked, then attached to the session
        handed = [HandedFd(os.dup(s.fd), check_memory_fd(s.fd, i)) for i, s in enumerate(kv.segments)]
        assert svc.attach_handoff(hello.handoff_nonce, handed, Peer(os.getpid(), os.getuid(), os.getgid())) is None
        registered = loop.request(p.RegisterWorker(2, kv.layout, p.Device.CPU, p.Copier.SERVER,
                                                   [s.nbytes for s in kv.segments]))
        assert isinstance(registered, p.Registered)
        worker_id = registered.worker_id

        def broken_metrics(direction: str, seconds: float) -> None:
            raise RuntimeError(f"metrics hook broke on a {direction}")

        svc.observe_copy = broken_metrics
        keys = hashes(2)
        reply = loop.request(p.Store(3, worker_id, keys, [0, 1, 2, 3]))
        assert isinstance(reply, p.StoreReply) and reply.statuses == [p.ChunkStatus.STORED] * 2  # the bytes are in
        assert svc.server_copies.pending == 0 and svc.workers.workers[worker_id].inflight == 0
        assert all(entry.ready for entry in svc.index.entries.values()) and len(svc.index.lru) == 2
        reply = loop.request(p.Retrieve(4, worker_id, keys, [4, 5, 6, 7]))
        assert isinstance(reply, p.RetrieveReply) and reply.num_retrieved_chunks == 2
        assert svc.server_copies.pending == 0 and len(svc.index.lru) == 2  # unpinned: evictable again
        assert svc.clear() == 2 and loop.pool.used_bytes == 0  # nothing stuck writing or pinned
    finally:
        loop.close()
        kv.close()
