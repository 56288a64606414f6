"""The GPU path end to end (``-m gpu``): a real ``lmcache server --cuda on`` process, and worker
processes (tests/gpu/cuda_worker.py) that build KV the way vLLM does and go through the real
connector ``WorkerState``, checking every byte of the KV after each load.

Two designs: server copies (``engine_driven`` against a plain server: the KV is shared over CUDA
IPC and the server's staged pipeline copies) and worker copies (``lmcache_driven`` against a
``--share-pool`` server: the worker registers the pool with CUDA and its own staged pipeline
copies). Short GPU memory is made by the worker itself, which fills the GPU (tests/gpu/gpu_fill.py)
before it registers, leaving the server a chosen number of MiB.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import RunningServer
from tests.gpu.gpu_support import requires_gpu, skip_unless_gpus

pytestmark = [pytest.mark.gpu, requires_gpu]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODES = ("engine_driven", "lmcache_driven")
VMM = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def start(server_factory, mode: str):  # noqa: ANN001, ANN201
    """A server for ``mode``: plain for server copies, ``--share-pool`` for worker copies."""
    flags = ["--cuda", "on", "--l1-size-gb", "2"] + (["--share-pool", "true"] if mode == "lmcache_driven" else [])
    return server_factory(*flags)


def run_worker(server: RunningServer, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    port = server.url.rsplit(":", 1)[1]
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, "-m", "tests.gpu.cuda_worker", "--port", port, *args], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": path, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 240) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"the worker did not finish within {timeout} s:\n{out[-4000:]}") from None
    return proc.returncode, out


def result_of(proc: subprocess.Popen[str]) -> tuple[dict, str]:
    code, out = finish(proc)
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    assert code == 0 and line is not None, f"worker exited with {code}:\n{out[-6000:]}"
    return json.loads(line[len("RESULT "):]), out


def copy_lines(server: RunningServer, verb: str, tokens: list[int], timeout: float = 15.0) -> list[tuple[float, float]]:
    """(seconds, GB/s) of the server's ``<verb> N tokens in S seconds (G GB/s ...)`` lines, once one
    has come for each of ``tokens`` (they follow the worker's Commit or Loaded, or the server's own
    copy; a load that skips blocks counts only the tokens it copied)."""
    pattern = re.compile(rf"{verb} (\d+) tokens in ([0-9.]+) seconds \(([0-9.]+) GB/s")
    deadline = time.monotonic() + timeout
    while True:
        found = [(int(m.group(1)), float(m.group(2)), float(m.group(3)))
                 for m in map(pattern.search, list(server.lines)) if m]
        seen = [t for t, _, _ in found]
        if all(seen.count(t) >= tokens.count(t) for t in tokens) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert all(seen.count(t) >= tokens.count(t) for t in tokens), \
        f"'{verb} N tokens' lines for {seen}, expected {tokens}; log:\n{server.log()[-6000:]}"
    return [(seconds, gbps) for _, seconds, gbps in found]


def check_copies(server: RunningServer, result: dict, mode: str, skips: tuple[int, ...] = (0, 3, 0),
                 block_size: int = 16) -> None:
    """Every round's bytes right, the registration line, and one Stored and one Retrieved line per
    round with positive seconds and GB/s (two chunks of 256 tokens each)."""
    assert result["rounds"] == [""] * len(skips), result["rounds"]
    worker_copies = mode == "lmcache_driven"
    assert result["plane"] == ("SharedPool" if worker_copies else "SharedKV")
    where = "the worker's own memory; it copies through the shared pool" if worker_copies else \
        r"\d+ CUDA IPC allocations on GPU \d"
    server.wait_for_log(rf"Registered KV cache for GPU ID {result['pid']} with 8 layers \(.* in {where}")
    expected = {"Stored": [512] * len(skips), "Retrieved": [512 - skip * block_size for skip in skips]}
    for verb, tokens in expected.items():
        for seconds, gbps in copy_lines(server, verb, tokens):
            assert seconds > 0 and gbps > 0, f"{verb}: {seconds} s, {gbps} GB/s"


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
@pytest.mark.parametrize("mode", MODES)
def test_store_then_load_every_byte(server_factory, mode: str, layout: str) -> None:  # noqa: ANN001
    """Three rounds (the second loads with skip_blocks 3), each from fresh KV written just before."""
    server = start(server_factory, mode)
    result, _ = result_of(run_worker(server, "--mode", mode, "--layout", layout))
    check_copies(server, result, mode)


@pytest.mark.parametrize("mode", MODES)
def test_one_buffer_per_layer_as_vllm_026_allocates(server_factory, mode: str) -> None:  # noqa: ANN001
    """8 layers of 12 MiB each, each its own cudaMalloc (torch gives allocations over 10 MiB their own
    segment): server copies open 8 CUDA IPC handles; worker copies address 8 allocations."""
    server = start(server_factory, mode)
    result, _ = result_of(run_worker(server, "--mode", mode, "--buffers", "per-layer", "--blocks", "192"))
    assert result["allocations"] == 8, result
    if mode == "engine_driven":
        server.wait_for_log(r"with 8 layers \(.* in 8 CUDA IPC allocations on GPU \d")
    check_copies(server, result, mode)


@pytest.mark.parametrize("mode", MODES)
def test_chunks_of_more_than_64_blocks(server_factory, mode: str) -> None:  # noqa: ANN001
    """Block size 2 and chunks of 256 tokens: 128 blocks per chunk, so each chunk's pages take two
    launches of the page kernel; the loads skip 70 blocks (past the first launch) and 127."""
    server = start(server_factory, mode)
    result, _ = result_of(run_worker(server, "--mode", mode, "--block-size", "2", "--blocks", "600",
                                     "--skips", "0,70,127"))
    check_copies(server, result, mode, skips=(0, 70, 127), block_size=2)


def test_vmm_allocated_kv_works_with_worker_copies(server_factory) -> None:  # noqa: ANN001
    """Memory from CUDA's virtual memory API (expandable segments) cannot be shared over CUDA IPC, but
    a worker that copies itself shares no KV memory."""
    server = start(server_factory, "lmcache_driven")
    result, _ = result_of(run_worker(server, "--mode", "lmcache_driven", env=VMM))
    assert result["ipc_capable"] is False, "the KV is not VMM memory: expandable segments did not take effect"
    check_copies(server, result, "lmcache_driven")


def test_vmm_allocated_kv_is_refused_for_server_copies(server_factory) -> None:  # noqa: ANN001
    server = start(server_factory, "engine_driven")
    code, out = finish(run_worker(server, "--mode", "engine_driven", env=VMM))
    assert code != 0, out[-4000:]
    assert "expandable_segments" in out and "--enable-sleep-mode" in out, out[-4000:]
    assert "Registered KV cache" not in server.log()


def test_two_gpus_at_once(server_factory) -> None:  # noqa: ANN001
    """Both designs on each of two GPUs, four workers at once against one --share-pool server."""
    skip_unless_gpus(2)
    server = start(server_factory, "lmcache_driven")
    procs = {(device, mode): run_worker(server, "--device", str(device), "--mode", mode)
             for device in (0, 1) for mode in MODES}
    for (device, mode), proc in procs.items():
        result, _ = result_of(proc)
        assert result["rounds"] == ["", "", ""], (device, mode, result["rounds"])  # "": every byte right
        assert result["plane"] == ("SharedPool" if mode == "lmcache_driven" else "SharedKV"), (device, mode)
        server.wait_for_log(rf"Registered KV cache for GPU ID {result['pid']} with 8 layers")
    server.wait_for_log(r"CUDA IPC allocations on GPU 1 ")


def test_short_gpu_memory_leaves_the_server_fewer_staging_buffers(server_factory) -> None:  # noqa: ANN001
    """The worker leaves the server 48 MiB: room for a few 8 MiB staging buffers, not for the 8 it
    wants. The server says how many it got, and every byte still arrives."""
    server = start(server_factory, "engine_driven")
    result, out = result_of(run_worker(server, "--mode", "engine_driven", "--leave-free-mib", "48"))
    check_copies(server, result, "engine_driven")
    found = server.wait_for_log(r"had room for (\d+) of the 8 staging buffers \(8\.0 MiB each\)")
    assert 1 <= int(found.group(1)) < 8, found.group(0)


def test_no_gpu_memory_for_one_staging_buffer_refuses_the_worker(server_factory) -> None:  # noqa: ANN001
    """With 64 heads a chunk takes 64 MiB; the worker leaves the server 40 MiB, so not one staging
    buffer fits: the registration is refused with a message naming what to change, and the worker
    runs without the cache (loads report recompute) instead of crashing."""
    server = start(server_factory, "engine_driven")
    result, out = result_of(run_worker(server, "--mode", "engine_driven", "--heads", "64", "--leave-free-mib", "40",
                                       "--expect", "refused"))
    assert result["refused"] is True
    refusal = next((ln for ln in out.splitlines() if "too little free memory for server copies" in ln), "")
    assert "--gpu-memory-utilization" in refusal and "--share-pool" in refusal, out[-4000:]
    assert "Registered KV cache" not in server.log()


@pytest.mark.parametrize("mode", MODES)
def test_disk_tier_brings_gpu_chunks_back_after_a_restart(server_factory, mode: str, tmp_path) -> None:  # noqa: ANN001
    """A GPU worker stores two chunks; the server stops (flushing them to its disk tier) and a new one
    starts on the same directory; a new GPU worker's lookup prefetches them from the disk into the pinned
    pool and its load brings back every byte (server copies and worker copies alike)."""
    tier = json.dumps({"type": "fs", "base_path": str(tmp_path / "l2"), "max_capacity_gb": 1})
    flags = ["--cuda", "on", "--l1-size-gb", "2", "--l2-adapter", tier] + (
        ["--share-pool", "true"] if mode == "lmcache_driven" else [])
    server = server_factory(*flags)
    result, _ = result_of(run_worker(server, "--mode", mode, "--l2-phase", "store", "--seed", "7"))
    assert result["phase"] == "", result
    assert server.stop() == 0
    server = server_factory(*flags)
    server.wait_for_log(r"found 2 objects")
    result, _ = result_of(run_worker(server, "--mode", mode, "--l2-phase", "load", "--seed", "7"))
    assert result["phase"] == "", result
    status = httpx.get(f"{server.http_url}/status", timeout=10).json()
    assert status["l2"][0]["counters"]["hits"] == 2
