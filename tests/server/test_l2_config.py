"""L2 tier configuration (``lmcd.server.l2config``): ``--l2-adapter`` JSON, ``LMCD_L2_ADAPTERS``, the YAML
``l2_adapter`` list and LMCache's legacy keys, into specs that carry the adapters' constructor arguments.

Every way a value can be wrong is a ConfigError naming the key and where it came from; a Redis password is
never shown (repr, describe, errors, logs); legacy keys each log exactly one INFO line naming the adapter.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmcd.cli import build_parser
from lmcd.server import config as cfgmod
from lmcd.server import l2config
from lmcd.server.config import SETTINGS, ConfigError, ServerConfig, resolve
from lmcd.server.l2config import FsSpec, RedisSpec, mask_url, parse_adapter, resolve_adapters
from tests.conftest import start_server

GIB = 2**30
SECRET = "Zq8-not-a-real-pw-41x"  # must never show
LEGACY_ENV = ("LMCACHE_LOCAL_DISK", "LMCACHE_MAX_LOCAL_DISK_SIZE", "LMCACHE_REMOTE_URL", l2config.ENV_ADAPTERS)


@pytest.fixture(autouse=True)
def _no_settings_in_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in {s.env for s in SETTINGS} | {"LMCD_CONFIG", *LEGACY_ENV}:
        monkeypatch.delenv(name, raising=False)


def parse(*argv: str) -> Any:
    return build_parser().parse_args(["server", *argv])


def write_yaml(path: Path, data: Any) -> str:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def fs(path: Path | str, gb: float = 1, **extra: Any) -> str:
    return json.dumps({"type": "fs", "base_path": str(path), "max_capacity_gb": gb, **extra})


def clean_env(**extra: str) -> dict[str, str]:
    names = {s.env for s in SETTINGS} | {"LMCD_CONFIG", *LEGACY_ENV}
    return {**{k: v for k, v in os.environ.items() if k not in names}, "PYTHONUNBUFFERED": "1", **extra}


def secret_file(tmp_path: Path, mode: int = 0o600, text: str = SECRET + "\n") -> str:
    path = tmp_path / "redis.pw"
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return str(path)


# ---------------------------------------------------------------- valid specs of each type


def test_fs_from_json_gives_the_constructor_args_in_bytes(tmp_path: Path) -> None:
    spec = parse_adapter(fs(tmp_path / "d", 2.5, min_free_gb=0.5), "--l2-adapter #1")
    assert spec == FsSpec(str(tmp_path / "d"), 2.5, 0.5)
    assert spec.kwargs() == {"base_path": str(tmp_path / "d"), "max_capacity_bytes": int(2.5 * GIB),
                             "min_free_bytes": GIB // 2}
    assert spec.kind == "fs" and spec.source == "--l2-adapter #1"
    assert spec.describe() == f"fs {tmp_path / 'd'} (2.5 GiB, keep 0.5 GiB free)"
    assert parse_adapter(fs("rel/dir"), "x").kwargs()["base_path"] == os.path.join(os.getcwd(), "rel/dir")
    assert parse_adapter(fs(tmp_path), "x").kwargs()["min_free_bytes"] is None


def test_resp_from_json_with_every_key() -> None:
    spec = parse_adapter(json.dumps({
        "type": "resp", "host": "10.0.0.5", "port": 6380, "username": "lmcd", "password_env": "REDIS_PW",
        "tls": True, "key_prefix": "kv:", "ttl_seconds": 3600, "max_capacity_gb": 8, "timeout_s": 0.5}),
        "--l2-adapter #1", environ={"REDIS_PW": SECRET})
    assert isinstance(spec, RedisSpec) and spec.kind == "resp"
    assert spec.kwargs() == {"host": "10.0.0.5", "port": 6380, "startup_nodes": None, "cluster_mode": False,
                             "username": "lmcd", "password": SECRET, "tls": True, "key_prefix": "kv:",
                             "ttl_seconds": 3600, "max_capacity_bytes": 8 * GIB, "timeout_s": 0.5}
    assert spec.describe() == ("resp rediss://lmcd@10.0.0.5:6380 (prefix 'kv:', ttl 3600 s, 8 GiB, password from "
                               "password_env REDIS_PW)")


def test_resp_defaults() -> None:
    spec = parse_adapter('{"type": "resp", "host": "redis"}', "s")
    assert spec.kwargs() == {"host": "redis", "port": 6379, "startup_nodes": None, "cluster_mode": False,
                             "username": None, "password": None, "tls": False, "key_prefix": "lmcd:",
                             "ttl_seconds": None, "max_capacity_bytes": None, "timeout_s": 1.0}


def test_valkey_cluster_from_startup_nodes() -> None:
    spec = parse_adapter(json.dumps({"type": "valkey", "startup_nodes": ["v1:7000", "[fd00::2]:7001"],
                                     "cluster_mode": True, "key_prefix": "p:", "ttl_seconds": 60}), "s")
    assert isinstance(spec, RedisSpec) and spec.kind == "valkey"
    args = spec.kwargs()
    assert (args["host"], args["startup_nodes"], args["cluster_mode"]) == (None, [("v1", 7000), ("fd00::2", 7001)],
                                                                          True)
    assert spec.describe() == "valkey valkey://v1:7000,[fd00::2]:7001 (cluster, prefix 'p:', ttl 60 s)"


def test_valkey_takes_host_and_resp_takes_a_cluster() -> None:
    """One client library for both types: the same keys, only the reported kind differs."""
    single = parse_adapter('{"type": "valkey", "host": "v", "port": 6390}', "s")
    assert (single.kind, single.kwargs()["host"], single.kwargs()["cluster_mode"]) == ("valkey", "v", False)
    cluster = parse_adapter('{"type": "resp", "startup_nodes": ["r:7000"], "cluster_mode": true}', "s")
    assert (cluster.kind, cluster.kwargs()["startup_nodes"]) == ("resp", [("r", 7000)])
    seed = parse_adapter('{"type": "resp", "host": "r", "port": 7000, "cluster_mode": true}', "s")
    assert (seed.kwargs()["host"], seed.kwargs()["cluster_mode"]) == ("r", True)


def test_repeated_flags_keep_their_order_in_the_config(tmp_path: Path) -> None:
    config = resolve(parse("--l2-adapter", fs(tmp_path / "a"), "--l2-adapter", '{"type":"resp","host":"r"}',
                           "--l2-adapter", fs(tmp_path / "b", 3)), {})
    assert [(s.kind, s.source) for s in config.l2_adapters] == [
        ("fs", "--l2-adapter #1"), ("resp", "--l2-adapter #2"), ("fs", "--l2-adapter #3")]
    assert config.l2_adapters[2] == FsSpec(str(tmp_path / "b"), 3.0)
    assert resolve(parse(), {}).l2_adapters == ()


def test_yaml_list_of_mappings_and_json_strings(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", {"l2_adapter": [
        {"type": "fs", "base_path": str(tmp_path / "d"), "max_capacity_gb": 4},
        '{"type": "valkey", "host": "v"}']})
    specs = resolve(parse("--config", path), {}).l2_adapters
    assert [s.kind for s in specs] == ["fs", "valkey"] and specs[0] == FsSpec(str(tmp_path / "d"), 4.0)
    assert specs[1].source == f"{path}: l2_adapter #2"
    alias = write_yaml(tmp_path / "a.yaml", {"l2_adapters": {"type": "fs", "base_path": "/x", "max_capacity_gb": 1}})
    assert resolve(parse("--config", alias), {}).l2_adapters == (FsSpec("/x", 1.0),)  # one mapping, not a list
    both = write_yaml(tmp_path / "b.yaml", {"l2_adapter": [], "l2_adapters": []})
    with pytest.raises(ConfigError, match="l2_adapter and l2_adapters"):
        resolve(parse("--config", both), {})
    bad = write_yaml(tmp_path / "n.yaml", {"l2_adapter": [5]})
    with pytest.raises(ConfigError, match=r"l2_adapter #1: expected a mapping"):
        resolve(parse("--config", bad), {})


def test_precedence_flag_over_env_over_yaml(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", {"l2_adapter": [{"type": "fs", "base_path": "/yaml",
                                                            "max_capacity_gb": 1}]})
    env = {"LMCD_L2_ADAPTERS": json.dumps([{"type": "fs", "base_path": "/env", "max_capacity_gb": 1}])}
    paths = [s.base_path for s in resolve(parse("--config", path, "--l2-adapter", fs("/flag")), env).l2_adapters]
    assert paths == ["/flag"]
    assert [s.base_path for s in resolve(parse("--config", path), env).l2_adapters] == ["/env"]
    assert [s.base_path for s in resolve(parse("--config", path), {}).l2_adapters] == ["/yaml"]
    assert resolve(parse("--config", path), {"LMCD_L2_ADAPTERS": "[]"}).l2_adapters == ()
    with pytest.raises(ConfigError, match="LMCD_L2_ADAPTERS: expected a JSON list"):
        resolve(parse(), {"LMCD_L2_ADAPTERS": fs("/x")})


# ---------------------------------------------------------------- errors

ERRORS = [
    ('{"type": "nope"}', ("unknown type 'nope'", "valid types: fs, resp, valkey")),
    ('{"base_path": "/x"}', ("no \"type\"", "fs, resp, valkey")),
    ('["fs"]', ("expected an object", "got list")),
    ('{"type": "fs", "base_path": "/x", "max_capacity_gb": 1, "max_size": 2}',
     ("unknown key 'max_size'", "valid keys: type, base_path, max_capacity_gb, min_free_gb")),
    ('{"type": "fs", "base_path": "/x", "max_capacity_gb": 1, "min_free": 2}', ("did you mean 'min_free_gb'",)),
    ('{"type": "resp", "host": "r", "db": 2}', ("unknown key 'db'", "password_file", "key_prefix")),
    ('{"type": "fs", "max_capacity_gb": 1}', ("needs 'base_path'",)),
    ('{"type": "fs", "base_path": "/x"}', ("needs 'max_capacity_gb'",)),
    ('{"type": "fs", "base_path": "", "max_capacity_gb": 1}', ("'base_path'", "non-empty string")),
    ('{"type": "fs", "base_path": 7, "max_capacity_gb": 1}', ("'base_path'", "non-empty string")),
    ('{"type": "fs", "base_path": "/x", "max_capacity_gb": -1}', ("'max_capacity_gb'", "> 0", "-1")),
    ('{"type": "fs", "base_path": "/x", "max_capacity_gb": 0}', ("'max_capacity_gb'", "> 0")),
    ('{"type": "fs", "base_path": "/x", "max_capacity_gb": true}', ("'max_capacity_gb'", "True")),
    ('{"type": "fs", "base_path": "/x", "max_capacity_gb": "10"}', ("'max_capacity_gb'", "'10'")),
    ('{"type": "fs", "base_path": "/x", "max_capacity_gb": 1, "min_free_gb": -1}', ("'min_free_gb'", ">= 0")),
    ('{"type": "resp", "host": "r", "port": "abc"}', ("'port'", "integer from 1 to 65535", "'abc'")),
    ('{"type": "resp", "host": "r", "port": 0}', ("'port'", "1 to 65535")),
    ('{"type": "resp", "host": "r", "port": true}', ("'port'",)),
    ('{"type": "resp", "host": "r", "port": 6379.5}', ("'port'",)),
    ('{"type": "resp"}', ("either \"host\"", "startup_nodes", "got neither")),
    ('{"type": "resp", "host": "r", "startup_nodes": ["a:1"], "cluster_mode": true}', ("not both",)),
    ('{"type": "valkey", "startup_nodes": ["a:1", "b:2"]}', ("cluster_mode", "single server")),
    ('{"type": "valkey", "startup_nodes": [], "cluster_mode": true}', ("'startup_nodes'", "non-empty list")),
    ('{"type": "valkey", "startup_nodes": ["a"], "cluster_mode": true}', ("'a'", "host:port")),
    ('{"type": "valkey", "startup_nodes": ["a:1"], "port": 5, "cluster_mode": true}', ("'port'",)),
    ('{"type": "resp", "host": "r", "cluster_mode": "yes"}', ("'cluster_mode'", "true or false")),
    ('{"type": "resp", "host": "r", "tls": 1}', ("'tls'", "true or false")),
    ('{"type": "resp", "host": "r", "ttl_seconds": 0}', ("'ttl_seconds'",)),
    ('{"type": "resp", "host": "r", "timeout_s": 0}', ("'timeout_s'", "> 0")),
    ('{"type": "resp", "host": "r", "key_prefix": ""}', ("'key_prefix'",)),
    ('{"type": "resp", "host": "r", "username": "u"}', ("\"username\" without a password",)),
    ('{"type": "resp", "host": "r", "password_env": "A", "password_file": "/b"}', ("password_file and password_env"
                                                                                  " both",)),
]


@pytest.mark.parametrize("text,needles", ERRORS, ids=[e[0] for e in ERRORS])
def test_invalid_adapter_names_the_key_and_the_source(text: str, needles: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_adapter(text, "--l2-adapter #2")
    message = str(info.value)
    assert message.startswith("--l2-adapter #2: "), message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_errors_from_yaml_name_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", {"l2_adapter": [{"type": "fs", "base_path": "/a", "max_capacity_gb": 1},
                                                           {"type": "fs", "base_path": "/b"}]})
    with pytest.raises(ConfigError, match=rf"^{path}: l2_adapter #2: the 'fs' adapter needs 'max_capacity_gb'"):
        resolve(parse("--config", path), {})


def test_invalid_json_quotes_the_position_not_the_text() -> None:
    text = '{"type": "resp", "host": "r", "password": "' + SECRET + '"'
    with pytest.raises(ConfigError) as info:
        parse_adapter(text, "--l2-adapter #1")
    message = str(info.value)
    assert "not valid JSON" in message and f"(char {len(text)})" in message and "line 1 column" in message
    assert SECRET not in message
    with pytest.raises(ConfigError, match=r"LMCD_L2_ADAPTERS: not valid JSON"):
        resolve(parse(), {"LMCD_L2_ADAPTERS": "[{"})


def test_duplicate_and_nested_fs_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--l2-adapter #2: .*same store as --l2-adapter #1.*own directory"):
        resolve(parse("--l2-adapter", fs(tmp_path / "d"), "--l2-adapter", fs(str(tmp_path / "d") + "/", 2)), {})
    with pytest.raises(ConfigError, match="same store"):
        resolve(parse("--l2-adapter", fs(tmp_path), "--l2-adapter", fs(tmp_path / "inside")), {})
    ok = resolve(parse("--l2-adapter", fs(tmp_path / "d"), "--l2-adapter", fs(tmp_path / "d2")), {})
    assert len(ok.l2_adapters) == 2  # a common prefix of the text is no nesting


def test_same_redis_and_prefix_twice_is_refused_another_prefix_is_not() -> None:
    one = '{"type": "resp", "host": "r"}'
    with pytest.raises(ConfigError, match="key_prefix"):
        resolve(parse("--l2-adapter", one, "--l2-adapter", '{"type": "valkey", "host": "r", "port": 6379}'), {})
    specs = resolve(parse("--l2-adapter", one, "--l2-adapter", '{"type":"resp","host":"r","key_prefix":"b:"}'), {})
    assert len(specs.l2_adapters) == 2


# ---------------------------------------------------------------- secrets


def test_password_file_is_read_once_and_must_be_private(tmp_path: Path) -> None:
    path = secret_file(tmp_path)
    spec = parse_adapter(json.dumps({"type": "resp", "host": "r", "password_file": path}), "s")
    assert spec.kwargs()["password"] == SECRET and spec.describe().endswith(f"password from password_file {path})")
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError) as info:
        parse_adapter(json.dumps({"type": "resp", "host": "r", "password_file": path}), "--l2-adapter #1")
    assert "--l2-adapter #1: \"password_file\"" in str(info.value) and "mode 644" in str(info.value)
    assert f"chmod 600 {path}" in str(info.value) and SECRET not in str(info.value)
    empty = secret_file(tmp_path, text="\n")
    with pytest.raises(ConfigError, match="is empty: write the Redis password into it"):
        parse_adapter(json.dumps({"type": "resp", "host": "r", "password_file": empty}), "s")
    with pytest.raises(ConfigError, match="No such file"):
        parse_adapter(json.dumps({"type": "resp", "host": "r", "password_file": str(tmp_path / "no")}), "s")


@pytest.mark.parametrize("environ,state", [({}, "is not set"), ({"REDIS_PW": ""}, "is empty")])
def test_password_env_missing_or_empty_names_the_variable(environ: dict[str, str], state: str) -> None:
    with pytest.raises(ConfigError, match=rf"--l2-adapter #1: \"password_env\": environment variable REDIS_PW {state}"):
        parse_adapter('{"type": "resp", "host": "r", "password_env": "REDIS_PW"}', "--l2-adapter #1",
                      environ=environ)


def test_inline_password_warns_where_others_can_read_it(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    text = json.dumps({"type": "resp", "host": "r", "username": "u", "password": SECRET})
    config = resolve(parse("--l2-adapter", text), {})
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "--l2-adapter #1" in warnings[0].getMessage()
    assert "password_file" in warnings[0].getMessage() and "password_env" in warnings[0].getMessage()
    caplog.clear()
    resolve(parse(), {"LMCD_L2_ADAPTERS": f"[{text}]"})  # an environment others cannot read: no warning
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert config.l2_adapters[0].kwargs()["password"] == SECRET


def test_password_is_never_shown(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"redis://lmcd:{SECRET}@cache:6380/0"
    config = resolve(parse("--l2-adapter", json.dumps({"type": "resp", "host": "r", "password": SECRET})),
                     {"LMCACHE_REMOTE_URL": url})
    inline, from_url = config.l2_adapters
    assert from_url.kwargs()["password"] == SECRET and inline.kwargs()["password"] == SECRET
    shown = [repr(config), str(config), repr(inline), repr(from_url), inline.describe(), from_url.describe(),
             inline.as_json(), from_url.as_json(), caplog.text, mask_url(url)]
    for text in shown:
        assert SECRET not in text, text
    assert "***" in from_url.as_json() and "cache:6380" in caplog.text
    # Errors after a password was given do not quote it, nor a password of the wrong type.
    for bad in ({"type": "resp", "host": "r", "password": SECRET, "ttl_seconds": -1},
                {"type": "resp", "host": "r", "password": 12345678901},
                {"type": "resp", "host": "r", "password": SECRET, "tls": "on"}):
        with pytest.raises(ConfigError) as info:
            parse_adapter(json.dumps(bad), "s")
        assert SECRET not in str(info.value) and "12345678901" not in str(info.value), info.value
    for bad_url in (f"redis-sentinel://u:{SECRET}@h:1", f"redis://u:{SECRET}@h:1/5", f"redis://u:{SECRET}@h:port"):
        with pytest.raises(ConfigError) as info:
            resolve_adapters(None, {"LMCACHE_REMOTE_URL": bad_url}, {}, None)
        assert SECRET not in str(info.value) and "u:***@h" in str(info.value), info.value


# ---------------------------------------------------------------- LMCache's legacy keys


def info_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]


def test_legacy_disk_env_maps_to_fs_with_one_info_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    env = {"LMCACHE_LOCAL_DISK": f"file://{tmp_path}/data/", "LMCACHE_MAX_LOCAL_DISK_SIZE": "10"}
    assert resolve(parse(), env).l2_adapters == (FsSpec(str(tmp_path / "data"), 10.0),)
    assert info_lines(caplog) == [
        f"LMCACHE_LOCAL_DISK=file://{tmp_path}/data/ (LMCACHE_MAX_LOCAL_DISK_SIZE=10 GB) -> L2 adapter "
        f'{{"type": "fs", "base_path": "{tmp_path}/data", "max_capacity_gb": 10.0}}']


@pytest.mark.parametrize("value", ["file://./local_disk/", "./local_disk/", "local_disk", "file://local_disk"])
def test_legacy_disk_relative_paths_are_relative_to_the_working_directory(tmp_path: Path, value: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (spec,) = resolve_adapters(None, {"LMCACHE_LOCAL_DISK": value}, {}, None)
    assert spec == FsSpec(str(tmp_path / "local_disk"), l2config.DEFAULT_LEGACY_DISK_GB)


def test_legacy_disk_size_without_a_disk_warns_and_adds_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    assert resolve_adapters(None, {"LMCACHE_MAX_LOCAL_DISK_SIZE": "10"}, {}, None) == ()
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "no disk tier" in caplog.text


@pytest.mark.parametrize("env,needles", [
    ({"LMCACHE_LOCAL_DISK": "s3://bucket/"}, ("LMCACHE_LOCAL_DISK", "'s3'", "file:///ABSOLUTE/PATH/")),
    ({"LMCACHE_LOCAL_DISK": "file://"}, ("LMCACHE_LOCAL_DISK", "names no directory")),
    ({"LMCACHE_LOCAL_DISK": "/d", "LMCACHE_MAX_LOCAL_DISK_SIZE": "abc"}, ("LMCACHE_MAX_LOCAL_DISK_SIZE", "> 0")),
    ({"LMCACHE_LOCAL_DISK": "/d", "LMCACHE_MAX_LOCAL_DISK_SIZE": "0"}, ("LMCACHE_MAX_LOCAL_DISK_SIZE", "> 0")),
    ({"LMCACHE_REMOTE_URL": "redis-sentinel://h:26379"}, ("'redis-sentinel'", "redis://, rediss://, valkey://")),
    ({"LMCACHE_REMOTE_URL": "lm://h:65432"}, ("LMCACHE_REMOTE_URL", "unsupported scheme 'lm'", "supported")),
    ({"LMCACHE_REMOTE_URL": "h:6379"}, ("no scheme",)),
    ({"LMCACHE_REMOTE_URL": "redis://h:6379/2"}, ("database 0", "key_prefix")),
    ({"LMCACHE_REMOTE_URL": "redis://h:6379?ssl=1"}, ("no query",)),
    ({"LMCACHE_REMOTE_URL": "redis://:6379"}, ("names no host",)),
    ({"LMCACHE_REMOTE_URL": "redis://user@h:6379"}, ("a user but no password",)),
])
def test_invalid_legacy_values(env: dict[str, str], needles: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_adapters(None, env, {}, None)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize("url,kind,tls,port,user", [
    ("redis://cache:6380", "resp", False, 6380, None),
    ("redis://cache", "resp", False, 6379, None),
    ("rediss://u:p%40ss@cache:6390/0", "resp", True, 6390, "u"),
    ("valkey://cache:7000/", "valkey", False, 7000, None),
    ("valkeys://:pw@cache", "valkey", True, 6379, None),
])
def test_legacy_remote_url(url: str, kind: str, tls: bool, port: int, user: str | None,
                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    (spec,) = resolve_adapters(None, {"LMCACHE_REMOTE_URL": url}, {}, None)
    assert isinstance(spec, RedisSpec)
    assert (spec.kind, spec.tls, spec.host, spec.port, spec.username) == (kind, tls, "cache", port, user)
    assert spec.kwargs()["password"] == {"u": "p@ss", None: "pw" if "pw" in url else None}[user]
    (line,) = info_lines(caplog)
    assert line.startswith(f"LMCACHE_REMOTE_URL={mask_url(url)} -> L2 adapter {{\"type\": \"{kind}\"")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # env: no one else reads it


def test_legacy_yaml_keys_env_beats_yaml_and_order(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    path = write_yaml(tmp_path / "c.yaml", {"local_disk": f"file://{tmp_path}/yaml/", "max_local_disk_size": 3,
                                            "remote_url": "redis://yaml-redis:6379",
                                            "l2_adapter": [{"type": "fs", "base_path": str(tmp_path / "explicit"),
                                                            "max_capacity_gb": 1}]})
    specs = resolve(parse("--config", path), {}).l2_adapters
    assert [type(s).__name__ for s in specs] == ["FsSpec", "FsSpec", "RedisSpec"]  # explicit, disk, remote
    assert specs[1] == FsSpec(str(tmp_path / "yaml"), 3.0) and specs[2].kwargs()["host"] == "yaml-redis"
    lines = info_lines(caplog)
    assert len(lines) == 2 and lines[0].startswith(f"{path}: local_disk=file://{tmp_path}/yaml/ (max_local_disk_size=3")
    assert lines[1].startswith(f"{path}: remote_url=redis://yaml-redis:6379 -> L2 adapter")
    env = {"LMCACHE_LOCAL_DISK": str(tmp_path / "env"), "LMCACHE_REMOTE_URL": "redis://env-redis"}
    specs = resolve(parse("--config", path), env).l2_adapters
    assert specs[1] == FsSpec(str(tmp_path / "env"), 3.0)  # each key from its own highest source
    assert specs[2].kwargs()["host"] == "env-redis"


def test_legacy_yaml_remote_url_with_a_password_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    path = write_yaml(tmp_path / "c.yaml", {"remote_url": f"redis://u:{SECRET}@r:6379"})
    resolve(parse("--config", path), {})
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"] and SECRET not in caplog.text


def test_legacy_adapter_already_given_explicitly_is_not_added_twice(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    env = {"LMCACHE_LOCAL_DISK": f"file://{tmp_path}/d/", "LMCACHE_MAX_LOCAL_DISK_SIZE": "2"}
    specs = resolve(parse("--l2-adapter", fs(tmp_path / "d", 2)), env).l2_adapters
    assert specs == (FsSpec(str(tmp_path / "d"), 2.0),) and specs[0].source == "--l2-adapter #1"
    (line,) = info_lines(caplog)
    assert line.endswith("the same as --l2-adapter #1, not added twice")
    with pytest.raises(ConfigError, match=r"LMCACHE_LOCAL_DISK: .*same store as --l2-adapter #1"):
        resolve(parse("--l2-adapter", fs(tmp_path / "d", 5)), env)  # the same directory sized otherwise


def test_load_file_accepts_the_l2_keys_and_still_refuses_unknown_ones(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", {"local_disk": None, "max_local_disk_size": None, "remote_url": None,
                                            "l2_adapter": None, "l2_prefetch_load_timeout": 2.5,
                                            "l2_flush_timeout_s": 3, "l2_write_queue_mb": 16})
    config = resolve(parse("--config", path), {})
    assert (config.l2_adapters, config.l2_prefetch_load_timeout_s, config.l2_flush_timeout_s,
            config.l2_write_queue_mb) == ((), 2.5, 3.0, 16)
    bad = write_yaml(tmp_path / "b.yaml", {"local_disks": True})
    with pytest.raises(ConfigError, match=r"unknown keys \['local_disks'\].*remote_url"):
        resolve(parse("--config", bad), {})


# ---------------------------------------------------------------- the scalar L2 settings


def test_l2_scalar_settings_defaults_precedence_and_validation(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    default = resolve(parse("--l1-size-gb", "0.25"), {})
    assert (default.l2_prefetch_load_timeout_s, default.l2_flush_timeout_s) == (1.0, 10.0)
    assert default.l2_write_queue_mb == 64  # a quarter of a 256 MiB pool, under the 1024 cap
    monkeypatch.setattr(cfgmod, "available_memory_bytes", lambda: 64 * GIB)
    assert ServerConfig(l1_size_gb=8).l2_write_queue_mb == 1024  # the cap, under a quarter of 8 GiB
    assert ServerConfig(l1_size_gb=0.25, l2_write_queue_mb=5).l2_write_queue_mb == 5
    path = write_yaml(tmp_path / "c.yaml", {"l2_prefetch_load_timeout": 3})
    env = {"LMCACHE_L2_PREFETCH_LOAD_TIMEOUT": "2", "LMCD_L2_WRITE_QUEUE_MB": "32", "LMCD_L2_FLUSH_TIMEOUT": "0"}
    assert resolve(parse("--config", path, "--l2-prefetch-load-timeout", "0.5"), env).l2_prefetch_load_timeout_s == 0.5
    config = resolve(parse("--config", path), env)
    assert (config.l2_prefetch_load_timeout_s, config.l2_write_queue_mb, config.l2_flush_timeout_s) == (2.0, 32, 0.0)
    assert resolve(parse("--config", path), {}).l2_prefetch_load_timeout_s == 3.0
    for argv, flag in ((("--l2-prefetch-load-timeout", "0"), "--l2-prefetch-load-timeout"),
                       (("--l2-write-queue-mb", "0"), "--l2-write-queue-mb"),
                       (("--l2-flush-timeout", "-1"), "--l2-flush-timeout")):
        with pytest.raises(ConfigError, match=flag):
            resolve(parse(*argv), {})


# ---------------------------------------------------------------- real processes


def test_unknown_type_on_the_command_line_exits_with_a_one_line_error() -> None:
    result = subprocess.run([sys.executable, "-m", "lmcd", "server", "--l2-adapter", '{"type":"nope"}', "--port",
                             "0", "--http-port", "0", "--l1-size-gb", "0.25"], capture_output=True, text=True,
                            env=clean_env(), timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--l2-adapter #1" in lines[0] and "'nope'" in lines[0] and "fs, resp, valkey" in lines[0]


def test_legacy_mapping_is_logged_by_the_real_server(tmp_path: Path) -> None:
    """resolve() runs before logging is set up: its lines are held and logged once it is."""
    server = start_server("--l1-size-gb", "0.25", "--touch-pool", "false",
                          env=clean_env(LMCACHE_LOCAL_DISK=f"file://{tmp_path}/d/"))
    try:
        m = server.wait_for_log(r"LMCache INFO: LMCACHE_LOCAL_DISK=\S+ \(default 5 GB\) -> L2 adapter (.*)")
        assert json.loads(m.group(1)) == {"type": "fs", "base_path": f"{tmp_path}/d", "max_capacity_gb": 5.0}
    finally:
        assert server.stop() == 0, server.log()
