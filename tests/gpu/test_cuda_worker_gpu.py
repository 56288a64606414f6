"""The GPU path end to end (``-m gpu``): a real server with ``--cuda on``, and worker processes
that build KV the way vLLM does and go through the real connector worker code (CUDA IPC
registration, event-ordered store and load), checking every byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import start_server
from tests.gpu.gpu_support import requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKER = textwrap.dedent(r"""
    import json, os, sys, time
    import numpy as np, torch
    from lmcd import protocol as p
    from lmcd.connector.settings import ConnectorSettings
    from lmcd.connector.worker import WorkerState
    from lmcd.connector.scheduler import LoadSpec, StoreSpec

    dev, port, layout = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.cuda.set_device(dev)
    L, B, N, H, D = 8, 96, 16, 8, 128
    shape = (B, H, N, 2 * D) if layout == "LBHNC" else (B, N, H, 2 * D)
    page = H * N * 2 * D * 2
    buf = torch.randint(-128, 128, (L * B * page,), dtype=torch.int8, device=dev)   # vLLM: one int8 buffer
    kv = {f"model.layers.{i}.self_attn.attn": buf[i * B * page:(i + 1) * B * page].view(torch.bfloat16).view(shape)
          for i in range(L)}
    if os.environ.get("LMCD_TEST_FILL_GPU"):  # leave the server 16-32 MiB: too little for 64 MiB of staging
        warm = torch.randint(-128, 128, (32, H * N * 2 * D * 2), dtype=torch.int8, device=dev)  # load the
        assert torch.equal(warm.clone(), warm[torch.arange(32, device=dev)])  # kernels the rounds use first
        del warm
        reserve = torch.empty(48 << 20, dtype=torch.uint8, device=dev)  # this worker's rounds use it later
        hog = []
        try:
            while True:
                hog.append(torch.empty(16 << 20, dtype=torch.uint8, device=dev))
        except RuntimeError:  # torch.OutOfMemoryError, or AcceleratorError "out of memory"
            pass
        del hog[-1]
        torch.cuda.empty_cache()  # that piece goes back to the driver; the reserve stays in torch's cache:
        del reserve
    mode = os.environ.get("LMCD_TEST_MODE", "engine_driven")
    settings = ConnectorSettings.from_extra_config({"lmcache.mp.host": "127.0.0.1", "lmcache.mp.port": port,
                                                    "lmcache.mp.mp_transfer_mode": mode})
    w = WorkerState(settings, p.Namespace("harness", "bfloat16", f"L{L}.{layout}", 1, 0), f"harness gpu{dev}")
    if os.environ.get("LMCD_TEST_TORCH_PAGES"):  # the fallback: torch's index ops instead of lmcd's kernel
        from lmcd.connector import cuda as worker_cuda
        worker_cuda.PoolCopier._kernel_launch = lambda self, bpc: None
    w.register_kv_caches(kv, B, N)
    assert w.worker_id is not None and w.cuda is not None, "registration failed"
    if w.copier is not None:
        assert (w.copier.launch is None) == bool(os.environ.get("LMCD_TEST_TORCH_PAGES")), "which page mover"
    assert (w.copier is not None) == (mode == "lmcache_driven"), "the worker copies itself iff lmcache_driven"
    bpc = 256 // N
    pages = [buf[i * B * page:(i + 1) * B * page].view(B, page) for i in range(L)]
    rng = np.random.default_rng()
    results = []
    for round_ in range(3):
        src = rng.choice(np.arange(1, B // 2), 2 * bpc, replace=False)
        dst = B // 2 + rng.choice(B // 2, 2 * bpc, replace=False)
        hashes = [os.urandom(32) for _ in range(2)]
        # new KV written by the "forward" on the current stream just before the store: the
        # server must copy it only after this work (worker event), with no host sync here
        for pg in pages:
            pg[torch.as_tensor(src, device=dev)] = torch.randint(-128, 128, (len(src), page), dtype=torch.int8,
                                                                 device=dev)
        w.store(StoreSpec(hashes, src.tolist()))
        assert (w.in_flight if w.copier is not None else w.cuda.stores_pending), "nothing was stored"
        t0 = time.monotonic()
        while not w.stores_done():
            assert time.monotonic() - t0 < 10, "store never completed"
            time.sleep(0.0005)
        expected = [pg[torch.as_tensor(src, device=dev)].clone() for pg in pages]
        before = [pg[torch.as_tensor(dst, device=dev)].clone() for pg in pages]
        skip = 3 if round_ == 1 else 0  # round 1: vLLM has the first 3 blocks of the first chunk
        spec = LoadSpec(hashes, dst.tolist(), skip, None)
        if w.copier is not None:  # the scheduler's lookup: it reports where the chunks are
            while True:
                hits, lease, slots, until = w.session.call(lambda c: c.lookup_for_load(hashes), None, "lookup")
                if hits == 2:
                    break
                assert time.monotonic() - t0 < 10, "the commit never made the chunks visible"
            spec = LoadSpec(hashes, dst.tolist(), skip, lease, slots, until)
        failed = w.load(spec, bpc)
        assert not failed, f"load failed for blocks {sorted(failed)[:4]}"
        # compared on the current stream, which waits for the copy on the GPU
        same = all(torch.equal(pg[torch.as_tensor(dst[skip:], device=dev)], e[skip:])
                   and torch.equal(pg[torch.as_tensor(dst[:skip], device=dev)], b[:skip])
                   for pg, e, b in zip(pages, expected, before))
        results.append(same)
    w.close()
    print("RESULT " + json.dumps({"results": results, "pid": os.getpid()}), flush=True)
""")


def run_worker(device: int, port: int, layout: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, "-c", WORKER, str(device), str(port), layout], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": path, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def result_of(proc: subprocess.Popen[str]) -> dict:
    out, _ = proc.communicate(timeout=180)
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line is not None, out[-4000:]
    return json.loads(line[len("RESULT "):])


@pytest.fixture
def gpu_server(request):  # noqa: ANN001, ANN201
    engine = getattr(request, "param", "kernel")
    server = start_server("--cuda", "on", "--l1-size-gb", "2", "--copy-engine", engine, "--share-pool", "true")
    yield server
    server.stop()


@pytest.mark.parametrize("gpu_server", ["staged"], indirect=True)
def test_staged_copies_fall_back_to_the_kernel_when_gpu_memory_is_short(gpu_server) -> None:  # noqa: ANN001
    port = int(gpu_server.url.rsplit(":", 1)[1])
    result = result_of(run_worker(0, port, "LBHNC", env={"LMCD_TEST_FILL_GPU": "1"}))
    assert result["results"] == [True, True, True]
    gpu_server.wait_for_log(r"too little free memory for the staging buffers .* use the kernel engine instead")


@pytest.mark.parametrize("gpu_server", ["kernel", "staged", "dma"], indirect=True)
@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
def test_worker_store_then_load_every_byte(gpu_server, layout: str) -> None:  # noqa: ANN001
    port = int(gpu_server.url.rsplit(":", 1)[1])
    result = result_of(run_worker(0, port, layout))
    assert result["results"] == [True, True, True]
    gpu_server.wait_for_log(rf"Registered KV cache for GPU ID {result['pid']} with 8 layers")
    gpu_server.wait_for_log(r"Stored 512 tokens in [0-9.]+ seconds")
    gpu_server.wait_for_log(r"Retrieved 512 tokens in [0-9.]+ seconds")


@pytest.mark.parametrize(("layout", "alloc_conf", "pages"), [("LBHNC", "", "kernel"), ("LBNHC", "", "kernel"),
                                                             ("LBHNC", "expandable_segments:True", "kernel"),
                                                             ("LBNHC", "", "torch")])
def test_worker_copies_itself_through_the_shared_pool(gpu_server, layout: str, alloc_conf: str,  # noqa: ANN001
                                                      pages: str) -> None:
    """lmcache_driven: the worker registers the shared pool with CUDA and copies itself, with no request
    before a copy; no KV memory is shared, so even VMM-allocated KV (expandable segments) works. The
    pages move with lmcd's kernel (NVRTC in the worker), or with torch's index ops where it cannot."""
    port = int(gpu_server.url.rsplit(":", 1)[1])
    env = {"LMCD_TEST_MODE": "lmcache_driven", **({"PYTORCH_CUDA_ALLOC_CONF": alloc_conf} if alloc_conf else {}),
           **({"LMCD_TEST_TORCH_PAGES": "1"} if pages == "torch" else {})}
    result = result_of(run_worker(0, port, layout, env))
    assert result["results"] == [True, True, True]
    gpu_server.wait_for_log(rf"Registered KV cache for GPU ID {result['pid']} with 8 layers .*it copies through the "
                            "shared pool")
    gpu_server.wait_for_log(r"Stored 512 tokens in [0-9.]+ seconds \([0-9.]+ GB/s")
    gpu_server.wait_for_log(r"Retrieved 512 tokens in [0-9.]+ seconds \([0-9.]+ GB/s")


def test_two_gpus_at_once(gpu_server) -> None:  # noqa: ANN001
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs; this machine has one")
    port = int(gpu_server.url.rsplit(":", 1)[1])
    procs = [run_worker(d, port, "LBHNC", {"LMCD_TEST_MODE": mode}) for d in (0, 1)
             for mode in ("engine_driven", "lmcache_driven")]
    for proc in procs:
        assert result_of(proc)["results"] == [True, True, True]


def test_vmm_allocated_kv_is_refused_with_the_setting_named(gpu_server) -> None:  # noqa: ANN001
    port = int(gpu_server.url.rsplit(":", 1)[1])
    proc = run_worker(0, port, "LBHNC", {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "expandable_segments" in out and "--enable-sleep-mode" in out, out[-3000:]
