"""The connector end to end, against the REAL vLLM CPU build and real ``lmcd server`` processes.

A tiny 2-layer Llama (make_tiny_llama's config with random weights written by this module, see
``_write_random_weights``: dummy weights make outputs blind to the prefix), token-id prompts,
greedy. vLLM's CPU block size is 128 tokens, the server's chunk size 256, so a prompt of n tokens
has ``n // 256`` full chunks: only those are stored, and a hit of the whole prompt is cut by one
token (vLLM must compute at least one).

vLLM starts are the expensive part (~30 s each), so the module makes four:

- ``baseline``: offline ``LLM`` without any connector: the reference greedy outputs;
- ``served``: ``vllm serve`` with ``LMCacheMPConnector`` against a server started here, with
  vLLM's own prefix caching ON and the dev-mode ``POST /reset_prefix_cache`` between requests
  where a request must not find its prompt locally. Requests go one at a time and every step
  records its outputs, the server's counters and the new lines of both logs, so the tests
  below can say which request stored, looked up and loaded what;
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

from tests.conftest import RunningServer, shm_names, start_server
from tests.vllm_support import (
    RESULT_PREFIX,
    free_port,
    make_tiny_llama,
    requires_vllm,
    run_llm_script,
    start_vllm_server,
    token_prompts,
)

pytestmark = requires_vllm(600)

VOCAB = 1000
MAX_TOKENS = 8
CHUNK = 256

P300, P700, P1000, P512 = token_prompts([300, 700, 1000, 512], vocab=VOCAB, seed=11)
_SHARED = token_prompts([600], vocab=VOCAB, seed=12)[0]
_TAIL_A, _TAIL_B = token_prompts([150, 250], vocab=VOCAB, seed=13)
SHARED_A = _SHARED + _TAIL_A  # 750 tokens: chunks 0-1 are the shared prefix
SHARED_B = _SHARED + _TAIL_B  # 850 tokens: chunks 0-1 shared, chunk 2 its own
P1000_HEAD = P1000[:200]  # one full vLLM block (128 tokens) of P1000, no full chunk
# P700 with other first two chunks: the control that outputs depend on the KV that is loaded
P700_OTHER_HEAD = token_prompts([512], vocab=VOCAB, seed=14)[0] + P700[512:]
assert SHARED_A[:600] == SHARED_B[:600] and SHARED_A[600] != SHARED_B[600]

PROMPTS: dict[str, list[int]] = {
    "p300": P300, "p700": P700, "p1000": P1000, "p512": P512,
    "shared_a": SHARED_A, "shared_b": SHARED_B, "p1000_head": P1000_HEAD,
    "p700_other_head": P700_OTHER_HEAD,
}

SCHED_LINE = re.compile(r"Reqid: (\S+), Total tokens (\d+), LMCache hit tokens: (\d+), need to load: (\d+)")
REGISTERED = re.compile(r"Registered KV cache for CPU ID (\d+) with (\d+) layers")
STORED = re.compile(r"Stored (\d+) tokens in ([0-9.]+) seconds \(([0-9.]+) GB/s")
RETRIEVED = re.compile(r"Retrieved (\d+) tokens in ([0-9.]+) seconds \(([0-9.]+) GB/s")
COUNTERS = ("stored_chunks", "retrieved_chunks", "lookup_hit_chunks", "lookups")


def _mp_config(port: int) -> dict[str, Any]:
    return {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
            "kv_connector_module_path": "lmcd.connector.vllm",
            "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": port,
                                          "lmcache.mp.mp_transfer_mode": "engine_driven"}}


def _embedded_config(port: int) -> dict[str, Any]:
    return {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both",
            "kv_connector_module_path": "lmcd.connector.vllm",
            "kv_connector_extra_config": {"lmcache.mp.port": port}}


def _sched(log: str) -> list[tuple[int, int, int]]:
    """(total tokens, hit tokens, need to load) of every scheduler lookup line, in order."""
    return [(int(m[2]), int(m[3]), int(m[4])) for m in SCHED_LINE.finditer(log)]


def _tokens(regex: re.Pattern[str], log: str) -> list[int]:
    return [int(m[1]) for m in regex.finditer(log)]


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


def _write_random_weights(model_dir: Path, seed: int = 0) -> None:
    """Random weights large enough that attention is sharp and the output depends on the prefix.

    vLLM's ``load_format="dummy"`` draws every weight from U(-1e-3, 1e-3): attention is then
    nearly uniform and the greedy output hardly depends on anything but the last tokens (a prompt
    with other first 512 tokens gives the same output), so equal outputs would not show that a
    loaded prefix was right. These weights are saved next to make_tiny_llama's config and loaded
    with ``load_format="safetensors"`` (no download either way).
    """
    import json

    import torch
    from safetensors.torch import save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q_out = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_out = cfg["num_key_value_heads"] * cfg["head_dim"]
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).contiguous()

    weights = {"model.embed_tokens.weight": rand(vocab, hidden, std=1.0), "model.norm.weight": torch.ones(hidden),
               "lm_head.weight": rand(vocab, hidden, std=0.1)}
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        weights.update({
            pre + "input_layernorm.weight": torch.ones(hidden),
            pre + "post_attention_layernorm.weight": torch.ones(hidden),
            pre + "self_attn.q_proj.weight": rand(q_out, hidden, std=0.2),
            pre + "self_attn.k_proj.weight": rand(kv_out, hidden, std=0.2),
            pre + "self_attn.v_proj.weight": rand(kv_out, hidden, std=0.2),
            pre + "self_attn.o_proj.weight": rand(hidden, q_out, std=0.1),
            pre + "mlp.gate_proj.weight": rand(inter, hidden, std=0.1),
            pre + "mlp.up_proj.weight": rand(inter, hidden, std=0.1),
            pre + "mlp.down_proj.weight": rand(hidden, inter, std=0.05),
        })
    save_file(weights, str(model_dir / "model.safetensors"))


LOAD_KWARGS = {"load_format": "safetensors"}
LOAD_ARGS = ["--load-format", "safetensors"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    model_dir = make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), vocab=VOCAB)
    _write_random_weights(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def baseline(tiny_model, tmp_path_factory) -> dict[str, list[int]]:
    """Greedy outputs of every prompt from vLLM WITHOUT a connector (kv_transfer_config None)."""
    names = list(PROMPTS)
    run = run_llm_script(tiny_model, [PROMPTS[n] for n in names], kv_transfer_config=None, max_tokens=MAX_TOKENS,
                         llm_kwargs=LOAD_KWARGS, workdir=tmp_path_factory.mktemp("baseline"))
    assert "Registering kv caches!" not in run["log"]  # really no connector
    outputs = dict(zip(names, run["outputs"][0], strict=True))
    assert all(len(ids) == MAX_TOKENS for ids in outputs.values())
    assert len({tuple(ids) for ids in outputs.values()}) > 1  # the model reads its prompt
    # ... including the part a hit loads: wrong KV in the first 512 tokens would show in the output
    assert outputs["p700"] != outputs["p700_other_head"]
    return outputs


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

    def request(self, step: str, prompt_name: str, reset: bool = True) -> Step:
        if reset:
            self.reset_local_prefix_cache()
        self.mark()
        answer = self.vllm.completions(PROMPTS[prompt_name], max_tokens=MAX_TOKENS, timeout=120)
        vlog, slog = self.mark()
        counters = self.status()["counters"]
        delta = {k: counters[k] - self.counters[k] for k in COUNTERS}
        self.counters = counters
        out = Step(step, answer["choices"][0]["token_ids"], {k: counters[k] for k in COUNTERS}, delta, vlog, slog)
        assert step not in self.result.steps
        self.result.steps[step] = out
        return out


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory) -> Served:
    """One ``vllm serve`` with LMCacheMPConnector; every request of every scenario below, in order."""
    server = start_server("--l1-size-gb", "0.25", "--chunk-size", str(CHUNK))
    result = Served()
    vllm = None
    try:
        port = int(server.url.rsplit(":", 1)[1])
        vllm = start_vllm_server(tiny_model, kv_transfer_config=_mp_config(port), enable_prefix_caching=True,
                                 extra_env={"VLLM_SERVER_DEV_MODE": "1"}, extra_args=LOAD_ARGS, timeout=300,
                                 workdir=tmp_path_factory.mktemp("served"))
        server.wait_for_log(r"Registered KV cache for CPU ID", timeout=30)
        drive = _Driver(vllm, server, result)
        result.startup_vllm_log, result.startup_server_log = vllm.log(), server.log()
        m = REGISTERED.search(result.startup_server_log)
        assert m, result.startup_server_log
        result.worker_pid = int(m[1])
        result.shm_while_running = shm_names(result.worker_pid)
        result.status_while_running = drive.status()

        # (1) one long prompt, twice; vLLM's local prefix cache is reset before each request
        drive.request("p700_first", "p700")
        drive.request("p700_second", "p700")
        # (2) round 0 stores (the shared-prefix prompt B already hits A's chunks), round 1 hits all
        for rnd in (0, 1):
            for name in ("p300", "p1000", "p512", "shared_a", "shared_b"):
                drive.request(f"{name}_r{rnd}", name)
        # (3) vLLM's own prefix cache ON and holding the prompt
        drive.request("p700_loaded", "p700")  # local cache reset: loads from the server
        drive.request("p700_local", "p700", reset=False)  # local cache holds 5 of its blocks
        drive.request("p1000_head", "p1000_head")  # local cache now holds P1000's first block
        drive.request("p1000_partly_local", "p1000", reset=False)
        drive.http.close()
    finally:
        if vllm is not None:
            vllm.stop()
            result.vllm_pgid_gone = not vllm.alive()
        if result.worker_pid:
            deadline = time.monotonic() + 10
            while shm_names(result.worker_pid) and time.monotonic() < deadline:
                time.sleep(0.1)  # the server sweeps segments whose owner died
            result.shm_after_stop = shm_names(result.worker_pid)
            with contextlib.suppress(httpx.HTTPError):
                result.status_after_stop = httpx.get(f"{server.http_url}/status", timeout=10).json()
        server.stop()
    return result


# --------------------------------------------------------------------------------------------
# (1) store on the first request, load on the second
# --------------------------------------------------------------------------------------------


def test_repeated_long_prompt_is_stored_then_loaded(served, baseline):
    startup = served.startup_vllm_log
    assert "Registering kv caches!" in startup
    assert "lmcache.mp.mp_transfer_mode = engine_driven" in startup
    m = REGISTERED.search(served.startup_server_log)
    assert m is not None and int(m[2]) == 2  # the tiny Llama's 2 layers
    # the worker (not the API server) registered, and its KV memory lived in SHM while it ran
    assert served.worker_pid > 0 and served.shm_while_running
    workers = served.status_while_running["workers"]
    assert [(w["pid"], w["num_layers"], w["block_size"]) for w in workers] == [(served.worker_pid, 2, 128)]

    first, second = served.steps["p700_first"], served.steps["p700_second"]
    # first request: a miss, two full chunks (512 of 700 tokens) stored
    assert first.sched == [(700, 0, 0)]
    assert first.delta == {"stored_chunks": 2, "retrieved_chunks": 0, "lookup_hit_chunks": 0, "lookups": 1}
    assert _tokens(STORED, first.server_log) == [512]
    assert _tokens(RETRIEVED, first.server_log) == []
    # second request: both chunks hit and loaded, nothing stored again
    assert second.sched == [(700, 512, 512)]
    assert second.delta == {"stored_chunks": 0, "retrieved_chunks": 2, "lookup_hit_chunks": 2, "lookups": 1}
    assert _tokens(RETRIEVED, second.server_log) == [512]
    assert _tokens(STORED, second.server_log) == []
    for line in (STORED.search(first.server_log), RETRIEVED.search(second.server_log)):
        assert line is not None and float(line[2]) > 0 and float(line[3]) > 0
    assert first.output == second.output == baseline["p700"]


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
# (2) outputs with cache hits are identical to vLLM without a connector
# --------------------------------------------------------------------------------------------

# (prompt, round 0 (total, hit, need to load), chunks stored in round 0, round 1 (total, hit, load))
EXPECTED_ROUNDS = [
    ("p300", (300, 0, 0), 1, (300, 256, 256)),
    ("p1000", (1000, 0, 0), 3, (1000, 768, 768)),
    ("p512", (512, 0, 0), 2, (512, 512, 511)),  # whole prompt hit: the last token is computed
    ("shared_a", (750, 0, 0), 2, (750, 512, 512)),
    ("shared_b", (850, 512, 512), 1, (850, 768, 768)),  # round 0: loads A's two shared chunks
]


@pytest.mark.parametrize(("name", "r0", "stored_r0", "r1"), EXPECTED_ROUNDS, ids=[e[0] for e in EXPECTED_ROUNDS])
def test_hits_give_baseline_outputs(served, baseline, name, r0, stored_r0, r1):
    s0, s1 = served.steps[f"{name}_r0"], served.steps[f"{name}_r1"]
    assert s0.sched == [r0]
    assert s0.delta["stored_chunks"] == stored_r0
    assert s0.delta["lookup_hit_chunks"] == s0.delta["retrieved_chunks"] == r0[1] // CHUNK
    assert s1.sched == [r1]
    assert s1.delta["stored_chunks"] == 0
    assert s1.delta["lookup_hit_chunks"] == s1.delta["retrieved_chunks"] == r1[1] // CHUNK
    assert _tokens(RETRIEVED, s1.server_log) == [r1[1]]
    assert s0.output == s1.output == baseline[name]


def test_prefix_sharing_prompt_loads_only_the_shared_chunks(served, baseline):
    b = served.steps["shared_b_r0"]
    assert b.sched == [(850, 512, 512)]
    assert _tokens(RETRIEVED, b.server_log) == [512]
    assert _tokens(STORED, b.server_log) == [256]  # only its own third chunk is new
    assert b.output == baseline["shared_b"]
    assert baseline["shared_a"] != baseline["shared_b"]  # the tails matter: a stale load would show


def test_totals_over_the_whole_run(served):
    last = served.steps["p1000_partly_local"].counters
    total = {k: sum(s.delta[k] for s in served.steps.values()) for k in COUNTERS}
    assert total == {k: last[k] for k in COUNTERS}  # nothing happened between requests
    # 700: 2, then round 0 of (2): 1 + 3 + 2 + 2 + 1 chunks
    assert last["stored_chunks"] == 2 + 1 + 3 + 2 + 2 + 1


# --------------------------------------------------------------------------------------------
# (3) vLLM's own prefix cache: what vLLM has is not loaded again
# --------------------------------------------------------------------------------------------


def test_local_prefix_cache_is_not_reloaded(served, baseline):
    loaded, local = served.steps["p700_loaded"], served.steps["p700_local"]
    assert loaded.sched == [(700, 512, 512)]
    assert loaded.delta["retrieved_chunks"] == 2
    # the prompt's first 5 blocks (640 tokens) are in vLLM's prefix cache: more than the server has
    assert local.sched == [(700, 512, 0)]
    assert local.delta["retrieved_chunks"] == 0 and local.delta["stored_chunks"] == 0
    assert _tokens(RETRIEVED, local.server_log) == []
    assert loaded.output == local.output == baseline["p700"]


def test_partly_local_prompt_loads_only_the_rest(served, baseline):
    head, full = served.steps["p1000_head"], served.steps["p1000_partly_local"]
    assert head.sched == [(200, 0, 0)]  # no full chunk: nothing to look up, nothing stored
    assert head.delta["stored_chunks"] == 0
    # vLLM has block 0 (128 tokens) locally; the server has 3 chunks (768): 640 are loaded,
    # from the 3 chunks, skipping the block vLLM has
    assert full.sched == [(1000, 768, 640)]
    assert full.delta["retrieved_chunks"] == 3 and full.delta["stored_chunks"] == 0
    assert head.output == baseline["p1000_head"]
    assert full.output == baseline["p1000"]


# --------------------------------------------------------------------------------------------
# (4) LMCacheConnectorV1, embedded: the connector starts (and ends) its own server
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


def _run_embedded(tiny_model, workdir: Path, prompts: list[list[int]], extra_env: dict[str, str]) -> dict[str, Any]:
    port = free_port()
    assert _lmcd_server_pids(port) == []
    run = run_llm_script(tiny_model, prompts, kv_transfer_config=_embedded_config(port), extra_env=extra_env,
                         rounds=2, max_tokens=MAX_TOKENS, timeout=300, llm_kwargs=LOAD_KWARGS, workdir=workdir)
    run["port"] = port
    run["leftover_servers"] = _lmcd_server_pids(port)
    pids = {int(m[1]) for m in REGISTERED.finditer(run["log"])}
    run["worker_pids"] = pids
    run["leftover_shm"] = set().union(*(shm_names(pid) for pid in pids)) if pids else set()
    return run


@pytest.fixture(scope="module")
def embedded(tiny_model, tmp_path_factory) -> dict[str, Any]:
    env = {"LMCACHE_LOCAL_CPU": "True", "LMCACHE_MAX_LOCAL_CPU_SIZE": "1", "LMCACHE_CHUNK_SIZE": "256"}
    return _run_embedded(tiny_model, tmp_path_factory.mktemp("embedded"), [P700, P1000, P512], env)


def test_embedded_connector_starts_a_server_and_hits(embedded, baseline):
    log = embedded["log"]
    port = embedded["port"]
    assert re.search(rf"Starting a local LMCache server: .* --port {port} .*--l1-size-gb 1\.0 --chunk-size 256", log)
    assert "Registering kv caches!" in log
    assert len(embedded["worker_pids"]) == 1
    # auto against the pool-sharing server it started: lmcache_driven, vLLM's KV never moves into SHM
    assert "lmcache.mp.mp_transfer_mode = auto" in log
    assert "Mapped the server's shared pool" in log and "Migrated CPU KV cache tensor" not in log
    assert "in the worker's own memory; it copies through the shared pool" in log
    # round 0 (one batch): misses, stores 2 + 3 + 2 chunks; round 1: hits of every full chunk
    sched = _sched(log)
    assert sorted(sched[:3]) == [(512, 0, 0), (700, 0, 0), (1000, 0, 0)]
    assert sorted(sched[3:]) == [(512, 512, 511), (700, 512, 512), (1000, 768, 768)]
    assert sum(_tokens(STORED, log)) == 512 + 768 + 512
    assert sum(_tokens(RETRIEVED, log)) == 512 + 768 + 512
    expected = [baseline["p700"], baseline["p1000"], baseline["p512"]]
    assert embedded["outputs"] == [expected, expected]


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


def test_embedded_reads_lmcache_config_file(tiny_model, baseline, tmp_path):
    config = tmp_path / "lmcache.yaml"
    # a 512-token chunk (not the 256 default) shows that the file was read
    config.write_text("chunk_size: 512\nlocal_cpu: true\nmax_local_cpu_size: 0.5\n")
    env = {"LMCACHE_CONFIG_FILE": str(config)}
    run = _run_embedded(tiny_model, tmp_path / "run", [P700, P1000], env)
    log = run["log"]
    assert re.search(r"Starting a local LMCache server: .*--l1-size-gb 0\.5 --chunk-size 512", log)
    sched = _sched(log)
    assert sorted(sched[:2]) == [(700, 0, 0), (1000, 0, 0)]
    assert sorted(sched[2:]) == [(700, 512, 512), (1000, 512, 512)]  # one 512-token chunk each
    assert _tokens(STORED, log) and sum(_tokens(STORED, log)) == 1024
    assert sum(_tokens(RETRIEVED, log)) == 1024
    expected = [baseline["p700"], baseline["p1000"]]
    assert run["outputs"] == [expected, expected]
    assert _server_stopped_with_vllm(log)
    assert run["leftover_servers"] == [] and run["leftover_shm"] == set()
