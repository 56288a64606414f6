"""`lmcache bench` runs against a real server and ends with one JSON line (figures: docs/BENCHMARKS.md)."""

import json
import subprocess
import sys

from tests.conftest import shm_names


def test_bench_json_output(server_factory):
    before = shm_names()
    srv = server_factory("--l1-size-gb", "0.25")
    port = srv.url.rsplit(":", 1)[1]
    out = subprocess.run(
        [sys.executable, "-m", "lmcd", "bench", "--host", "127.0.0.1", "--port", port, "--json",
         "--tokens", "256,1024", "--repeats", "2", "--layers", "2", "--lookup-iters", "20",
         "--lookup-tokens", "4096"],
        capture_output=True, text=True, timeout=120,
    )
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


def test_bench_in_process_is_retired():
    """The worker copies itself in `--transfer-mode lmcache_driven`; the old `--in-process` variant is gone."""
    out = subprocess.run([sys.executable, "-m", "lmcd", "bench", "--in-process"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "unrecognized arguments: --in-process" in out.stderr
