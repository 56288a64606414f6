"""The connector inside a REAL vLLM on the GPU (``-m gpu``): offline ``vllm.LLM`` and ``vllm serve``,
a config-only Llama-3-8B with dummy weights, CUDA graphs on, against real ``lmcache server`` processes.

vLLM starts are the expensive part (about a minute each), so the module starts five drivers at
once (tests/gpu/vllm_gpu_driver.py, one vLLM each, sharing the GPU with a fixed KV cache size):
  server        server copies (engine_driven, CUDA IPC): repeat, prefix, kill
  worker        worker copies (lmcache_driven, --share-pool): repeat, prefix, kill
  worker_sleep  worker copies, vLLM's sleep-mode allocator (CUDA VMM memory): repeat
  server_sleep  server copies, sleep mode: must be refused at registration with the message
  serve         ``vllm serve`` + /v1/completions, server copies
and each test reads one driver's result.json and log. A hit is compared with vLLM's own prefix
cache hitting the same number of tokens from the same producer prefill (the driver's docstring
says how the lengths are chosen), and every loaded chunk's bytes with what was stored (digests).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.gpu.gpu_support import requires_gpu
from tests.gpu.vllm_gpu import ROOT, gpu_vllm_env, vllm_gpu_problem
from tests.vllm_support import check_loaded_kv

pytestmark = [pytest.mark.gpu, requires_gpu, pytest.mark.timeout(600)]
DRIVERS = {
    "server": ["--mode", "engine_driven"],
    "worker": ["--mode", "lmcache_driven"],
    "worker_sleep": ["--mode", "lmcache_driven", "--sleep-mode", "--scenarios", "repeat"],
    "server_sleep": ["--mode", "engine_driven", "--sleep-mode", "--scenarios", "repeat"],
    "serve": ["--mode", "engine_driven", "--serve"],
}
MODES = {"server": "engine_driven", "worker": "lmcache_driven"}
DRIVERS_S = 400


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, Any], str]]:
    """Every driver, started at once; {name: (result.json, its log)} once all have ended."""
    problem = vllm_gpu_problem()
    if problem is not None:
        pytest.skip(f"real-vLLM GPU test: {problem}")
    base = tmp_path_factory.mktemp("vllm-gpu")
    procs = {}
    for name, args in DRIVERS.items():
        out = base / name
        out.mkdir()
        log = open(out / "driver.log", "wb")  # noqa: SIM115  (closed below)
        procs[name] = (subprocess.Popen([sys.executable, "-m", "tests.gpu.vllm_gpu_driver", "--out", str(out), *args],
                                        cwd=ROOT, env=gpu_vllm_env(), stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True), log, out)
    deadline = time.monotonic() + DRIVERS_S
    results = {}
    for name, (proc, log, out) in procs.items():
        try:
            proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(30)
        log.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)  # the driver's vLLM children, if any are left
        text = (out / "driver.log").read_text(errors="replace")
        more = sorted(out.glob("server-*.log")) + sorted(out.glob("vllm-serve-*.log"))
        server_logs = "".join(p.read_text(errors="replace") for p in more)
        path = out / "result.json"
        result = json.loads(path.read_text()) if path.exists() else {"error": "no result.json"}
        results[name] = (result, text + "\n" + server_logs)
    return results


def result_of(runs: dict[str, tuple[dict[str, Any], str]], name: str) -> tuple[dict[str, Any], str]:
    result, log = runs[name]
    assert "error" not in result, f"driver {name} failed: {result['error']}\n{log[-8000:]}"
    return result, log


def section(log: str, start: str, end: str | None = None) -> str:
    """The part of a driver's log between two ``LMCD_PHASE`` lines."""
    head = log.split(f"LMCD_PHASE {start}", 1)[-1]
    return head.split(f"LMCD_PHASE {end}", 1)[0] if end else head


def retrieved(step: dict[str, Any], after: dict[str, Any]) -> int:
    return int(after["retrieved_chunks"]) - int(step["counters_before"]["retrieved_chunks"])


@pytest.mark.parametrize("design", ["server", "worker"])
def test_a_repeated_prompt_is_stored_then_loaded_and_equals_vllms_own_prefix_cache(runs, design: str) -> None:
    result, log = result_of(runs, design)
    mode = MODES[design]
    r = result["repeat"]
    assert r["cold"]["cached"] == 0
    assert r["stored_after_cold"] >= 32, "the cold run's 32 chunks were not all stored"
    assert r["vllm_hit"]["cached"] == 8192 and r["lmcd_hit"]["cached"] == 8192, r
    assert retrieved(r["lmcd_hit"], r["counters_after"]) == 32
    assert r["lmcd_hit"]["tokens"] == r["vllm_hit"]["tokens"], "lmcd's hit and vLLM's own hit disagree"
    assert f"Creating transfer context (device_type=cuda, mode={mode})" in log
    assert re.search(r"Registered KV cache for GPU ID \d+ with 32 layers", log), log[-6000:]
    assert re.search(r"Stored \d+ tokens in [0-9.]+ seconds", log) and "Retrieved 8192 tokens in" in log
    assert "Graph capturing finished" in log, "CUDA graphs were not captured"
    assert re.search(r"LMCache hit tokens: 8192, need to load: 8192", log)
    loaded = check_loaded_kv(section(log, "repeat", "kill"))  # every loaded byte is what was stored
    assert len(loaded) >= 32 + 16


@pytest.mark.parametrize("design", ["server", "worker"])
def test_a_prompt_sharing_only_a_prefix_loads_that_prefix(runs, design: str) -> None:
    result, _ = result_of(runs, design)
    r = result["prefix"]
    assert r["lmcd_hit"]["cached"] == 4096 and r["vllm_hit"]["cached"] == 4096, r
    assert retrieved(r["lmcd_hit"], r["warm_head"]["counters_before"]) == 16
    assert r["lmcd_hit"]["tokens"] == r["vllm_hit"]["tokens"]


@pytest.mark.parametrize("design", ["server", "worker"])
def test_the_server_killed_mid_run_costs_recompute_and_a_restarted_server_is_used_again(runs, design: str) -> None:
    result, log = result_of(runs, design)
    k = result["kill"]
    assert k["killed_before_end"], f"the server was not killed while vLLM ran ({k.get('generate_s')} s)"
    assert len(k["outputs"]) == 8 and all(len(o["tokens"]) == 16 for o in k["outputs"]), k["outputs"]
    last = k["after_restart"][-1]
    assert last["hit"]["cached"] == 4096, k["after_restart"]
    assert int(last["counters_after"]["retrieved_chunks"]) >= 16  # counted by the new server
    assert "EngineDeadError" not in log and "EngineCore encountered a fatal error" not in log


def test_sleep_mode_memory_works_with_worker_copies(runs) -> None:
    result, log = result_of(runs, "worker_sleep")
    r = result["repeat"]
    assert r["lmcd_hit"]["cached"] == 8192 and r["lmcd_hit"]["tokens"] == r["vllm_hit"]["tokens"], r
    assert "Creating transfer context (device_type=cuda, mode=lmcache_driven)" in log
    check_loaded_kv(section(log, "repeat"))


def test_sleep_mode_memory_is_refused_by_server_copies_with_the_fix_named(runs) -> None:
    result, log = runs["server_sleep"]
    assert "init_error" in result, f"vLLM started with server copies of VMM memory: {result}"
    assert "cannot share" in log and "--enable-sleep-mode" in log and "--share-pool" in log, log[-6000:]


def test_vllm_serve_completions_store_then_load(runs) -> None:
    result, log = result_of(runs, "serve")
    assert len(result["cold"]) == 8 and result["stored"] >= 16
    assert result["retrieved"] == 16, result
    assert result["lmcd_hit"] == result["vllm_hit"], "lmcd's hit and vLLM's own hit disagree"
    assert "Creating transfer context (device_type=cuda, mode=engine_driven)" in log


def test_vllms_kv_allocations_are_shared_with_the_server(runs) -> None:
    """Server copies open every allocation under vLLM's KV (0.32 on the GPU: one for all 32 layers;
    0.26: one per layer; the harness tests both), named in the server's registration line."""
    _, log = result_of(runs, "server")
    lines = [ln for ln in log.splitlines() if "Registered KV cache for GPU" in ln]
    shared = re.compile(r"with 32 layers \(.* \d+ CUDA IPC allocations on GPU \d")
    assert lines and all(shared.search(ln) for ln in lines), lines
