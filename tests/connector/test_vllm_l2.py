"""L2 tiers end to end: the real vLLM CPU build, real ``lmcd server`` processes, a real redis-server.

Two acceptance points: (a) a prompt stored before a server restart is a hit after it, from the
disk tier; (b) a prompt stored through the server of "node A" is a hit for a vLLM on "node B", a
server with its own (empty) L1 and the same Redis tier. The tiny model, the random weights, the
connector config and the kind of reference are those of ``test_vllm_connector`` (read its module
docstring): a hit is compared with vLLM's OWN prefix cache hitting the same 512 tokens that the
same producer prefill computed, so the prompts have 600 tokens (2 chunks of 256 = 4 blocks of 128).

vLLM starts are the cost, so the module makes four, all offline ``LLM`` runs, one request per
``generate``::

    reference  no connector, prefix caching on:   [P] [P] [Q] [Q]    (cold, hit 512, cold, hit 512)
    producer   digest connector -> S1 (fs on DIR, then resp on R):   [P] [Q]   (both stored, written behind)
               wait until both tiers wrote 4 objects; SIGTERM S1
    disk       digest connector -> S2 (fs on DIR only, new process): [P]  (hit 512: from disk)
    node_b     digest connector -> B  (resp on R only, own L1):      [Q]  (hit 512: from Redis)

A hit must show everywhere it can: the scheduler's lookup line (600 total, 512 hit, 512 to load),
the tier's ``hits`` counter (2 chunks, nothing else read), the server's retrieve, the bytes (the
digest connector's loaded digests equal those the producer logged when it stored the chunks) and
the output (the reference's hit). A broken tier fails all of them: a miss recomputes the prompt.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmcd.connector.keys import chunk_keys
from tests.conftest import RunningServer, start_server
from tests.connector.test_vllm_connector import (
    LOAD_KWARGS,
    MAX_TOKENS,
    RETRIEVED,
    VOCAB,
    _mp_config,
    _sched,
    _tokens,
)
from tests.redis_support import start_redis
from tests.vllm_support import (
    ChunkDigest,
    kv_digests,
    make_tiny_llama,
    requires_vllm,
    run_llm_script,
    token_prompts,
    write_random_weights,
)

pytestmark = requires_vllm(600)

CHUNK = 256
P, Q = token_prompts([600, 600], vocab=VOCAB, seed=21)
PROMPTS = [P, Q]
COLD, HIT = (600, 0, 0), (600, 512, 512)
PREFETCH_TIMEOUT = ("--l2-prefetch-load-timeout", "10")  # a loaded 2-core box must not turn a hit into a miss
WRITE_WAIT_S = 30.0


def _server(*adapters: dict[str, Any]) -> RunningServer:
    flags = ["--l1-size-gb", "0.25", "--chunk-size", str(CHUNK), *PREFETCH_TIMEOUT]
    for adapter in adapters:
        flags += ["--l2-adapter", json.dumps(adapter)]
    return start_server(*flags)


def _port(server: RunningServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _status(server: RunningServer) -> dict[str, Any]:
    r = httpx.get(f"{server.http_url}/status", timeout=10)
    r.raise_for_status()
    return r.json()


def _tiers(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {tier["tier"]: tier for tier in status["l2"]}


def _wait_written(server: RunningServer, num_objects: int) -> dict[str, Any]:
    """The server's status once every tier wrote ``num_objects`` and queues nothing (or the test fails)."""
    deadline = time.monotonic() + WRITE_WAIT_S
    while True:
        status = _status(server)
        tiers = _tiers(status).values()
        if all(t["counters"]["writes"] >= num_objects and t["queues"]["write_queued_objects"] == 0 for t in tiers):
            return status
        assert time.monotonic() < deadline, f"tiers not written within {WRITE_WAIT_S} s: {status['l2']}"
        time.sleep(0.2)


def _settled_log(server: RunningServer) -> str:
    """The server's log once its reader thread caught up (lines are written before replies go out)."""
    before = -1
    while before != len(server.lines):
        before = len(server.lines)
        time.sleep(0.3)
    return server.log()


@dataclass
class Run:
    """One offline vLLM run against one server: its log and outputs, the server's status and log after it."""

    log: str
    outputs: list[list[int]]
    status: dict[str, Any]
    server_log: str


@dataclass
class L2Runs:
    reference_outputs: list[list[int]]  # [P cold, P hit, Q cold, Q hit]
    reference_cached: list[int]
    producer: Run
    producer_exit: int
    disk: Run
    node_b: Run
    disk_startup_log: str
    node_b_status_before: dict[str, Any]


@pytest.fixture(scope="module")
def l2_model(tmp_path_factory) -> Path:
    model_dir = make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-l2"), vocab=VOCAB)
    write_random_weights(model_dir)
    return model_dir


def _run(model: Path, server: RunningServer, schedule: list[list[int]], workdir: Path) -> Run:
    run = run_llm_script(model, PROMPTS, kv_transfer_config=_mp_config(_port(server), digests=True),
                         max_tokens=MAX_TOKENS, enable_prefix_caching=True, schedule=schedule, timeout=300,
                         llm_kwargs=LOAD_KWARGS, workdir=workdir)
    return Run(run["log"], [out[0] for out in run["batches"]], _status(server), _settled_log(server))


@pytest.fixture(scope="module")
def runs(l2_model, tmp_path_factory) -> L2Runs:
    ref = run_llm_script(l2_model, PROMPTS, kv_transfer_config=None, max_tokens=MAX_TOKENS,
                         enable_prefix_caching=True, schedule=[[0], [0], [1], [1]], timeout=300,
                         llm_kwargs=LOAD_KWARGS, workdir=tmp_path_factory.mktemp("l2-reference"))
    assert "Registering kv caches!" not in ref["log"]  # really no connector
    disk_dir = tmp_path_factory.mktemp("l2-disk")
    redis = start_redis()
    fs = {"type": "fs", "base_path": str(disk_dir), "max_capacity_gb": 1}
    resp = {"type": "resp", "host": "127.0.0.1", "port": redis.port, "key_prefix": "vllm-l2:"}
    servers: list[RunningServer] = []
    try:
        # the producer: both prompts stored into S1's L1, written behind to the disk and to Redis
        s1 = _server(fs, resp)
        servers.append(s1)
        producer = _run(l2_model, s1, [[0], [1]], tmp_path_factory.mktemp("l2-producer"))
        producer.status = _wait_written(s1, 4)
        producer_exit = s1.stop()  # SIGTERM: nothing is left to flush, and the disk's files are final
        # the restart: a new server process on the same directory; and node B: its own L1, the same Redis
        s2 = _server(fs)
        servers.append(s2)
        s2.wait_for_log(r"found 4 objects", timeout=30)
        disk_startup_log = s2.log()
        b = _server(resp)
        servers.append(b)
        node_b_before = _status(b)
        disk = _run(l2_model, s2, [[0]], tmp_path_factory.mktemp("l2-disk-consumer"))
        node_b = _run(l2_model, b, [[1]], tmp_path_factory.mktemp("l2-node-b"))
    finally:
        for server in servers:
            server.stop()
        redis.remove()
    return L2Runs([out[0] for out in ref["batches"]], [n[0] for n in ref["cached"]], producer, producer_exit, disk,
                  node_b, disk_startup_log, node_b_before)


def _loaded_equal_stored(producer_log: str, consumer_log: str, prompt: list[int]) -> list[ChunkDigest]:
    """The consumer loaded both of ``prompt``'s chunks, each with the bytes the producer stored."""
    stored, _ = kv_digests(producer_log)
    _, loaded = kv_digests(consumer_log)
    assert [(chunk.key, chunk.skip) for chunk in loaded] == [(k.hex(), 0) for k in chunk_keys(prompt, CHUNK)]
    for chunk in loaded:
        assert len(stored.get(chunk.key, [])) == 1, f"chunk {chunk.key} not stored exactly once by the producer"
        assert chunk.digests == stored[chunk.key][0].digests, f"chunk {chunk.key}: other bytes than were stored"
    return loaded


def test_reference_is_comparable(runs):
    """vLLM's own cache hit 512 tokens of each prompt's own earlier prefill, as lmcd's hits must."""
    assert runs.reference_cached == [0, 512, 0, 512]
    assert runs.reference_outputs[0] != runs.reference_outputs[2]  # the outputs tell the prompts apart
    assert all(len(ids) == MAX_TOKENS for ids in runs.reference_outputs)


def test_producer_stores_both_prompts_into_both_tiers(runs):
    producer = runs.producer
    assert _sched(producer.log) == [COLD, COLD]
    assert producer.outputs == [runs.reference_outputs[0], runs.reference_outputs[2]]
    assert producer.status["counters"]["stored_chunks"] == 4
    tiers = _tiers(producer.status)
    assert sorted(tiers) == ["fs", "resp"]
    for tier in tiers.values():
        c = tier["counters"]
        assert (c["writes"], c["errors"], c["hits"]) == (4, 0, 0), tier
    assert tiers["fs"]["objects"] == 4
    assert runs.producer_exit == 0


def test_disk_hit_after_server_restart(runs):
    disk = runs.disk
    assert "found 4 objects" in runs.disk_startup_log
    assert _sched(disk.log) == [HIT]  # the scheduler's lookup: both chunks, prefetched from disk
    fs = _tiers(disk.status)["fs"]
    assert fs["counters"]["hits"] == 2 and fs["counters"]["misses"] == 0, fs
    assert fs["counters"]["writes"] == 0  # what was read from the tier is not written back to it
    assert (fs["counters"]["errors"], fs["counters"]["corrupt"], fs["counters"]["timeouts"]) == (0, 0, 0), fs
    counters = disk.status["counters"]
    assert (counters["lookup_hit_chunks"], counters["retrieved_chunks"], counters["stored_chunks"]) == (2, 2, 0)
    assert _tokens(RETRIEVED, disk.server_log) == [512]
    _loaded_equal_stored(runs.producer.log, disk.log, P)
    assert disk.outputs == [runs.reference_outputs[1]]  # vLLM's own cache hitting the same 512 tokens


def test_redis_hit_on_another_node(runs):
    node_b = runs.node_b
    assert runs.node_b_status_before["pool"]["num_chunks"] == 0  # B's L1 starts empty: a hit is from Redis
    assert _sched(node_b.log) == [HIT]
    resp = _tiers(node_b.status)["resp"]
    assert resp["counters"]["hits"] == 2 and resp["counters"]["misses"] == 0, resp
    assert resp["counters"]["writes"] == 0
    assert (resp["counters"]["errors"], resp["counters"]["corrupt"], resp["counters"]["timeouts"]) == (0, 0, 0), resp
    counters = node_b.status["counters"]
    assert (counters["lookup_hit_chunks"], counters["retrieved_chunks"], counters["stored_chunks"]) == (2, 2, 0)
    assert _tokens(RETRIEVED, node_b.server_log) == [512]
    _loaded_equal_stored(runs.producer.log, node_b.log, Q)
    assert node_b.outputs == [runs.reference_outputs[3]]
