"""One real vLLM on the GPU with lmcd's connector, driven through the scenarios of
tests/gpu/test_vllm_gpu.py; it starts (and kills, and starts again) its own ``lmcache server``.

    python -m tests.gpu.vllm_gpu_driver --mode engine_driven|lmcache_driven --out DIR
        [--scenarios repeat,prefix,kill] [--sleep-mode] [--serve]

Offline ``vllm.LLM`` (``VLLM_ENABLE_V1_MULTIPROCESSING`` as vLLM defaults: the engine core, with the
scheduler and the TP=1 worker, runs in a child process), a config-only Llama-3-8B with dummy
weights, token-id prompts, greedy, CUDA graphs on. The connector is the test's digest connector
(``LMCacheMPConnector`` that logs a digest of every chunk stored and loaded), so the test checks
every loaded byte. ``--serve`` runs ``vllm serve`` instead and talks to it over HTTP.

Scenarios (each result goes into DIR/result.json, with the server's counters around it):
- repeat: a 8193-token prompt cold (stored), again (vLLM's own prefix cache: 8192 tokens), and after
  ``reset_prefix_cache`` (lmcd: 8192 tokens = 32 chunks). Hit lengths are equal: vLLM's cache hits
  floor((L - 1) / 16) blocks, lmcd floor(L / 256) chunks of at most L - 1 tokens.
- prefix: a prompt sharing only its first 4096 tokens with the first (4297 tokens): from lmcd, then
  from vLLM's own cache holding those 4096 tokens (computed by the same producer prefill).
- kill: 8 prompts sharing 4096 stored tokens, generated at once while the server is SIGKILLed at the
  first lookup; then the server is started again on the same ports and a new prompt is stored and
  loaded through it.
Lines ``LMCD_PHASE <name>`` on stderr split the log between scenarios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from tests.gpu.vllm_gpu import Lmcd, engine_args, kv_transfer, prompt, randomize_weights, write_model

DIGEST = "tests.connector.digest_connector"
MAX_TOKENS = 8


def phase(name: str) -> None:
    print(f"LMCD_PHASE {name}", file=sys.stderr, flush=True)


class Engine:
    def __init__(self, llm: Any, server: Lmcd) -> None:
        from vllm import SamplingParams

        self.llm, self.server = llm, server
        self.params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)

    def generate(self, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[dict[str, Any]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = self.params if max_tokens == MAX_TOKENS else SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [{"tokens": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens} for o in outs]

    def one(self, tokens: list[int]) -> dict[str, Any]:
        before = self.server.counters()
        out = self.generate([tokens])[0]
        out["counters_before"] = before
        return out

    def reset(self) -> None:
        assert self.llm.reset_prefix_cache(), "vLLM refused to reset its prefix cache"

    def settle(self, stored_before: int, chunks: int) -> int:
        """Wait for this many new chunks stored (a GPU store ends after its step)."""
        return self.server.wait_counter("stored_chunks", stored_before + chunks)


def repeat(e: Engine, a: list[int]) -> dict[str, Any]:
    phase("repeat")
    r: dict[str, Any] = {"cold": e.one(a)}
    r["stored_after_cold"] = e.settle(r["cold"]["counters_before"]["stored_chunks"], len(a) // 256)
    r["vllm_hit"] = e.one(a)
    e.reset()
    r["lmcd_hit"] = e.one(a)
    r["counters_after"] = e.server.counters()
    return r


def prefix(e: Engine, a: list[int], rng: random.Random) -> dict[str, Any]:
    phase("prefix")
    c = a[:4096] + prompt(rng, 201)
    e.reset()
    r: dict[str, Any] = {"lmcd_hit": e.one(c)}
    e.reset()
    r["warm_head"] = e.one(a[:4097])  # vLLM's own cache now holds the shared 4096 tokens (256 blocks)
    r["vllm_hit"] = e.one(c)
    r["counters_after"] = e.server.counters()
    return r


def kill(e: Engine, a: list[int], rng: random.Random) -> dict[str, Any]:
    phase("kill")
    prompts = [a[:4096] + prompt(rng, 1025) for _ in range(8)]
    e.reset()
    server = e.server
    lookups = int(server.counters()["lookups"])
    r: dict[str, Any] = {}
    done = threading.Event()

    def killer() -> None:  # SIGKILL at the first lookup of this batch: loads and stores are cut off
        while not done.is_set():
            try:
                if int(server.counters()["lookups"]) > lookups:
                    break
            except OSError:
                pass
            time.sleep(0.002)
        r["killed_at"] = time.monotonic()
        server.kill()

    thread = threading.Thread(target=killer, daemon=True)
    started = time.monotonic()
    thread.start()
    outs = e.generate(prompts, max_tokens=16)
    r["generate_s"] = time.monotonic() - started
    r["generate_ended"] = time.monotonic()
    done.set()
    thread.join(30)
    r["killed_before_end"] = r.get("killed_at", float("inf")) < r["generate_ended"]
    r["outputs"] = outs
    phase("restart")
    server.start()
    r["restarted"] = True
    attempts = []
    for _ in range(5):  # the connector notices the new server within its retry interval
        time.sleep(1.0)
        fresh = prompt(rng, 4097)
        before = server.counters()
        cold = e.generate([fresh])[0]
        e.settle(int(before["stored_chunks"]), 16)
        e.reset()
        hit = e.one(fresh)
        attempts.append({"cold": cold, "hit": hit, "counters_after": server.counters()})
        if hit["cached"] == 4096:
            break
    r["after_restart"] = attempts
    return r


def offline(args: argparse.Namespace, out: Path, server: Lmcd, model: str) -> dict[str, Any]:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    ktc = KVTransferConfig(**kv_transfer(server.port, args.mode, DIGEST, "DigestConnector"))
    extra: dict[str, Any] = {"enable_sleep_mode": True} if args.sleep_mode else {}
    kwargs = engine_args(model, args.kv_cache_gib, max_model_len=20000, kv_transfer_config=ktc, **extra)
    if args.cpu:  # a dry run of this driver on vLLM CPU (a developer's check, not a test)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("kv_cache_memory_bytes", "gpu_memory_utilization")}
        kwargs.update(block_size=32, enforce_eager=True)  # vLLM CPU: multiples of 32
    started = time.monotonic()
    try:
        llm = LLM(**kwargs)
    except Exception as exc:  # e.g. server copies refusing sleep mode's memory: the test reads the log
        return {"init_error": f"{type(exc).__name__}: {exc}", "init_s": time.monotonic() - started}
    result: dict[str, Any] = {"init_s": time.monotonic() - started}
    result["weights"] = llm.collective_rpc(randomize_weights)
    engine = Engine(llm, server)
    rng = random.Random(7)
    a = prompt(rng, 8193)
    for name in args.scenarios.split(","):
        result[name] = {"repeat": lambda: repeat(engine, a), "prefix": lambda: prefix(engine, a, rng),
                        "kill": lambda: kill(engine, a, rng)}[name]()
        (out / "result.json").write_text(json.dumps(result))
    return result


def serve(args: argparse.Namespace, out: Path, server: Lmcd, model: str) -> dict[str, Any]:
    """``vllm serve`` with the connector, and /v1/completions: stored, loaded after a reset, and from
    vLLM's own prefix cache."""
    from tests.gpu.vllm_gpu import CUDA_GRAPH_SIZES, gpu_vllm_env
    from tests.vllm_support import start_vllm_server

    env = gpu_vllm_env({"VLLM_SERVER_DEV_MODE": "1"})  # POST /reset_prefix_cache
    extra = ["--kv-cache-memory-bytes", str(int(args.kv_cache_gib * 2**30)), "--gpu-memory-utilization", "0.15",
             "--max-num-seqs", str(max(CUDA_GRAPH_SIZES)),
             "--compilation-config", json.dumps({"cudagraph_capture_sizes": CUDA_GRAPH_SIZES})]
    started = time.monotonic()
    vllm = start_vllm_server(model, kv_transfer_config=kv_transfer(server.port, args.mode), env=env,
                             extra_args=extra, max_model_len=20000, enable_prefix_caching=True, enforce_eager=False,
                             block_size=None, timeout=400, workdir=out)
    import httpx

    try:
        result: dict[str, Any] = {"init_s": time.monotonic() - started}
        rng = random.Random(11)
        s = prompt(rng, 4097)
        before = server.counters()
        result["cold"] = vllm.completions(s, max_tokens=MAX_TOKENS)["choices"][0]["token_ids"]
        result["stored"] = server.wait_counter("stored_chunks", int(before["stored_chunks"]) + 16)
        httpx.post(f"{vllm.url}/reset_prefix_cache", timeout=30).raise_for_status()
        before = server.counters()
        result["lmcd_hit"] = vllm.completions(s, max_tokens=MAX_TOKENS)["choices"][0]["token_ids"]
        after = server.counters()
        result["retrieved"] = int(after["retrieved_chunks"]) - int(before["retrieved_chunks"])
        result["vllm_hit"] = vllm.completions(s, max_tokens=MAX_TOKENS)["choices"][0]["token_ids"]
        result["vllm_log"] = vllm.log()[-20000:]
        return result
    finally:
        vllm.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["engine_driven", "lmcache_driven"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenarios", default="repeat,prefix,kill")
    parser.add_argument("--sleep-mode", action="store_true", help="vLLM's sleep-mode allocator (CUDA VMM memory)")
    parser.add_argument("--serve", action="store_true", help="vllm serve and /v1/completions instead")
    parser.add_argument("--kv-cache-gib", type=float, default=4.0)
    parser.add_argument("--l1-size-gb", default="8")
    parser.add_argument("--cpu", action="store_true",
                        help="a dry run of the scenarios on vLLM CPU with a tiny model (in tests.vllm_support's env)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.cpu:
        from tests.vllm_support import make_tiny_llama

        model = str(make_tiny_llama(out / "tiny", vocab=128256, max_pos=32768))
    else:
        model = write_model(out / "llama3-8b")
    flags = ["--l1-size-gb", args.l1_size_gb] + ([] if args.cpu else ["--cuda", "on"])
    if args.mode == "lmcache_driven":
        flags += ["--share-pool", "true"]
    server = Lmcd(out, *flags).start()
    try:
        result = (serve if args.serve else offline)(args, out, server, model)
        result["server_status"] = server.status()
    except BaseException:
        result = {"error": traceback.format_exc()}
    finally:
        server.stop()
    (out / "result.json").write_text(json.dumps(result))
    print("LMCD_DRIVER_DONE", flush=True)
    os._exit(0)  # vLLM's engine core and its threads go with the process


if __name__ == "__main__":
    main()
