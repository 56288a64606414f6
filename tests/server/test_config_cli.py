"""Server configuration and the command line: precedence, validation, help, console scripts, busy ports.

Precedence is flag > environment > ``--config`` YAML > default. It is checked through
``lmcd.server.config.resolve`` with the real parser, and once end to end through a real server's
startup log. Invalid values must make ``python -m lmcd server`` exit non-zero with a message naming
the flag.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmcd.cli import build_parser
from lmcd.server import config as cfgmod
from lmcd.server.config import SETTINGS, ConfigError, ServerConfig, default_l1_size_gb, resolve
from tests.conftest import server_command, start_server

VENV_BIN = Path(sys.executable).parent
BOUND = re.compile(r"ZMQ server bound to (\S+) \(chunk size (\d+) tokens, eviction (\S+), (\d+) copy threads, "
                   r"lease timeout (\d+) s\)")
ALLOCATING = re.compile(r"L1 pool: allocating ([\d.]+) GiB")
# Flags that keep a server start cheap: a small pool that is not touched page by page.
CHEAP = ("--l1-size-gb", "0.25", "--touch-pool", "false")


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without any setting's variable (so the host cannot leak in), plus extra."""
    names = {s.env for s in SETTINGS} | {"LMCD_CONFIG"}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def _no_settings_in_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in {s.env for s in SETTINGS} | {"LMCD_CONFIG"}:
        monkeypatch.delenv(name, raising=False)


def write_yaml(path: Path, data: Any) -> str:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data, encoding="utf-8")
    return str(path)


def parse(*argv: str) -> Any:
    return build_parser().parse_args(["server", *argv])


def run_server_cli(*argv: str, env: dict[str, str] | None = None, cwd: str | None = None,
                   timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m lmcd ARGV`` to completion; a server that starts instead of failing is killed."""
    try:
        return subprocess.run([sys.executable, "-m", "lmcd", *argv], capture_output=True, text=True,
                              env=env or clean_env(), cwd=cwd, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"`lmcd {' '.join(argv)}` did not exit within {timeout} s "
                             f"(output so far: {exc.stdout!r} {exc.stderr!r})") from None


# ---------------------------------------------------------------- precedence through resolve()

COMPUTED = object()  # a default computed from the machine (memory, CPU count)

# field, flag, env var, YAML key, (flag value, env value, file value), expected (flag, env, file, default)
PRECEDENCE_CASES = [
    ("port", "--port", "LMCACHE_PORT", "port", ("6001", "6002", 6003), (6001, 6002, 6003, 5555)),
    ("http_port", "--http-port", "LMCACHE_HTTP_PORT", "http_port", ("9001", "9002", 9003), (9001, 9002, 9003, 8080)),
    ("chunk_size", "--chunk-size", "LMCACHE_CHUNK_SIZE", "chunk_size", ("16", "32", 64), (16, 32, 64, 256)),
    ("l1_size_gb", "--l1-size-gb", "LMCACHE_L1_SIZE_GB", "l1_size_gb", ("0.5", "0.75", 1.0),
     (0.5, 0.75, 1.0, COMPUTED)),
    ("max_workers", "--max-workers", "LMCACHE_MAX_WORKERS", "max_workers", ("5", "6", 7),
     (5, 6, 7, COMPUTED)),
    ("lease_timeout_s", "--lease-timeout", "LMCACHE_LEASE_TIMEOUT", "lease_timeout", ("11", "12.5", 13),
     (11.0, 12.5, 13.0, 60.0)),
    ("auth_token", "--auth-token", "LMCD_AUTH_TOKEN", "auth_token",
     ("token-from-the-flag-7f3a9c", "token-from-the-env-7f3a9c", "token-from-the-file-7f3a9c"),
     ("token-from-the-flag-7f3a9c", "token-from-the-env-7f3a9c", "token-from-the-file-7f3a9c", None)),
    ("insecure_no_auth", "--insecure-no-auth", "LMCD_INSECURE_NO_AUTH", "insecure_no_auth", ("true", "false", True),
     (True, False, True, False)),
    ("log_level", "--log-level", "LMCACHE_LOG_LEVEL", "log_level", ("debug", "WARNING", "error"),
     ("DEBUG", "WARNING", "ERROR", "INFO")),
    # loopback addresses: a non-loopback one needs a token (tests/server/test_auth_defaults.py)
    ("host", "--host", "LMCACHE_HOST", "host", ("127.0.0.11", "127.0.0.12", "127.0.0.13"),
     ("127.0.0.11", "127.0.0.12", "127.0.0.13", "localhost")),
    ("http_host", "--http-host", "LMCACHE_HTTP_HOST", "http_host", ("::1", "127.0.0.2", "127.0.0.3"),
     ("::1", "127.0.0.2", "127.0.0.3", "127.0.0.1")),
    ("touch_pool", "--touch-pool", "LMCACHE_TOUCH_POOL", "touch_pool", ("false", "yes", False),
     (False, True, False, True)),
]


@pytest.mark.parametrize("field,flag,env,key,raw,expected", PRECEDENCE_CASES, ids=[c[0] for c in PRECEDENCE_CASES])
def test_precedence_flag_env_file_default(tmp_path: Path, field: str, flag: str, env: str, key: str,
                                          raw: tuple[str, str, Any], expected: tuple[Any, Any, Any, Any]) -> None:
    flag_value, env_value, file_value = raw
    want_flag, want_env, want_file, want_default = expected
    path = write_yaml(tmp_path / "lmcd.yaml", {key: file_value})
    environ = {env: env_value}

    assert getattr(resolve(parse("--config", path, flag, flag_value), environ), field) == want_flag
    assert getattr(resolve(parse(flag, flag_value), environ), field) == want_flag
    assert getattr(resolve(parse("--config", path), environ), field) == want_env
    assert getattr(resolve(parse("--config", path), {}), field) == want_file
    default = getattr(resolve(parse(), {}), field)
    if want_default is COMPUTED:  # computed from the machine
        want_default = {"l1_size_gb": default_l1_size_gb, "max_workers": cfgmod.default_max_workers}[field]()
    assert default == want_default
    # The three non-default sources really are different from the default, so each check could fail.
    assert len({want_flag, want_env, want_file}) == 3 or field in ("touch_pool", "insecure_no_auth")
    assert want_file != want_default


def test_precedence_mixes_sources_per_setting(tmp_path: Path) -> None:
    """Each setting is taken from its own highest source: one flag does not hide the env or the file."""
    path = write_yaml(tmp_path / "c.yaml", {"chunk_size": 64, "max_workers": 3, "lease_timeout": 30,
                                            "l1_size_gb": 0.5, "log_level": "warning"})
    config = resolve(parse("--config", path, "--chunk-size", "16"),
                     {"LMCACHE_CHUNK_SIZE": "32", "LMCACHE_MAX_WORKERS": "2"})
    assert (config.chunk_size, config.max_workers, config.lease_timeout_s, config.l1_size_gb,
            config.log_level, config.port) == (16, 2, 30.0, 0.5, "WARNING", 5555)


def test_empty_env_var_is_ignored_and_lmcd_config_env_names_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", {"chunk_size": 48, "port": 7000})
    config = resolve(parse(), {"LMCD_CONFIG": path, "LMCACHE_CHUNK_SIZE": ""})
    assert (config.chunk_size, config.port) == (48, 7000)
    # --config on the command line beats LMCD_CONFIG.
    other = write_yaml(tmp_path / "d.yaml", {"chunk_size": 80})
    assert resolve(parse("--config", other), {"LMCD_CONFIG": path}).chunk_size == 80


def test_yaml_accepts_the_field_name_lease_timeout_s_too(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", {"lease_timeout_s": 7.5})
    assert resolve(parse("--config", path), {}).lease_timeout_s == 7.5


def test_empty_yaml_file_means_defaults(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", "")
    assert resolve(parse("--config", path), {}) == resolve(parse(), {})


def test_eviction_policy_is_case_insensitive_and_taken_from_env() -> None:
    assert resolve(parse(), {"LMCACHE_EVICTION_POLICY": "lru"}).eviction_policy == "LRU"
    with pytest.raises(ConfigError, match=r"--eviction-policy.*LRU"):
        resolve(parse(), {"LMCACHE_EVICTION_POLICY": "FIFO"})


@pytest.mark.parametrize("key,value,flag", [
    ("chunk_size", 1.5, "--chunk-size"),
    ("max_workers", 2.9, "--max-workers"),
    ("port", True, "--port"),
    ("l1_size_gb", True, "--l1-size-gb"),
    ("chunk_size", [256], "--chunk-size"),
    ("touch_pool", "maybe", "--touch-pool"),
])
def test_yaml_values_of_the_wrong_type_are_rejected_not_coerced(tmp_path: Path, key: str, value: Any,
                                                                flag: str) -> None:
    """A YAML ``chunk_size: 1.5`` must not silently become 1, nor ``port: true`` become port 1."""
    path = write_yaml(tmp_path / "c.yaml", {key: value})
    with pytest.raises(ConfigError, match=re.escape(flag)) as info:
        resolve(parse("--config", path), {})
    assert path in str(info.value)


def test_config_is_frozen() -> None:
    config = resolve(parse("--chunk-size", "64"), {})
    assert isinstance(config, ServerConfig)
    for field, value in (("chunk_size", 1), ("port", 1), ("l1_size_gb", 1.0), ("auth_token", "x")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(config, field, value)
    assert config.chunk_size == 64 and config.auth_token is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        del config.port


def test_direct_construction_validates_too() -> None:
    with pytest.raises(ConfigError, match="--chunk-size"):
        ServerConfig(chunk_size=0)
    with pytest.raises(ConfigError, match="--max-workers"):
        ServerConfig(max_workers=0)
    with pytest.raises(ConfigError, match="--lease-timeout"):
        ServerConfig(lease_timeout_s=0)
    with pytest.raises(ConfigError, match="--auth-token"):
        ServerConfig(auth_token="")


# ---------------------------------------------------------------- end to end with a real server


def test_precedence_end_to_end_in_the_startup_log(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "lmcd.yaml", {"chunk_size": 128, "max_workers": 3, "lease_timeout": 30,
                                               "l1_size_gb": 0.5, "touch_pool": False})
    env = clean_env(LMCACHE_CHUNK_SIZE="64", LMCACHE_MAX_WORKERS="2", LMCACHE_L1_SIZE_GB="0.75")
    server = start_server("--config", path, "--chunk-size", "32", "--l1-size-gb", "0.25", env=env)
    try:
        m = server.wait_for_log(BOUND.pattern)
        assert m.group(1) == server.url and server.url.startswith("tcp://127.0.0.1:")
        # chunk size from the flag (not env 64, not file 128); workers from env (not file 3);
        # lease timeout from the file; eviction from the default.
        assert (int(m.group(2)), m.group(3), int(m.group(4)), int(m.group(5))) == (32, "LRU", 2, 30)
        assert float(server.wait_for_log(ALLOCATING.pattern).group(1)) == 0.25  # flag, not env 0.75 or file 0.5
        assert "pages faulted on first use" in server.log()  # touch_pool false from the file
    finally:
        assert server.stop() == 0, server.log()


def test_env_only_end_to_end(tmp_path: Path) -> None:
    env = clean_env(LMCACHE_CHUNK_SIZE="48", LMCACHE_LEASE_TIMEOUT="17", LMCACHE_L1_SIZE_GB="0.5",
                    LMCACHE_TOUCH_POOL="false", LMCACHE_EVICTION_POLICY="lru")
    server = start_server(env=env)
    try:
        m = server.wait_for_log(BOUND.pattern)
        assert (int(m.group(2)), m.group(3), int(m.group(5))) == (48, "LRU", 17)
        assert float(server.wait_for_log(ALLOCATING.pattern).group(1)) == 0.5
    finally:
        assert server.stop() == 0, server.log()


def test_default_l1_size_is_logged_and_matches_default_l1_size_gb() -> None:
    before = default_l1_size_gb()
    server = start_server("--touch-pool", "false", env=clean_env())
    try:
        logged = float(server.wait_for_log(ALLOCATING.pattern).group(1))
    finally:
        assert server.stop() == 0, server.log()
    after = default_l1_size_gb()
    # Available memory can move while other processes run; the logged size must match one reading.
    assert logged in (round(before, 2), round(after, 2)), (logged, before, after)
    assert 0.25 <= logged <= cfgmod.DEFAULT_L1_CAP_GB
    assert (logged * 4).is_integer()  # steps of 1/4 GiB


# ---------------------------------------------------------------- invalid values


def assert_fails(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode != 0, f"expected failure, got rc 0:\n{result.stdout}\n{result.stderr}"
    message = result.stderr + result.stdout
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message}"
    assert "Traceback" not in message, message
    assert "running on" not in message, message
    return message


@pytest.mark.parametrize("argv,needles", [
    (("--eviction-policy", "FIFO"), ("--eviction-policy", "FIFO", "LRU")),
    (("--port", "70000"), ("--port", "70000")),
    (("--http-port", "-1"), ("--http-port",)),
    (("--l1-size-gb", "-1"), ("--l1-size-gb",)),
    (("--l1-size-gb", "100000"), ("--l1-size-gb", "memory available")),
    (("--chunk-size", "0"), ("--chunk-size",)),
    (("--max-workers", "0"), ("--max-workers",)),
    (("--lease-timeout", "0"), ("--lease-timeout",)),
    (("--log-level", "LOUD"), ("--log-level", "DEBUG")),
    (("--touch-pool", "maybe"), ("--touch-pool",)),
    (("--port", "abc"), ("--port",)),
    (("--auth-token", ""), ("--auth-token",)),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) and v and v[0].startswith("--") else None)
def test_invalid_flag_exits_nonzero_naming_the_flag(argv: tuple[str, ...], needles: tuple[str, ...]) -> None:
    result = run_server_cli(*server_command("--touch-pool", "false", *argv)[3:])
    assert result.returncode == 2
    assert_fails(result, *needles)


def test_l1_size_more_than_available_memory_names_the_amount() -> None:
    result = run_server_cli("server", "--l1-size-gb", "100000", "--touch-pool", "false")
    message = assert_fails(result, "--l1-size-gb")
    available = float(re.search(r"the ([\d.]+) GiB of memory available", message).group(1))  # type: ignore[union-attr]
    assert 0 < available < 100000


def test_invalid_env_value_names_flag_and_env_var() -> None:
    result = run_server_cli("server", env=clean_env(LMCACHE_PORT="abc"))
    assert_fails(result, "--port", "LMCACHE_PORT", "abc")
    result = run_server_cli("server", env=clean_env(LMCACHE_CHUNK_SIZE="-5"))
    assert_fails(result, "--chunk-size")


def test_yaml_unknown_key_fails(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", {"chunk_size": 64, "cache_size": 3})
    message = assert_fails(run_server_cli("server", "--config", path), "--config", path, "cache_size")
    assert "chunk_size" in message  # the valid keys are listed


def test_yaml_not_a_mapping_fails(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", ["chunk_size", 64])
    assert_fails(run_server_cli("server", "--config", path), "--config", path, "mapping")
    path = write_yaml(tmp_path / "s.yaml", "just a string\n")
    assert_fails(run_server_cli("server", "--config", path), "--config", "mapping")


def test_yaml_syntax_error_fails(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", "chunk_size: [1, 2\n")
    assert_fails(run_server_cli("server", "--config", path), "--config", path, "YAML")


def test_yaml_invalid_value_fails(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", {"eviction_policy": "FIFO"})
    assert_fails(run_server_cli("server", "--config", path), "--eviction-policy", "LRU")


def test_missing_config_file_fails(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    assert_fails(run_server_cli("server", "--config", missing), "--config", missing, "No such file")
    assert_fails(run_server_cli("server", env=clean_env(LMCD_CONFIG=missing)), missing)


# ---------------------------------------------------------------- help and console scripts


def help_entries(text: str) -> dict[str, str]:
    """Option flag -> its whole help entry, whitespace collapsed (argparse wraps long entries)."""
    entries: dict[str, str] = {}
    current: list[str] = []
    for line in text.splitlines():
        if re.match(r"^  -", line):
            if current:
                entries[current[0].split()[0].rstrip(",")] = " ".join(" ".join(current).split())
            current = [line.strip()]
        elif current and line.startswith("   "):
            current.append(line.strip())
        elif current:
            entries[current[0].split()[0].rstrip(",")] = " ".join(" ".join(current).split())
            current = []
    if current:
        entries[current[0].split()[0].rstrip(",")] = " ".join(" ".join(current).split())
    return entries


def test_server_help_lists_every_setting_with_its_default() -> None:
    result = subprocess.run([str(VENV_BIN / "lmcache"), "server", "--help"], capture_output=True, text=True,
                            env=clean_env(COLUMNS="100"), timeout=60)
    assert result.returncode == 0, result.stderr
    entries = help_entries(result.stdout)
    assert "--config" in entries and "YAML" in entries["--config"]
    literal_defaults = {"--port": "5555", "--http-port": "8080", "--chunk-size": "256", "--host": "localhost",
                        "--eviction-policy": "LRU", "--lease-timeout": "60.0", "--max-connections": "4096",
                        "--handshake-timeout": "10.0", "--log-level": "INFO",
                        "--l1-size-gb": "auto", "--max-workers": "auto", "--auth-token": "none",
                        "--auth-token-file": "none", "--insecure-no-auth": "False",
                        "--touch-pool": "True", "--share-pool": "False", "--http-host": "127.0.0.1",
                        "--cuda": "auto", "--l2-prefetch-load-timeout": "1.0", "--l2-write-queue-mb": "auto",
                        "--l2-flush-timeout": "10.0", "--engine-type": "default"}
    assert set(literal_defaults) == {s.flag for s in SETTINGS}
    for s in SETTINGS:
        assert s.flag in entries, f"{s.flag} missing from --help:\n{result.stdout}"
        assert f"[default: {literal_defaults[s.flag]}; env {s.env}]" in entries[s.flag], entries[s.flag]
    assert "[default: none; env LMCD_L2_ADAPTERS" in entries["--l2-adapter"], entries["--l2-adapter"]
    assert set(entries) == {"-h", "--config", "--l2-adapter"} | {s.flag for s in SETTINGS}


def test_lmcache_and_lmcd_scripts_run_the_same_program(tmp_path: Path) -> None:
    outputs = {}
    for script in ("lmcache", "lmcd"):
        exe = VENV_BIN / script
        assert exe.exists(), f"console script {exe} not installed"
        version = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60,
                                 cwd=tmp_path, env=clean_env(COLUMNS="100"))
        assert version.returncode == 0, version.stderr
        from lmcd import __version__

        assert version.stdout.strip() == f"lmcd {__version__}"
        help_ = subprocess.run([str(exe), "server", "--help"], capture_output=True, text=True, timeout=60,
                               cwd=tmp_path, env=clean_env(COLUMNS="100"))
        assert help_.returncode == 0, help_.stderr
        assert "--l1-size-gb" in help_.stdout
        bare = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                              env=clean_env(COLUMNS="100"))
        assert bare.returncode == 2 and "server" in bare.stderr and "bench" in bare.stderr
        outputs[script] = (version.stdout, help_.stdout, bare.stderr)
    assert outputs["lmcache"] == outputs["lmcd"]
    module = run_server_cli("--version", env=clean_env(COLUMNS="100"), cwd=str(tmp_path))
    assert module.returncode == 0 and module.stdout == outputs["lmcd"][0]


# ---------------------------------------------------------------- busy ports


@pytest.fixture
def busy_port() -> Any:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield sock.getsockname()[1]
    sock.close()


def run_until_exit(*flags: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(server_command(*CHEAP, *flags), capture_output=True, text=True, env=clean_env(),
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"server with a busy port did not exit within {timeout} s: {exc.stdout!r}") from None


@pytest.mark.parametrize("flag", ["--port", "--http-port"])
def test_busy_port_fails_startup(busy_port: int, flag: str) -> None:
    result = run_until_exit(flag, str(busy_port))
    assert result.returncode == 1, result.stdout + result.stderr
    message = result.stdout + result.stderr
    assert "Startup failed" in message and flag in message, message
    assert str(busy_port) in message and "in use" in message.lower(), message
    assert "running on" not in message and "Traceback" not in message, message


def test_server_on_a_busy_port_does_not_disturb_the_running_one(server_factory: Any) -> None:
    first = server_factory(*CHEAP, env=clean_env())
    port = first.url.rsplit(":", 1)[1]
    result = run_until_exit("--port", port)
    assert result.returncode == 1 and "--port" in result.stdout + result.stderr
    assert first.proc.poll() is None
    assert first.stop() == 0, first.log()
