"""``LMCacheMPConnector`` inside the real ``vllm serve`` (CPU build), configured as in the quick start.

One lmcd server and one ``vllm serve`` (tiny 2-layer Llama, dummy weights) are shared by the
tests of this module, which run in order:

(a) the quick start: the kv-transfer-config JSON on the ``vllm serve`` command line; a 600-token
    prompt is stored on the first request and its two full chunks (512 tokens) are retrieved on
    the second;
(b) a second vLLM instance (offline ``LLM``) on the same lmcd server hits the chunks the first
    one stored;
(c) SIGKILL of the lmcd server: every request still succeeds (vLLM recomputes), the outage is
    logged once per connector component, not per request; a new server on the same port is
    found within seconds (re-registration, stores, hits). Then a SIGTERM restart on the same
    port, with no request in between, goes unnoticed by the requests that follow.

Ports are free ones on 127.0.0.1; the chunk size is the server's default (256 tokens), so a
600-token prompt has 2 full chunks.

What the answers are compared with (``reference``): vLLM without a connector, with its own
prefix cache, running this module's requests one at a time in the same order. KV computed
inside another prefill is not bit-identical (a bf16 GEMM rounds by batch shape), so a hit is
comparable only with a hit of the same length on KV that the same prefill computed: vLLM's own
cache hits a repeated 600-token prompt with floor(599 / 128) = 4 blocks = 512 tokens, what lmcd
loads (a 700-token prompt would hit 640 there, 512 here). A miss, or a request recomputed while
the server is down, is compared with the reference's cold run of its prompt (one prompt alone:
the same prefill wherever it runs).
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RunningServer, start_server
from tests.vllm_support import (
    VllmServer,
    free_port,
    make_tiny_llama,
    requires_vllm,
    run_llm_script,
    start_vllm_server,
    token_prompts,
)

pytestmark = requires_vllm(420)

VOCAB = 1000
MAX_TOKENS = 8
CHUNK = 256
# Distinct prompts, so no test sees another's chunks: 600 tokens = 2 full chunks + 88.
PROMPT_A, PROMPT_B, PROMPT_DOWN1, PROMPT_DOWN2, PROMPT_BACK, PROMPT_TERM = token_prompts([600] * 6, vocab=VOCAB,
                                                                                         seed=7)
ALL_PROMPTS = [PROMPT_A, PROMPT_B, PROMPT_DOWN1, PROMPT_DOWN2, PROMPT_BACK, PROMPT_TERM]
A, B, DOWN1, DOWN2, BACK, TERM = range(len(ALL_PROMPTS))
# The module's requests in order, each prompt's repeats that hit a cache (recomputed repeats while
# the server is down are cold: the first run is their reference)
REFERENCE_ORDER = [A, A, B, B, A, DOWN1, DOWN2, BACK, BACK, TERM, TERM]
HIT_LINE = r"Reqid: (\S+), Total tokens 600, LMCache hit tokens: (\d+), need to load: (\d+)"
TRANSFER_CONTEXT = "Creating transfer context (device_type=cpu, mode=engine_driven)"


def kv_transfer_config(port: int) -> dict[str, Any]:
    """The quick start's --kv-transfer-config, with a free port and loopback host."""
    return {
        "kv_connector": "LMCacheMPConnector",
        "kv_role": "kv_both",
        "kv_connector_module_path": "lmcd.connector.vllm",
        "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": port,
                                      "lmcache.mp.mp_transfer_mode": "engine_driven"},
    }


def counters(server: RunningServer) -> dict[str, Any]:
    r = httpx.get(f"{server.http_url}/status", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["counters"]


def count_lines(log: str, pattern: str) -> int:
    return len(re.findall(pattern, log, flags=re.MULTILINE))


def output_ids(answer: dict[str, Any]) -> list[int]:
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "length"
    return list(choice["token_ids"])


@dataclass
class Stack:
    """The lmcd server (replaced by the restart tests) and the ``vllm serve`` connected to it."""

    lmcd_port: int
    lmcd: RunningServer
    vllm: VllmServer
    model: Path
    old_servers: list[RunningServer]

    def start_lmcd(self) -> RunningServer:
        self.old_servers.append(self.lmcd)
        self.lmcd = start_server("--l1-size-gb", "1", "--port", str(self.lmcd_port))
        return self.lmcd


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), vocab=VOCAB)


@dataclass
class Reference:
    cold: dict[int, list[int]]  # by prompt: its first run, computed whole
    hit: dict[int, list[int]]  # by prompt run twice: its second run, 512 tokens from vLLM's cache (the first run's KV)


@pytest.fixture(scope="module")
def reference(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """vLLM without a connector, its own prefix cache on: REFERENCE_ORDER, one request at a time."""
    result = run_llm_script(tiny_model, ALL_PROMPTS, max_tokens=MAX_TOKENS, enable_prefix_caching=True,
                            schedule=[[i] for i in REFERENCE_ORDER], workdir=tmp_path_factory.mktemp("reference"),
                            timeout=300)
    runs: dict[int, list[tuple[list[int], int]]] = {}
    for i, outputs, cached in zip(REFERENCE_ORDER, result["batches"], result["cached"], strict=True):
        runs.setdefault(i, []).append((outputs[0], cached[0]))
    # every prompt's first run computed everything, every later one hit the same 512 tokens as lmcd
    assert all([n for _, n in runs[i]] == [0] + [512] * (len(runs[i]) - 1) for i in runs), runs
    assert runs[A][1][0] == runs[A][2][0]  # the same hit again: the same answer
    ref = Reference({i: r[0][0] for i, r in runs.items()}, {i: r[1][0] for i, r in runs.items() if len(r) > 1})
    assert all(len(ids) == MAX_TOKENS for ids in [*ref.cold.values(), *ref.hit.values()])
    return ref


@pytest.fixture(scope="module")
def stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    port = free_port()
    lmcd = start_server("--l1-size-gb", "2", "--port", str(port))
    stack: Stack | None = None
    try:
        vllm = start_vllm_server(tiny_model, kv_transfer_config=kv_transfer_config(port), timeout=300,
                                 workdir=tmp_path_factory.mktemp("vllm-serve"))
        try:
            stack = Stack(port, lmcd, vllm, tiny_model, [])
            yield stack
        finally:
            vllm.stop()
    finally:
        for server in [stack.lmcd, *stack.old_servers] if stack is not None else [lmcd]:
            server.stop()


# --------------------------------------------------------------------------------------------
# (a) quick start
# --------------------------------------------------------------------------------------------


def test_quick_start_stores_then_retrieves(stack: Stack, reference: Reference) -> None:
    lmcd, vllm = stack.lmcd, stack.vllm
    # The connector is loaded from the command line's JSON, registers vLLM's KV cache (2 layers).
    assert "--kv-transfer-config" in " ".join(vllm.proc.args)  # type: ignore[arg-type]
    assert "Registering kv caches!" in vllm.log()
    lmcd.wait_for_log(r"Registered KV cache for CPU ID \d+ with 2 layers", timeout=10)
    assert "lmcache.mp.mp_transfer_mode = engine_driven" in vllm.log()
    assert vllm.log().count(TRANSFER_CONTEXT) == 1  # the worker, at registration: the server copies
    before = counters(lmcd)

    first = output_ids(vllm.completions(PROMPT_A, MAX_TOKENS))
    after_first = counters(lmcd)
    assert after_first["stored_chunks"] - before["stored_chunks"] == 2
    assert after_first["retrieved_chunks"] == before["retrieved_chunks"]
    # counted before the store's reply, logged after it: the line may reach the log reader a moment later
    lmcd.wait_for_log(r"Stored \d+ tokens in [\d.]+ seconds", timeout=5)
    assert "Retrieved" not in lmcd.log()
    miss = re.findall(HIT_LINE, vllm.log())
    assert miss and miss[-1][1:] == ("0", "0"), miss

    second = output_ids(vllm.completions(PROMPT_A, MAX_TOKENS))
    after_second = counters(lmcd)
    lmcd.wait_for_log(r"Retrieved 512 tokens in [\d.]+ seconds", timeout=5)
    assert after_second["retrieved_chunks"] - after_first["retrieved_chunks"] == 2
    assert after_second["stored_chunks"] == after_first["stored_chunks"]  # nothing new to store
    hit = re.findall(HIT_LINE, vllm.log())
    # 512 cached tokens, all loaded (vLLM's own prefix cache is off).
    assert hit[-1][1:] == ("512", "512"), hit
    assert hit[-1][0] != miss[-1][0]

    assert first == reference.cold[A]
    assert second == reference.hit[A]


# --------------------------------------------------------------------------------------------
# (b) two vLLM instances, one lmcd server
# --------------------------------------------------------------------------------------------


def test_second_instance_hits_chunks_of_the_first(stack: Stack, reference: Reference, tmp_path: Path) -> None:
    lmcd, vllm = stack.lmcd, stack.vllm
    before = counters(lmcd)
    a = output_ids(vllm.completions(PROMPT_B, MAX_TOKENS))
    stored = counters(lmcd)
    assert stored["stored_chunks"] - before["stored_chunks"] == 2

    # Instance B: another vLLM process (offline LLM API) with the same connector config.
    other = run_llm_script(stack.model, [PROMPT_B], kv_transfer_config=kv_transfer_config(stack.lmcd_port),
                           max_tokens=MAX_TOKENS, workdir=tmp_path, timeout=300)
    after = counters(lmcd)
    registered = re.findall(r"Registered KV cache for CPU ID (\d+) with 2 layers", lmcd.log())
    assert len(set(registered)) >= 2, registered  # the serve worker and the offline worker
    hits = re.findall(HIT_LINE, other["log"])
    assert hits and hits[0][1:] == ("512", "512"), hits
    assert after["retrieved_chunks"] - stored["retrieved_chunks"] == 2
    assert after["stored_chunks"] == stored["stored_chunks"]  # B found everything cached
    assert TRANSFER_CONTEXT in other["log"]
    assert a == reference.cold[B]
    assert other["outputs"][0][0] == reference.hit[B]  # the second instance loaded the first one's KV


# --------------------------------------------------------------------------------------------
# (c) server failure and return
# --------------------------------------------------------------------------------------------


def server_warnings(log: str, port: int) -> list[str]:
    """Who logged "LMCache server at ... failed", one entry per warning line."""
    pattern = rf"LMCache WARNING: LMCache server at tcp://127\.0\.0\.1:{port} failed \(.*\); (.+?) continues without"
    return re.findall(pattern, log)


def test_killed_server_recompute_then_reconnect(stack: Stack, reference: Reference) -> None:
    vllm, port = stack.vllm, stack.lmcd_port
    assert server_warnings(vllm.log(), port) == []
    # Both connector components (scheduler: lookups; worker: stores/loads) are connected and busy.
    assert output_ids(vllm.completions(PROMPT_A, MAX_TOKENS)) == reference.hit[A]
    assert re.findall(HIT_LINE, vllm.log())[-1][1:] == ("512", "512")
    stack.lmcd.stop(signal.SIGKILL)
    assert stack.lmcd.proc.returncode == -signal.SIGKILL

    # While the server is dead: every request answers, recomputed whole (A too: vLLM's own
    # prefix cache is off), so with the tokens of the reference's cold runs.
    requests = [(PROMPT_DOWN1, reference.cold[DOWN1]), (PROMPT_DOWN2, reference.cold[DOWN2]),
                (PROMPT_DOWN1, reference.cold[DOWN1]), (PROMPT_A, reference.cold[A]),
                (PROMPT_DOWN2, reference.cold[DOWN2]), (PROMPT_DOWN1, reference.cold[DOWN1])]
    times = []
    for prompt, expected in requests:
        started = time.monotonic()
        assert output_ids(vllm.completions(prompt, MAX_TOKENS, timeout=90)) == expected
        times.append(time.monotonic() - started)
    assert vllm.alive()
    # The first request finds the server gone (at most one request timeout, 10 s, per component);
    # later ones do not wait on it (a reconnect attempt is at most a 0.5 s connect, once a second).
    assert times[0] < 45 and max(times[1:]) < 8, times
    # Once per connector component (scheduler, worker) for the whole outage, not once per request.
    warned = server_warnings(vllm.log(), port)
    assert sorted(warned) == ["the vLLM scheduler", "vLLM worker rank 0"], warned
    log = vllm.log()
    miss_lines = re.findall(HIT_LINE, log)[-len(requests):]
    assert all(m[1:] == ("0", "0") for m in miss_lines), miss_lines  # nothing came from a cache

    # A new server on the same port: found again within seconds, KV memory registered again.
    new = stack.start_lmcd()
    deadline = time.monotonic() + 20
    stored = 0
    while time.monotonic() < deadline:
        assert output_ids(vllm.completions(PROMPT_BACK, MAX_TOKENS)) == reference.cold[BACK]  # a miss
        stored = counters(new)["stored_chunks"]
        if stored:
            break
        time.sleep(0.5)
    assert stored == 2, new.log()
    new.wait_for_log(r"Registered KV cache for CPU ID \d+ with 2 layers", timeout=1)
    assert "is back: the vLLM scheduler uses the cache again" in vllm.log()
    assert "is back: vLLM worker rank 0 uses the cache again" in vllm.log()

    again = output_ids(vllm.completions(PROMPT_BACK, MAX_TOKENS))
    assert again == reference.hit[BACK]
    new.wait_for_log(r"Retrieved 512 tokens in", timeout=5)
    assert counters(new)["retrieved_chunks"] == 2
    assert re.findall(HIT_LINE, vllm.log())[-1][1:] == ("512", "512")
    # Still one warning per component: the recovery did not log failures.
    assert len(server_warnings(vllm.log(), port)) == 2


def test_sigterm_restart_on_same_port_is_transparent(stack: Stack, reference: Reference) -> None:
    vllm, port = stack.vllm, stack.lmcd_port
    warnings_before = len(server_warnings(vllm.log(), port))
    assert stack.lmcd.stop(signal.SIGTERM) == 0
    assert "LMCache cache server stopped" in stack.lmcd.log()
    new = stack.start_lmcd()

    first = output_ids(vllm.completions(PROMPT_TERM, MAX_TOKENS))
    c = counters(new)
    assert c["stored_chunks"] == 2, new.log()
    new.wait_for_log(r"Registered KV cache for CPU ID \d+ with 2 layers", timeout=1)
    second = output_ids(vllm.completions(PROMPT_TERM, MAX_TOKENS))
    new.wait_for_log(r"Retrieved 512 tokens in", timeout=5)
    assert counters(new)["retrieved_chunks"] == 2
    assert [line[1:] for line in re.findall(HIT_LINE, vllm.log())[-2:]] == [("0", "0"), ("512", "512")]
    assert first == reference.cold[TERM]
    assert second == reference.hit[TERM]
    # The restart was repaired on the spot (new Hello, new registration): no outage was logged.
    assert len(server_warnings(vllm.log(), port)) == warnings_before
