"""Safe auth defaults (issue 13, item 9): no non-loopback bind without a token unless the operator opts
out loudly, tokens long enough and not a placeholder, a token file instead of the command line, an empty
``LMCD_AUTH_TOKEN`` an error rather than "no auth", and the connector's matching token-file key.

Refusals are checked on ``ServerConfig``/``resolve`` and through ``python -m lmcd server`` exiting 2 with
a message naming the flag. No test listens on a public interface: the CLI refusals use addresses of
TEST-NET-2 (198.51.100.0/24), which no machine has, so even a server that failed to refuse could not bind;
the one test that serves beyond loopback binds a private address of this machine, and only if it has one.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmcd import protocol as p
from lmcd.connector.client import ServerError
from lmcd.connector.settings import ConnectorSettings, SettingsError
from lmcd.server import config as cfgmod
from lmcd.server.config import ConfigError, ServerConfig, resolve
from tests.conftest import connect, namespace, routed_ipv4, start_server
from tests.server.test_config_cli import CHEAP, assert_fails, clean_env, parse, run_server_cli

TOKEN = secrets.token_hex(32)
NOT_LOCAL = "198.51.100.7"  # TEST-NET-2 (RFC 5737): never an address of this machine


@pytest.fixture(autouse=True)
def _no_auth_settings_in_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LMCD_AUTH_TOKEN", "LMCD_AUTH_TOKEN_FILE", "LMCD_INSECURE_NO_AUTH", "LMCACHE_HOST",
                 "LMCACHE_HTTP_HOST", "LMCD_CONFIG"):
        monkeypatch.delenv(name, raising=False)


def token_file(tmp_path: Path, content: str = TOKEN + "\n", mode: int = 0o600, name: str = "token") -> str:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    path.chmod(mode)
    return str(path)


def private_local_ipv4() -> str | None:
    """A private (never public) non-loopback IPv4 address of this machine, or None."""
    address = routed_ipv4()
    return address if address is not None and ipaddress.ip_address(address).is_private else None


# ---------------------------------------------------------------- binding without a token


OPEN_HOSTS = ["0.0.0.0", "::", "*", "tcp://0.0.0.0", "tcp://*", "10.1.2.3", "tcp://10.1.2.3", "192.168.0.1",
              "fe80::1", "::ffff:10.0.0.1", "eth0", "node1.example.com", "127.0.0.1.example.com"]
LOOPBACK_HOSTS = ["localhost", "127.0.0.1", "127.1.2.3", "tcp://127.0.0.1", "tcp://localhost", "::1", "[::1]",
                  "tcp://[::1]", "::ffff:127.0.0.1", "ipc:///tmp/lmcd.sock", "LOCALHOST"]


def test_only_loopback_binds_go_without_a_token() -> None:
    for host in OPEN_HOSTS:
        assert not cfgmod.is_loopback(host), host
        with pytest.raises(ConfigError) as info:
            ServerConfig(host=host, l1_size_gb=0.25)
        message = str(info.value)
        for needle in ("--host", "not a loopback", "--auth-token-file", "LMCD_AUTH_TOKEN_FILE", "LMCD_AUTH_TOKEN",
                       "--insecure-no-auth", "127.0.0.1"):
            assert needle in message, (host, needle, message)
        assert "--http-host" not in message, message  # the default HTTP address is loopback
    for host in ("0.0.0.0", "::", "10.1.2.3"):
        with pytest.raises(ConfigError, match="--http-host") as info:
            ServerConfig(http_host=host, l1_size_gb=0.25)
        assert "--host " not in str(info.value)
    with pytest.raises(ConfigError, match=r"--host.*--http-host|--http-host.*--host"):
        ServerConfig(host="0.0.0.0", http_host="0.0.0.0", l1_size_gb=0.25)
    for host in LOOPBACK_HOSTS:
        assert cfgmod.is_loopback(host), host
        ServerConfig(host=host, l1_size_gb=0.25)
        if not host.startswith(("ipc://", "tcp://")):
            ServerConfig(http_host=host.strip("[]"), l1_size_gb=0.25)
    # with a token, any address
    ServerConfig(host="0.0.0.0", http_host="::", auth_token=TOKEN, l1_size_gb=0.25)


@pytest.mark.parametrize("flags", [("--host", NOT_LOCAL), ("--http-host", NOT_LOCAL),
                                   ("--host", f"tcp://{NOT_LOCAL}", "--http-host", NOT_LOCAL)])
def test_cli_refuses_a_non_loopback_bind_without_a_token(flags: tuple[str, ...]) -> None:
    result = run_server_cli("server", *CHEAP, "--port", "0", "--http-port", "0", *flags, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_fails(result, flags[0], "not a loopback", "--auth-token-file", "--insecure-no-auth",
                 "openssl rand -hex 32")
    assert "Startup failed" not in result.stdout + result.stderr  # refused before any bind


def test_insecure_opt_out_is_explicit_and_exclusive(tmp_path: Path) -> None:
    config = ServerConfig(host="0.0.0.0", http_host="0.0.0.0", insecure_no_auth=True, l1_size_gb=0.25)
    assert config.auth_token is None and config.insecure_no_auth
    for environ in ({"LMCD_INSECURE_NO_AUTH": "1"}, {"LMCD_INSECURE_NO_AUTH": "true"}):
        assert resolve(parse("--host", "0.0.0.0"), environ).insecure_no_auth
    assert resolve(parse("--host", "0.0.0.0", "--insecure-no-auth", "true"), {}).insecure_no_auth
    path = tmp_path / "lmcd.yaml"
    path.write_text("host: 0.0.0.0\ninsecure_no_auth: true\n")
    assert resolve(parse("--config", str(path)), {}).insecure_no_auth
    with pytest.raises(ConfigError, match="--host"):
        resolve(parse("--host", "0.0.0.0", "--insecure-no-auth", "false"), {})
    # a token and the opt-out contradict each other: one of them is a mistake
    with pytest.raises(ConfigError, match="--insecure-no-auth") as info:
        ServerConfig(auth_token=TOKEN, insecure_no_auth=True, l1_size_gb=0.25)
    assert TOKEN not in str(info.value)


def test_opt_out_is_logged_at_warning_on_every_start() -> None:
    for _ in range(2):
        server = start_server(*CHEAP, "--insecure-no-auth", "true", env=clean_env())
        try:
            line = server.wait_for_log(r"LMCache WARNING: .*insecure-no-auth.*").group(0)
            assert "no auth token" in line and "127.0.0.1" in line, line
        finally:
            assert server.stop() == 0, server.log()


def test_opt_out_on_a_private_address_serves_without_a_token_and_says_where() -> None:
    address = private_local_ipv4()
    if address is None:
        pytest.skip("this machine has no private non-loopback IPv4 address")
    server = start_server(*CHEAP, "--host", address, "--insecure-no-auth", "true", env=clean_env())
    try:
        assert server.url.startswith(f"tcp://{address}:"), server.url
        line = server.wait_for_log(r"LMCache WARNING: .*insecure-no-auth.*").group(0)
        assert server.url in line and "any process that reaches" in line, line
        with connect(server.url, namespace()) as client:
            assert client.ping() >= 0
    finally:
        assert server.stop() == 0, server.log()


# ---------------------------------------------------------------- the token itself


def test_short_tokens_are_refused_with_how_to_make_one() -> None:
    for short in ("x", "s3cret", "a" * 15):
        with pytest.raises(ConfigError) as info:
            ServerConfig(auth_token=short, l1_size_gb=0.25)
        message = str(info.value)
        for needle in ("--auth-token", "at least 16", "openssl rand -hex 32", "secrets.token_hex(32)"):
            assert needle in message, (needle, message)
        assert f"{short!r}" not in message  # a token is never echoed back
    assert ServerConfig(auth_token="k" * 7 + "9Q-x_Z.w+1", l1_size_gb=0.25).auth_token is not None  # 17


@pytest.mark.parametrize("placeholder", ["replace-me-with-a-random-token", "CHANGEME-CHANGEME-CHANGEME",
                                         "change-me-please-1234", "your-token-here-0123456789",
                                         "<your-random-token-goes-here>", "placeholder-placeholder"])
def test_placeholder_tokens_are_refused(placeholder: str) -> None:
    with pytest.raises(ConfigError, match="placeholder") as info:
        ServerConfig(auth_token=placeholder, l1_size_gb=0.25)
    assert "openssl rand -hex 32" in str(info.value)


@pytest.mark.parametrize("bad", ["with a space in the middle", "tab\tinside-the-token-value", "newline\nin-token-xx",
                                 "non-ascii-tökén-0123456789"])
def test_tokens_that_no_bearer_header_can_carry_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="printable ASCII"):
        ServerConfig(auth_token=bad, l1_size_gb=0.25)


def test_the_token_is_not_in_the_configs_repr() -> None:
    assert TOKEN not in repr(ServerConfig(auth_token=TOKEN, l1_size_gb=0.25))


def test_an_empty_token_variable_is_an_error_not_no_auth(tmp_path: Path) -> None:
    for name in ("LMCD_AUTH_TOKEN", "LMCD_AUTH_TOKEN_FILE"):
        with pytest.raises(ConfigError, match=name) as info:
            resolve(parse(), {name: ""})
        assert "unset it" in str(info.value)
    result = run_server_cli("server", *CHEAP, "--port", "0", "--http-port", "0",
                            env=clean_env(LMCD_AUTH_TOKEN=""), timeout=30)
    assert result.returncode == 2
    assert_fails(result, "LMCD_AUTH_TOKEN", "empty")


# ---------------------------------------------------------------- token files


def test_token_file_from_flag_environment_and_yaml(tmp_path: Path) -> None:
    path = token_file(tmp_path, f"  {TOKEN}\n\n")
    assert resolve(parse("--auth-token-file", path), {}).auth_token == TOKEN  # stripped
    assert resolve(parse(), {"LMCD_AUTH_TOKEN_FILE": path}).auth_token == TOKEN
    config_yaml = tmp_path / "lmcd.yaml"
    config_yaml.write_text(f"auth_token_file: {path}\nhost: 0.0.0.0\n")
    config = resolve(parse("--config", str(config_yaml)), {})
    assert config.auth_token == TOKEN and config.auth_token_file == path and config.host == "0.0.0.0"
    assert TOKEN not in repr(config)
    # precedence as for every setting: the flag's file beats the environment's token
    other = secrets.token_hex(16)
    assert resolve(parse("--auth-token-file", path), {"LMCD_AUTH_TOKEN": other}).auth_token == TOKEN
    assert resolve(parse("--config", str(config_yaml)), {"LMCD_AUTH_TOKEN": other}).auth_token == other


def test_token_given_two_ways_at_one_level_is_refused(tmp_path: Path) -> None:
    path = token_file(tmp_path)
    with pytest.raises(ConfigError, match=r"--auth-token.*--auth-token-file|--auth-token-file.*--auth-token"):
        resolve(parse("--auth-token", TOKEN, "--auth-token-file", path), {})
    with pytest.raises(ConfigError, match="LMCD_AUTH_TOKEN_FILE"):
        resolve(parse(), {"LMCD_AUTH_TOKEN": TOKEN, "LMCD_AUTH_TOKEN_FILE": path})
    with pytest.raises(ConfigError, match="--auth-token-file"):
        ServerConfig(auth_token=TOKEN, auth_token_file=path, l1_size_gb=0.25)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660], ids=lambda m: f"{m:o}")
def test_token_file_open_to_group_or_others_is_refused_with_the_chmod(tmp_path: Path, mode: int) -> None:
    path = token_file(tmp_path, mode=mode)
    with pytest.raises(ConfigError) as info:
        ServerConfig(auth_token_file=path, l1_size_gb=0.25)
    message = str(info.value)
    assert "--auth-token-file" in message and path in message and f"chmod 600 {path}" in message, message
    assert f"{mode:o}" in message and TOKEN not in message
    os.chmod(path, 0o400)
    assert ServerConfig(auth_token_file=path, l1_size_gb=0.25).auth_token == TOKEN


@pytest.mark.parametrize("case", ["missing", "empty", "blank", "directory", "huge", "short", "placeholder"])
def test_bad_token_files_name_the_file_and_the_problem(tmp_path: Path, case: str) -> None:
    expect = {"missing": "cannot read", "empty": "empty", "blank": "empty", "directory": "cannot read",
              "huge": "larger than", "short": "at least 16", "placeholder": "placeholder"}[case]
    path: Any
    if case == "missing":
        path = str(tmp_path / "nope")
    elif case == "directory":
        path = str(tmp_path)
    else:
        content = {"empty": "", "blank": " \n\n", "huge": "a" * 100_000, "short": "abc\n",
                   "placeholder": "replace-me-with-a-random-token\n"}[case]
        path = token_file(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        ServerConfig(auth_token_file=path, l1_size_gb=0.25)
    message = str(info.value)
    assert "--auth-token-file" in message and path in message and expect in message, message


def test_token_file_end_to_end_and_http_endpoints(tmp_path: Path) -> None:
    path = token_file(tmp_path)
    server = start_server(*CHEAP, "--auth-token-file", path, env=clean_env())
    try:
        log = server.log()
        assert TOKEN not in log
        assert re.search(r"Auth: token required \(from --auth-token-file .*token\)", log), log
        assert "cmdline" not in log  # no command-line warning: the token is not on it
        with open(f"/proc/{server.proc.pid}/cmdline", "rb") as f:
            assert TOKEN.encode() not in f.read()
        with pytest.raises(ServerError) as info:
            connect(server.url, namespace())
        assert info.value.code == p.ErrorCode.AUTH_FAILED
        with connect(server.url, namespace(), auth_token=TOKEN) as client:
            assert client.ping() >= 0
        good = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=server.http_url, timeout=15) as http:
            assert http.get("/healthcheck").status_code == 200  # probes need no token
            for method, route in (("POST", "/clear-cache"), ("POST", "/cache/clear"), ("GET", "/status"),
                                  ("GET", "/metrics")):
                assert http.request(method, route).status_code == 401, route
                assert http.request(method, route, headers=good).status_code == 200, route
    finally:
        assert server.stop() == 0, server.log()


def test_token_on_the_command_line_works_but_warns_where_it_shows() -> None:
    server = start_server(*CHEAP, "--auth-token", TOKEN, env=clean_env())
    try:
        line = server.wait_for_log(r"LMCache WARNING: .*--auth-token.*").group(0)
        for needle in ("/proc/", "cmdline", "--auth-token-file", "LMCD_AUTH_TOKEN_FILE", "LMCD_AUTH_TOKEN"):
            assert needle in line, (needle, line)
        assert TOKEN not in server.log()
        with connect(server.url, namespace(), auth_token=TOKEN) as client:
            assert client.ping() >= 0
    finally:
        assert server.stop() == 0, server.log()
    quiet = start_server(*CHEAP, env=clean_env(LMCD_AUTH_TOKEN=TOKEN))
    try:
        quiet.wait_for_log(r"Auth: token required \(from LMCD_AUTH_TOKEN\)")
        assert "cmdline" not in quiet.log() and TOKEN not in quiet.log()
    finally:
        assert quiet.stop() == 0, quiet.log()


# ---------------------------------------------------------------- the connector's side


def test_connector_reads_a_token_file_key_or_variable(tmp_path: Path) -> None:
    path = token_file(tmp_path)
    key = "lmcache.mp.auth_token_file"
    assert ConnectorSettings.from_extra_config({key: path}, environ={}).auth_token == TOKEN
    assert ConnectorSettings.from_extra_config({}, environ={"LMCD_AUTH_TOKEN_FILE": path}).auth_token == TOKEN
    # the config key beats the environment, as lmcache.mp.auth_token does
    other = token_file(tmp_path, "other-token-0123456789\n", name="other")
    assert ConnectorSettings.from_extra_config({key: path}, environ={"LMCD_AUTH_TOKEN_FILE": other}).auth_token \
        == TOKEN
    assert ConnectorSettings.from_extra_config({key: path}, environ={"LMCD_AUTH_TOKEN": "x" * 20}).auth_token == TOKEN
    with pytest.raises(SettingsError, match="lmcache.mp.auth_token_file"):
        ConnectorSettings.from_extra_config({key: path, "lmcache.mp.auth_token": TOKEN}, environ={})
    os.chmod(path, 0o644)
    with pytest.raises(SettingsError, match=f"chmod 600 {re.escape(path)}"):
        ConnectorSettings.from_extra_config({key: path}, environ={})
    with pytest.raises(SettingsError, match="cannot read"):
        ConnectorSettings.from_extra_config({key: str(tmp_path / "nope")}, environ={})
