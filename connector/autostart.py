"""Embedded mode: start a local ``lmcache server`` when none answers, owned by this process.

The first connector of a node that finds no server starts one (a file lock keeps two processes
from racing), sized from LMCache's in-process settings. The child gets SIGTERM when its parent
dies (``PR_SET_PDEATHSIG``) and at the parent's normal exit, so no process and no SHM segment
outlives vLLM.
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

from lmcd import protocol as p
from lmcd.cacheblend import TUNING_ENV_PREFIX
from lmcd.connector.client import CacheClient, LmcdError
from lmcd.connector.settings import ConnectorSettings, EmbeddedSettings

log = logging.getLogger("lmcd.connector")
PR_SET_PDEATHSIG = 1
START_TIMEOUT_S = 120.0
_children: list[subprocess.Popen[bytes]] = []


def _answers(settings: ConnectorSettings, timeout_s: float) -> bool:
    probe = CacheClient(settings.url, p.Namespace("probe", "", ""), auth_token=settings.auth_token,
                        timeout_s=timeout_s, connect=False)
    try:
        probe.connect()
        return True
    except LmcdError:
        return False
    finally:
        probe.close()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _stop_children() -> None:
    for child in _children:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()


def ensure_local_server(settings: ConnectorSettings, embedded: EmbeddedSettings) -> ConnectorSettings:
    """Return settings pointing at a running local server, starting one if needed."""
    local = settings if settings.host.startswith("ipc://") else replace(settings, host="127.0.0.1")
    if _answers(local, 0.5):
        return local
    if not embedded.local_cpu:
        log.warning("No LMCache server at %s and LMCACHE_LOCAL_CPU is off: not starting one", local.url)
        return local
    lock_path = os.path.join(tempfile.gettempdir(), f"lmcd-autostart-{local.port}.lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _answers(local, 0.5):
            return local
        cmd = [sys.executable, "-m", "lmcd", "server", "--port", str(local.port), "--http-port", "0",
               "--l1-size-gb", str(embedded.max_local_cpu_size_gb), "--chunk-size", str(embedded.chunk_size),
               "--share-pool", "true"]  # our own child: its pool may be shared, so auto picks lmcache_driven
        cmd += ["--host", local.host] if local.host.startswith("ipc://") else ["--host", "127.0.0.1"]
        # exactly the connector's token: an inherited LMCD_AUTH_TOKEN_FILE beside it would be refused; no
        # CacheBlend tuning variables, which EmbeddedSettings.from_env has already said are ignored
        env = {k: v for k, v in os.environ.items()
               if k not in ("LMCD_AUTH_TOKEN", "LMCD_AUTH_TOKEN_FILE") and not k.startswith(TUNING_ENV_PREFIX)}
        if settings.auth_token:
            env["LMCD_AUTH_TOKEN"] = settings.auth_token
        log.info("Starting a local LMCache server: %s", " ".join(cmd))
        child = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)  # noqa: PLW1509
        if not _children:
            atexit.register(_stop_children)
        _children.append(child)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if _answers(local, 1.0):
                return local
            if child.poll() is not None:
                log.error("The local LMCache server exited with code %s; continuing without the cache",
                          child.returncode)
                return local
            time.sleep(0.2)
    log.error("The local LMCache server did not answer within %.0f s; continuing without it", START_TIMEOUT_S)
    return local
