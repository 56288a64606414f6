"""LMCache's own settings in the server's configuration: an LMCache user's commands and ``lmcache_config.yaml`` work
verbatim, or fail once with a message saying why.

- the in-process YAML keys ``chunk_size``, ``local_cpu`` (``false``: one WARNING, ignored) and
  ``max_local_cpu_size`` (sizes L1 where nothing higher does; one INFO line either way);
- CacheBlend (``lmcd.cacheblend``): enabled by ``LMCACHE_ENABLE_BLENDING``, ``enable_blending`` or
  ``--engine-type blend``, the server exits with one message; tuning keys alone get one WARNING;
- ``--engine-type``: ``default`` is accepted, anything else refused naming the valid values.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from lmcd.server.config import SETTINGS, ConfigError, resolve
from tests.conftest import start_server
from tests.server.test_config_cli import ALLOCATING, BOUND, assert_fails, clean_env, parse, run_server_cli, write_yaml

BLEND_ENV = ("LMCACHE_ENABLE_BLENDING", "LMCACHE_BLEND_SPECIAL_STR", "LMCACHE_BLEND_RECOMPUTE_RATIOS",
             "LMCACHE_BLEND_CHECK_LAYERS", "LMCACHE_BLEND_MIN_TOKENS")
NOT_YET = "is not available in lmcd yet"


@pytest.fixture(autouse=True)
def _no_settings_in_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in {s.env for s in SETTINGS} | {"LMCD_CONFIG", *BLEND_ENV}:
        monkeypatch.delenv(name, raising=False)


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


# ---------------------------------------------------------------- LMCache's in-process keys


def test_max_local_cpu_size_sets_l1_with_one_info_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    path = write_yaml(tmp_path / "lmcache_config.yaml", {"chunk_size": 64, "local_cpu": True,
                                                         "max_local_cpu_size": 0.5})
    config = resolve(parse("--config", path), {})
    assert (config.chunk_size, config.l1_size_gb, config.l1_size_is_default) == (64, 0.5, False)
    assert messages(caplog, logging.INFO) == [
        f"{path}: max_local_cpu_size=0.5 -> --l1-size-gb 0.5 (the L1 pool in GiB)"]
    assert messages(caplog, logging.WARNING) == []  # local_cpu: true is what lmcd does anyway


@pytest.mark.parametrize("argv,environ,file_extra,source", [
    (("--l1-size-gb", "0.25"), {}, {}, "--l1-size-gb"),
    ((), {"LMCACHE_L1_SIZE_GB": "0.25"}, {}, "LMCACHE_L1_SIZE_GB"),
    ((), {}, {"l1_size_gb": 0.25}, "l1_size_gb"),
], ids=["flag", "env", "file"])
def test_l1_size_from_a_higher_source_beats_max_local_cpu_size(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                               argv: tuple[str, ...], environ: dict[str, str],
                                                               file_extra: dict[str, float], source: str) -> None:
    caplog.set_level(logging.DEBUG)
    path = write_yaml(tmp_path / "c.yaml", {"max_local_cpu_size": 0.5, **file_extra})
    assert resolve(parse("--config", path, *argv), environ).l1_size_gb == 0.25
    (line,) = messages(caplog, logging.INFO)
    assert line.startswith(f"{path}: max_local_cpu_size=0.5 is not used: ") and source in line, line


def test_local_cpu_false_warns_once_and_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    path = write_yaml(tmp_path / "c.yaml", {"local_cpu": False, "l1_size_gb": 0.25})
    assert resolve(parse("--config", path), {}) == resolve(parse("--l1-size-gb", "0.25"), {})
    assert messages(caplog, logging.WARNING) == [
        f"{path}: local_cpu: false is ignored: lmcd always keeps L1 in CPU memory"]


@pytest.mark.parametrize("data,needles", [
    ({"local_cpu": "maybe"}, ("local_cpu", "true or false")),
    ({"max_local_cpu_size": "lots"}, ("max_local_cpu_size", "--l1-size-gb", "lots")),
    ({"max_local_cpu_size": True}, ("max_local_cpu_size", "expected float")),
    ({"max_local_cpu_size": 0}, ("--l1-size-gb", "positive")),
    ({"local_cpus": True}, ("unknown keys ['local_cpus']", "max_local_cpu_size", "enable_blending")),
])
def test_invalid_in_process_keys_are_refused(tmp_path: Path, data: dict[str, object],
                                             needles: tuple[str, ...]) -> None:
    path = write_yaml(tmp_path / "c.yaml", data)
    with pytest.raises(ConfigError) as info:
        resolve(parse("--config", path), {})
    for needle in needles:
        assert needle in str(info.value), info.value


def test_an_lmcache_config_file_works_verbatim_in_a_real_server(tmp_path: Path) -> None:
    """LMCache's in-process keys and CacheBlend's tuning keys (blending off): the server starts and says, once
    each, what it made of them."""
    path = write_yaml(tmp_path / "lmcache_config.yaml", (
        "chunk_size: 64\nlocal_cpu: false\nmax_local_cpu_size: 0.25\n"
        "enable_blending: false\nblend_recompute_ratios: 0.15\nblend_special_str: \" # # \"\n"))
    server = start_server("--config", path, "--touch-pool", "false",
                          env=clean_env(LMCACHE_BLEND_CHECK_LAYERS="1"))
    try:
        assert int(server.wait_for_log(BOUND.pattern).group(2)) == 64
        assert float(server.wait_for_log(ALLOCATING.pattern).group(1)) == 0.25
        log = server.log()
    finally:
        assert server.stop() == 0, server.log()
    lines = log.splitlines()
    (mapped,) = [ln for ln in lines if "max_local_cpu_size" in ln]
    assert f"LMCache INFO: {path}: max_local_cpu_size=0.25 -> --l1-size-gb 0.25" in mapped, log
    (local_cpu,) = [ln for ln in lines if "local_cpu: false" in ln]
    assert "LMCache WARNING:" in local_cpu and "always keeps L1 in CPU memory" in local_cpu
    (blend,) = [ln for ln in lines if "CacheBlend" in ln]
    assert "LMCache WARNING:" in blend and "settings are ignored" in blend
    assert "LMCACHE_BLEND_CHECK_LAYERS" in blend and "blend_recompute_ratios" in blend and "blend_special_str" in blend


# ---------------------------------------------------------------- CacheBlend


@pytest.mark.parametrize("argv,env,data,needles", [
    ((), {"LMCACHE_ENABLE_BLENDING": "True"}, None, ("CacheBlend (LMCACHE_ENABLE_BLENDING=True)",
                                                      "unset LMCACHE_ENABLE_BLENDING")),
    ((), {"LMCACHE_ENABLE_BLENDING": "1", "LMCACHE_BLEND_SPECIAL_STR": " # # "}, None,
     ("CacheBlend (LMCACHE_ENABLE_BLENDING=1)",)),
    ((), {}, {"enable_blending": True, "blend_check_layers": 1}, ("CacheBlend (enable_blending: True in ",
                                                                  "remove enable_blending from")),
    (("--engine-type", "blend"), {}, None, ("CacheBlend (--engine-type blend)", "--engine-type default")),
    ((), {"LMCACHE_ENGINE_TYPE": "blend"}, None, ("CacheBlend (--engine-type blend)",)),
    ((), {}, {"engine_type": "blend_legacy"}, ("CacheBlend (--engine-type blend_legacy)",)),
], ids=["env", "env-with-tuning", "yaml", "flag", "engine-type-env", "engine-type-yaml"])
def test_blending_enabled_exits_with_one_message(tmp_path: Path, argv: tuple[str, ...], env: dict[str, str],
                                                 data: dict[str, object] | None, needles: tuple[str, ...]) -> None:
    config = ("--config", write_yaml(tmp_path / "c.yaml", data)) if data is not None else ()
    result = run_server_cli("server", "--l1-size-gb", "0.25", "--touch-pool", "false", *config, *argv,
                            env=clean_env(**env))
    assert result.returncode == 2
    message = assert_fails(result, NOT_YET, "to serve without blending", *needles)
    assert message.count("CacheBlend") == 1 and result.stdout == "", message  # one message, no log lines
    assert message.strip().splitlines() == [message.strip()], message


def test_blending_env_false_beats_the_file_and_tuning_keys_only_warn(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    path = write_yaml(tmp_path / "c.yaml", {"enable_blending": True, "blend_min_tokens": 256})
    resolve(parse("--config", path), {"LMCACHE_ENABLE_BLENDING": "false", "LMCACHE_BLEND_RECOMPUTE_RATIOS": "0.15"})
    assert messages(caplog, logging.WARNING) == [
        "CacheBlend is not available in lmcd yet, so its settings are ignored: LMCACHE_BLEND_RECOMPUTE_RATIOS, "
        f"blend_min_tokens in {path}"]
    caplog.clear()
    resolve(parse(), {"LMCACHE_ENABLE_BLENDING": "0"})  # blending off and nothing to tune: nothing to say
    assert messages(caplog, logging.WARNING) == []


# ---------------------------------------------------------------- --engine-type


def test_engine_type_default_is_accepted_from_every_source(tmp_path: Path) -> None:
    assert resolve(parse(), {}).engine_type == "default"
    assert resolve(parse("--engine-type", "default"), {}).engine_type == "default"
    assert resolve(parse(), {"LMCACHE_ENGINE_TYPE": "DEFAULT"}).engine_type == "default"
    path = write_yaml(tmp_path / "c.yaml", {"engine_type": "default"})
    assert resolve(parse("--config", path), {}) == resolve(parse(), {})


def test_engine_type_default_starts_a_real_server() -> None:
    server = start_server("--engine-type", "default", "--l1-size-gb", "0.25", "--touch-pool", "false",
                          env=clean_env())
    try:
        server.wait_for_log(BOUND.pattern)
    finally:
        assert server.stop() == 0, server.log()


def test_unknown_engine_type_is_refused_naming_the_valid_values() -> None:
    result = run_server_cli("server", "--engine-type", "fast", "--l1-size-gb", "0.25", "--touch-pool", "false")
    assert result.returncode == 2
    message = assert_fails(result, "--engine-type 'fast'", "valid values: default")
    assert re.search(r"blend\b.*not available yet", message), message
