"""The Redis tier (``lmcd.server.redistier``) against real redis-server processes (tests/redis_support).

Round trips, write-once, TTL, one-round-trip contains, a killed and a hung Redis (bounded calls, the
watcher reconnecting on its own), maxmemory eviction and OOM, corrupt and foreign values, a 3-master
cluster, a password kept out of every description and log line.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from lmcd.server import redistier
from lmcd.server.l2 import CorruptObject, MissingObject, ObjectId, TierError, encode_header, verify
from lmcd.server.redistier import RedisAdapter
from tests.conftest import free_port
from tests.redis_support import RedisClusterProcs, RedisProc, RoundTripProxy

KiB, MiB = 1 << 10, 1 << 20
NS = "test-model\x1fbf16\x1fgeometry\x1f1"


def make_object(size: int, i: int = 0) -> tuple[ObjectId, bytes, memoryview]:
    oid = ObjectId(NS, 0, i.to_bytes(4, "little") + os.urandom(28))
    payload = memoryview(bytearray(os.urandom(size)))
    return oid, encode_header(oid, payload), payload


@contextmanager
def adapter_of(port: int, **kwargs: object) -> Iterator[RedisAdapter]:
    tier = RedisAdapter("resp", host="127.0.0.1", port=port, **kwargs)  # type: ignore[arg-type]
    tier.start()
    try:
        yield tier
    finally:
        tier.close()


def read_back(tier: RedisAdapter, oid: ObjectId, size: int) -> bytes:
    dest = memoryview(bytearray(size))
    header = tier.read_into(oid.name, dest)
    verify(oid, header, dest)
    return bytes(dest)


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.02)


def timed(fn: Callable[[], object]) -> tuple[float, BaseException | None]:
    t0 = time.monotonic()
    try:
        fn()
    except BaseException as exc:
        return time.monotonic() - t0, exc
    return time.monotonic() - t0, None


@pytest.mark.parametrize("size", [64 * KiB, 6 * MiB])
def test_round_trip_is_byte_exact_and_written_once(redis_server: RedisProc, size: int) -> None:
    oid, header, payload = make_object(size)
    with adapter_of(redis_server.port) as tier:
        assert tier.write(oid.name, header, payload) is True
        assert read_back(tier, oid, size) == bytes(payload)
        before = redis_server.info("stats")["total_net_input_bytes"]
        assert tier.write(oid.name, header, payload) is False
        after = redis_server.info("stats")["total_net_input_bytes"]
        assert after - before < 1024, "a second write sent the payload again"
        assert tier.contains([oid.name]) == [True]
        with redis_server.client() as c:
            assert c.ttl(b"lmcd:" + oid.name.encode()) == -1  # no ttl_seconds: no expiry
            assert c.strlen(b"lmcd:" + oid.name.encode()) == len(header) + size


def test_ttl_seconds_sets_an_expiry(redis_server: RedisProc) -> None:
    oid, header, payload = make_object(4 * KiB)
    with adapter_of(redis_server.port, ttl_seconds=300, key_prefix="ttl:") as tier:
        assert tier.write(oid.name, header, payload)
        with redis_server.client() as c:
            assert 290 <= c.ttl(b"ttl:" + oid.name.encode()) <= 300


def test_contains_is_one_round_trip(redis_server: RedisProc) -> None:
    proxy = RoundTripProxy(redis_server.port).start()
    try:
        objects = [make_object(1 * KiB, i) for i in range(20)]
        with adapter_of(proxy.port) as tier:
            for oid, header, payload in objects[::2]:
                assert tier.write(oid.name, header, payload)
            proxy.round_trips = 0
            assert tier.contains([]) == []
            assert proxy.round_trips == 0
            assert tier.contains([oid.name for oid, _, _ in objects]) == [i % 2 == 0 for i in range(20)]
            assert proxy.round_trips == 1
    finally:
        proxy.stop()


def test_killed_redis_fails_fast_and_the_tier_comes_back_by_itself(
        redis_server: RedisProc, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lmcd.server")
    timeout = 0.5
    oid, header, payload = make_object(6 * MiB)
    with adapter_of(redis_server.port, timeout_s=timeout) as tier:
        assert tier.write(oid.name, header, payload)
        redis_server.kill()
        other, other_header, other_payload = make_object(6 * MiB, 1)
        calls: list[Callable[[], object]] = [
            lambda: tier.write(other.name, other_header, other_payload),
            lambda: tier.read_into(oid.name, memoryview(bytearray(6 * MiB))),
            lambda: tier.contains([oid.name, other.name]),
            lambda: tier.delete(oid.name),
        ]
        for call in calls:
            elapsed, exc = timed(call)
            assert isinstance(exc, TierError) and not isinstance(exc, MissingObject), exc
            assert elapsed < 2 * timeout
        assert tier.usage()["available"] is False
        elapsed, exc = timed(lambda: tier.contains([oid.name]))
        assert isinstance(exc, TierError) and elapsed < 0.05, "a down tier should fail without trying to connect"

        redis_server.restart()  # empty: no persistence
        wait_until(lambda: tier.usage()["available"] is True, 10.0, "the tier available again")
        assert tier.usage()["reconnects"] == 1
        with pytest.raises(MissingObject):
            tier.read_into(oid.name, memoryview(bytearray(6 * MiB)))
        assert tier.write(other.name, other_header, other_payload)
        assert read_back(tier, other, 6 * MiB) == bytes(other_payload)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage(), [r.getMessage() for r in warnings]
    assert "serving from L1, reconnecting" in warnings[0].getMessage()
    assert any("reachable again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_hung_redis_times_out_and_the_tier_comes_back(redis_server: RedisProc) -> None:
    timeout = 0.5
    oid, header, payload = make_object(6 * MiB)
    with adapter_of(redis_server.port, timeout_s=timeout) as tier:
        assert tier.write(oid.name, header, payload)
        redis_server.pause()
        try:
            elapsed, exc = timed(lambda: tier.read_into(oid.name, memoryview(bytearray(6 * MiB))))
            assert isinstance(exc, TierError) and not isinstance(exc, MissingObject), exc
            assert elapsed < 2 * timeout
            assert tier.usage()["available"] is False
        finally:
            redis_server.resume()
        wait_until(lambda: tier.usage()["available"] is True, 10.0, "the tier available again")
        assert read_back(tier, oid, 6 * MiB) == bytes(payload)


def test_redis_down_at_start_is_no_error(redis_factory: Callable[..., RedisProc],
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lmcd.server")
    port = free_port()
    with adapter_of(port, timeout_s=0.5) as tier:
        assert tier.usage()["available"] is False
        with pytest.raises(TierError):
            tier.contains(["x"])
        assert any("unreachable" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        redis_factory(port)
        wait_until(lambda: tier.usage()["available"] is True, 10.0, "the tier available once Redis runs")
        oid, header, payload = make_object(64 * KiB)
        assert tier.write(oid.name, header, payload)
        assert tier.usage()["reconnects"] == 0  # the first connection is no reconnect


def test_maxmemory_eviction_writes_never_hang_and_evicted_objects_are_missing(
        redis_factory: Callable[..., RedisProc]) -> None:
    server = redis_factory(maxmemory="32mb", policy="allkeys-lru")
    objects = [make_object(1 * MiB, i) for i in range(100)]
    with adapter_of(server.port, timeout_s=1.0) as tier:
        written = []
        for oid, header, payload in objects:
            elapsed, exc = timed(lambda: written.append(tier.write(oid.name, header, payload)))  # noqa: B023
            assert exc is None or isinstance(exc, TierError), exc
            assert elapsed < 2.0
        assert written.count(True) >= 50
        missing = 0
        for oid, _, payload in objects:
            try:
                assert read_back(tier, oid, 1 * MiB) == bytes(payload)
            except MissingObject:
                missing += 1
        assert missing >= 50, "32 MiB of Redis cannot hold 100 MiB"
        time.sleep(redistier.SAMPLE_EVERY_S + 0.5)
        usage = tier.usage()
        assert usage["available"] is True and usage["capacity_bytes"] == 32 * MiB
        assert isinstance(usage["used_bytes"], int) and usage["used_bytes"] <= 40 * MiB
        assert isinstance(usage["objects"], int) and usage["objects"] < 40


def test_out_of_memory_refuses_a_write_and_the_tier_stays_up(redis_factory: Callable[..., RedisProc]) -> None:
    server = redis_factory(maxmemory="8mb", policy="noeviction")
    with adapter_of(server.port) as tier:
        refused = 0
        for i in range(20):
            oid, header, payload = make_object(1 * MiB, i)
            try:
                tier.write(oid.name, header, payload)
            except TierError as exc:
                assert "OOM" in str(exc) or "memory" in str(exc)
                refused += 1
        assert refused > 0
        assert tier.usage()["available"] is True


def test_max_capacity_bytes_refuses_writes_over_it(redis_server: RedisProc) -> None:
    with adapter_of(redis_server.port, max_capacity_bytes=1) as tier:  # used_memory is always above 1 B
        assert tier.usage()["capacity_bytes"] == 1
        oid, header, payload = make_object(4 * KiB)
        with pytest.raises(TierError, match="full"):
            tier.write(oid.name, header, payload)
        assert tier.contains([oid.name]) == [False]


def test_corrupt_truncated_and_foreign_values(redis_server: RedisProc) -> None:
    size = 64 * KiB
    oid, header, payload = make_object(size)
    other, other_header, other_payload = make_object(size, 1)
    key = b"lmcd:" + oid.name.encode()
    with adapter_of(redis_server.port) as tier, redis_server.client() as c:
        dest = memoryview(bytearray(size))
        c.set(key, b"garbage, not an lmcd object")
        with pytest.raises(CorruptObject):
            tier.read_into(oid.name, dest)
        c.set(key, b"xy")
        with pytest.raises(CorruptObject):
            tier.read_into(oid.name, dest)
        c.set(key, header + bytes(payload[: size // 2]))  # truncated
        with pytest.raises(CorruptObject):
            tier.read_into(oid.name, dest)
        c.set(key, header + bytes(payload))  # the right object, asked for at another size
        with pytest.raises(CorruptObject):
            tier.read_into(oid.name, memoryview(bytearray(size - 1)))
        c.set(key, other_header + bytes(other_payload))  # another object's bytes
        with pytest.raises(CorruptObject):
            verify(oid, tier.read_into(oid.name, dest), dest)
        flipped = bytearray(payload)
        flipped[size // 3] ^= 0x40
        c.set(key, header + bytes(flipped))  # bit rot
        with pytest.raises(CorruptObject, match="checksum"):
            verify(oid, tier.read_into(oid.name, dest), dest)
        tier.delete(oid.name)
        tier.delete(oid.name)  # not there: no error
        with pytest.raises(MissingObject):
            tier.read_into(oid.name, dest)
        assert tier.contains([oid.name]) == [False]


def dbsize(node: RedisProc) -> int:
    with node.client() as c:
        return int(c.dbsize())


def test_cluster_spreads_objects_over_nodes(redis_cluster: RedisClusterProcs) -> None:
    objects = [make_object(256 * KiB, i) for i in range(30)]
    tier = RedisAdapter("valkey", startup_nodes=redis_cluster.startup_nodes, cluster_mode=True, key_prefix="c:")
    tier.start()
    try:
        assert tier.usage()["available"] is True
        for oid, header, payload in objects:
            assert tier.write(oid.name, header, payload)
            assert tier.write(oid.name, header, payload) is False
        sizes = [dbsize(node) for node in redis_cluster.nodes]
        assert sum(sizes) >= 30 and sum(1 for n in sizes if n > 0) > 1, sizes
        for oid, _, payload in objects:
            assert read_back(tier, oid, 256 * KiB) == bytes(payload)
        absent = [make_object(1, 100 + i)[0] for i in range(10)]
        names = [o.name for o, _, _ in objects] + [o.name for o in absent]
        assert tier.contains(names) == [True] * 30 + [False] * 10
        for oid, _, _ in objects[:15]:
            tier.delete(oid.name)
        assert tier.contains([o.name for o, _, _ in objects]) == [False] * 15 + [True] * 15
        time.sleep(redistier.SAMPLE_EVERY_S + 0.5)
        usage = tier.usage()
        assert usage["objects"] == sum(dbsize(node) for node in redis_cluster.nodes)
        assert isinstance(usage["used_bytes"], int) and usage["used_bytes"] > 0
        assert "cluster" in tier.describe() and str(redis_cluster.nodes[0].port) in tier.describe()
    finally:
        tier.close()


def test_password_works_and_is_never_shown(redis_factory: Callable[..., RedisProc],
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "s3cret-" + os.urandom(6).hex()
    server = redis_factory(password=secret)
    oid, header, payload = make_object(64 * KiB)
    with adapter_of(server.port, password=secret) as tier:
        assert tier.write(oid.name, header, payload)
        assert read_back(tier, oid, 64 * KiB) == bytes(payload)
        shown = [tier.describe(), repr(tier), str(tier.usage())]
    wrong = "wrong-" + os.urandom(6).hex()
    with adapter_of(server.port, password=wrong, timeout_s=0.5) as tier:
        assert tier.usage()["available"] is False
        with pytest.raises(TierError):
            tier.contains([oid.name])
        time.sleep(0.5)  # a few reconnect attempts, each refused
        assert tier.usage()["available"] is False
        shown += [tier.describe(), repr(tier), str(tier.usage())]
    assert any("unreachable" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    logged = "\n".join(r.getMessage() + str(r.exc_info or "") for r in caplog.records)
    for text in [*shown, logged]:
        assert secret not in text and wrong not in text


def test_construction_checks_and_tls() -> None:
    tier = RedisAdapter("resp", host="redis.example", port=6380, tls=True, password="pw-not-shown")
    assert tier.describe() == "resp redis.example:6380 (prefix 'lmcd:', tls)" and "pw-not-shown" not in repr(tier)
    assert tier.usage()["available"] is False
    with pytest.raises(TierError):
        tier.contains(["x"])  # not started: down
    tier.close()
    with pytest.raises(ValueError, match="kind"):
        RedisAdapter("fs", host="h")
    with pytest.raises(ValueError, match="host or startup_nodes"):
        RedisAdapter("resp")
    with pytest.raises(ValueError, match="cluster_mode"):
        RedisAdapter("resp", startup_nodes=[("a", 1), ("b", 2)])
