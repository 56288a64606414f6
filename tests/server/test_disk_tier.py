"""The fs L2 tier (``lmcd.server.disktier.FsAdapter``) on real files: round trips, restarts, the byte
bound, corrupt and foreign files, writers killed mid-write, a full filesystem, threads, start-up speed."""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmcd.server import l2
from lmcd.server.diskscan import object_path
from lmcd.server.disktier import FsAdapter
from tests.conftest import ROOT_DIR, run_in_private_shm

KIB, MIB = 1 << 10, 1 << 20
NAMESPACE = l2.namespace_text("test-model", "bf16", "16x8x128", 1)


def make_object(i: int, size: int, rng: random.Random | None = None) -> tuple[l2.ObjectId, bytes, bytes]:
    """Object ``i``: its id, header and random payload of ``size`` bytes."""
    oid = l2.ObjectId(NAMESPACE, 0, i.to_bytes(32, "little"))
    payload = (rng or random.Random(i)).randbytes(size)
    return oid, l2.encode_header(oid, payload), payload


def object_bytes(i: int, size: int) -> int:
    _, header, payload = make_object(i, 0)
    return len(header) + size


def store(adapter: FsAdapter, i: int, size: int) -> bytes:
    oid, header, payload = make_object(i, size)
    assert adapter.write(oid.name, header, memoryview(payload))
    return payload


def read_verified(adapter: FsAdapter, oid: l2.ObjectId, size: int) -> bytes:
    dest = bytearray(size)
    header = adapter.read_into(oid.name, memoryview(dest))
    l2.verify(oid, header, memoryview(dest))
    return bytes(dest)


def on_disk(base: Path) -> tuple[dict[str, int], list[str]]:
    """The object files under ``base`` (name -> bytes) and its temp files."""
    objects, temps = {}, []
    for path in base.glob("*/*"):
        if path.name.endswith(".kv"):
            objects[path.name.removesuffix(".kv")] = path.stat().st_size
        elif path.name.endswith(".tmp"):
            temps.append(str(path))
    return objects, temps


def assert_index_matches_disk(adapter: FsAdapter, base: Path) -> None:
    objects, temps = on_disk(base)
    assert not temps, f"temp files left: {temps}"
    usage = adapter.usage()
    assert usage["objects"] == len(objects)
    assert usage["used_bytes"] == sum(objects.values())
    assert all(adapter.contains(list(objects)))
    assert usage["used_bytes"] <= adapter.capacity_bytes


@pytest.fixture
def adapters() -> Iterator[list[FsAdapter]]:
    made: list[FsAdapter] = []
    yield made
    for adapter in made:
        adapter.close()


def started(made: list[FsAdapter], base: Path, capacity: int, min_free: int | None = 0) -> FsAdapter:
    adapter = FsAdapter(str(base), capacity, min_free)
    adapter.start()
    made.append(adapter)
    return adapter


def test_round_trip_is_byte_exact_and_a_second_write_is_skipped(tmp_path: Path, adapters: list[FsAdapter]) -> None:
    adapter = started(adapters, tmp_path / "tier", 64 * MIB)
    rng = random.Random(7)
    for i, size in enumerate([1, 64 * KIB, 64 * KIB + 3, 6 * MIB, 6 * MIB]):
        oid, header, payload = make_object(i, size, rng)
        assert adapter.write(oid.name, header, memoryview(payload))
        assert adapter.holds(oid.name)
        assert read_verified(adapter, oid, size) == payload
        path = object_path(str(tmp_path / "tier"), oid.name)
        assert os.path.getsize(path) == len(header) + size
        before = os.stat(path)
        other = rng.randbytes(size)
        assert adapter.write(oid.name, l2.encode_header(oid, other), memoryview(other)) is False
        after = os.stat(path)
        assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
        assert read_verified(adapter, oid, size) == payload
    oid, _, _ = make_object(3, 0)
    with pytest.raises(l2.CorruptObject, match="asked for"):
        adapter.read_into(oid.name, memoryview(bytearray(6 * MIB - 1)))
    with pytest.raises(l2.MissingObject):
        adapter.read_into(make_object(99, 0)[0].name, memoryview(bytearray(10)))
    assert adapter.contains([make_object(0, 0)[0].name, make_object(99, 0)[0].name]) == [True, False]
    assert_index_matches_disk(adapter, tmp_path / "tier")


def test_restart_rebuilds_the_index_in_lru_order(tmp_path: Path, adapters: list[FsAdapter]) -> None:
    base, size = tmp_path / "tier", 64 * KIB
    capacity = 5 * object_bytes(0, size)
    first = started(adapters, base, capacity)
    payloads = {i: store(first, i, size) for i in range(5)}
    read_verified(first, make_object(0, 0)[0], size)  # 0 is now the most recently used; 1 the least
    first.close()

    again = started(adapters, base, capacity)
    names = [make_object(i, 0)[0].name for i in range(5)]
    assert all(again.holds(n) for n in names) and again.contains(names) == [True] * 5
    for i in range(5):
        assert read_verified(again, make_object(i, 0)[0], size) == payloads[i]
    again.close()  # those reads went in order 0..4: 0 is now the least recently used

    again = started(adapters, base, capacity)
    store(again, 5, size)
    assert not again.holds(names[0]) and all(again.holds(n) for n in names[1:])
    again.close()

    smaller = started(adapters, base, 2 * object_bytes(0, size))  # capacity lowered between runs
    assert [smaller.holds(n) for n in names[1:]] == [False, False, False, True]  # LRU order was 1, 2, 3, 4, 5
    assert smaller.holds(make_object(5, 0)[0].name)
    assert_index_matches_disk(smaller, base)


def test_capacity_bound_evicts_exactly_the_least_recently_used(tmp_path: Path, adapters: list[FsAdapter]) -> None:
    base, size, n, k = tmp_path / "tier", 32 * KIB, 8, 3
    one = object_bytes(0, size)
    adapter = started(adapters, base, n * one + one - 1)  # room for n objects, not n + 1
    for i in range(n):
        store(adapter, i, size)
    read_verified(adapter, make_object(0, 0)[0], size)
    read_verified(adapter, make_object(2, 0)[0], size)  # LRU order now 1, 3, 4, 5, 6, 7, 0, 2
    for i in range(n, n + k):
        store(adapter, i, size)
        assert adapter.usage()["used_bytes"] == n * one
        assert_index_matches_disk(adapter, base)
    held = {i for i in range(n + k) if adapter.holds(make_object(i, 0)[0].name)}
    assert held == set(range(n + k)) - {1, 3, 4}

    huge, header, payload = make_object(100, n * one + one)
    with pytest.raises(l2.TierError, match=f"{huge.name}.*exceeds the tier's capacity"):
        adapter.write(huge.name, header, memoryview(payload))
    assert adapter.usage()["objects"] == n  # a refused write evicts nothing
    assert_index_matches_disk(adapter, base)


def test_corrupt_truncated_and_foreign_objects_are_caught(tmp_path: Path, adapters: list[FsAdapter]) -> None:
    base, size = tmp_path / "tier", 64 * KIB
    adapter = started(adapters, base, 64 * MIB)
    oids = [make_object(i, 0)[0] for i in range(5)]
    for i in range(5):
        store(adapter, i, size)
    paths = [object_path(str(base), oid.name) for oid in oids]

    with open(paths[0], "r+b") as f:  # one payload bit flipped
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(l2.CorruptObject, match="checksum"):
        read_verified(adapter, oids[0], size)
    adapter.delete(oids[0].name)
    assert not os.path.exists(paths[0]) and not adapter.holds(oids[0].name)
    adapter.delete(oids[0].name)  # absent: no error

    os.truncate(paths[1], os.path.getsize(paths[1]) - 1)
    with pytest.raises(l2.CorruptObject, match="truncated"):
        adapter.read_into(oids[1].name, memoryview(bytearray(size)))

    with open(paths[2], "wb") as f:
        f.write(random.Random(1).randbytes(size + 200))
    with pytest.raises(l2.CorruptObject, match="not an lmcd L2 object"):
        adapter.read_into(oids[2].name, memoryview(bytearray(size)))
    with open(paths[2], "wb") as f:
        f.write(b"LMCD")
    with pytest.raises(l2.CorruptObject, match="shorter than a header"):
        adapter.read_into(oids[2].name, memoryview(bytearray(size)))

    shutil.copyfile(paths[4], paths[3])  # another object's bytes under this name
    with pytest.raises(l2.CorruptObject, match="names another chunk"):
        read_verified(adapter, oids[3], size)
    for oid in oids[1:4]:
        adapter.delete(oid.name)
    assert read_verified(adapter, oids[4], size) == make_object(4, size)[2]
    assert_index_matches_disk(adapter, base)


def test_start_keeps_foreign_files_and_removes_temp_files(tmp_path: Path, adapters: list[FsAdapter],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    base = tmp_path / "tier"
    first = started(adapters, base, 64 * MIB)
    store(first, 0, 1000)
    first.close()
    name = make_object(0, 0)[0].name
    foreign = [base / "README", base / "zz", base / "ab" / "notes.txt", base / "00" / ("f" * 32 + ".kv"),
               base / name[:2] / (name + ".kv.bak")]
    for path in foreign:
        path.write_bytes(b"not ours")
    temp = base / name[:2] / f".{name}.1f.tmp"
    temp.write_bytes(b"half an object")
    with caplog.at_level(logging.INFO, logger="lmcd.l2"):
        again = started(adapters, base, 64 * MIB)
    assert all(path.read_bytes() == b"not ours" for path in foreign)
    assert not temp.exists()
    assert again.usage()["objects"] == 1 and again.holds(name)
    assert any(f"Disk tier {base}: found 1 objects" in r.getMessage() and "removed 1 temp" in r.getMessage()
               for r in caplog.records)
    assert any(r.levelno == logging.WARNING and "5 files that are not lmcd objects" in r.getMessage()
               for r in caplog.records)


def test_start_refuses_an_unusable_or_shared_directory(tmp_path: Path, adapters: list[FsAdapter]) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(l2.TierError, match=r"file/tier: cannot create or write the directory.*point the tier"):
        FsAdapter(str(tmp_path / "file" / "tier"), MIB).start()
    started(adapters, tmp_path / "tier", MIB)
    with pytest.raises(l2.TierError, match="another adapter or process uses this directory"):
        FsAdapter(str(tmp_path / "tier"), MIB).start()
    with pytest.raises(l2.TierError, match="not started"):
        FsAdapter(str(tmp_path / "other"), MIB).read_into("0" * 32, memoryview(bytearray(1)))
    default = started(adapters, tmp_path / "floor", MIB, min_free=None)
    st = os.statvfs(tmp_path)
    assert default.usage()["min_free_bytes"] == min(1 << 30, int(st.f_blocks * st.f_frsize * 0.05))
    assert default.describe() == f"fs {tmp_path / 'floor'} (1.0 MiB)"


TORN_WRITER = """
import sys
from lmcd.server import l2
from lmcd.server.disktier import FsAdapter
base, first, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
adapter = FsAdapter(base, 2 * (size + 4096), 0)
adapter.start()
payload = memoryview(bytearray(b"0123456789abcdef" * (size // 16)))
for i in range(first, first + 1000):
    payload[:8] = i.to_bytes(8, "little")
    oid = l2.ObjectId(sys.argv[4], 0, i.to_bytes(32, "little"))
    adapter.write(oid.name, l2.encode_header(oid, payload), payload)
    print(i, flush=True)
"""


def test_writer_killed_mid_write_leaves_no_partial_object(tmp_path: Path, adapters: list[FsAdapter]) -> None:
    base, size = tmp_path / "tier", 256 * MIB
    torn = 0
    for round_ in range(3):
        child = subprocess.Popen([sys.executable, "-c", TORN_WRITER, str(base), str(round_ * 1000), str(size),
                                  NAMESPACE], stdout=subprocess.PIPE, text=True, cwd=ROOT_DIR)
        try:
            assert child.stdout is not None and child.stdout.readline(), "the writer wrote no object"
            deadline = time.monotonic() + 20
            while not on_disk(base)[1] and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(random.uniform(0, 0.03))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            assert child.stdout is not None
            child.stdout.close()
        temps = on_disk(base)[1]
        torn += any(os.path.getsize(t) < size for t in temps)
    assert torn, "no write was killed half done (a temp file shorter than the object): the test proved nothing"

    adapter = started(adapters, base, 1 << 40)
    objects, temps = on_disk(base)
    assert not temps and objects
    for name in objects:
        i = next(i for r in range(3) for i in range(r * 1000, r * 1000 + 1000)
                 if l2.ObjectId(NAMESPACE, 0, i.to_bytes(32, "little")).name == name)
        payload = read_verified(adapter, l2.ObjectId(NAMESPACE, 0, i.to_bytes(32, "little")), size)
        assert payload[:8] == i.to_bytes(8, "little")
    assert_index_matches_disk(adapter, base)


FULL_FILESYSTEM = """
import json, os
from lmcd.server import l2
from lmcd.server.disktier import FsAdapter
from lmcd.server.diskscan import object_path
MIB = 1 << 20
def obj(i, size):
    oid = l2.ObjectId("full", 0, i.to_bytes(32, "little"))
    payload = os.urandom(size)
    return oid, l2.encode_header(oid, payload), payload
def temps(base):
    return [n for d in os.listdir(base) if len(d) == 2 for n in os.listdir(os.path.join(base, d)) if n.endswith(".tmp")]
def reads_ok(adapter, kept):
    for oid, payload in kept:
        dest = bytearray(len(payload))
        l2.verify(oid, adapter.read_into(oid.name, memoryview(dest)), dest)
        assert dest == payload
    return len(kept)
out = {}

# 1. the floor: writes stop while the filesystem still has min_free_bytes
floor = FsAdapter("/dev/shm/floor", 64 * MIB, 2 * MIB)
floor.start()
kept = []
for i in range(20):
    oid, header, payload = obj(i, MIB)
    try:
        floor.write(oid.name, header, memoryview(payload))
    except l2.TierError as e:
        out["floor_error"] = str(e)
        break
    kept.append((oid, payload))
st = os.statvfs("/dev/shm")
out.update(floor_written=len(kept), floor_free=st.f_bavail * st.f_frsize, floor_temps=temps("/dev/shm/floor"),
           floor_reads=reads_ok(floor, kept))
floor.close()
for oid, _ in kept:
    os.unlink(object_path("/dev/shm/floor", oid.name))

# 2. ENOSPC mid-write: the evicted victim is held open by a reader, so its space is not freed
size = 3 * MIB // 2
full = FsAdapter("/dev/shm/full", 5 * (size + 4096), 0)
full.start()
kept = []
for i in range(5):
    oid, header, payload = obj(100 + i, size)
    full.write(oid.name, header, memoryview(payload))
    kept.append((oid, payload))
readers = [open(object_path("/dev/shm/full", oid.name), "rb") for oid, _ in kept]
oid, header, payload = obj(200, size)
try:
    full.write(oid.name, header, memoryview(payload))
    out["enospc_error"] = None
except l2.TierError as e:
    out["enospc_error"] = str(e)
out.update(enospc_temps=temps("/dev/shm/full"), enospc_reads=reads_ok(full, kept[1:]),
           victim_readable=readers[0].read() [-size:] == kept[0][1], holds_new=full.holds(oid.name))
for reader in readers:
    reader.close()
out["retry"] = full.write(oid.name, header, memoryview(payload))
out["retry_reads"] = reads_ok(full, kept[2:] + [(oid, payload)])
print("RESULT " + json.dumps(out))
"""


def test_full_filesystem_refuses_writes_and_keeps_serving() -> None:
    result = run_in_private_shm(FULL_FILESYSTEM)
    assert "below the floor of 2097152" in result["floor_error"]
    assert 1 <= result["floor_written"] < 8 and result["floor_free"] >= 2 * MIB  # stopped before ENOSPC
    assert result["floor_temps"] == [] and result["floor_reads"] == result["floor_written"]
    assert result["enospc_error"] is not None and "no space writing" in result["enospc_error"]
    assert result["enospc_temps"] == [] and result["enospc_reads"] == 4
    assert result["victim_readable"] and not result["holds_new"]
    assert result["retry"] is True and result["retry_reads"] == 4


def test_threads_writing_reading_and_evicting_at_once(tmp_path: Path, adapters: list[FsAdapter]) -> None:
    base, size, names = tmp_path / "tier", 64 * KIB, 40
    adapter = started(adapters, base, 12 * object_bytes(0, size))
    oids = [make_object(i, 0)[0] for i in range(names)]
    counts = {"reads": 0, "missing": 0, "writes": 0, "skipped": 0, "over": 0}
    failures: list[BaseException] = []
    lock = threading.Lock()
    stop = time.monotonic() + 1.5

    def work(seed: int) -> None:
        rng = random.Random(seed)
        dest = bytearray(size)
        try:
            while time.monotonic() < stop:
                oid = rng.choice(oids)
                op = rng.random()
                if op < 0.45:
                    payload = rng.randbytes(size)  # every write new bytes: a mixed read would fail its checksum
                    done = adapter.write(oid.name, l2.encode_header(oid, payload), memoryview(payload))
                    key = "writes" if done else "skipped"
                elif op < 0.95:
                    try:
                        l2.verify(oid, adapter.read_into(oid.name, memoryview(dest)), memoryview(dest))
                        key = "reads"
                    except l2.MissingObject:
                        key = "missing"
                else:
                    adapter.delete(oid.name)
                    key = "deleted"
                usage = adapter.usage()
                with lock:
                    counts[key] = counts.get(key, 0) + 1
                    counts["over"] += usage["used_bytes"] + usage["writing_bytes"] > adapter.capacity_bytes  # type: ignore[operator]
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failures, failures
    assert counts["over"] == 0
    assert counts["reads"] > 100 and counts["writes"] > 100 and counts["missing"] > 0, counts
    assert_index_matches_disk(adapter, base)
    for oid in oids:
        if adapter.holds(oid.name):
            read_verified(adapter, oid, size)


def test_start_rebuilds_twenty_thousand_objects_fast(tmp_path: Path, adapters: list[FsAdapter]) -> None:
    base = tmp_path / "tier"
    started(adapters, base, 1 << 40).close()  # makes the directories
    for i in range(20_000):  # written as files, not through the adapter: this measures start(), not writes
        oid = l2.ObjectId(NAMESPACE, 0, i.to_bytes(32, "little"))
        payload = i.to_bytes(8, "little")
        with open(object_path(str(base), oid.name), "wb") as f:
            f.write(l2.encode_header(oid, payload) + payload)
    began = time.monotonic()
    again = started(adapters, base, 1 << 40)
    took = time.monotonic() - began
    assert again.usage()["objects"] == 20_000
    assert took < 10, f"start() took {took:.1f} s for 20,000 objects"
    oid = l2.ObjectId(NAMESPACE, 0, (12345).to_bytes(32, "little"))
    assert read_verified(again, oid, 8) == (12345).to_bytes(8, "little")


def test_the_module_is_importable_from_a_fresh_interpreter() -> None:
    code = "import lmcd.server.disktier as d; print(d.FsAdapter.kind)"
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60,
                          cwd="/")
    assert done.stdout.strip() == "fs", done.stderr
