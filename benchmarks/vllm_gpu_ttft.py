"""TTFT of a real vLLM on the GPU with LMCacheMPConnector: cold, a hit from lmcd, and a hit from
vLLM's own prefix cache in GPU memory (the floor), plus a mixed load whose shared prefixes overflow
the GPU's KV cache. Llama-3-8B geometry (config only, dummy weights given a scale), bf16, CUDA graphs on.

Usage, on the GPU machine with vLLM installed (``benchmarks/gpu_session.sh vllm-bench`` runs it)::

    python benchmarks/vllm_gpu_ttft.py --out DIR [--arms none,engine_driven,lmcache_driven,none] [--reps 3]

Each arm is a fresh process, one after the other: ``none`` is vLLM without a connector;
``engine_driven`` (server copies over CUDA IPC) and ``lmcache_driven`` (worker copies through a
``--share-pool`` server) run against a fresh ``lmcache server --cuda on``. Per arm:
  1. TTFT (max_tokens=1, the wall time of ``LLM.generate`` for one request) at 2K, 8K, 16K and 32K
     tokens, ``--reps`` fresh prompts each of L + 1 tokens (so that both caches can hit exactly L):
     cold (computed, and stored by the connector arms), again (vLLM's own GPU prefix cache: the
     floor), and, connector arms only, after ``reset_prefix_cache`` (a hit from lmcd);
  2. a mixed load: 12 documents of 8K tokens (96K tokens: twice the GPU's 6 GiB KV cache of 48K
     tokens) sent once, then ``--mixed-rounds`` rounds of 32 requests at once: 16 = a document and
     a fresh 64-token question, 16 = fresh 8K-token prompts; 32 tokens out each. Throughput and
     the engine's TTFT per request (p50, p99).
The connector runs at ``LMCACHE_LOG_LEVEL=DEBUG`` in its arms, which logs the host time of each of
its hooks in vLLM's step; the report gives their medians and p99s. ``--report DIR`` prints the
table of the arms found in DIR (one ``arm-*.json`` each) and one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.gpu.vllm_gpu import (  # noqa: E402
    TOKEN_BYTES,
    Lmcd,
    engine_args,
    gpu_vllm_env,
    kv_transfer,
    prompt,
    randomize_weights,
    write_model,
)

LENGTHS = (2048, 8192, 16384, 32768)
KV_CACHE_GIB = 6.0  # the GPU's KV cache: 48K tokens of Llama-3-8B
DOCS, DOC_TOKENS, QUESTION, UNIQUE, OUT_TOKENS = 12, 8192, 64, 16, 32
DRY = os.environ.get("LMCD_BENCH_DRY_CPU") == "1"  # a developer's dry run of this script on vLLM CPU, tiny model
if DRY:
    LENGTHS, DOC_TOKENS, UNIQUE = (512, 1024), 1024, 4
HOOK = re.compile(r"Connector (\w+) took ([0-9.]+) ms")
HANDOVER = re.compile(r"(Load|Store) of (\d+) chunks handed over in ([0-9.]+) ms")  # the worker's call, host time
COPY = re.compile(r"(Stored|Retrieved) (\d+) tokens in ([0-9.]+) seconds \(([0-9.]+) GB/s")


def one_arm(arm: str, index: int, out: Path, reps: int, mixed_rounds: int) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    server = None
    extra: dict[str, Any] = {}
    if arm != "none":
        flags = ["--l1-size-gb", "2" if DRY else "64"] + ([] if DRY else ["--cuda", "on"])
        flags += ["--share-pool", "true"] if arm == "lmcache_driven" else []
        server = Lmcd(out / f"server-{index}", *flags).start(timeout=300)
        assert server.proc is not None
        (out / "server.pid").write_text(str(server.proc.pid))  # the parent stops it if this arm is killed
        extra["kv_transfer_config"] = KVTransferConfig(**kv_transfer(server.port, arm))
        os.environ["LMCACHE_LOG_LEVEL"] = "DEBUG"  # the connector's hook times (read by the engine core child)
    kwargs = engine_args(write_model(out / "llama3-8b"), KV_CACHE_GIB, max_model_len=max(LENGTHS) + 256, **extra)
    if DRY:
        from tests.vllm_support import make_tiny_llama

        kwargs = {k: v for k, v in kwargs.items() if k not in ("kv_cache_memory_bytes", "gpu_memory_utilization")}
        kwargs.update(model=str(make_tiny_llama(out / "tiny", vocab=128256, max_pos=8192)), block_size=32,
                      enforce_eager=True)
    started = time.monotonic()
    llm = LLM(**kwargs)
    res: dict[str, Any] = {"arm": arm, "init_s": time.monotonic() - started}
    llm.collective_rpc(randomize_weights)
    rng = random.Random(1234)
    first = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False)

    def ttft(tokens: list[int]) -> tuple[float, int]:
        t = time.perf_counter()
        o = llm.generate([TokensPrompt(prompt_token_ids=tokens)], first, use_tqdm=False)[0]
        return time.perf_counter() - t, o.num_cached_tokens

    def stores_done(before: int, chunks: int) -> None:
        if server is not None:
            server.wait_counter("stored_chunks", before + chunks, timeout=60)

    def stored() -> int:
        return int(server.counters()["stored_chunks"]) if server is not None else 0

    for length in (min(LENGTHS), max(LENGTHS)):  # kernels and allocations of both ends, before any timing
        before = stored()
        ttft(prompt(rng, length + 1))
        stores_done(before, length // 256)
    assert llm.reset_prefix_cache()
    rows = []
    for length in LENGTHS:
        for rep in range(reps):
            tokens = prompt(rng, length + 1)
            before = stored()
            cold, cached_cold = ttft(tokens)
            stores_done(before, length // 256)
            gpu_hit, cached_gpu = ttft(tokens)
            row = {"tokens": length, "rep": rep, "cold_s": cold, "gpu_hit_s": gpu_hit,
                   "cached": {"cold": cached_cold, "gpu_hit": cached_gpu}}
            if server is not None:
                assert llm.reset_prefix_cache()
                row["lmcd_hit_s"], row["cached"]["lmcd_hit"] = ttft(tokens)
            rows.append(row)
            print("TTFT", json.dumps(row), flush=True)
    res["ttft"] = rows
    assert llm.reset_prefix_cache()
    res["mixed"] = mixed(llm, rng, mixed_rounds, stores_done, stored)
    if server is not None:
        res["server_status"] = server.status()
        server.stop()
    return res


def mixed(llm: Any, rng: random.Random, rounds: int, stores_done: Any, stored: Any) -> list[dict[str, Any]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    docs = [prompt(rng, DOC_TOKENS) for _ in range(DOCS)]
    before = stored()
    llm.generate([TokensPrompt(prompt_token_ids=d) for d in docs],
                 SamplingParams(temperature=0.0, max_tokens=1, detokenize=False), use_tqdm=False)
    stores_done(before, DOCS * DOC_TOKENS // 256)
    params = SamplingParams(temperature=0.0, max_tokens=OUT_TOKENS, ignore_eos=True, detokenize=False)
    results = []
    for r in range(rounds):
        shared = [docs[(i + r) % DOCS] + prompt(rng, QUESTION) for i in range(UNIQUE)]
        fresh = [prompt(rng, DOC_TOKENS + QUESTION) for _ in range(UNIQUE)]
        batch = [p for pair in zip(shared, fresh, strict=True) for p in pair]  # interleaved arrivals
        t = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False)
        wall = time.perf_counter() - t
        ttfts = [float(getattr(o.metrics, "first_token_latency", float("nan"))) for o in outs]
        row = {"round": r, "wall_s": wall, "requests": len(batch), "out_tokens": sum(len(o.outputs[0].token_ids)
                                                                                    for o in outs),
               "ttft_s": ttfts, "cached": [o.num_cached_tokens for o in outs]}
        results.append(row)
        print("MIXED", json.dumps({k: v for k, v in row.items() if k != "ttft_s"}), flush=True)
    return results


# ------------------------------------------------------------------ the report


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def hook_times(log: str) -> dict[str, dict[str, float]]:
    found: dict[str, list[float]] = {}
    for m in HOOK.finditer(log):
        found.setdefault(m[1], []).append(float(m[2]))
    return {name: {"calls": len(v), "p50_ms": statistics.median(v), "p99_ms": quantile(v, 0.99), "max_ms": max(v)}
            for name, v in sorted(found.items())}


def handovers(log: str) -> dict[str, dict[str, float]]:
    """Host time of the worker's load and store calls, per call and per chunk (p50, p99, max)."""
    found: dict[str, list[tuple[int, float]]] = {}
    for m in HANDOVER.finditer(log):
        found.setdefault(m[1].lower(), []).append((int(m[2]), float(m[3])))
    out = {}
    for what, calls in sorted(found.items()):
        times = [t for _, t in calls]
        one_chunk = [t for n, t in calls if n == 1]
        out[what] = {"calls": len(calls), "p50_ms": statistics.median(times), "p99_ms": quantile(times, 0.99),
                     "max_ms": max(times), "median_chunks": statistics.median(n for n, _ in calls),
                     "one_chunk_p50_ms": statistics.median(one_chunk) if one_chunk else float("nan")}
    return out


def copies(log: str) -> dict[str, dict[int, list[float]]]:
    found: dict[str, dict[int, list[float]]] = {"Stored": {}, "Retrieved": {}}
    for m in COPY.finditer(log):
        found[m[1]].setdefault(int(m[2]), []).append(float(m[4]))
    return found


def report(out: Path) -> dict[str, Any]:
    arms = []
    for path in sorted(out.glob("arm-*.json"), key=lambda p: int(p.stem.split("-")[1])):  # in run order
        data = json.loads(path.read_text())
        log_path = path.with_suffix(".log")
        data["log"] = log_path.read_text(errors="replace") if log_path.exists() else ""
        arms.append(data)
    base = [a for a in arms if a["arm"] == "none"]
    med = statistics.median

    def per_length(arm: dict[str, Any], key: str) -> dict[int, float]:
        return {n: med([r[key] for r in arm["ttft"] if r["tokens"] == n]) for n in LENGTHS
                if any(key in r for r in arm["ttft"] if r["tokens"] == n)}

    summary: dict[str, Any] = {"arms": []}
    cold_none = {n: med([v for a in base for v in [per_length(a, "cold_s")[n]]]) for n in LENGTHS} if base else {}
    print(f"\nvLLM on GPU, Llama-3-8B geometry, CUDA graphs on; TTFT medians (s) per run, {len(arms)} runs")
    print("| run | arm | tokens | cold | lmcd hit | vLLM GPU hit | cold / lmcd hit | lmcd / GPU hit | "
          "miss overhead |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for i, arm in enumerate(arms):
        cold, gpu, hit = per_length(arm, "cold_s"), per_length(arm, "gpu_hit_s"), per_length(arm, "lmcd_hit_s")
        entry: dict[str, Any] = {"run": i, "arm": arm["arm"], "cold_s": cold, "gpu_hit_s": gpu, "lmcd_hit_s": hit}
        for n in LENGTHS:
            over = (cold[n] / cold_none[n] - 1) * 100 if cold_none and arm["arm"] != "none" else None
            print(f"| {i} | {arm['arm']} | {n} | {cold[n]:.4f} | "
                  + (f"{hit[n]:.4f} | " if n in hit else "- | ") + f"{gpu[n]:.4f} | "
                  + (f"**{cold[n] / hit[n]:.1f}x** | {hit[n] / gpu[n]:.2f} | " if n in hit else "- | - | ")
                  + (f"{over:+.2f} % |" if over is not None else "- |"))
        bad = [r for r in arm["ttft"] if r["cached"].get("lmcd_hit", r["tokens"]) != r["tokens"]
               or r["cached"]["gpu_hit"] != r["tokens"] or r["cached"]["cold"] != 0]
        entry["unexpected_hits"] = bad
        mixed_rows = arm["mixed"]
        ttfts = [t for r in mixed_rows for t in r["ttft_s"]]
        entry["mixed"] = {"req_per_s": [r["requests"] / r["wall_s"] for r in mixed_rows],
                          "out_tok_per_s": [r["out_tokens"] / r["wall_s"] for r in mixed_rows],
                          "ttft_p50_s": quantile(ttfts, 0.5), "ttft_p99_s": quantile(ttfts, 0.99),
                          "cached_tokens": [sum(r["cached"]) for r in mixed_rows]}
        entry["hooks"] = hook_times(arm["log"])
        entry["handovers"] = handovers(arm["log"])
        server_log = "".join(p.read_text(errors="replace") for p in sorted(out.glob(f"server-{i}/server-*.log")))
        entry["copies_gbps"] = {verb: {n: med(v) for n, v in sorted(d.items()) if n in LENGTHS}
                                for verb, d in copies(server_log).items()}
        entry["init_s"] = arm["init_s"]
        summary["arms"].append(entry)
    print("\nMixed load: 32 requests at once per round (16 share one of 12 8K-token documents that overflow the "
          "GPU cache, 16 fresh), 32 tokens out")
    print("| run | arm | requests/s per round | output tokens/s | TTFT p50 (s) | TTFT p99 (s) | tokens from caches |")
    print("|---:|---|---|---|---:|---:|---|")
    for e in summary["arms"]:
        m = e["mixed"]
        print(f"| {e['run']} | {e['arm']} | {', '.join(f'{v:.2f}' for v in m['req_per_s'])} | "
              f"{', '.join(f'{v:.0f}' for v in m['out_tok_per_s'])} | {m['ttft_p50_s']:.3f} | {m['ttft_p99_s']:.3f} | "
              f"{', '.join(map(str, m['cached_tokens']))} |")
    print("\nConnector hooks, host time per call inside vLLM's step (ms): p50 / p99 / max (calls)")
    for e in summary["arms"]:
        if e["hooks"]:
            print(f"- run {e['run']} {e['arm']}: " + "; ".join(
                f"{k} {v['p50_ms']:.3f} / {v['p99_ms']:.3f} / {v['max_ms']:.3f} ({v['calls']})"
                for k, v in e["hooks"].items()))
            print("  worker calls (host ms): " + "; ".join(
                f"{k} p50 {v['p50_ms']:.3f} / p99 {v['p99_ms']:.3f} / max {v['max_ms']:.3f} over {v['calls']} calls "
                f"(median {v['median_chunks']:.0f} chunks; 1-chunk calls p50 {v['one_chunk_p50_ms']:.3f})"
                for k, v in e["handovers"].items()))
            print(f"  server copy GB/s (median per size): {json.dumps(e['copies_gbps'])}")
        if e["unexpected_hits"]:
            print(f"- run {e['run']} {e['arm']}: UNEXPECTED HIT LENGTHS {e['unexpected_hits']}")
    print(f"\n(KV bytes per token {TOKEN_BYTES}; 16K tokens = {16384 * TOKEN_BYTES / 2**30:.1f} GiB)")
    print("RESULT " + json.dumps(summary))
    return summary


def run_arm(out: Path, index: int, arm: str, args: argparse.Namespace) -> None:
    """One arm in a fresh process (its own process group), bounded by ``--arm-timeout``."""
    cmd = [sys.executable, __file__, "--out", str(out), "--one-arm", arm, "--index", str(index),
           "--reps", str(args.reps), "--mixed-rounds", str(args.mixed_rounds)]
    started = time.monotonic()
    pid_file = out / "server.pid"
    pid_file.unlink(missing_ok=True)
    env = os.environ.copy() if DRY else gpu_vllm_env()
    with open(out / f"arm-{index}.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code: int | str = proc.wait(args.arm_timeout)
        except subprocess.TimeoutExpired:
            code = "timeout"
        for pgid in [proc.pid] + ([int(pid_file.read_text())] if pid_file.exists() else []):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)  # vLLM's engine core, and a server the arm left running
        proc.wait()
    print(f"arm {index} {arm}: exit {code} in {time.monotonic() - started:.0f} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--arms", default="none,engine_driven,lmcache_driven,none")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--mixed-rounds", type=int, default=2)
    parser.add_argument("--arm-timeout", type=float, default=280)
    parser.add_argument("--one-arm", help=argparse.SUPPRESS)  # the child process of one arm
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--report", action="store_true", help="only print the report of the arms in --out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.one_arm:
        res = one_arm(args.one_arm, args.index, out, args.reps, args.mixed_rounds)
        (out / f"arm-{args.index}.json").write_text(json.dumps(res))
        print("ARM_DONE", flush=True)
        os._exit(0)
    if not args.report:
        for i, arm in enumerate(args.arms.split(",")):
            run_arm(out, i, arm, args)
    report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
