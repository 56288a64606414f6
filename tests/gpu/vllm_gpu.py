"""What the real-vLLM GPU tests and ``benchmarks/vllm_gpu_ttft.py`` share: a config-only
Llama-3-8B-shaped model (``load_format="dummy"``), the environment of a vLLM on the GPU, the
engine arguments (CUDA graphs on: vLLM's default), and an ``lmcache server`` process that can be
killed and started again on the same ports.

Nothing here imports torch or vLLM at import time, so the GPU tests collect (and skip) everywhere.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 256  # the server's default --chunk-size
BLOCK = 16  # vLLM's GPU block size
TOKEN_BYTES = 32 * 2 * 8 * 128 * 2  # Llama-3-8B: layers x (K, V) x KV heads x head size x bf16 = 128 KiB
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
    "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001,
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
}
CUDA_GRAPH_SIZES = [1, 2, 4, 8, 16, 32, 64]  # CUDA graphs on (vLLM's default mode), fewer sizes to capture


def write_model(directory: str | os.PathLike[str]) -> str:
    """A Llama-3-8B config (no weights, no tokenizer) in ``directory``; returns its path."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(LLAMA3_8B, indent=1))
    return str(path)


def prompt(rng: Any, length: int) -> list[int]:
    """Token ids of ``length``, from ``rng`` (a random.Random), clear of the special ids."""
    return [rng.randrange(1000, 120000) for _ in range(length)]


@functools.lru_cache(maxsize=1)
def vllm_gpu_problem() -> str | None:
    """None if a CUDA build of vLLM and a GPU are here, else why not (for ``pytest.skip``)."""
    for module in ("torch", "vllm", "cupy"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (the GPU machine's vLLM: ../shared/gpu/vllm.md)"
    probe = ("import torch, vllm.platforms as p; "
             "print('PLATFORM', p.current_platform.device_type, torch.cuda.is_available())")
    try:
        proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=180,
                              env=gpu_vllm_env())
    except subprocess.TimeoutExpired:
        return "importing vllm timed out"
    if proc.returncode != 0:
        return f"vllm is not importable: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
    if "PLATFORM cuda True" not in proc.stdout:
        return f"no CUDA build of vLLM with a visible GPU here ({proc.stdout.strip()!r})"
    return None


def gpu_vllm_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every vLLM process on the GPU machine (offline, no flashinfer sampler)."""
    env = dict(os.environ)
    paths = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update({
        "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)),
        "VLLM_USE_FLASHINFER_SAMPLER": "0",  # flashinfer is not on the GPU machine
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
        "VLLM_HOST_IP": "127.0.0.1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
        "VLLM_CACHE_ROOT": env.get("VLLM_CACHE_ROOT", "/tmp/lmcd-vllm-cache"),  # compiled graphs, shared by runs
        "VLLM_ENGINE_READY_TIMEOUT_S": "400",
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # LLM.collective_rpc(randomize_weights)
    })
    env.update(extra or {})
    return env


def kv_transfer(port: int, mode: str, module: str = "lmcd.connector.vllm",
                connector: str = "LMCacheMPConnector") -> dict[str, Any]:
    return {"kv_connector": connector, "kv_role": "kv_both", "kv_connector_module_path": module,
            "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": port,
                                          "lmcache.mp.mp_transfer_mode": mode}}


def engine_args(model: str, kv_cache_gib: float, max_model_len: int = 40000, **more: Any) -> dict[str, Any]:
    """``vllm.LLM`` arguments: dummy weights, token ids in, CUDA graphs on, vLLM's own prefix cache on,
    a fixed KV cache size (so that several engines can share the GPU and the GPU prefix cache
    overflows where a benchmark wants it to)."""
    args: dict[str, Any] = {
        "model": model, "load_format": "dummy", "skip_tokenizer_init": True, "dtype": "bfloat16", "seed": 0,
        "enable_prefix_caching": True, "max_model_len": max_model_len, "gpu_memory_utilization": 0.15,
        "kv_cache_memory_bytes": int(kv_cache_gib * 2**30), "disable_log_stats": False,
        "max_num_seqs": max(CUDA_GRAPH_SIZES), "compilation_config": {"cudagraph_capture_sizes": CUDA_GRAPH_SIZES},
    }
    args.update(more)
    return args


def randomize_weights(worker: Any, seed: int = 0) -> int:
    """Run in vLLM's worker (``LLM.collective_rpc``): give the dummy weights a scale that makes the
    output depend on every token of the prompt (``load_format="dummy"`` fills them with values so
    small that the output hardly depends on the prompt): norms 1, everything else N(0, 0.02), from
    ``seed`` on the weights' device, so every process gets the same model. Returns the parameter count."""
    import torch

    model = getattr(worker, "worker", worker).model_runner.get_model()  # the nn.Module under any CUDA graph wrapper
    count = 0
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            generator = torch.Generator(device=param.device).manual_seed(seed + count)
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
            count += 1
    return count


class Lmcd:
    """An ``lmcache server`` process on fixed ports, logging to ``log_dir``; ``kill`` and ``start``
    again bring a new process on the same ports (the connector reconnects to it)."""

    def __init__(self, log_dir: str | os.PathLike[str], *flags: str) -> None:
        from tests.conftest import free_port

        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.flags = list(flags)
        self.port, self.http_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log_path = self.log_dir / "server-0.log"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 120.0) -> Lmcd:
        self.log_path = self.log_dir / f"server-{self.starts}.log"
        self.starts += 1
        cmd = [sys.executable, "-m", "lmcd", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--http-port", str(self.http_port), *self.flags]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        deadline = time.monotonic() + timeout
        from tests.conftest import RUNNING

        while not RUNNING.search(self.log()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"lmcache server did not start ({' '.join(cmd)}):\n{self.log()[-4000:]}")
            time.sleep(0.1)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def logs(self) -> str:
        """Every start's log, in order."""
        return "".join((self.log_dir / f"server-{i}.log").read_text(errors="replace") for i in range(self.starts))

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.http}/status", timeout=timeout) as reply:
            return json.load(reply)

    def counters(self) -> dict[str, Any]:
        return dict(self.status()["counters"])

    def wait_counter(self, name: str, at_least: int, timeout: float = 30.0) -> int:
        """Wait until counter ``name`` reaches ``at_least`` (GPU stores end after their step); its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = int(self.counters()[name])
            if value >= at_least or time.monotonic() > deadline:
                return value
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: the server dies mid-whatever, as on an OOM kill."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
