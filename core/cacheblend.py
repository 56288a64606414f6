"""LMCache's CacheBlend settings, which lmcd does not implement yet: found in one place, refused or warned about once.

CacheBlend (non-prefix KV reuse) is asked for by ``LMCACHE_ENABLE_BLENDING`` or the YAML key ``enable_blending``
(LMCache's in-process settings), or by ``lmcache server --engine-type blend`` (its multi-process server). The
tuning keys, ``LMCACHE_BLEND_*`` and YAML ``blend_*``, mean nothing without it. Both the server (its environment
and ``--config`` file) and the connector (``LMCACHE_CONFIG_FILE``, for the server it starts) call
``check_settings``:

- blending enabled (the variable over the file): ``BlendingUnavailable``, which the server turns into its
  ConfigError (it exits with the message) and the connector into its SettingsError (vLLM does not start);
- only tuning keys given: one WARNING naming them all; they are ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("lmcd.cacheblend")

ENABLE_ENV = "LMCACHE_ENABLE_BLENDING"
ENABLE_KEY = "enable_blending"
TUNING_ENV_PREFIX = "LMCACHE_BLEND_"
TUNING_KEY_PREFIX = "blend_"
ENGINE_TYPES = ("blend", "blend_legacy")  # LMCache's --engine-type values that select a CacheBlend engine
FALSE_WORDS = ("0", "false", "no", "off")


class BlendingUnavailable(ValueError):
    """CacheBlend was asked for; the message says by what and how to serve without it."""


def unavailable_message(asked_by: str, fix: str) -> str:
    """The one refusal text: ``asked_by`` names the setting as the user wrote it, ``fix`` how to drop it."""
    return f"CacheBlend ({asked_by}) is not available in lmcd yet: {fix} to serve without blending"


def is_file_key(key: str) -> bool:
    """Whether a YAML key is one of CacheBlend's (accepted by the server's --config, then checked here)."""
    return key == ENABLE_KEY or key.startswith(TUNING_KEY_PREFIX)


def _enabled(value: Any) -> bool:
    """A given value asks for blending unless it says false; an unclear one asks (unsetting it is the fix)."""
    return value is not False and str(value).strip().lower() not in FALSE_WORDS


def check_settings(environ: Mapping[str, str], from_file: Mapping[str, Any], file_label: str | None) -> None:
    """Raise BlendingUnavailable where ``LMCACHE_ENABLE_BLENDING`` (else the file's ``enable_blending``) asks for
    CacheBlend; else log one WARNING where tuning keys are given. ``file_label`` names the file in messages.
    Empty variables count as unset, as every other setting's."""
    if environ.get(ENABLE_ENV):
        if _enabled(environ[ENABLE_ENV]):
            raise BlendingUnavailable(unavailable_message(f"{ENABLE_ENV}={environ[ENABLE_ENV]}", f"unset {ENABLE_ENV}"))
    elif from_file.get(ENABLE_KEY) is not None and _enabled(from_file[ENABLE_KEY]):
        raise BlendingUnavailable(unavailable_message(f"{ENABLE_KEY}: {from_file[ENABLE_KEY]} in {file_label}",
                                                      f"remove {ENABLE_KEY} from {file_label}"))
    tuning = sorted(k for k, v in environ.items() if k.startswith(TUNING_ENV_PREFIX) and v)
    tuning += [f"{k} in {file_label}" for k in sorted(map(str, from_file)) if k.startswith(TUNING_KEY_PREFIX)]
    if tuning:
        log.warning("CacheBlend is not available in lmcd yet, so its settings are ignored: %s", ", ".join(tuning))
