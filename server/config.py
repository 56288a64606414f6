"""Server configuration: one frozen dataclass; flags, environment and a YAML file map onto it.

Precedence: command-line flag > environment variable > ``--config`` YAML file > default.
Every invalid value raises ``ConfigError`` naming the flag (and where the value came from).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

EVICTION_POLICIES = ("LRU",)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_L1_CAP_GB = 4.0
CUDA_MODES = ("auto", "on", "off")


class ConfigError(ValueError):
    pass


def proc_kib_field(path: str, key: str) -> int | None:
    """Bytes of a ``Key:  N kB`` line of a /proc file, None where it is missing."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory_bytes() -> int:
    found = proc_kib_field("/proc/meminfo", "MemAvailable")
    return found if found is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def default_l1_size_gb() -> float:
    """The smaller of 4 GiB and a quarter of available memory, in steps of 1/4 GiB."""
    quarter = available_memory_bytes() / 4 / 2**30
    return max(0.25, min(DEFAULT_L1_CAP_GB, int(quarter * 4) / 4))


def default_max_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


@dataclass(frozen=True)
class Setting:
    field: str
    flag: str
    env: str
    parse: Callable[[str], Any]
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "--host", "LMCACHE_HOST", str,
            "ZMQ address to bind: a host or IP (tcp), tcp://HOST, or ipc:///path/to/socket"),
    Setting("port", "--port", "LMCACHE_PORT", int, "ZMQ port (0 picks a free one)"),
    Setting("http_host", "--http-host", "LMCACHE_HTTP_HOST", str, "HTTP sidecar address"),
    Setting("http_port", "--http-port", "LMCACHE_HTTP_PORT", int, "HTTP sidecar port (0 picks a free one)"),
    Setting("l1_size_gb", "--l1-size-gb", "LMCACHE_L1_SIZE_GB", float,
            "L1 pool size in GiB (default: the smaller of 4 GiB and a quarter of available memory)"),
    Setting("eviction_policy", "--eviction-policy", "LMCACHE_EVICTION_POLICY", str,
            f"eviction policy, one of {', '.join(EVICTION_POLICIES)}"),
    Setting("chunk_size", "--chunk-size", "LMCACHE_CHUNK_SIZE", int, "tokens per chunk"),
    Setting("max_workers", "--max-workers", "LMCACHE_MAX_WORKERS", int,
            "threads that run copies (default: min(4, CPU cores))"),
    Setting("lease_timeout_s", "--lease-timeout", "LMCACHE_LEASE_TIMEOUT", float,
            "seconds a lookup's pins are held if no retrieve or release comes"),
    Setting("auth_token", "--auth-token", "LMCD_AUTH_TOKEN", str,
            "shared secret required in Hello and on mutating HTTP endpoints"),
    Setting("log_level", "--log-level", "LMCACHE_LOG_LEVEL", str, f"one of {', '.join(LOG_LEVELS)}"),
    Setting("touch_pool", "--touch-pool", "LMCACHE_TOUCH_POOL", _bool,
            "fault in the whole pool at start so no request pays for it (true/false)"),
    Setting("share_pool", "--share-pool", "LMCACHE_SHARE_POOL", _bool,
            "put the pool in named POSIX SHM so workers in lmcache_driven mode copy to and from it "
            "themselves (needs /dev/shm as large as the pool) (true/false)"),
    Setting("cuda", "--cuda", "LMCACHE_CUDA", str,
            "GPU workers (CUDA IPC, pinned pool): auto (when CuPy and a GPU are present), on (refuse to start "
            "without them), off"),
)
BY_FIELD = {s.field: s for s in SETTINGS}


@dataclass(frozen=True)
class ServerConfig:
    host: str = "localhost"
    port: int = 5555
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    l1_size_gb: float | None = None  # None: default_l1_size_gb()
    eviction_policy: str = "LRU"
    chunk_size: int = 256
    max_workers: int | None = None  # None: default_max_workers()
    lease_timeout_s: float = 60.0
    auth_token: str | None = None
    log_level: str = "INFO"
    touch_pool: bool = True
    share_pool: bool = False
    cuda: str = "auto"
    l1_size_is_default: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.l1_size_gb is None:
            object.__setattr__(self, "l1_size_gb", default_l1_size_gb())
            object.__setattr__(self, "l1_size_is_default", True)
        if self.max_workers is None:
            object.__setattr__(self, "max_workers", default_max_workers())
        object.__setattr__(self, "eviction_policy", self.eviction_policy.upper())
        object.__setattr__(self, "log_level", self.log_level.upper())
        object.__setattr__(self, "cuda", self.cuda.lower())
        self._validate()

    def _validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ConfigError(f"{BY_FIELD[name].flag} {getattr(self, name)!r}: {why}")

        for name in ("port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                fail(name, "a port must be between 0 and 65535")
        size = self.l1_size_gb
        assert size is not None
        if not size > 0:
            fail("l1_size_gb", "the pool size must be a positive number of GiB")
        if size * 2**30 > available_memory_bytes():
            fail("l1_size_gb", f"more than the {available_memory_bytes() / 2**30:.1f} GiB of memory available")
        if self.eviction_policy not in EVICTION_POLICIES:
            fail("eviction_policy", f"unknown policy; valid values: {', '.join(EVICTION_POLICIES)}")
        if not 1 <= self.chunk_size <= 1 << 20:
            fail("chunk_size", "tokens per chunk must be between 1 and 1048576")
        if not 1 <= (self.max_workers or 0) <= 256:
            fail("max_workers", "copy threads must be between 1 and 256")
        if not self.lease_timeout_s > 0:
            fail("lease_timeout_s", "must be a positive number of seconds")
        if self.log_level not in LOG_LEVELS:
            fail("log_level", f"valid values: {', '.join(LOG_LEVELS)}")
        if self.auth_token is not None and not self.auth_token:
            fail("auth_token", "an empty token is not allowed; omit it to disable auth")
        if not self.host:
            fail("host", "must not be empty")
        if self.cuda not in CUDA_MODES:
            fail("cuda", f"valid values: {', '.join(CUDA_MODES)}")

    @property
    def l1_size_bytes(self) -> int:
        assert self.l1_size_gb is not None
        return int(self.l1_size_gb * 2**30)

    @property
    def zmq_url(self) -> str:
        if self.host.startswith("ipc://"):
            return self.host
        host = self.host.removeprefix("tcp://")
        if host == "localhost":
            host = "127.0.0.1"
        return f"tcp://{host}:{'*' if self.port == 0 else self.port}"

    @property
    def log_level_number(self) -> int:
        return int(logging.getLevelName(self.log_level))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every setting. Defaults are shown in --help but applied later (precedence)."""
    defaults = ServerConfig.__dataclass_fields__
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of the settings below "
                        "(keys are the flag names with underscores, e.g. l1_size_gb)")
    for s in SETTINGS:
        default = defaults[s.field].default
        shown = {"auth_token": "none"}.get(s.field, "auto") if default is None else default
        kwargs: dict[str, Any] = {"dest": s.field, "default": None, "help": f"{s.help} [default: {shown}; env {s.env}]"}
        if s.parse is _bool:
            kwargs["type"] = _bool
            kwargs["metavar"] = "BOOL"
        else:
            kwargs["type"] = s.parse
        parser.add_argument(s.flag, **kwargs)


def _parse(setting: Setting, raw: Any, source: str) -> Any:
    if raw is None:
        return None
    # YAML gives typed values: int(1.5) or int(True) would silently turn them into something else.
    if setting.parse in (int, float) and (
            isinstance(raw, bool) or (setting.parse is int and isinstance(raw, float) and not raw.is_integer())):
        raise ConfigError(f"{setting.flag} (from {source}): invalid value {raw!r}: expected {setting.parse.__name__}")
    try:
        return setting.parse(raw) if isinstance(raw, str) or setting.parse is not str else str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{setting.flag} (from {source}): invalid value {raw!r}: {exc}") from None


def load_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - set(BY_FIELD) - {"lease_timeout"})
    if unknown:
        raise ConfigError(f"--config {path}: unknown keys {unknown}; valid keys: {sorted(BY_FIELD)}")
    if "lease_timeout" in data:
        data["lease_timeout_s"] = data.pop("lease_timeout")
    return data


def resolve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServerConfig:
    environ = os.environ if environ is None else environ
    config_path = getattr(args, "config", None) or environ.get("LMCD_CONFIG")
    from_file = load_file(config_path) if config_path else {}
    values: dict[str, Any] = {}
    for s in SETTINGS:
        given = getattr(args, s.field, None)
        if given is not None:
            values[s.field] = given
        elif environ.get(s.env) not in (None, ""):
            values[s.field] = _parse(s, environ[s.env], f"environment {s.env}")
        elif s.field in from_file:
            values[s.field] = _parse(s, from_file[s.field], f"{config_path}")
    known = {f.name for f in fields(ServerConfig) if f.init}
    return ServerConfig(**{k: v for k, v in values.items() if k in known})
