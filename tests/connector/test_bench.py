"""`lmcache bench` runs against a real server and ends with one JSON line (figures: docs/BENCHMARKS.md)."""

import json
import subprocess
import sys

from lmcd.connector.bench import PoolRoom, plan_sizes
from tests.conftest import shm_names

MIB = 2**20


def small_bench(port: str, tokens: str) -> subprocess.CompletedProcess[str]:
    """``lmcache bench --json`` of ``tokens`` with 2 layers (4 KiB per token), 2 repeats, a short lookup."""
    return subprocess.run(
        [sys.executable, "-m", "lmcd", "bench", "--host", "127.0.0.1", "--port", port, "--json",
         "--tokens", tokens, "--repeats", "2", "--layers", "2", "--lookup-iters", "20", "--lookup-tokens", "4096"],
        capture_output=True, text=True, timeout=120,
    )


def test_bench_json_output(server_factory):
    before = shm_names()
    srv = server_factory("--l1-size-gb", "0.25")
    port = srv.url.rsplit(":", 1)[1]
    out = small_bench(port, "256,1024")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "store GB/s" in out.stdout and "lookup of 4096 tokens" in out.stdout
    result = json.loads(lines[-1])
    assert [r["tokens"] for r in result["results"]] == [256, 1024]
    for r in result["results"]:
        assert r["store_gbps"] > 0 and r["retrieve_gbps"] > 0 and r["memcpy_gbps"] > 0
    assert 0 < result["lookup_p50_ms"] <= result["lookup_p99_ms"]
    assert shm_names() <= before  # the bench's worker removed its segments


def test_bench_reports_a_pool_too_small(server_factory):
    srv = server_factory("--l1-size-gb", "0.05")
    port = srv.url.rsplit(":", 1)[1]
    out = subprocess.run([sys.executable, "-m", "lmcd", "bench", "--port", port, "--tokens", "16384"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "too small" in out.stderr and "--l1-size-gb" in out.stderr


def test_bench_on_a_small_pool_measures_what_fits_and_names_what_it_skipped(server_factory):
    """--layers 2: 4 KiB per token, chunks of 1 MiB. A 0.5 GiB pool is two slabs of 256 MiB, one of them left to
    other chunk sizes: 256 chunks for the bench. 1024 tokens (2 rounds of 4 chunks) fit; 49152 tokens (2 rounds
    of 192 chunks, 384 MiB: less than the pool, more than the bench may keep) and 100 (no whole chunk) do not."""
    srv = server_factory("--l1-size-gb", "0.5", "--touch-pool", "false")
    port = srv.url.rsplit(":", 1)[1]
    out = small_bench(port, "100,1024,49152")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["tokens"] for r in result["results"]] == [1024]
    assert result["results"][0]["store_gbps"] > 0 and result["results"][0]["repeats"] == 2
    small, big = result["skipped"]
    assert small == {"tokens": 100, "reason": "fewer tokens than one chunk (256 tokens)"}
    assert (big["tokens"], big["needed_bytes"], big["room_bytes"]) == (49152, 384 * MIB, 256 * MIB)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("skipped ")]
    assert lines == [f"skipped {s['tokens']} tokens: {s['reason']}" for s in result["skipped"]]
    assert "0.50 GiB pool" in lines[1] and "(384.0 MiB)" in lines[1] and "--l1-size-gb" in lines[1], lines[1]
    assert out.stderr == ""


def test_plan_sizes_keeps_a_size_that_fills_the_room_exactly():
    one_slab, four_slabs = PoolRoom(256 * MIB, 256 * MIB, 1), PoolRoom(1024 * MIB, 256 * MIB, 4)
    # chunks of 1 MiB: one slab is all the bench's; of four, three are (768 chunks)
    assert plan_sizes([128 * 256, 129 * 256], 256, MIB, one_slab)[0] == [128 * 256]
    measured, skipped = plan_sizes([384 * 256, 385 * 256, 300], 256, MIB, four_slabs)
    assert measured == [384 * 256, 256] and [s["tokens"] for s in skipped] == [385 * 256]
    assert plan_sizes([256], 256, 300 * MIB, four_slabs)[1][0]["room_bytes"] == 0  # a chunk bigger than a slab


def test_bench_in_process_is_retired():
    """The worker copies itself in `--transfer-mode lmcache_driven`; the old `--in-process` variant is gone."""
    out = subprocess.run([sys.executable, "-m", "lmcd", "bench", "--in-process"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "unrecognized arguments: --in-process" in out.stderr
