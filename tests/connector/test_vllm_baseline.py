"""The vLLM harness without any KV connector: real vLLM (CPU build), tiny random-weight Llama.

These prove what the connector tests build on: greedy generation from token-id prompts is
reproducible across separate vLLM processes, a schedule's RESET really empties vLLM's own prefix
cache, a repeat hits floor((L - 1) / 128) blocks of it (the arithmetic the connector tests choose
their prompt lengths by), and ``vllm serve`` (through tests/vllm_launcher.py) answers
/v1/completions with token-id prompts.
"""

from __future__ import annotations

import os

import pytest

from tests.vllm_support import RESET, make_tiny_llama, requires_vllm, run_llm_script, start_vllm_server, token_prompts

pytestmark = requires_vllm(300)

VOCAB = 1000
MAX_TOKENS = 8
# 40 tokens: less than one block; 200: one full 128-token block + a partial one; 300: two + partial.
PROMPTS = token_prompts([40, 200, 300], vocab=VOCAB, seed=1)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), vocab=VOCAB)


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """Greedy outputs of PROMPTS from one offline vLLM process, two rounds on the same LLM."""
    return run_llm_script(tiny_model, PROMPTS, rounds=2, max_tokens=MAX_TOKENS,
                          workdir=tmp_path_factory.mktemp("reference"))


def _group_gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_offline_greedy_is_deterministic_across_processes(tiny_model, reference, tmp_path):
    first = reference
    # vLLM's own prefix cache on: a batch, RESET, the batch again (cold again), and once more (hits)
    batch = list(range(len(PROMPTS)))
    second = run_llm_script(tiny_model, PROMPTS, max_tokens=MAX_TOKENS, enable_prefix_caching=True,
                            schedule=[batch, RESET, batch, batch], workdir=tmp_path)

    assert first["pid"] != second["pid"]
    assert _group_gone(first["pid"]) and _group_gone(second["pid"])
    assert len(first["outputs"]) == 2 and second["outputs"] is None and len(second["batches"]) == 3
    assert second["cached"] == [[0, 0, 0], [0, 0, 0], [0, 128, 256]]  # full blocks of 128 before the last token
    for round_outputs in first["outputs"] + second["batches"]:
        assert len(round_outputs) == len(PROMPTS)
        for ids in round_outputs:
            assert len(ids) == MAX_TOKENS  # ignore_eos: exactly max_tokens
            assert all(0 <= t < VOCAB for t in ids)
    # Same process, second round: same outputs. Separate process (same seed): same outputs.
    assert first["outputs"][1] == first["outputs"][0]
    assert second["batches"][0] == second["batches"][1] == first["outputs"][0]
    # Different prompts do not all collapse to one continuation (the model really reads the prompt).
    assert len({tuple(ids) for ids in first["outputs"][0]}) > 1
    assert all(t > 0 for t in first["round_times"])
    # The run really was vLLM's CPU engine with the expected KV geometry.
    assert "LBHNC" in first["log"]
    assert "VLLM_CPU_OMP_THREADS_BIND" in first["log"]


def test_serve_answers_completions_with_token_id_prompts(tiny_model, reference, tmp_path):
    server = start_vllm_server(tiny_model, workdir=tmp_path)
    try:
        prompt = PROMPTS[1]
        a = server.completions(prompt, max_tokens=MAX_TOKENS)
        b = server.completions(prompt, max_tokens=MAX_TOKENS)
        other = server.completions(PROMPTS[2], max_tokens=MAX_TOKENS)
        for answer in (a, b, other):
            assert answer["model"] == "tiny"
            choice = answer["choices"][0]
            assert choice["finish_reason"] == "length"
            assert len(choice["token_ids"]) == MAX_TOKENS
            assert answer["usage"]["completion_tokens"] == MAX_TOKENS
        assert a["usage"]["prompt_tokens"] == len(prompt)
        assert a["choices"][0]["prompt_token_ids"] == prompt
        assert a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"]
        # Same dummy weights (seed 0) as the offline API: same greedy continuations.
        assert a["choices"][0]["token_ids"] == reference["outputs"][0][1]
        assert other["choices"][0]["token_ids"] == reference["outputs"][0][2]
        assert server.alive()
    finally:
        server.stop()
    assert not server.alive()
    assert _group_gone(server.proc.pid)
