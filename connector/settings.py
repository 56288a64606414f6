"""Connector settings: ``kv_connector_extra_config`` keys under ``lmcache.mp.*``, plus the
LMCache in-process environment variables used by embedded mode.

| key | default | meaning |
|---|---|---|
| ``lmcache.mp.host`` | ``localhost`` | server host: ``tcp://host``, a bare host, an IP, or ``ipc:///path`` |
| ``lmcache.mp.port`` | ``5555`` | server port |
| ``lmcache.mp.mp_transfer_mode`` | ``auto`` | ``auto``, ``engine_driven``, ``lmcache_driven`` |
| ``lmcache.mp.auth_token`` | env ``LMCD_AUTH_TOKEN`` | the server's ``--auth-token`` |
| ``lmcache.mp.auth_token_file`` | env ``LMCD_AUTH_TOKEN_FILE`` | a file holding it (mode 0600): ``--auth-token-file`` |
| ``lmcache.mp.request_timeout`` | ``10`` | seconds before a request to the server counts as failed |
| ``lmcache.mp.autostart`` | ``false`` (``true`` for ``LMCacheConnectorV1``) | start a local server if none answers |
| ``lmcache.mp.load_failure_policy`` | ``recompute`` | vLLM's ``kv_load_failure_policy`` unless set there |

Embedded mode sizes the server it starts from ``LMCACHE_MAX_LOCAL_CPU_SIZE`` (GiB),
``LMCACHE_CHUNK_SIZE``, ``LMCACHE_LOCAL_CPU`` or the YAML file named by
``LMCACHE_CONFIG_FILE`` (keys ``chunk_size``, ``local_cpu``, ``max_local_cpu_size``). CacheBlend's settings
(``LMCACHE_ENABLE_BLENDING``, ``LMCACHE_BLEND_*``, YAML ``enable_blending``, ``blend_*``) are checked by
``lmcd.cacheblend``: enabled, they are a SettingsError; tuning keys alone, one WARNING.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from lmcd.cacheblend import BlendingUnavailable, check_settings
from lmcd.connector.client import server_url
from lmcd.server.config import read_token_file

TRANSFER_MODES = ("auto", "engine_driven", "lmcache_driven")
PREFIX = "lmcache.mp."
KNOWN_KEYS = {"host", "port", "mp_transfer_mode", "auth_token", "auth_token_file", "request_timeout", "autostart",
              "load_failure_policy"}


class SettingsError(ValueError):
    pass


def _token(ours: Mapping[str, Any], environ: Mapping[str, str]) -> str | None:
    """The token the connector sends: a config key beats the environment; a token and a token file from
    the same place are an error; a file is read once, with the server's rules (mode 0600 or stricter)."""
    env_token, env_path = environ.get("LMCD_AUTH_TOKEN"), environ.get("LMCD_AUTH_TOKEN_FILE")
    for token, path, where in ((ours.get("auth_token"), ours.get("auth_token_file"), f"{PREFIX}auth_token"),
                               (env_token, env_path, "LMCD_AUTH_TOKEN")):
        if token and path:
            raise SettingsError(f"{where} and {where}_file both give the auth token: give one of them")
        if path:
            try:
                return read_token_file(str(path))
            except ValueError as exc:
                raise SettingsError(f"{where}_file: {exc}") from None
        if token:
            return str(token)
    return None


def _truthy(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class EmbeddedSettings:
    """What a server started by the connector gets (LMCache in-process settings)."""

    local_cpu: bool = True
    max_local_cpu_size_gb: float = 5.0
    chunk_size: int = 256

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EmbeddedSettings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        data: dict[str, Any] = {}
        path = environ.get("LMCACHE_CONFIG_FILE")
        if path:
            try:
                with open(path, encoding="utf-8") as f:
                    data = yaml.safe_load(f) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise SettingsError(f"LMCACHE_CONFIG_FILE={path}: cannot read it: {exc}") from None
            if not isinstance(data, dict):
                raise SettingsError(f"LMCACHE_CONFIG_FILE={path}: expected a mapping")
            values.update({k: data[k] for k in ("local_cpu", "max_local_cpu_size", "chunk_size") if k in data})
        try:
            check_settings(environ, data, f"LMCACHE_CONFIG_FILE={path}")
        except BlendingUnavailable as exc:
            raise SettingsError(str(exc)) from None
        for key, env in (("local_cpu", "LMCACHE_LOCAL_CPU"), ("max_local_cpu_size", "LMCACHE_MAX_LOCAL_CPU_SIZE"),
                         ("chunk_size", "LMCACHE_CHUNK_SIZE")):
            if environ.get(env):
                values[key] = environ[env]
        try:
            return cls(
                local_cpu=_truthy(values.get("local_cpu", True)),
                max_local_cpu_size_gb=float(values.get("max_local_cpu_size", cls.max_local_cpu_size_gb)),
                chunk_size=int(values.get("chunk_size", cls.chunk_size)),
            )
        except (TypeError, ValueError) as exc:
            raise SettingsError(f"invalid LMCache setting: {exc}") from None


@dataclass(frozen=True)
class ConnectorSettings:
    host: str = "localhost"
    port: int = 5555
    transfer_mode: str = "auto"
    auth_token: str | None = None
    request_timeout_s: float = 10.0
    autostart: bool = False
    load_failure_policy: str = "recompute"
    instance_id: str = ""  # not a key: the vLLM connector sets vLLM's engine id (kv_transfer_config.engine_id)

    @property
    def url(self) -> str:
        return server_url(self.host, self.port)

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None, *, autostart_default: bool = False,
                          environ: Mapping[str, str] | None = None) -> ConnectorSettings:
        environ = os.environ if environ is None else environ
        extra = dict(extra or {})
        ours = {k[len(PREFIX):]: v for k, v in extra.items() if k.startswith(PREFIX)}
        unknown = sorted(set(ours) - KNOWN_KEYS)
        if unknown:
            raise SettingsError(f"unknown kv_connector_extra_config keys {[PREFIX + k for k in unknown]}; "
                                f"known: {sorted(PREFIX + k for k in KNOWN_KEYS)}")
        mode = str(ours.get("mp_transfer_mode", "auto"))
        if mode not in TRANSFER_MODES:
            raise SettingsError(f"{PREFIX}mp_transfer_mode={mode!r}: valid values are {', '.join(TRANSFER_MODES)}")
        policy = str(ours.get("load_failure_policy", "recompute"))
        if policy not in ("recompute", "fail"):
            raise SettingsError(f"{PREFIX}load_failure_policy={policy!r}: valid values are recompute, fail")
        try:
            port = int(ours.get("port", 5555))
            timeout = float(ours.get("request_timeout", 10.0))
        except (TypeError, ValueError) as exc:
            raise SettingsError(f"{PREFIX}port / {PREFIX}request_timeout: {exc}") from None
        if not 0 < port < 65536 or not timeout > 0:
            raise SettingsError(f"{PREFIX}port must be 1..65535 and {PREFIX}request_timeout positive")
        return cls(
            host=str(ours.get("host", "localhost")), port=port, transfer_mode=mode,
            auth_token=_token(ours, environ), request_timeout_s=timeout,
            autostart=_truthy(ours.get("autostart", autostart_default)), load_failure_policy=policy,
        )
