"""L2 tier configuration: ``--l2-adapter`` JSON, the YAML ``l2_adapter`` list and LMCache's legacy keys, parsed
into plain validated specs (``FsSpec``, ``RedisSpec``) that carry the adapters' constructor arguments.

Where adapters come from, and in which order the cascade gets them (first = nearest to L1):

1. the explicit list, from the highest source that gives one: ``--l2-adapter`` flags (repeatable, in the order
   given) > ``LMCD_L2_ADAPTERS`` (a JSON list; ``[]`` means none, hiding the YAML's) > the YAML's ``l2_adapter``
   (alias ``l2_adapters``: a list of mappings or JSON strings, or one of them);
2. then LMCache's legacy disk keys (``LMCACHE_LOCAL_DISK`` > YAML ``local_disk``, sized by
   ``LMCACHE_MAX_LOCAL_DISK_SIZE`` > YAML ``max_local_disk_size`` in GiB, default ``DEFAULT_LEGACY_DISK_GB``);
3. then the legacy remote (``LMCACHE_REMOTE_URL`` > YAML ``remote_url``).

Legacy keys always add, each with one INFO line saying which adapter it became, unless that very adapter is
already in the explicit list (then the line says so and it is not added twice). Two adapters on one store (the
same directory, or one inside the other; the same Redis nodes and key prefix) are a ConfigError.

Types: ``fs`` (a local directory); ``resp`` and ``valkey`` (one client library, redis-py, for both: they accept
the same keys and differ only in the name the tier reports). A Redis tier is one server (``host``, ``port``) or a
cluster; a cluster is ``cluster_mode: true`` with seed nodes (``startup_nodes: ["h:p", ...]``, or ``host``/
``port`` as the one seed). ``startup_nodes`` without ``cluster_mode: true`` is an error: a plain client talks to
one server. Sizes are GiB (2**30 bytes), as ``--l1-size-gb``.

Secrets: a Redis password comes from ``password_file`` (mode 0600, read once), ``password_env`` (the name of an
environment variable), the legacy URL, or ``password`` (accepted, but where a flag or a YAML file holds it others
may read it: logged at WARNING). It is never in a repr, ``describe()``, an error or a log line.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from lmcd.server.config import ConfigError, read_token_file
from lmcd.server.l2 import Adapter

log = logging.getLogger("lmcd.server.config")

ADAPTER_TYPES = ("fs", "resp", "valkey")
DEFAULT_LEGACY_DISK_GB = 5.0  # LMCACHE_LOCAL_DISK without LMCACHE_MAX_LOCAL_DISK_SIZE
DEFAULT_REDIS_PORT = 6379
DEFAULT_KEY_PREFIX = "lmcd:"
URL_SCHEMES = {"redis": ("resp", False), "rediss": ("resp", True), "valkey": ("valkey", False),
               "valkeys": ("valkey", True)}  # scheme -> (type, tls)
FS_KEYS = ("type", "base_path", "max_capacity_gb", "min_free_gb")
REDIS_KEYS = ("type", "host", "port", "startup_nodes", "cluster_mode", "username", "password", "password_file",
              "password_env", "tls", "key_prefix", "ttl_seconds", "max_capacity_gb", "timeout_s")
YAML_KEYS = ("l2_adapter", "l2_adapters", "local_disk", "max_local_disk_size", "remote_url")
ENV_ADAPTERS = "LMCD_L2_ADAPTERS"
MASK = "***"
GIB = 2**30


@dataclass(frozen=True)
class FsSpec:
    """A local disk tier: objects under ``base_path`` (absolute), at most ``max_capacity_gb`` of them, and
    (where given) none written while the file system has less than ``min_free_gb`` free."""

    base_path: str
    max_capacity_gb: float
    min_free_gb: float | None = None
    source: str = field(default="", compare=False)  # where it was configured, e.g. "--l2-adapter #2"

    kind = "fs"

    def kwargs(self) -> dict[str, Any]:
        """FsAdapter's constructor arguments."""
        return {"base_path": self.base_path, "max_capacity_bytes": int(self.max_capacity_gb * GIB),
                "min_free_bytes": None if self.min_free_gb is None else int(self.min_free_gb * GIB)}

    def describe(self) -> str:
        keep = "" if self.min_free_gb is None else f", keep {self.min_free_gb:g} GiB free"
        return f"fs {self.base_path} ({self.max_capacity_gb:g} GiB{keep})"

    def as_json(self) -> str:
        d: dict[str, Any] = {"type": "fs", "base_path": self.base_path, "max_capacity_gb": self.max_capacity_gb}
        if self.min_free_gb is not None:
            d["min_free_gb"] = self.min_free_gb
        return json.dumps(d)

    def overlaps(self, other: AdapterSpec) -> bool:
        if not isinstance(other, FsSpec):
            return False
        return os.path.commonpath([self.base_path, other.base_path]) in (self.base_path, other.base_path)


@dataclass(frozen=True)
class RedisSpec:
    """A Redis/Valkey tier: one server (``host``, ``port``) or a cluster (``cluster_mode``, seeds in
    ``startup_nodes`` or ``host``/``port``). ``password`` is a secret: never in a repr, describe() or a log."""

    kind: str  # "resp" or "valkey"
    host: str | None = None
    port: int = DEFAULT_REDIS_PORT
    startup_nodes: tuple[tuple[str, int], ...] = ()
    cluster_mode: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    key_prefix: str = DEFAULT_KEY_PREFIX
    ttl_seconds: int | None = None
    max_capacity_gb: float | None = None  # None: unbounded here (the server's maxmemory policy evicts)
    timeout_s: float = 1.0
    password_source: str | None = field(default=None, compare=False)  # e.g. "password_file /run/secrets/redis"
    source: str = field(default="", compare=False)

    @property
    def nodes(self) -> tuple[tuple[str, int], ...]:
        """The servers it talks to first: ``startup_nodes``, or ``host``/``port``."""
        return self.startup_nodes or ((self.host or "", self.port),)

    def kwargs(self) -> dict[str, Any]:
        """RedisAdapter's constructor arguments, less ``kind`` (its first positional one)."""
        return {"host": self.host, "port": self.port,
                "startup_nodes": list(self.startup_nodes) if self.startup_nodes else None,
                "cluster_mode": self.cluster_mode, "username": self.username, "password": self.password,
                "tls": self.tls, "key_prefix": self.key_prefix, "ttl_seconds": self.ttl_seconds,
                "max_capacity_bytes": None if self.max_capacity_gb is None else int(self.max_capacity_gb * GIB),
                "timeout_s": self.timeout_s}

    def describe(self) -> str:
        scheme = ("rediss" if self.tls else "redis") if self.kind == "resp" else ("valkeys" if self.tls else "valkey")
        user = f"{self.username}@" if self.username else ""
        where = ",".join(f"{_hostport(h, p)}" for h, p in self.nodes)
        extra = ["cluster"] if self.cluster_mode else []
        extra.append(f"prefix {self.key_prefix!r}")
        if self.ttl_seconds is not None:
            extra.append(f"ttl {self.ttl_seconds} s")
        if self.max_capacity_gb is not None:
            extra.append(f"{self.max_capacity_gb:g} GiB")
        if self.password_source:
            extra.append(f"password from {self.password_source}")
        return f"{self.kind} {scheme}://{user}{where} ({', '.join(extra)})"

    def as_json(self) -> str:
        """The spec as ``--l2-adapter`` JSON, the password masked."""
        d: dict[str, Any] = {"type": self.kind}
        if self.startup_nodes:
            d["startup_nodes"] = [_hostport(h, p) for h, p in self.startup_nodes]
        else:
            d.update(host=self.host, port=self.port)
        if self.cluster_mode:
            d["cluster_mode"] = True
        if self.username:
            d["username"] = self.username
        if self.password is not None:
            d["password"] = MASK
        if self.tls:
            d["tls"] = True
        if self.key_prefix != DEFAULT_KEY_PREFIX:
            d["key_prefix"] = self.key_prefix
        for name in ("ttl_seconds", "max_capacity_gb"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        return json.dumps(d)

    def overlaps(self, other: AdapterSpec) -> bool:
        return isinstance(other, RedisSpec) and other.key_prefix == self.key_prefix \
            and bool(set(other.nodes) & set(self.nodes))


AdapterSpec = FsSpec | RedisSpec


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------- one adapter


class _Fields:
    """The keys of one adapter's mapping, read once each; errors name the key and ``source``."""

    def __init__(self, raw: Mapping[str, Any], source: str, kind: str, valid: tuple[str, ...]) -> None:
        self.raw, self.source, self.kind = raw, source, kind
        unknown = sorted(set(map(str, raw)) - set(valid))
        if unknown:
            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, valid, 1)) else repr(k)
                     for k in unknown]
            raise ConfigError(f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(hints)} for "
                              f"type {kind!r}; valid keys: {', '.join(valid)}")

    def fail(self, key: str, why: str, show: bool = True) -> ConfigError:
        got = f", got {self.raw[key]!r}" if show and key in self.raw else ""
        return ConfigError(f"{self.source}: {key!r} of the {self.kind!r} adapter {why}{got}")

    def string(self, key: str, required: bool = False, show: bool = True) -> str | None:
        value = self.raw.get(key)
        if value is None:
            if required:
                raise ConfigError(f"{self.source}: the {self.kind!r} adapter needs {key!r}; keys given: "
                                  f"{', '.join(map(str, self.raw)) or 'none'}")
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(key, "must be a non-empty string", show)
        return value

    def number(self, key: str, minimum: float, strict: bool = True, required: bool = False) -> float | None:
        value = self.raw.get(key)
        if value is None:
            if required:
                raise ConfigError(f"{self.source}: the {self.kind!r} adapter needs {key!r} (a number of GiB > 0)")
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not (value > minimum if strict else value >= minimum) or value != value or value == float("inf"):
            raise self.fail(key, f"must be a number {'>' if strict else '>='} {minimum:g}")
        return float(value)

    def integer(self, key: str, low: int, high: int) -> int | None:
        value = self.raw.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(key, f"must be an integer from {low} to {high}")
        return value

    def flag(self, key: str) -> bool:
        value = self.raw.get(key, False)
        if not isinstance(value, bool):
            raise self.fail(key, "must be true or false")
        return value


def parse_adapter(value: str | Mapping[str, Any], source: str, *, environ: Mapping[str, str] | None = None,
                  visible: bool = True) -> AdapterSpec:
    """One adapter from ``--l2-adapter`` JSON text or a YAML mapping. ``source`` names it in errors and logs;
    ``visible``: whether others may read where it was written (a flag, a file), so an inline password is
    logged at WARNING. ``environ`` resolves ``password_env`` (default os.environ)."""
    raw = _load_json(value, source) if isinstance(value, str) else value
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected an object with a \"type\" ({', '.join(ADAPTER_TYPES)}), "
                          f"got {type(raw).__name__}")
    kind = raw.get("type")
    if kind not in ADAPTER_TYPES:
        got = "no \"type\"" if kind is None else f"unknown type {kind!r}"
        raise ConfigError(f"{source}: {got}; valid types: {', '.join(ADAPTER_TYPES)}")
    if kind == "fs":
        return _fs(_Fields(raw, source, kind, FS_KEYS))
    return _redis(_Fields(raw, source, kind, REDIS_KEYS), os.environ if environ is None else environ, visible)


def _load_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:  # its message quotes a position, never the text (it may hold a password)
        raise ConfigError(f"{source}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno} (char "
                          f"{exc.pos}); expected an object like '{{\"type\": \"fs\", \"base_path\": "
                          "\"/var/cache/lmcd\", \"max_capacity_gb\": 100}' (in single quotes for the shell)") from None


def _fs(f: _Fields) -> FsSpec:
    base_path = f.string("base_path", required=True)
    assert base_path is not None
    size = f.number("max_capacity_gb", 0, required=True)
    assert size is not None
    return FsSpec(os.path.abspath(os.path.expanduser(base_path)), size,
                  f.number("min_free_gb", 0, strict=False), f.source)


def _redis(f: _Fields, environ: Mapping[str, str], visible: bool) -> RedisSpec:
    host, nodes, cluster = f.string("host"), _nodes(f), f.flag("cluster_mode")
    if (host is None) == (not nodes):
        raise ConfigError(f"{f.source}: the {f.kind!r} adapter needs either \"host\" (and \"port\", default "
                          f"{DEFAULT_REDIS_PORT}) or \"startup_nodes\" (a cluster's [\"host:port\", ...]), "
                          f"{'not both' if host else 'got neither'}")
    if nodes and not cluster:
        raise ConfigError(f"{f.source}: \"startup_nodes\" lists a cluster's seed nodes: add \"cluster_mode\": true, "
                          "or give \"host\" and \"port\" for a single server")
    if nodes and "port" in f.raw:
        raise f.fail("port", "goes with \"host\"; \"startup_nodes\" give each node's port")
    password, password_source = _password(f, environ, visible)
    username = f.string("username")
    if username is not None and password is None:
        raise ConfigError(f"{f.source}: \"username\" without a password: add \"password_file\" or \"password_env\"")
    ttl = f.integer("ttl_seconds", 1, 2**31 - 1)
    timeout = f.number("timeout_s", 0)
    return RedisSpec(f.kind, host=host, port=f.integer("port", 1, 65535) or DEFAULT_REDIS_PORT,
                     startup_nodes=nodes, cluster_mode=cluster, username=username, password=password,
                     tls=f.flag("tls"), key_prefix=f.string("key_prefix") or DEFAULT_KEY_PREFIX, ttl_seconds=ttl,
                     max_capacity_gb=f.number("max_capacity_gb", 0), timeout_s=1.0 if timeout is None else timeout,
                     password_source=password_source, source=f.source)


def _nodes(f: _Fields) -> tuple[tuple[str, int], ...]:
    raw = f.raw.get("startup_nodes")
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise f.fail("startup_nodes", "must be a non-empty list of \"host:port\" strings")
    nodes = []
    for item in raw:
        host, _, port = item.rpartition(":") if isinstance(item, str) else ("", "", "")
        host = host.strip("[]")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(f"{f.source}: \"startup_nodes\" entry {item!r} is not \"host:port\" (port 1 to 65535, "
                              "an IPv6 host in brackets: \"[::1]:6379\")")
        nodes.append((host, int(port)))
    return tuple(nodes)


def _password(f: _Fields, environ: Mapping[str, str], visible: bool) -> tuple[str | None, str | None]:
    """The password and where it came from (never the password itself); at most one of the three keys."""
    given = [k for k in ("password", "password_file", "password_env") if k in f.raw]
    if len(given) > 1:
        raise ConfigError(f"{f.source}: {' and '.join(given)} both give the Redis password: keep one "
                          "(password_file or password_env keep it out of the command line and config files)")
    if not given:
        return None, None
    if given[0] == "password":
        password = f.string("password", show=False)
        if visible:
            _warn_inline(f.source)
        return password, "password"
    if given[0] == "password_file":
        path = f.string("password_file")
        assert path is not None
        try:
            return read_token_file(path, what="the Redis password"), f"password_file {path}"
        except ValueError as exc:
            raise ConfigError(f"{f.source}: \"password_file\": {exc}") from None
    name = f.string("password_env")
    assert name is not None
    if not environ.get(name):
        state = "is empty" if name in environ else "is not set"
        raise ConfigError(f"{f.source}: \"password_env\": environment variable {name} {state}: export the Redis "
                          f"password in {name}, or give \"password_file\"")
    return environ[name], f"password_env {name}"


# ---------------------------------------------------------------- LMCache's legacy keys


def _legacy_value(environ: Mapping[str, str], from_file: Mapping[str, Any], config_path: str | None, env: str,
                  key: str) -> tuple[Any, str, bool]:
    """A legacy key's value (None: not given), its label for messages, and whether others may read it there."""
    if environ.get(env):
        return environ[env], env, False
    return from_file.get(key), f"{config_path}: {key}", True


def legacy_disk(environ: Mapping[str, str], from_file: Mapping[str, Any],
                config_path: str | None) -> tuple[FsSpec, str] | None:
    """The disk tier of ``local_disk``/``max_local_disk_size`` (env over YAML) and the text that says which
    keys gave it; None where no local disk is given. ``file:///abs/``, ``file://./rel/`` and a bare path all
    name a directory, a relative one relative to the server's working directory."""
    where, where_label, _ = _legacy_value(environ, from_file, config_path, "LMCACHE_LOCAL_DISK", "local_disk")
    size, size_label, _ = _legacy_value(environ, from_file, config_path, "LMCACHE_MAX_LOCAL_DISK_SIZE",
                                        "max_local_disk_size")
    if where is None:
        if size is not None:
            log.warning("%s=%s is set but no local disk is (LMCACHE_LOCAL_DISK or local_disk): no disk tier",
                        size_label, size)
        return None
    if not isinstance(where, str) or not where.strip():
        raise ConfigError(f"{where_label}: expected a directory (file:///ABSOLUTE/PATH/, file://./RELATIVE/ or a "
                          f"path), got {where!r}")
    path = where.strip()
    if path.startswith("file://"):
        path = path[len("file://"):]
    elif "://" in path:
        raise ConfigError(f"{where_label}: {where!r} is no local directory (scheme {where.split('://')[0]!r}); "
                          "give file:///ABSOLUTE/PATH/, file://./RELATIVE/ or a path; remote stores go in "
                          "remote_url (LMCACHE_REMOTE_URL)")
    if not path:
        raise ConfigError(f"{where_label}: {where!r} names no directory: give file:///ABSOLUTE/PATH/")
    gb = DEFAULT_LEGACY_DISK_GB if size is None else _legacy_size(size, size_label)
    spec = FsSpec(os.path.abspath(os.path.expanduser(path)), gb, source=where_label)
    sized = f"default {gb:g} GB" if size is None else f"{size_label.split(': ')[-1]}={size} GB"
    return spec, f"{where_label}={where} ({sized})"


def _legacy_size(size: Any, label: str) -> float:
    if isinstance(size, str):
        try:
            size = float(size)
        except ValueError:
            size = None
    if isinstance(size, bool) or not isinstance(size, (int, float)) or not 0 < size < float("inf"):
        raise ConfigError(f"{label}: the local disk's size must be a number of GiB > 0")
    return float(size)


def mask_url(url: str) -> str:
    """``url`` with the password of its user part, if any, replaced by ***."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, hostpart = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}{colon and ':' + MASK}@{hostpart}"


def legacy_remote(environ: Mapping[str, str], from_file: Mapping[str, Any],
                  config_path: str | None) -> tuple[RedisSpec, str] | None:
    """The Redis tier of ``remote_url`` (env over YAML): ``redis://[user:pass@]host[:port][/0]``, ``rediss://``
    for TLS, ``valkey://``/``valkeys://`` likewise as type valkey; and the text that says so (masked)."""
    url, label, visible = _legacy_value(environ, from_file, config_path, "LMCACHE_REMOTE_URL", "remote_url")
    if url is None:
        return None
    if not isinstance(url, str):
        raise ConfigError(f"{label}: expected a URL like redis://HOST:6379, got {type(url).__name__}")
    masked = mask_url(url)
    supported = ", ".join(f"{s}://" for s in URL_SCHEMES)
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in URL_SCHEMES:
        raise ConfigError(f"{label}: {masked!r}: {'unsupported scheme ' + repr(scheme) if scheme else 'no scheme'}; "
                          f"supported: {supported} (rediss and valkeys use TLS); for a Redis Cluster give "
                          "--l2-adapter '{\"type\": \"valkey\", \"startup_nodes\": [\"HOST:PORT\"], "
                          "\"cluster_mode\": true}'")
    kind, tls = URL_SCHEMES[scheme]
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(f"{label}: {masked!r} is no URL of the form {scheme}://[USER:PASSWORD@]HOST[:PORT]") \
            from None
    if not parts.hostname:
        raise ConfigError(f"{label}: {masked!r} names no host: {scheme}://HOST:PORT")
    if parts.path.strip("/") not in ("", "0") or parts.query or parts.fragment:
        raise ConfigError(f"{label}: {masked!r}: only database 0 and no query or fragment (lmcd keeps its objects "
                          "under a key prefix, which a Redis Cluster allows too): give a --l2-adapter JSON with "
                          "\"key_prefix\" to keep servers apart")
    password = None if parts.password is None else unquote(parts.password)
    username = unquote(parts.username) if parts.username else None
    if username is not None and password is None:
        raise ConfigError(f"{label}: {masked!r} has a user but no password: {scheme}://USER:PASSWORD@HOST:PORT")
    if password is not None and visible:
        _warn_inline(label)
    spec = RedisSpec(kind, host=parts.hostname, port=port or DEFAULT_REDIS_PORT, username=username,
                     password=password, tls=tls, password_source=None if password is None else label.split(": ")[-1],
                     source=label)
    return spec, f"{label}={masked}"


def _warn_inline(source: str) -> None:
    log.warning("%s: the Redis password is written inline, where others may read it (the command line shows in ps "
                "and /proc/<pid>/cmdline; a config file to whoever can read it): put it in a file of mode 0600 and "
                "give \"password_file\", or give \"password_env\" (the name of an environment variable)", source)


# ---------------------------------------------------------------- all adapters, in cascade order


def resolve_adapters(args_adapters: list[str] | None, environ: Mapping[str, str], from_file: Mapping[str, Any],
                     config_path: str | None) -> tuple[AdapterSpec, ...]:
    """The cascade's adapters, nearest to L1 first: the explicit ones (flags > LMCD_L2_ADAPTERS > YAML), then the
    legacy disk, then the legacy remote. See the module docstring."""
    adapters: list[AdapterSpec] = []
    for spec in _explicit(args_adapters, environ, from_file, config_path):
        _check_overlap(adapters, spec)
        adapters.append(spec)
    for found in (legacy_disk(environ, from_file, config_path), legacy_remote(environ, from_file, config_path)):
        if found is None:
            continue
        spec, said = found
        same = next((a for a in adapters if a == spec), None)
        if same is not None:
            log.info("%s -> L2 adapter %s: the same as %s, not added twice", said, spec.as_json(), same.source)
            continue
        _check_overlap(adapters, spec)
        log.info("%s -> L2 adapter %s", said, spec.as_json())
        adapters.append(spec)
    return tuple(adapters)


def _explicit(args_adapters: list[str] | None, environ: Mapping[str, str], from_file: Mapping[str, Any],
              config_path: str | None) -> list[AdapterSpec]:
    if args_adapters:
        return [parse_adapter(text, f"--l2-adapter #{i}", environ=environ) for i, text in enumerate(args_adapters, 1)]
    if environ.get(ENV_ADAPTERS):
        items = _load_json(environ[ENV_ADAPTERS], ENV_ADAPTERS)
        if not isinstance(items, list):
            raise ConfigError(f"{ENV_ADAPTERS}: expected a JSON list of adapters ([{{\"type\": ...}}, ...]; [] for "
                              f"none), got {type(items).__name__}")
        return [parse_adapter(item, f"{ENV_ADAPTERS} #{i}", environ=environ, visible=False)
                for i, item in enumerate(items, 1)]
    keys = [k for k in ("l2_adapter", "l2_adapters") if from_file.get(k) is not None]
    if len(keys) == 2:
        raise ConfigError(f"{config_path}: l2_adapter and l2_adapters both list adapters: keep one of them")
    if not keys:
        return []
    items = from_file[keys[0]]
    items = items if isinstance(items, list) else [items]
    specs = []
    for i, item in enumerate(items, 1):
        source = f"{config_path}: {keys[0]} #{i}"
        if not isinstance(item, (str, Mapping)):
            raise ConfigError(f"{source}: expected a mapping (type: fs, ...) or a JSON string, got "
                              f"{type(item).__name__}")
        specs.append(parse_adapter(item, source, environ=environ))
    return specs


def _check_overlap(adapters: list[AdapterSpec], spec: AdapterSpec) -> None:
    for other in adapters:
        if spec.overlaps(other):
            fix = ("give each fs tier its own directory, neither inside the other" if isinstance(spec, FsSpec) else
                   "give each a different \"key_prefix\", or keep one")
            raise ConfigError(f"{spec.source}: {spec.describe()} uses the same store as {other.source} "
                              f"({other.describe()}): {fix}")


def make_adapter(spec: AdapterSpec) -> Adapter:
    """The adapter a spec configures (not started)."""
    if isinstance(spec, FsSpec):
        from lmcd.server.disktier import FsAdapter

        return FsAdapter(**spec.kwargs())
    from lmcd.server.redistier import RedisAdapter

    return RedisAdapter(spec.kind, **spec.kwargs())
