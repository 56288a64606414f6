"""The connector end to end, against the REAL vLLM CPU build and real ``lmcd server`` processes.

A tiny 2-layer Llama (make_tiny_llama's config with random weights written by this module, see
``write_random_weights``: dummy weights make outputs blind to the prefix), token-id prompts,
greedy. vLLM's CPU block size is 128 tokens, the server's chunk size 256.

What a hit is compared with. A bf16 GEMM rounds differently for another batch shape, so KV
computed inside another prefill is not bit-identical, and a request that loads KV is not
comparable with vLLM computing the whole prompt (vLLM's own prefix cache is not either). The
reference of a hit is vLLM's OWN prefix cache hitting the same number of tokens, computed by the
same producer prefill: a vLLM without connector, prefix caching on, running the same requests in
the same order and batches (``reference``), never emptying its cache between a producer and its
consumer. The two hits have the same length where ``L mod 256`` is in [1, 128]::

    vLLM's own cache, a repeat:   floor((L - 1) / 128) blocks of 128
    lmcd:                          min(floor(L / 256) * 256, L - 1) tokens
    L = 600: 4 blocks = 512 = 2 chunks;  L = 700: 5 blocks = 640 but 2 chunks = 512 (not comparable)

so the prompts below have 300, 600, 800 and 850 tokens. A cold request (a miss) is compared with
the reference's cold run of the same prompt at the same place. Two kinds of request have no
vLLM equivalent, and are checked by their scheduler lines, the server's counters, determinism
(the same situation again gives the same output) and the bytes loaded: a whole-prompt hit
(L = 512: lmcd loads 511 tokens, vLLM's own cache 384) and a request whose first block vLLM has
locally from ANOTHER prefill (``p800_partly_local``).

Bytes loaded: the served vLLM runs ``tests.connector.digest_connector`` (``LMCacheMPConnector``
logging a digest of every chunk's blocks when it is stored and when it is loaded), so every load
is checked to bring back exactly the bytes that were stored; ``worker_copies`` does the same with
the worker copying through a shared pool (``lmcache_driven``).

vLLM starts are the expensive part (~30-60 s each), so the module makes five:

- ``reference``: offline ``LLM`` without a connector, prefix caching on: the requests of
  ``served`` (sequential), then those of ``embedded`` (one batch per round);
- ``served``: ``vllm serve`` with the digest connector (server copies) against a server started
  here, vLLM's own prefix caching ON and the dev-mode ``POST /reset_prefix_cache`` before the
  requests that must not find their prompt locally. Requests go one at a time and every step
  records its outputs, the server's counters and the new lines of both logs;
- ``worker_copies``: offline ``LLM`` with the digest connector, ``lmcache_driven``, against a
  server started with ``--share-pool true``;
- ``embedded`` and the run in ``test_embedded_reads_lmcache_config_file``: offline ``LLM`` with
  ``LMCacheConnectorV1`` and no server running (the connector starts one), sized from LMCache's
  environment variables or from the YAML file named by ``LMCACHE_CONFIG_FILE``.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmcd.connector.keys import chunk_keys
from tests.conftest import RunningServer, memfd_names, shm_names, start_server
from tests.vllm_support import (
    RESET,
    RESULT_PREFIX,
    ScheduleItem,
    check_loaded_kv,
    free_port,
    kv_digests,
    make_tiny_llama,
    requires_vllm,
    run_llm_script,
    start_vllm_server,
    token_prompts,
    write_random_weights,
)

pytestmark = requires_vllm(600)

VOCAB = 1000
MAX_TOKENS = 8
CHUNK = 256
BLOCK = 128

P600, P300, P800, P512 = token_prompts([600, 300, 800, 512], vocab=VOCAB, seed=11)
_SHARED = token_prompts([512], vocab=VOCAB, seed=12)[0]  # 4 blocks, 2 chunks
_TAIL_A, _TAIL_B = token_prompts([88, 338], vocab=VOCAB, seed=13)
SHARED_A = _SHARED + _TAIL_A  # 600 tokens: its 2 chunks are the shared prefix
SHARED_B = _SHARED + _TAIL_B  # 850 tokens: chunks 0-1 shared, chunk 2 its own
P800_HEAD = P800[:200]  # one full vLLM block (128 tokens) of P800, no full chunk
# P600 with other first two chunks: the control that outputs depend on the KV that is loaded
P600_OTHER_HEAD = token_prompts([512], vocab=VOCAB, seed=14)[0] + P600[512:]
assert SHARED_A[:512] == SHARED_B[:512] and SHARED_A[512] != SHARED_B[512]

PROMPTS: dict[str, list[int]] = {
    "p600": P600, "p300": P300, "p800": P800, "p512": P512, "shared_a": SHARED_A, "shared_b": SHARED_B,
    "p800_head": P800_HEAD, "p600_other_head": P600_OTHER_HEAD,
}
PROMPT_NAMES = list(PROMPTS)


@dataclass(frozen=True)
class Request:
    """One request of ``served``: what its scheduler line must say, and what its output must equal."""

    step: str
    prompt: str
    reset: bool  # vLLM's own prefix cache is emptied before it (so what it hits comes from lmcd)
    sched: tuple[int, int, int]  # (total tokens, lmcd hit tokens, need to load)
    reference: str | None  # the reference request it must answer like; None: no vLLM equivalent


# (prompt, round 0 scheduler line, chunks stored in round 0, round 1 scheduler line)
EXPECTED_ROUNDS = [
    ("p300", (300, 0, 0), 1, (300, 256, 256)),
    ("p800", (800, 0, 0), 3, (800, 768, 768)),
    ("p512", (512, 0, 0), 2, (512, 512, 511)),  # whole prompt hit: the last token is computed
    ("shared_a", (600, 0, 0), 2, (600, 512, 512)),
    ("shared_b", (850, 512, 512), 1, (850, 768, 768)),  # round 0: loads A's two shared chunks
]

REQUESTS: list[Request] = [
    # (1) one long prompt twice: stored by the first, loaded by the second; the control prompt
    Request("p600_first", "p600", True, (600, 0, 0), "p600_first"),
    Request("p600_second", "p600", True, (600, 512, 512), "p600_second"),
    Request("p600_other_head", "p600_other_head", True, (600, 0, 0), "p600_other_head"),
    # (2) round 0 stores (the shared-prefix prompt B already hits A's chunks), round 1 hits all
    *[Request(f"{name}_r0", name, True, r0, f"{name}_r0") for name, r0, _, _ in EXPECTED_ROUNDS],
    *[Request(f"{name}_r1", name, True, r1, None if name == "p512" else f"{name}_r1")
      for name, _, _, r1 in EXPECTED_ROUNDS],
    Request("p512_again", "p512", True, (512, 512, 511), None),
    # (3) vLLM's own prefix cache ON: holding what the server has, then part of it
    Request("p600_loaded", "p600", True, (600, 512, 512), "p600_loaded"),  # loads from the server
    Request("p600_local", "p600", False, (600, 512, 0), "p600_local"),  # vLLM has the 4 blocks itself
    Request("p800_head", "p800_head", True, (200, 0, 0), "p800_head"),  # vLLM now has P800's block 0
    Request("p800_partly_local", "p800", False, (800, 768, 640), None),
    Request("p800_head_again", "p800_head", True, (200, 0, 0), "p800_head"),
    Request("p800_partly_local_again", "p800", False, (800, 768, 640), None),
]
BY_STEP = {r.step: r for r in REQUESTS}

# The reference runs the served requests in order up to p600_local, without emptying its cache
# (each hit finds the blocks of the same producer as the lmcd hit); then, emptied, P800's head
# cold; then the embedded rounds (one batch each, like ``embedded``), emptied before round 0.
_LOCAL_END = [r.step for r in REQUESTS].index("p600_local") + 1
REFERENCE_STEPS: list[str] = [r.step for r in REQUESTS[:_LOCAL_END]] + [RESET, "p800_head"]
EMBEDDED_PROMPTS = ("p600", "p800", "p300")

SCHED_LINE = re.compile(r"Reqid: (\S+), Total tokens (\d+), LMCache hit tokens: (\d+), need to load: (\d+)")
REGISTERED = re.compile(r"Registered KV cache for CPU ID (\d+) with (\d+) layers")
STORED = re.compile(r"Stored (\d+) tokens in ([0-9.]+) seconds \(([0-9.]+) GB/s")
RETRIEVED = re.compile(r"Retrieved (\d+) tokens in ([0-9.]+) seconds \(([0-9.]+) GB/s")
COUNTERS = ("stored_chunks", "retrieved_chunks", "lookup_hit_chunks", "lookups", "store_present_chunks")
DIGEST_MODULE = "tests.connector.digest_connector"


def _mp_config(port: int, mode: str = "engine_driven", digests: bool = False) -> dict[str, Any]:
    return {"kv_connector": "DigestConnector" if digests else "LMCacheMPConnector", "kv_role": "kv_both",
            "kv_connector_module_path": DIGEST_MODULE if digests else "lmcd.connector.vllm",
            "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": port,
                                          "lmcache.mp.mp_transfer_mode": mode}}


def _embedded_config(port: int) -> dict[str, Any]:
    return {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both",
            "kv_connector_module_path": "lmcd.connector.vllm",
            "kv_connector_extra_config": {"lmcache.mp.port": port}}


def _sched(log: str) -> list[tuple[int, int, int]]:
    """(total tokens, hit tokens, need to load) of every scheduler lookup line, in order."""
    return [(int(m[2]), int(m[3]), int(m[4])) for m in SCHED_LINE.finditer(log)]


def _tokens(regex: re.Pattern[str], log: str) -> list[int]:
    return [int(m[1]) for m in regex.finditer(log)]


def _transfer_context(log: str) -> list[str]:
    return re.findall(r"Creating transfer context \(device_type=cpu, mode=(\w+)\)", log)


def _expected_load(prompt: list[int], sched: tuple[int, int, int]) -> list[tuple[str, int]]:
    """(chunk key hex, skip blocks) of the chunks a request with this scheduler line loads."""
    total, hit, to_load = sched
    local = min(hit, total - 1) - to_load  # what vLLM had itself
    first, last = local // CHUNK, -(-(local + to_load) // CHUNK)
    keys = chunk_keys(prompt, CHUNK)[first:last] if to_load else []
    return [(key.hex(), (local - first * CHUNK) // BLOCK if i == 0 else 0) for i, key in enumerate(keys)]


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


LOAD_KWARGS = {"load_format": "safetensors"}
LOAD_ARGS = ["--load-format", "safetensors"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    model_dir = make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), vocab=VOCAB)
    write_random_weights(model_dir)
    return model_dir


@dataclass
class Reference:
    """Outputs and cached tokens of vLLM's own prefix cache (no connector), by served step name."""

    outputs: dict[str, list[int]]
    cached: dict[str, int]
    embedded: list[list[list[int]]]  # [round][prompt] of EMBEDDED_PROMPTS, one batch per round
    embedded_cached: list[list[int]]


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> Reference:
    """vLLM WITHOUT a connector, prefix caching on: the served requests, then the embedded rounds."""
    schedule: list[ScheduleItem] = [RESET if step == RESET else [PROMPT_NAMES.index(BY_STEP[step].prompt)]
                                    for step in REFERENCE_STEPS]
    embedded_batch = [PROMPT_NAMES.index(name) for name in EMBEDDED_PROMPTS]
    schedule += [RESET, embedded_batch, embedded_batch]
    run = run_llm_script(tiny_model, [PROMPTS[n] for n in PROMPT_NAMES], kv_transfer_config=None,
                         max_tokens=MAX_TOKENS, enable_prefix_caching=True, schedule=schedule, timeout=300,
                         llm_kwargs=LOAD_KWARGS, workdir=tmp_path_factory.mktemp("reference"))
    assert "Registering kv caches!" not in run["log"]  # really no connector
    steps = [step for step in REFERENCE_STEPS if step != RESET]
    assert len(run["batches"]) == len(steps) + 2
    ref = Reference({step: out[0] for step, out in zip(steps, run["batches"], strict=False)},
                    {step: n[0] for step, n in zip(steps, run["cached"], strict=False)},
                    run["batches"][-2:], run["cached"][-2:])
    assert all(len(ids) == MAX_TOKENS for ids in ref.outputs.values())
    assert len({tuple(ids) for ids in ref.outputs.values()}) > 1  # the model reads its prompt
    return ref


@dataclass
class Step:
    """One request to the served vLLM: what it generated and what the connector and server did."""

    name: str
    output: list[int]
    counters: dict[str, int]  # server counters after the request
    delta: dict[str, int]  # counter growth during the request
    vllm_log: str  # vLLM log lines written during the request
    server_log: str  # server log lines written during the request

    @property
    def sched(self) -> list[tuple[int, int, int]]:
        return _sched(self.vllm_log)


@dataclass
class Served:
    steps: dict[str, Step] = field(default_factory=dict)
    startup_vllm_log: str = ""
    startup_server_log: str = ""
    vllm_log: str = ""  # the whole run's
    worker_pid: int = 0
    shm_while_running: set[str] = field(default_factory=set)
    shm_after_stop: set[str] = field(default_factory=set)
    status_while_running: dict[str, Any] = field(default_factory=dict)
    status_after_stop: dict[str, Any] = field(default_factory=dict)
    vllm_pgid_gone: bool = False


class _Driver:
    def __init__(self, vllm: Any, server: RunningServer, result: Served) -> None:
        self.vllm = vllm
        self.server = server
        self.result = result
        self.http = httpx.Client(timeout=30.0)
        self._vllm_pos = 0
        self._server_pos = 0
        self.counters = self.status()["counters"]
        self.mark()

    def status(self) -> dict[str, Any]:
        r = self.http.get(f"{self.server.http_url}/status")
        r.raise_for_status()
        return r.json()

    def _settle(self) -> None:
        """Let the server log's reader thread catch up (its lines are written before replies go out)."""
        before = -1
        while before != len(self.server.lines):
            before = len(self.server.lines)
            time.sleep(0.3)

    def mark(self) -> tuple[str, str]:
        self._settle()
        vlog, slog = self.vllm.log(), self.server.log()
        new = vlog[self._vllm_pos:], slog[self._server_pos:]
        self._vllm_pos, self._server_pos = len(vlog), len(slog)
        return new

    def reset_local_prefix_cache(self) -> None:
        for _ in range(50):
            r = self.http.post(f"{self.vllm.url}/reset_prefix_cache")
            r.raise_for_status()
            if r.json().get("success"):
                return
            time.sleep(0.1)
        raise AssertionError("vLLM refused to reset its prefix cache")

    def request(self, request: Request) -> Step:
        if request.reset:
            self.reset_local_prefix_cache()
        self.mark()
        answer = self.vllm.completions(PROMPTS[request.prompt], max_tokens=MAX_TOKENS, timeout=120)
        vlog, slog = self.mark()
        counters = self.status()["counters"]
        delta = {k: counters[k] - self.counters[k] for k in COUNTERS}
        self.counters = counters
        out = Step(request.step, answer["choices"][0]["token_ids"], {k: counters[k] for k in COUNTERS}, delta,
                   vlog, slog)
        assert request.step not in self.result.steps
        self.result.steps[request.step] = out
        return out


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory) -> Served:
    """One ``vllm serve`` with the digest connector (engine_driven); every request of REQUESTS, in order."""
    server = start_server("--l1-size-gb", "0.25", "--chunk-size", str(CHUNK))
    result = Served()
    vllm = None
    try:
        port = int(server.url.rsplit(":", 1)[1])
        vllm = start_vllm_server(tiny_model, kv_transfer_config=_mp_config(port, digests=True),
                                 enable_prefix_caching=True, extra_env={"VLLM_SERVER_DEV_MODE": "1"},
                                 extra_args=LOAD_ARGS, timeout=300, workdir=tmp_path_factory.mktemp("served"))
        server.wait_for_log(r"Registered KV cache for CPU ID", timeout=30)
        drive = _Driver(vllm, server, result)
        result.startup_vllm_log, result.startup_server_log = vllm.log(), server.log()
        m = REGISTERED.search(result.startup_server_log)
        assert m, result.startup_server_log
        result.worker_pid = int(m[1])
        result.shm_while_running = memfd_names(result.worker_pid, "lmcache_kv")  # its KV's memfds
        result.status_while_running = drive.status()
        for request in REQUESTS:
            drive.request(request)
        drive.http.close()
        result.vllm_log = vllm.log()
    finally:
        if vllm is not None:
            vllm.stop()
            result.vllm_pgid_gone = not vllm.alive()
        if result.worker_pid:
            deadline = time.monotonic() + 10
            while shm_names(result.worker_pid) and time.monotonic() < deadline:
                time.sleep(0.1)  # nothing is named in /dev/shm (segments are memfds): this never waits
            result.shm_after_stop = shm_names(result.worker_pid) | memfd_names(result.worker_pid, "lmcache_kv")
            with contextlib.suppress(httpx.HTTPError):
                result.status_after_stop = httpx.get(f"{server.http_url}/status", timeout=10).json()
        server.stop()
    return result


# --------------------------------------------------------------------------------------------
# (1) store on the first request, load on the second
# --------------------------------------------------------------------------------------------


def test_repeated_long_prompt_is_stored_then_loaded(served, reference):
    startup = served.startup_vllm_log
    assert "Registering kv caches!" in startup
    assert "lmcache.mp.mp_transfer_mode = engine_driven" in startup
    assert _transfer_context(startup) == ["engine_driven"]  # the worker's KV moved into SHM, the server copies
    m = REGISTERED.search(served.startup_server_log)
    assert m is not None and int(m[2]) == 2  # the tiny Llama's 2 layers
    # the worker (not the API server) registered, and its KV memory lived in SHM while it ran
    assert served.worker_pid > 0 and served.shm_while_running
    workers = served.status_while_running["workers"]
    assert [(w["pid"], w["num_layers"], w["block_size"], w["copier"]) for w in workers] == [
        (served.worker_pid, 2, 128, "server")]

    first, second = served.steps["p600_first"], served.steps["p600_second"]
    # first request: a miss, two full chunks (512 of 600 tokens) stored
    assert first.sched == [(600, 0, 0)]
    assert first.delta == {"stored_chunks": 2, "retrieved_chunks": 0, "lookup_hit_chunks": 0, "lookups": 1,
                           "store_present_chunks": 0}
    assert _tokens(STORED, first.server_log) == [512]
    assert _tokens(RETRIEVED, first.server_log) == []
    # second request: both chunks hit and loaded, nothing stored again
    assert second.sched == [(600, 512, 512)]
    assert second.delta == {"stored_chunks": 0, "retrieved_chunks": 2, "lookup_hit_chunks": 2, "lookups": 1,
                            "store_present_chunks": 0}
    assert _tokens(RETRIEVED, second.server_log) == [512]
    assert _tokens(STORED, second.server_log) == []
    for line in (STORED.search(first.server_log), RETRIEVED.search(second.server_log)):
        # the seconds are printed to 4 places (a tiny model's 512 tokens may copy in under 50 us: 0.0000); the
        # GB/s come from the unrounded time, so a copy that was timed shows positive GB/s
        assert line is not None and float(line[2]) >= 0 and float(line[3]) > 0
    # the miss answers like vLLM's cold run; the hit like vLLM's own cache hitting the same 512
    # tokens that the same (first) prefill computed
    assert reference.cached["p600_first"] == 0 and reference.cached["p600_second"] == 512
    assert first.output == reference.outputs["p600_first"]
    assert second.output == reference.outputs["p600_second"]


def test_server_session_ends_cleanly_with_vllm(served):
    assert served.vllm_pgid_gone
    assert served.shm_after_stop == set()  # no KV segment of the vLLM worker is left in /dev/shm
    # the server outlives vLLM, forgets its worker, and saw no error all along
    assert served.status_after_stop, "the server did not answer /status after vLLM stopped"
    assert served.status_after_stop["workers"] == []
    assert served.status_after_stop["counters"]["errors"] == {}
    assert served.status_after_stop["leases"] == 0  # every lookup's pins were released
    assert served.status_after_stop["counters"]["evicted_chunks"] == 0
    assert served.status_after_stop["pool"]["num_chunks"] == served.status_after_stop["counters"]["stored_chunks"]


# --------------------------------------------------------------------------------------------
# (2) every request: its scheduler line, and its output against vLLM's own prefix cache
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("request_", REQUESTS, ids=[r.step for r in REQUESTS])
def test_request_answers_like_its_reference(served, reference, request_: Request):
    step = served.steps[request_.step]
    assert step.sched == [request_.sched]
    if request_.reference is None:
        return  # no vLLM equivalent: the tests below check it
    # the reference hit (or missed) the same number of tokens as lmcd did, from the same producer
    assert reference.cached[request_.reference] == request_.sched[1]
    assert step.output == reference.outputs[request_.reference]


def test_outputs_depend_on_the_loaded_prefix(served, reference):
    """Equal outputs mean something: other first chunks, or another tail, give other outputs."""
    assert reference.outputs["p600_first"] != reference.outputs["p600_other_head"]
    assert served.steps["p600_second"].output != served.steps["p600_other_head"].output
    assert reference.outputs["shared_a_r0"] != reference.outputs["shared_b_r0"]


@pytest.mark.parametrize(("name", "r0", "stored_r0", "r1"), EXPECTED_ROUNDS, ids=[e[0] for e in EXPECTED_ROUNDS])
def test_rounds_store_then_hit(served, name, r0, stored_r0, r1):
    s0, s1 = served.steps[f"{name}_r0"], served.steps[f"{name}_r1"]
    assert s0.sched == [r0]
    assert s0.delta["stored_chunks"] == stored_r0
    assert s0.delta["lookup_hit_chunks"] == s0.delta["retrieved_chunks"] == r0[1] // CHUNK
    assert s1.sched == [r1]
    assert s1.delta["stored_chunks"] == 0
    assert s1.delta["lookup_hit_chunks"] == s1.delta["retrieved_chunks"] == r1[1] // CHUNK
    assert _tokens(RETRIEVED, s1.server_log) == [r1[1]]


def test_whole_prompt_hit_loads_all_but_the_last_token(served, reference):
    """L = 512: both chunks load, vLLM computes token 511 (vLLM's own cache would hit 384: no equal)."""
    cold, hit, again = served.steps["p512_r0"], served.steps["p512_r1"], served.steps["p512_again"]
    assert cold.output == reference.outputs["p512_r0"] and reference.cached["p512_r0"] == 0
    assert reference.cached["p512_r1"] == 384  # why there is no vLLM equivalent
    for step in (hit, again):
        assert step.sched == [(512, 512, 511)]
        assert step.delta["retrieved_chunks"] == 2 and step.delta["stored_chunks"] == 0
        assert _tokens(RETRIEVED, step.server_log) == [512]
    assert hit.output == again.output  # the same chunks and the same last token: the same answer
    assert len(hit.output) == MAX_TOKENS


def test_prefix_sharing_prompt_loads_only_the_shared_chunks(served):
    b = served.steps["shared_b_r0"]
    assert b.sched == [(850, 512, 512)]
    assert _tokens(RETRIEVED, b.server_log) == [512]
    assert _tokens(STORED, b.server_log) == [256]  # only its own third chunk is new
    _, loaded = kv_digests(b.vllm_log)
    assert [chunk.key for chunk in loaded] == [k.hex() for k in chunk_keys(SHARED_A, CHUNK)]  # A's chunks


def test_totals_over_the_whole_run(served):
    last = served.steps[REQUESTS[-1].step].counters
    total = {k: sum(s.delta[k] for s in served.steps.values()) for k in COUNTERS}
    assert total == {k: last[k] for k in COUNTERS}  # nothing happened between requests
    # 600 and its control: 2 + 2, then round 0 of (2): 1 + 3 + 2 + 2 + 1 chunks; none twice
    assert last["stored_chunks"] == 2 + 2 + 1 + 3 + 2 + 2 + 1
    assert last["store_present_chunks"] == 0


# --------------------------------------------------------------------------------------------
# (3) vLLM's own prefix cache: what vLLM has is not loaded again
# --------------------------------------------------------------------------------------------


def test_local_prefix_cache_is_not_reloaded(served):
    loaded, local = served.steps["p600_loaded"], served.steps["p600_local"]
    assert loaded.sched == [(600, 512, 512)]
    assert loaded.delta["retrieved_chunks"] == 2
    # the prompt's first 4 blocks (512 tokens) are in vLLM's prefix cache: all the server has
    assert local.sched == [(600, 512, 0)]
    assert local.delta["retrieved_chunks"] == 0 and local.delta["stored_chunks"] == 0
    assert _tokens(RETRIEVED, local.server_log) == []
    assert kv_digests(local.vllm_log) == ({}, [])
    assert loaded.output == local.output  # the blocks vLLM kept are the ones it loaded


def test_partly_local_prompt_loads_only_the_rest(served):
    head, full = served.steps["p800_head"], served.steps["p800_partly_local"]
    assert head.delta["stored_chunks"] == 0  # no full chunk: nothing to look up, nothing stored
    # vLLM has block 0 (128 tokens, computed by the head's prefill); the server has 3 chunks
    # (768): 640 are loaded, from the 3 chunks, skipping the block vLLM has
    assert full.delta["retrieved_chunks"] == 3 and full.delta["stored_chunks"] == 0
    _, loaded = kv_digests(full.vllm_log)
    assert [(chunk.key, chunk.skip) for chunk in loaded] == _expected_load(P800, (800, 768, 640))
    assert loaded[0].skip == 1 and len(loaded[0].digests) == 1
    # no vLLM equivalent (its block 0 comes from another prefill); the same situation again
    # (vLLM's cache emptied, the head, the prompt) gives the same answer
    head_again, full_again = served.steps["p800_head_again"], served.steps["p800_partly_local_again"]
    assert head_again.output == head.output
    assert full_again.output == full.output


# --------------------------------------------------------------------------------------------
# (4) the loaded bytes: every chunk loaded into vLLM's blocks is the chunk stored
# --------------------------------------------------------------------------------------------


def test_loaded_kv_is_the_stored_kv_server_copies(served):
    loaded = check_loaded_kv(served.vllm_log)
    stored, _ = kv_digests(served.vllm_log)
    assert len(stored) == served.steps[REQUESTS[-1].step].counters["stored_chunks"]
    # every step loaded exactly the chunks its scheduler line names, with the skip it implies
    for request in REQUESTS:
        step = served.steps[request.step]
        _, step_loaded = kv_digests(step.vllm_log)
        assert [(chunk.key, chunk.skip) for chunk in step_loaded] == _expected_load(PROMPTS[request.prompt],
                                                                                   request.sched), request.step
    assert len(loaded) == sum(s.delta["retrieved_chunks"] for s in served.steps.values())


# Offline, worker copies: (prompt, reset before it, scheduler line, what its output must equal)
WORKER_COPIES = [
    ("p600", True, (600, 0, 0), "reference:p600_first"),
    ("p600", True, (600, 512, 512), "reference:p600_second"),
    ("p800", True, (800, 0, 0), "reference:p800_r0"),
    ("p800_head", True, (200, 0, 0), "reference:p800_head"),
    ("p800", False, (800, 768, 640), "served:p800_partly_local"),  # the same situation, server copies
    ("p512", True, (512, 0, 0), "reference:p512_r0"),
    ("p512", True, (512, 512, 511), "served:p512_r1"),
]


@pytest.fixture(scope="module")
def worker_copies(tiny_model, tmp_path_factory) -> dict[str, Any]:
    """Offline ``LLM`` with the digest connector, lmcache_driven, against a --share-pool server."""
    server = start_server("--l1-size-gb", "0.25", "--chunk-size", str(CHUNK), "--share-pool", "true")
    try:
        port = int(server.url.rsplit(":", 1)[1])
        schedule: list[ScheduleItem] = []
        for name, reset, _, _ in WORKER_COPIES:
            schedule += [RESET] if reset else []
            schedule.append([PROMPT_NAMES.index(name)])
        run = run_llm_script(tiny_model, [PROMPTS[n] for n in PROMPT_NAMES],
                             kv_transfer_config=_mp_config(port, "lmcache_driven", digests=True),
                             max_tokens=MAX_TOKENS, enable_prefix_caching=True, schedule=schedule, timeout=300,
                             llm_kwargs=LOAD_KWARGS, workdir=tmp_path_factory.mktemp("worker-copies"))
        run["status"] = httpx.get(f"{server.http_url}/status", timeout=10).json()
        time.sleep(0.5)  # the server log's reader thread
        run["server_log"] = server.log()
    finally:
        server.stop()
    return run


def test_loaded_kv_is_the_stored_kv_worker_copies(worker_copies, served, reference):
    log = worker_copies["log"]
    assert "lmcache.mp.mp_transfer_mode = lmcache_driven" in log
    assert _transfer_context(log) == ["lmcache_driven"]
    assert "Mapped the server's shared pool" in log and "Migrated CPU KV cache tensor" not in log
    assert "in the worker's own memory; it copies through the shared pool" in worker_copies["server_log"]
    assert worker_copies["status"]["workers"] == []  # unregistered when vLLM ended
    assert _sched(log) == [sched for _, _, sched, _ in WORKER_COPIES]
    counters = worker_copies["status"]["counters"]
    assert counters["stored_chunks"] == 2 + 3 + 2 and counters["retrieved_chunks"] == 2 + 3 + 2
    assert counters["errors"] == {}
    loaded = check_loaded_kv(log)
    expected: list[tuple[str, int]] = []
    for name, _, sched, _ in WORKER_COPIES:
        expected += _expected_load(PROMPTS[name], sched)
    assert [(chunk.key, chunk.skip) for chunk in loaded] == expected
    # the chunks copied by the worker hold the same bytes as those the server copied
    stored, _ = kv_digests(log)
    served_stored, _ = kv_digests(served.vllm_log)
    assert set(stored) <= set(served_stored)
    assert {key: s[0].digests for key, s in stored.items()} == {key: served_stored[key][0].digests for key in stored}
    outputs = [out[0] for out in worker_copies["batches"]]
    for (name, _, _, expect), output in zip(WORKER_COPIES, outputs, strict=True):
        source, step = expect.split(":")
        want = reference.outputs[step] if source == "reference" else served.steps[step].output
        assert output == want, (name, expect)


# --------------------------------------------------------------------------------------------
# (5) LMCacheConnectorV1, embedded: the connector starts (and ends) its own server
# --------------------------------------------------------------------------------------------


def _lmcd_server_pids(port: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in cmd if a]
        if "lmcd" in args and "server" in args and str(port) in args:
            pids.append(int(entry))
    return pids


def _run_embedded(tiny_model, workdir: Path, prompts: list[list[int]], extra_env: dict[str, str],
                  sequential: bool = False) -> dict[str, Any]:
    port = free_port()
    assert _lmcd_server_pids(port) == []
    run = run_llm_script(tiny_model, prompts, kv_transfer_config=_embedded_config(port), extra_env=extra_env,
                         rounds=2, sequential=sequential, max_tokens=MAX_TOKENS, timeout=300, llm_kwargs=LOAD_KWARGS,
                         workdir=workdir)
    run["port"] = port
    run["leftover_servers"] = _lmcd_server_pids(port)
    pids = {int(m[1]) for m in REGISTERED.finditer(run["log"])}
    run["worker_pids"] = pids
    run["leftover_shm"] = set().union(*(shm_names(pid) for pid in pids)) if pids else set()
    return run


@pytest.fixture(scope="module")
def embedded(tiny_model, tmp_path_factory) -> dict[str, Any]:
    env = {"LMCACHE_LOCAL_CPU": "True", "LMCACHE_MAX_LOCAL_CPU_SIZE": "1", "LMCACHE_CHUNK_SIZE": "256"}
    return _run_embedded(tiny_model, tmp_path_factory.mktemp("embedded"), [PROMPTS[n] for n in EMBEDDED_PROMPTS],
                         env)


def test_embedded_connector_starts_a_server_and_hits(embedded, reference):
    log = embedded["log"]
    port = embedded["port"]
    assert re.search(rf"Starting a local LMCache server: .* --port {port} .*--l1-size-gb 1\.0 --chunk-size 256", log)
    assert "Registering kv caches!" in log
    assert len(embedded["worker_pids"]) == 1
    # auto against the pool-sharing server it started: lmcache_driven, vLLM's KV never moves into SHM
    assert "lmcache.mp.mp_transfer_mode = auto" in log
    assert _transfer_context(log) == ["lmcache_driven"]
    assert "Mapped the server's shared pool" in log and "Migrated CPU KV cache tensor" not in log
    # round 0 (one batch): misses, stores 2 + 3 + 1 chunks; round 1 (one batch): hits of every full chunk
    sched = _sched(log)
    assert sorted(sched[:3]) == [(300, 0, 0), (600, 0, 0), (800, 0, 0)]
    assert sorted(sched[3:]) == [(300, 256, 256), (600, 512, 512), (800, 768, 768)]
    assert sum(_tokens(STORED, log)) == 512 + 768 + 256
    assert sum(_tokens(RETRIEVED, log)) == 512 + 768 + 256
    # the reference: the same two batches with vLLM's own cache, which hits the same tokens
    # (round 1) that the same round-0 batch computed
    assert reference.embedded_cached == [[0, 0, 0], [512, 768, 256]]
    assert embedded["outputs"] == reference.embedded


def _server_stopped_with_vllm(log: str) -> bool:
    """The started server got its SIGTERM while vLLM shut down, before the harness signals anything.

    The harness SIGTERMs the process group only after the script's process has exited, which
    is after it printed its result line; a server that stops earlier was stopped by the
    connector (the dying parent's PR_SET_PDEATHSIG, or its atexit hook).
    """
    stop, result = log.find("Received SIGTERM: shutting down"), log.find(RESULT_PREFIX)
    return 0 <= stop < result


def test_embedded_leaves_no_server_and_no_shm(embedded):
    assert embedded["worker_pids"]
    assert _server_stopped_with_vllm(embedded["log"]), embedded["log"][-3000:]
    assert embedded["leftover_servers"] == []
    assert embedded["leftover_shm"] == set()


def test_embedded_reads_lmcache_config_file(tiny_model, reference, tmp_path):
    config = tmp_path / "lmcache.yaml"
    # a 512-token chunk (not the 256 default) shows that the file was read: P300 has no full chunk
    config.write_text("chunk_size: 512\nlocal_cpu: true\nmax_local_cpu_size: 0.5\n")
    env = {"LMCACHE_CONFIG_FILE": str(config)}
    run = _run_embedded(tiny_model, tmp_path / "run", [P600, P300], env, sequential=True)
    log = run["log"]
    assert re.search(r"Starting a local LMCache server: .*--l1-size-gb 0\.5 --chunk-size 512", log)
    # one prompt at a time, vLLM's own cache off: P600 stores its one 512-token chunk and loads it
    # (512 tokens, as vLLM's own cache hits a repeated P600); P300 is a miss both times
    assert _sched(log) == [(600, 0, 0), (300, 0, 0), (600, 512, 512), (300, 0, 0)]
    assert _tokens(STORED, log) == [512]
    assert _tokens(RETRIEVED, log) == [512]
    assert run["outputs"] == [[reference.outputs["p600_first"], reference.outputs["p300_r0"]],
                              [reference.outputs["p600_second"], reference.outputs["p300_r0"]]]
    assert _server_stopped_with_vllm(log)
    assert run["leftover_servers"] == [] and run["leftover_shm"] == set()
