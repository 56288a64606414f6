"""``LMCacheMPConnector`` inside the real ``vllm serve`` (CPU build), configured as in the quick start.

One lmcd server and one ``vllm serve`` (tiny 2-layer Llama, dummy weights) are shared by the
tests of this module, which run in order:

(a) the quick start: the kv-transfer-config JSON on the ``vllm serve`` command line; a 700-token
    prompt is stored on the first request and its two full chunks (512 tokens) are retrieved on
    the second; both answers equal those of vLLM without any connector;
(b) a second vLLM instance (offline ``LLM``) on the same lmcd server hits the chunks the first
    one stored, and answers the same;
(c) SIGKILL of the lmcd server: every request still succeeds (vLLM recomputes), the outage is
    logged once per connector component, not per request; a new server on the same port is
    found within seconds (re-registration, stores, hits). Then a SIGTERM restart on the same
    port, with no request in between, goes unnoticed by the requests that follow.

Ports are free ones on 127.0.0.1; the chunk size is the server's default (256 tokens), so a
700-token prompt has 2 full chunks.
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
# Distinct prompts, so no test sees another's chunks: 700 tokens = 2 full chunks + 188.
PROMPT_A, PROMPT_B, PROMPT_DOWN1, PROMPT_DOWN2, PROMPT_BACK, PROMPT_TERM = token_prompts([700] * 6, vocab=VOCAB,
                                                                                         seed=7)
ALL_PROMPTS = [PROMPT_A, PROMPT_B, PROMPT_DOWN1, PROMPT_DOWN2, PROMPT_BACK, PROMPT_TERM]
HIT_LINE = r"Reqid: (\S+), Total tokens 700, LMCache hit tokens: (\d+), need to load: (\d+)"


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


@pytest.fixture(scope="module")
def baseline(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[list[int]]:
    """Greedy outputs of every prompt from vLLM without a connector (offline API, same seed)."""
    result = run_llm_script(tiny_model, ALL_PROMPTS, max_tokens=MAX_TOKENS, sequential=True,
                            workdir=tmp_path_factory.mktemp("baseline"), timeout=300)
    outputs = result["outputs"][0]
    assert len(outputs) == len(ALL_PROMPTS) and all(len(ids) == MAX_TOKENS for ids in outputs)
    return outputs


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


def test_quick_start_stores_then_retrieves(stack: Stack, baseline: list[list[int]]) -> None:
    lmcd, vllm = stack.lmcd, stack.vllm
    # The connector is loaded from the command line's JSON, registers vLLM's KV cache (2 layers).
    assert "--kv-transfer-config" in " ".join(vllm.proc.args)  # type: ignore[arg-type]
    assert "Registering kv caches!" in vllm.log()
    lmcd.wait_for_log(r"Registered KV cache for CPU ID \d+ with 2 layers", timeout=10)
    assert "lmcache.mp.mp_transfer_mode = engine_driven" in vllm.log()
    before = counters(lmcd)

    first = output_ids(vllm.completions(PROMPT_A, MAX_TOKENS))
    after_first = counters(lmcd)
    assert after_first["stored_chunks"] - before["stored_chunks"] == 2
    assert after_first["retrieved_chunks"] == before["retrieved_chunks"]
    assert re.search(r"Stored \d+ tokens in [\d.]+ seconds", lmcd.log())
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

    assert first == second == baseline[0]


# --------------------------------------------------------------------------------------------
# (b) two vLLM instances, one lmcd server
# --------------------------------------------------------------------------------------------


def test_second_instance_hits_chunks_of_the_first(stack: Stack, baseline: list[list[int]],
                                                  tmp_path: Path) -> None:
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
    assert other["outputs"][0][0] == a == baseline[1]


# --------------------------------------------------------------------------------------------
# (c) server failure and return
# --------------------------------------------------------------------------------------------


def server_warnings(log: str, port: int) -> list[str]:
    """Who logged "LMCache server at ... failed", one entry per warning line."""
    pattern = rf"LMCache WARNING: LMCache server at tcp://127\.0\.0\.1:{port} failed \(.*\); (.+?) continues without"
    return re.findall(pattern, log)


def test_killed_server_recompute_then_reconnect(stack: Stack, baseline: list[list[int]]) -> None:
    vllm, port = stack.vllm, stack.lmcd_port
    assert server_warnings(vllm.log(), port) == []
    # Both connector components (scheduler: lookups; worker: stores/loads) are connected and busy.
    assert output_ids(vllm.completions(PROMPT_A, MAX_TOKENS)) == baseline[0]
    stack.lmcd.stop(signal.SIGKILL)
    assert stack.lmcd.proc.returncode == -signal.SIGKILL

    # While the server is dead: every request answers, with the baseline's tokens.
    requests = [(PROMPT_DOWN1, baseline[2]), (PROMPT_DOWN2, baseline[3]), (PROMPT_DOWN1, baseline[2]),
                (PROMPT_A, baseline[0]), (PROMPT_DOWN2, baseline[3]), (PROMPT_DOWN1, baseline[2])]
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
        assert output_ids(vllm.completions(PROMPT_BACK, MAX_TOKENS)) == baseline[4]
        stored = counters(new)["stored_chunks"]
        if stored:
            break
        time.sleep(0.5)
    assert stored == 2, new.log()
    new.wait_for_log(r"Registered KV cache for CPU ID \d+ with 2 layers", timeout=1)
    assert "is back: the vLLM scheduler uses the cache again" in vllm.log()
    assert "is back: vLLM worker rank 0 uses the cache again" in vllm.log()

    again = output_ids(vllm.completions(PROMPT_BACK, MAX_TOKENS))
    assert again == baseline[4]
    new.wait_for_log(r"Retrieved 512 tokens in", timeout=5)
    assert counters(new)["retrieved_chunks"] == 2
    assert re.findall(HIT_LINE, vllm.log())[-1][1:] == ("512", "512")
    # Still one warning per component: the recovery did not log failures.
    assert len(server_warnings(vllm.log(), port)) == 2


def test_sigterm_restart_on_same_port_is_transparent(stack: Stack, baseline: list[list[int]]) -> None:
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
    assert first == second == baseline[5]
    # The restart was repaired on the spot (new Hello, new registration): no outage was logged.
    assert len(server_warnings(vllm.log(), port)) == warnings_before
