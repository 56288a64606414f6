"""One GPU worker for the end-to-end tests (tests/gpu/test_cuda_worker_gpu.py).

It builds KV the way vLLM does (ONE int8 buffer, per-layer bf16 views ``[blocks, heads,
block_size, 2*head_dim]`` (LBHNC) or ``[blocks, block_size, heads, 2*head_dim]`` (LBNHC); or with
``--buffers per-layer`` one buffer per layer, as vLLM 0.26 allocates), goes
through the real connector (``WorkerState``: registration, store, the scheduler's lookup, load)
against a running server, and checks every byte of the KV after each load. Each round, the
"forward" writes new KV on the current stream just before the store and reads the whole KV just
before the load, with no host sync: the copies must order themselves behind that work.

    python -m tests.gpu.cuda_worker --port P [--device 0] [--layout LBHNC] [--mode engine_driven]
        [--block-size 16] [--blocks 96] [--heads 8] [--buffers one|per-layer] [--skips 0,3,0] [--leave-free-mib M]
        [--expect copies|refused] [--l2-phase store|load --seed N]

``--leave-free-mib``: after a warm-up round (so that no torch kernel loads later, which takes GPU
memory) and with a reserve kept in torch's cache for the rounds, fill the GPU until only M MiB
stay free for the server (``tests.gpu.gpu_fill``). ``--expect refused``: the registration must
fail; loads then report every block as not loaded (vLLM recomputes) and stores are dropped,
without raising. Ends with one line ``RESULT {json}``; logs go to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from lmcd import protocol as p
from lmcd.connector.cuda import ipc_capable
from lmcd.connector.scheduler import LoadSpec, StoreSpec
from lmcd.connector.settings import ConnectorSettings
from lmcd.connector.shared_kv import SharedKV
from lmcd.connector.shared_pool import SharedPool
from lmcd.connector.worker import WorkerState
from tests.gpu.gpu_fill import fill_gpu

LAYERS, HEAD_DIM, NUM_CHUNKS = 8, 128, 2
CHUNK_TOKENS = 256  # the server's default --chunk-size
RESERVE_BYTES = 512 << 20  # torch's cache keeps this for the rounds once the GPU is full
WAIT_S = 20.0


class KV:
    """vLLM's KV on one GPU: per-layer views of ONE int8 buffer (vLLM 0.32), or of one buffer per layer
    (``per_layer``, vLLM 0.26), and each layer's pages as int8 rows."""

    def __init__(self, device: int, layout: str, num_blocks: int, block_size: int, heads: int,
                 per_layer: bool = False) -> None:
        self.device, self.num_blocks = device, num_blocks
        self.page = heads * block_size * 2 * HEAD_DIM * 2  # bf16
        layer = num_blocks * self.page
        if per_layer:
            self.layers = [torch.randint(-128, 128, (layer,), dtype=torch.int8, device=device) for _ in range(LAYERS)]
        else:
            buffer = torch.randint(-128, 128, (LAYERS * layer,), dtype=torch.int8, device=device)
            self.layers = [buffer[i * layer : (i + 1) * layer] for i in range(LAYERS)]
        shape = ((num_blocks, heads, block_size, 2 * HEAD_DIM) if layout == "LBHNC"
                 else (num_blocks, block_size, heads, 2 * HEAD_DIM))
        self.tensors = {f"model.layers.{i}.self_attn.attn": raw.view(torch.bfloat16).view(shape)
                        for i, raw in enumerate(self.layers)}

    def pages(self, layers: list[torch.Tensor]) -> list[torch.Tensor]:
        return [raw.view(self.num_blocks, self.page) for raw in layers]

    def equals(self, want: list[torch.Tensor]) -> bool:
        """Whether the KV holds ``want`` (read on the current stream, which waits for the copies)."""
        return all(torch.equal(have, expected) for have, expected in zip(self.layers, want, strict=True))

    def ids(self, values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.int64, device=self.device)

    def write(self, blocks: torch.Tensor) -> list[torch.Tensor]:
        """The forward writes new KV into ``blocks`` (on the current stream); their new pages."""
        for pages in self.pages(self.layers):
            pages[blocks] = torch.randint(-128, 128, (len(blocks), self.page), dtype=torch.int8, device=self.device)
        return [pages[blocks] for pages in self.pages(self.layers)]

    def expected_after_load(self, blocks: torch.Tensor, stored: list[torch.Tensor], skip: int) -> list[torch.Tensor]:
        """The whole KV as it is now (read on the current stream, before the load), with the loaded
        blocks replaced: every byte the load may change, and every one it must not."""
        want = [raw.clone() for raw in self.layers]
        for pages, new in zip(self.pages(want), stored, strict=True):
            pages[blocks[skip:]] = new[skip:]
        return want

    def first_difference(self, want: list[torch.Tensor], dst: np.ndarray, skip: int) -> str:
        for layer, (have, expected) in enumerate(zip(self.layers, want, strict=True)):
            diff = (have != expected).nonzero().flatten()
            if not len(diff):
                continue
            block = int(diff[0]) // self.page
            role = ("a skipped block" if block in dst[:skip] else "a loaded block" if block in dst[skip:]
                    else "a block the load was not given")
            return f"{len(diff)} bytes differ in layer {layer}, the first in block {block} ({role})"
        return ""


def wait_until(ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {WAIT_S} s")
        time.sleep(0.0005)


def one_round(w: WorkerState, kv: KV, rng: np.random.Generator, bpc: int, skip: int) -> str:
    """Store two chunks, look them up as the scheduler does, load them elsewhere; "" if every byte is right."""
    half = kv.num_blocks // 2
    src = rng.choice(np.arange(1, half), NUM_CHUNKS * bpc, replace=False)
    dst = half + rng.choice(kv.num_blocks - half, NUM_CHUNKS * bpc, replace=False)
    keys = [os.urandom(p.HASH_BYTES) for _ in range(NUM_CHUNKS)]
    stored = kv.write(kv.ids(src))  # no host sync before the store: it must copy these bytes
    w.store(StoreSpec(keys, src.tolist(), bpc))
    plane = w.plane
    if isinstance(plane, SharedPool):  # a GPU copy is queued, its Commit goes once it has ended
        assert plane.copier is None or plane.in_flight or plane.posted, "nothing was stored (no copy, no Commit)"
    else:
        assert isinstance(plane, SharedKV) and w.cuda is not None and w.cuda.stores_pending, "nothing was stored"
    wait_until(w.stores_done, "the store did not complete")

    def all_hit() -> bool:
        found = w.session.call(lambda c: c.lookup(keys, lease=False), None, "lookup")
        return found is not None and found.num_hit_chunks == NUM_CHUNKS

    wait_until(all_hit, "the stored chunks did not become visible")
    found = w.session.call(lambda c: c.lookup_for_load(keys), None, "lookup")  # the scheduler's, before the step
    assert found is not None and found.num_hit_chunks == NUM_CHUNKS and found.lease_id is not None
    assert found.slots is not None or not isinstance(plane, SharedPool), "no slots from a server sharing its pool"
    dst_ids = kv.ids(dst)
    want = kv.expected_after_load(dst_ids, stored, skip)  # queued before the load: the load comes after it
    failed = w.load(LoadSpec(keys, dst.tolist(), bpc, skip, found.lease_id, found.slots, found.slots_valid_until))
    assert not failed, f"the load failed for blocks {sorted(failed)[:4]}..."
    if kv.equals(want):  # on the current stream, which waits for the copy on the GPU
        return ""
    return kv.first_difference(want, dst, skip)


def l2_phase(w: WorkerState, kv: KV, bpc: int, phase: str, seed: int) -> str:
    """Two chunks made from ``seed``: stored (phase "store"), or looked up, loaded into other blocks and
    checked byte for byte (phase "load", in a later process against a server restarted onto the same disk
    tier: its lookup prefetches them from the disk into the pinned pool). "" if all went right."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    half = kv.num_blocks // 2
    src = rng.choice(np.arange(1, half), NUM_CHUNKS * bpc, replace=False)
    dst = half + rng.choice(kv.num_blocks - half, NUM_CHUNKS * bpc, replace=False)
    keys = [hashlib.blake2b(f"l2-{seed}-{i}".encode(), digest_size=p.HASH_BYTES).digest() for i in range(NUM_CHUNKS)]
    stored = kv.write(kv.ids(src))  # the same pages in both phases (same seed, same calls)
    if phase == "store":
        w.store(StoreSpec(keys, src.tolist(), bpc))
        wait_until(w.stores_done, "the store did not complete")
        return ""
    found = w.session.call(lambda c: c.lookup_for_load(keys), None, "lookup")
    if found is None or found.num_hit_chunks != NUM_CHUNKS:
        return f"the lookup found {found.num_hit_chunks if found else None} of {NUM_CHUNKS} chunks"
    want = kv.expected_after_load(kv.ids(dst), stored, 0)
    failed = w.load(LoadSpec(keys, dst.tolist(), bpc, 0, found.lease_id, found.slots, found.slots_valid_until))
    if failed:
        return f"the load failed for blocks {sorted(failed)[:4]}..."
    return "" if kv.equals(want) else kv.first_difference(want, dst, 0)


def warm_up(kv: KV, rng: np.random.Generator, bpc: int) -> None:
    """Every torch kernel a round uses, once, before the GPU is full (CUDA loads kernels lazily,
    into GPU memory); then a reserve in torch's cache for the rounds."""
    blocks = kv.ids(rng.choice(kv.num_blocks, NUM_CHUNKS * bpc, replace=False))
    stored = kv.write(blocks)
    want = kv.expected_after_load(blocks, stored, 1)
    kv.equals(want)
    (kv.layers[0][:16] != want[0][:16]).nonzero()
    del stored, want
    reserve = torch.empty(RESERVE_BYTES, dtype=torch.uint8, device=kv.device)
    torch.cuda.synchronize(kv.device)
    del reserve  # stays in torch's cache, not the driver's free memory


def refused(w: WorkerState, kv: KV, bpc: int) -> dict[str, object]:
    """The registration failed: the connector runs without the cache, and never raises into vLLM."""
    assert w.plane is None and w.worker_id is None, "the registration was expected to fail"
    keys = [os.urandom(p.HASH_BYTES) for _ in range(NUM_CHUNKS)]
    blocks = list(range(NUM_CHUNKS * bpc))
    w.store(StoreSpec(keys, blocks, bpc))
    failed = w.load(LoadSpec(keys, blocks, bpc, 0, None))
    assert failed == set(blocks), "a load without a registration must report every block for recompute"
    time.sleep(1.2)  # past the session's retry interval: it tries the server again, and is refused again
    assert w.load(LoadSpec(keys, blocks, bpc, 1, None)) == set(blocks[1:])
    return {"refused": True}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--layout", choices=["LBHNC", "LBNHC"], default="LBHNC")
    parser.add_argument("--mode", choices=["engine_driven", "lmcache_driven", "auto"], default="engine_driven")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=96)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--buffers", choices=["one", "per-layer"], default="one",
                        help="one buffer for all layers (vLLM 0.32) or one per layer (vLLM 0.26)")
    parser.add_argument("--skips", default="0,3,0", help="skip_blocks of each round's load")
    parser.add_argument("--leave-free-mib", type=float, default=None)
    parser.add_argument("--expect", choices=["copies", "refused"], default="copies")
    parser.add_argument("--l2-phase", choices=["store", "load"], default=None,
                        help="instead of the rounds: store, or load and check, the chunks of --seed (l2_phase)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.cuda.set_device(args.device)
    kv = KV(args.device, args.layout, args.blocks, args.block_size, args.heads, args.buffers == "per-layer")
    bpc = CHUNK_TOKENS // args.block_size
    rng = np.random.default_rng()
    result: dict[str, object] = {"pid": os.getpid(), "ipc_capable": ipc_capable(kv.layers[0].data_ptr())}
    held = []
    if args.leave_free_mib is not None:
        warm_up(kv, rng, bpc)
        held = fill_gpu(int(args.leave_free_mib * 2**20))
        result["free_mib_after_fill"] = torch.cuda.mem_get_info(args.device)[0] / 2**20
        logging.info("GPU %d filled: %.1f MiB free for the server", args.device, result["free_mib_after_fill"])
    settings = ConnectorSettings.from_extra_config({"lmcache.mp.host": "127.0.0.1", "lmcache.mp.port": args.port,
                                                    "lmcache.mp.mp_transfer_mode": args.mode})
    geometry = f"L{LAYERS}.H{args.heads}.N{args.block_size}.D{HEAD_DIM}.{args.layout}"
    w = WorkerState(settings, p.Namespace("gpu-harness", "bfloat16", geometry, 1, 0), f"harness gpu{args.device}")
    try:
        w.register_kv_caches(kv.tensors, args.blocks, args.block_size)
        if args.expect == "refused":
            result.update(refused(w, kv, bpc))
        elif args.l2_phase is not None:
            result["phase"] = l2_phase(w, kv, bpc, args.l2_phase, args.seed)
        else:
            assert w.plane is not None and w.worker_id is not None, "registration failed"
            assert w.blocks_per_chunk == bpc, f"blocks per chunk {w.blocks_per_chunk}, expected {bpc}"
            result["plane"] = type(w.plane).__name__
            assert w.cuda is not None
            result["allocations"] = len(w.cuda.starts)
            if isinstance(w.plane, SharedPool):
                assert w.plane.copier is not None and w.plane.copier.pipeline is not None, "no GPU copier"
                result["stages"] = w.plane.copier.pipeline.stages
            result["rounds"] = [one_round(w, kv, rng, bpc, int(skip)) for skip in args.skips.split(",")]
    finally:
        w.close()
    del held  # the filled memory goes with the process
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
