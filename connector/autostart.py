"""Embedded mode: start a local ``lmcache server`` when none answers, owned by this process.

The first connector of a node that finds no server starts one (a file lock keeps two processes
from racing), sized from LMCache's in-process settings, and given the YAML file named by
``LMCACHE_CONFIG_FILE`` as its ``--config`` (so its L2 keys take effect too). The child gets
SIGTERM when its parent dies (``PR_SET_PDEATHSIG``) and at the parent's normal exit, so no process
and no SHM segment outlives vLLM. Each start is recorded (``lmcd-autostart-<port>.json`` beside the
lock: the server's pid and the processes it was started for), so that ``stop_embedded`` in an
ancestor (LMCache's ``LMCacheEngineBuilder.destroy`` in the user's script, whose vLLM engine core
started the server) stops it.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import json
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


RECORD_PREFIX, RECORD_SUFFIX = "lmcd-autostart-", ".json"  # lmcd-autostart-<port>.json: one start's record


def _record_path(port: int) -> str:
    return os.path.join(tempfile.gettempdir(), f"{RECORD_PREFIX}{port}{RECORD_SUFFIX}")


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, ppid, ...); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _ancestors(pid: int) -> list[int]:
    """``pid`` and its parents, up to init."""
    chain: list[int] = []
    while pid > 1 and len(chain) < 64:
        chain.append(pid)
        fields = _stat(pid)
        if not fields or not fields[1].isdigit():
            break
        pid = int(fields[1])
    return chain


def stop_embedded(owner: int | None = None, timeout_s: float = 30.0) -> int:
    """Stop the servers embedded mode started for ``owner`` (this process by default) or for a process
    it started; returns how many were stopped."""
    owner = os.getpid() if owner is None else owner
    stopped = 0
    for name in os.listdir(tempfile.gettempdir()):
        if not (name.startswith(RECORD_PREFIX) and name.endswith(RECORD_SUFFIX)):
            continue
        path = os.path.join(tempfile.gettempdir(), name)
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
            pid, owners = int(record["pid"]), [int(p) for p in record["owners"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if owner not in owners:
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        else:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.05)
            stopped += 1
            log.info("Stopped the local LMCache server (pid %d) that embedded mode started", pid)
        with contextlib.suppress(OSError):
            os.unlink(path)
    return stopped


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


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
        if os.environ.get("LMCACHE_CONFIG_FILE"):  # LMCache's YAML: chunk size and CPU size above, L2 keys there
            cmd += ["--config", os.environ["LMCACHE_CONFIG_FILE"]]
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
        with open(_record_path(local.port), "w", encoding="utf-8") as f:
            json.dump({"pid": child.pid, "owners": _ancestors(os.getpid())}, f)
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
