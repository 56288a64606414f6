"""Server configuration: one frozen dataclass; flags, environment and a YAML file map onto it.

Precedence: command-line flag > environment variable > ``--config`` YAML file > default.
Every invalid value raises ``ConfigError`` naming the flag (and where the value came from).
LMCache's own keys work too: its in-process YAML keys map here (``_in_process_keys``), its L2 keys in
``lmcd.server.l2config``; CacheBlend's settings are refused or warned about by ``lmcd.cacheblend``.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import yaml

from lmcd import cacheblend

if TYPE_CHECKING:
    from lmcd.server.l2config import AdapterSpec

EVICTION_POLICIES = ("LRU",)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_L1_CAP_GB = 4.0
DEFAULT_L2_WRITE_QUEUE_MB = 1024  # capped at a quarter of the pool
CUDA_MODES = ("auto", "on", "off")
ENGINE_TYPES = ("default",)  # LMCache's --engine-type values lmcd serves; its CacheBlend ones are refused
IN_PROCESS_KEYS = ("local_cpu", "max_local_cpu_size")  # LMCache's in-process YAML keys the --config file takes
MIN_TOKEN_LENGTH = 16
MAX_TOKEN_FILE_BYTES = 4096
TOKEN_RECIPE = "make one with `openssl rand -hex 32` or `python3 -c 'import secrets; print(secrets.token_hex(32))'`"
TOKEN_HOWTO = f"{TOKEN_RECIPE} and put it in a file of mode 0600 for --auth-token-file"
# Words of documentation examples and committed placeholders (compared lower-case, letters and digits
# only): a token with one of them in it was typed by a person, not drawn at random.
PLACEHOLDER_WORDS = ("replaceme", "changeme", "placeholder", "yourtoken", "yoursecret", "yourrandom", "goeshere",
                     "tokenhere", "secrethere", "insertyour", "putyour", "example", "dummy", "fixme", "password",
                     "secret")


log = logging.getLogger("lmcd.server.config")


class ConfigError(ValueError):
    pass


def is_loopback(host: str) -> bool:
    """Whether a ``--host``/``--http-host`` value binds loopback only: 127.0.0.0/8, ::1, ``localhost``, or an
    ``ipc://`` path. Names other than ``localhost``, interfaces and wildcards count as reachable from outside."""
    if host.startswith("ipc://"):
        return True
    bare = host.removeprefix("tcp://").strip("[]")
    if bare.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def token_problem(token: str) -> str | None:
    """What makes ``token`` unfit as a shared secret, or None. Never quotes the token."""
    if not token:
        return "is empty"
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        return "must be printable ASCII without spaces (it travels in an HTTP 'Authorization: Bearer' header)"
    normalized = re.sub(r"[^a-z0-9]", "", token.lower())
    word = next((w for w in PLACEHOLDER_WORDS if w in normalized), None)
    if word is not None:
        return f"looks like a placeholder (it contains {word!r}), not a random secret"
    if len(token) < MIN_TOKEN_LENGTH:
        return f"has {len(token)} characters; a token needs at least {MIN_TOKEN_LENGTH}"
    return None


def read_token_file(path: str, what: str = "the token") -> str:
    """The token (or another secret: ``what``) in file ``path``, read once, whitespace stripped. ValueError (naming
    the file and the fix) where it cannot be read, is no regular file, is open to its group or others (any of the
    mode bits 0o077: a file that others can read shares the secret with them; one they can write lets them pick it),
    is larger than MAX_TOKEN_FILE_BYTES, or holds no text."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
        os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"cannot read {path}: not a regular file")
        raise ValueError(f"{path} has mode {stat.S_IMODE(st.st_mode):o}, open to its group or others: "
                         f"chmod 600 {path} (in Kubernetes: defaultMode: 0400 on the Secret's volume)")
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_TOKEN_FILE_BYTES + 1)
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise ValueError(f"{path} is larger than {MAX_TOKEN_FILE_BYTES} bytes: not a secret file")
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if not token:
        recipe = f" ({TOKEN_RECIPE})" if what == "the token" else ""
        raise ValueError(f"{path} is empty: write {what} into it{recipe}")
    return token


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
    Setting("max_connections", "--max-connections", "LMCD_MAX_CONNECTIONS", int,
            "open ZMQ connections served at once; more are cut at once (also capped by the open-file limit)"),
    Setting("handshake_timeout_s", "--handshake-timeout", "LMCD_HANDSHAKE_TIMEOUT_S", float,
            "seconds a new connection has to say Hello before it is cut"),
    Setting("auth_token", "--auth-token", "LMCD_AUTH_TOKEN", str,
            "shared secret required in Hello and on every HTTP endpoint but /healthcheck (at least "
            f"{MIN_TOKEN_LENGTH} characters; on the command line every local user sees it: prefer --auth-token-file "
            "or LMCD_AUTH_TOKEN)"),
    Setting("auth_token_file", "--auth-token-file", "LMCD_AUTH_TOKEN_FILE", str,
            "file holding the shared secret (read once at start, whitespace stripped; mode 0600 or stricter)"),
    Setting("insecure_no_auth", "--insecure-no-auth", "LMCD_INSECURE_NO_AUTH", _bool,
            "serve a non-loopback --host/--http-host without a token: only on a trusted network; logged at WARNING "
            "(true/false)"),
    Setting("log_level", "--log-level", "LMCACHE_LOG_LEVEL", str, f"one of {', '.join(LOG_LEVELS)}"),
    Setting("touch_pool", "--touch-pool", "LMCACHE_TOUCH_POOL", _bool,
            "fault in the whole pool at start so no request pays for it (true/false)"),
    Setting("share_pool", "--share-pool", "LMCACHE_SHARE_POOL", _bool,
            "share the pool (a sealed memfd handed to workers of the server's user) so that workers in "
            "lmcache_driven mode copy to and from it themselves (true/false)"),
    Setting("cuda", "--cuda", "LMCACHE_CUDA", str,
            "GPU workers (CUDA IPC, pinned pool): auto (when CuPy and a GPU are present), on (refuse to start "
            "without them), off"),
    Setting("l2_prefetch_load_timeout_s", "--l2-prefetch-load-timeout", "LMCACHE_L2_PREFETCH_LOAD_TIMEOUT", float,
            "seconds a lookup waits for L2 reads before it reports only what is in L1"),
    Setting("l2_write_queue_mb", "--l2-write-queue-mb", "LMCD_L2_WRITE_QUEUE_MB", int,
            "bound of each L2 tier's write-behind queue in MiB; stores past it are not written to that tier "
            "(default: the smaller of 1024 and a quarter of the pool)"),
    Setting("l2_flush_timeout_s", "--l2-flush-timeout", "LMCD_L2_FLUSH_TIMEOUT", float,
            "seconds the write-behind queues are flushed for at shutdown (SIGTERM) before the rest is dropped"),
    Setting("engine_type", "--engine-type", "LMCACHE_ENGINE_TYPE", str,
            "LMCache's cache engine: default (prefix caching); blend (CacheBlend) is not available yet"),
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
    max_connections: int = 4096
    handshake_timeout_s: float = 10.0
    auth_token: str | None = field(default=None, repr=False)  # a secret: never in a repr or a log
    auth_token_file: str | None = None  # where auth_token was read from, when from a file
    insecure_no_auth: bool = False
    log_level: str = "INFO"
    touch_pool: bool = True
    share_pool: bool = False
    cuda: str = "auto"
    l2_adapters: tuple[AdapterSpec, ...] = ()  # the cascade behind L1, nearest first (lmcd.server.l2config)
    l2_prefetch_load_timeout_s: float = 1.0
    l2_write_queue_mb: int | None = None  # None: default_l2_write_queue_mb()
    l2_flush_timeout_s: float = 10.0
    engine_type: str = "default"
    l1_size_is_default: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.l1_size_gb is None:
            object.__setattr__(self, "l1_size_gb", default_l1_size_gb())
            object.__setattr__(self, "l1_size_is_default", True)
        if self.max_workers is None:
            object.__setattr__(self, "max_workers", default_max_workers())
        if self.l2_write_queue_mb is None:
            quarter_mb = max(1, self.l1_size_bytes // 4 // 2**20)
            object.__setattr__(self, "l2_write_queue_mb", min(DEFAULT_L2_WRITE_QUEUE_MB, quarter_mb))
        object.__setattr__(self, "eviction_policy", self.eviction_policy.upper())
        object.__setattr__(self, "log_level", self.log_level.upper())
        object.__setattr__(self, "cuda", self.cuda.lower())
        object.__setattr__(self, "engine_type", self.engine_type.lower())
        if self.auth_token_file is not None:
            if self.auth_token is not None:
                raise ConfigError("--auth-token and --auth-token-file both give a token: give one of them "
                                  "(--auth-token-file keeps it off the command line)")
            try:
                object.__setattr__(self, "auth_token", read_token_file(self.auth_token_file))
            except ValueError as exc:
                raise ConfigError(f"--auth-token-file: {exc}") from None
        self._validate()
        self._validate_auth()

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
        if not 1 <= self.max_connections <= 1 << 20:
            fail("max_connections", "must be between 1 and 1048576")
        if not self.handshake_timeout_s > 0:
            fail("handshake_timeout_s", "must be a positive number of seconds")
        if self.log_level not in LOG_LEVELS:
            fail("log_level", f"valid values: {', '.join(LOG_LEVELS)}")
        if not self.host:
            fail("host", "must not be empty")
        if self.cuda not in CUDA_MODES:
            fail("cuda", f"valid values: {', '.join(CUDA_MODES)}")
        if not self.l2_prefetch_load_timeout_s > 0:
            fail("l2_prefetch_load_timeout_s", "must be a positive number of seconds")
        if not 1 <= (self.l2_write_queue_mb or 0) <= 1 << 20:
            fail("l2_write_queue_mb", "must be between 1 and 1048576 MiB")
        if not self.l2_flush_timeout_s >= 0:
            fail("l2_flush_timeout_s", "must be 0 (do not wait) or a positive number of seconds")
        if self.engine_type in cacheblend.ENGINE_TYPES:
            raise ConfigError(cacheblend.unavailable_message(f"--engine-type {self.engine_type}",
                                                  "use --engine-type default (or drop it)"))
        if self.engine_type not in ENGINE_TYPES:
            fail("engine_type", f"valid values: {', '.join(ENGINE_TYPES)} (CacheBlend's "
                 f"{', '.join(cacheblend.ENGINE_TYPES)} are not available yet)")

    def _validate_auth(self) -> None:
        """A token fit to be a secret, and none only where every address is loopback or the operator opted out."""
        token = self.auth_token
        if token is not None:
            problem = token_problem(token)
            if problem is not None:
                source = f"--auth-token-file {self.auth_token_file}" if self.auth_token_file else "--auth-token"
                raise ConfigError(f"{source}: the token {problem}; {TOKEN_HOWTO}")
            if self.insecure_no_auth:
                raise ConfigError("--insecure-no-auth true and an auth token contradict each other: drop "
                                  "--insecure-no-auth (LMCD_INSECURE_NO_AUTH) to require the token, or the token to "
                                  "serve without auth")
            return
        if self.insecure_no_auth:
            return
        exposed = [f"{flag} {value}" for flag, value in (("--host", self.host), ("--http-host", self.http_host))
                   if not is_loopback(value)]
        if exposed:
            raise ConfigError(
                f"{' and '.join(exposed)}: not a loopback address, and no auth token is set, so anyone who reaches "
                "it could read, overwrite and clear the cache. Set a token: --auth-token-file PATH (or "
                f"LMCD_AUTH_TOKEN_FILE; {TOKEN_RECIPE}, in a file of mode 0600) or "
                "LMCD_AUTH_TOKEN; or bind 127.0.0.1; or, on a trusted network only, pass --insecure-no-auth true "
                "(LMCD_INSECURE_NO_AUTH=1)")

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
                        "(keys are the flag names with underscores, e.g. l1_size_gb; an LMCache config file works too: "
                        "chunk_size, local_cpu, max_local_cpu_size, local_disk, ...)")
    for s in SETTINGS:
        default = defaults[s.field].default
        shown = "none" if s.field in TOKEN_FIELDS else "auto" if default is None else default
        kwargs: dict[str, Any] = {"dest": s.field, "default": None, "help": f"{s.help} [default: {shown}; env {s.env}]"}
        if s.parse is _bool:
            kwargs["type"] = _bool
            kwargs["metavar"] = "BOOL"
        else:
            kwargs["type"] = s.parse
        parser.add_argument(s.flag, **kwargs)
    parser.add_argument("--l2-adapter", dest="l2_adapter", action="append", metavar="JSON", default=None,
                        help="an L2 tier behind the L1 pool, as JSON, e.g. '{\"type\": \"fs\", \"base_path\": "
                        "\"/var/cache/lmcd\", \"max_capacity_gb\": 100}' or '{\"type\": \"resp\", \"host\": "
                        "\"redis\", \"port\": 6379, \"password_file\": \"/run/secrets/redis\"}'; types: fs, "
                        "resp, valkey; repeat for more tiers, nearest first (replaces the YAML's l2_adapter list; "
                        "LMCache's local_disk and remote_url keys add theirs after) [default: none; env "
                        "LMCD_L2_ADAPTERS, a JSON list]")


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


# YAML keys spelled like the flag where the field name differs (lease_timeout for lease_timeout_s)
FLAG_KEYS = {s.flag[2:].replace("-", "_"): s.field for s in SETTINGS if s.flag[2:].replace("-", "_") != s.field}


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
    from lmcd.server.l2config import YAML_KEYS

    known = {*BY_FIELD, *FLAG_KEYS, *YAML_KEYS, *IN_PROCESS_KEYS}
    unknown = sorted(k for k in map(str, data) if k not in known and not cacheblend.is_file_key(k))
    if unknown:
        blend = (cacheblend.ENABLE_KEY, f"{cacheblend.TUNING_KEY_PREFIX}*")
        valid = sorted([*BY_FIELD, *YAML_KEYS, *IN_PROCESS_KEYS, *blend])
        raise ConfigError(f"--config {path}: unknown keys {unknown}; valid keys: {valid}")
    for key, name in FLAG_KEYS.items():
        if key in data:
            data[name] = data.pop(key)
    return data


TOKEN_FIELDS = ("auth_token", "auth_token_file")


def _token_values(args: argparse.Namespace, environ: Mapping[str, str], from_file: Mapping[str, Any],
                  config_path: str | None) -> dict[str, Any]:
    """The token (or its file) from the highest source that gives either; both from one source is an error,
    and so is a token variable that is set but empty (it would silently mean "no auth")."""
    flag, env = BY_FIELD["auth_token"], BY_FIELD["auth_token_file"]
    given = {name: getattr(args, name, None) for name in TOKEN_FIELDS}
    if all(v is not None for v in given.values()):
        raise ConfigError(f"{flag.flag} and {env.flag} both give a token: give one of them "
                          f"({env.flag} keeps it off the command line)")
    if any(v is not None for v in given.values()):
        return {k: v for k, v in given.items() if v is not None}
    found: dict[str, Any] = {}
    for name in TOKEN_FIELDS:
        s = BY_FIELD[name]
        if environ.get(s.env) == "":
            raise ConfigError(f"{s.flag} (from environment {s.env}): {s.env} is set but empty, which would mean no "
                              f"auth: unset it, or set it to {'a token' if name == 'auth_token' else 'a token file'} "
                              f"({TOKEN_RECIPE})")
        if environ.get(s.env) is not None:
            found[name] = _parse(s, environ[s.env], f"environment {s.env}")
    if len(found) == 2:
        raise ConfigError(f"{flag.env} and {env.env} are both set: set one of them")
    if found:
        return found
    found = {name: _parse(BY_FIELD[name], from_file[name], f"{config_path}") for name in TOKEN_FIELDS
             if from_file.get(name) is not None}
    if len(found) == 2:
        raise ConfigError(f"{config_path}: auth_token and auth_token_file both give a token: keep one of them")
    return found


def _in_process_keys(values: dict[str, Any], sources: Mapping[str, str], from_file: Mapping[str, Any],
                     config_path: str | None) -> None:
    """LMCache's in-process keys of the --config file, one log line each (as the legacy L2 keys in
    lmcd.server.l2config): ``max_local_cpu_size`` (GiB) sizes L1 where no higher source gives ``l1_size_gb``;
    ``local_cpu: false`` is ignored, since L1 is always CPU memory here."""
    if from_file.get("local_cpu") is not None:
        try:
            local_cpu = _bool(from_file["local_cpu"])
        except ValueError as exc:
            raise ConfigError(f"{config_path}: local_cpu: {exc}") from None
        if not local_cpu:
            log.warning("%s: local_cpu: false is ignored: lmcd always keeps L1 in CPU memory", config_path)
    size = from_file.get("max_local_cpu_size")
    if size is None:
        return
    label = f"{config_path}: max_local_cpu_size"
    gb = _parse(BY_FIELD["l1_size_gb"], size, label)
    if "l1_size_gb" in values:
        log.info("%s=%s is not used: %s gives the L1 size", label, size, sources["l1_size_gb"])
        return
    values["l1_size_gb"] = gb
    log.info("%s=%s -> --l1-size-gb %s (the L1 pool in GiB)", label, size, gb)


def resolve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServerConfig:
    environ = os.environ if environ is None else environ
    config_path = getattr(args, "config", None) or environ.get("LMCD_CONFIG")
    from_file = load_file(config_path) if config_path else {}
    try:
        cacheblend.check_settings(environ, from_file, config_path)
    except cacheblend.BlendingUnavailable as exc:
        raise ConfigError(str(exc)) from None
    values: dict[str, Any] = _token_values(args, environ, from_file, config_path)
    sources: dict[str, str] = {}  # field -> where its value came from, for log lines
    for s in SETTINGS:
        if s.field in TOKEN_FIELDS:
            continue
        given = getattr(args, s.field, None)
        if given is not None:
            values[s.field], sources[s.field] = given, s.flag
        elif environ.get(s.env) not in (None, ""):
            values[s.field], sources[s.field] = _parse(s, environ[s.env], f"environment {s.env}"), s.env
        elif s.field in from_file:
            values[s.field] = _parse(s, from_file[s.field], f"{config_path}")
            sources[s.field] = f"{config_path}: {s.field}"
    _in_process_keys(values, sources, from_file, config_path)
    from lmcd.server.l2config import resolve_adapters

    values["l2_adapters"] = resolve_adapters(getattr(args, "l2_adapter", None), environ, from_file, config_path)
    known = {f.name for f in fields(ServerConfig) if f.init}
    return ServerConfig(**{k: v for k, v in values.items() if k in known})
