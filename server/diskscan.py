"""The file names of the fs L2 tier, and the start-up scan that rebuilds its index from them.

Names (see ``lmcd.server.disktier`` for the layout)::

    <sub>/<name>.kv              an object: sub == name[:2], name = 32 lowercase hex digits
    <sub>/.<name>.<seq>.tmp      a write in flight, or torn by a process that was killed

The scan reads directories only (``os.scandir`` plus one ``stat`` an object, for its size and mtime),
never a file's content, so 100k objects take well under a second on a warm cache. It deletes temp
files: the directory is locked by the one adapter using it, so every temp file there is a dead
writer's. Anything else is foreign and left alone (counted and logged once).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass, field

log = logging.getLogger("lmcd.l2")

OBJECT_SUFFIX = ".kv"
TEMP_SUFFIX = ".tmp"
_OBJECT = re.compile(r"([0-9a-f]{32})\.kv")
_TEMP = re.compile(r"\.[0-9a-f]{32}\.[0-9a-f]+\.tmp")
_SUBDIR = re.compile(r"[0-9a-f]{2}")
PROGRESS_EVERY_S = 1.0
GIB = 1 << 30


def object_path(base_path: str, name: str) -> str:
    """Where object ``name`` lives under ``base_path``."""
    return os.path.join(base_path, name[:2], name + OBJECT_SUFFIX)


@dataclass(slots=True)
class ScanResult:
    """What ``scan`` found: ``objects`` as (name, file bytes), least recently used (oldest mtime) first."""

    objects: list[tuple[str, int]] = field(default_factory=list)
    temps_removed: int = 0
    newest_mtime_ns: int = 0  # of the objects; 0 if none
    foreign: list[str] = field(default_factory=list)  # paths relative to the base, not ours: left alone


def scan(base_path: str) -> ScanResult:
    """The objects under ``base_path``, oldest first; temp files deleted on the way; INFO progress about
    every second and one INFO summary line; one WARNING if foreign files are there."""
    started = time.monotonic()
    result = ScanResult()
    stamped: list[tuple[int, str, int]] = []  # (mtime ns, name, bytes)
    next_report = started + PROGRESS_EVERY_S
    with os.scandir(base_path) as top:
        subdirs = []
        for entry in top:
            if _SUBDIR.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
            elif entry.name != ".lmcd-fs.lock":
                result.foreign.append(entry.name)
    for sub in sorted(subdirs):
        _scan_subdir(base_path, sub, stamped, result)
        if time.monotonic() >= next_report:
            next_report = time.monotonic() + PROGRESS_EVERY_S
            log.info("Disk tier %s: scanning, %d objects so far (directory %s of ff)", base_path, len(stamped), sub)
    stamped.sort()
    result.objects = [(name, size) for _, name, size in stamped]
    result.newest_mtime_ns = stamped[-1][0] if stamped else 0
    total = sum(size for _, _, size in stamped)
    log.info("Disk tier %s: found %d objects (%.2f GiB) in %.2f s%s", base_path, len(stamped), total / GIB,
             time.monotonic() - started,
             f", removed {result.temps_removed} temp files of interrupted writes" if result.temps_removed else "")
    if result.foreign:
        log.warning("Disk tier %s: %d files that are not lmcd objects left alone (e.g. %s); the tier's directory "
                    "should hold nothing else", base_path, len(result.foreign), result.foreign[0])
    return result


def _scan_subdir(base_path: str, sub: str, stamped: list[tuple[int, str, int]], result: ScanResult) -> None:
    directory = os.path.join(base_path, sub)
    with os.scandir(directory) as entries:
        for entry in entries:
            match = _OBJECT.fullmatch(entry.name)
            if match and match.group(1).startswith(sub) and entry.is_file(follow_symlinks=False):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                stamped.append((st.st_mtime_ns, match.group(1), st.st_size))
            elif _TEMP.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    result.temps_removed += 1
            else:
                result.foreign.append(os.path.join(sub, entry.name))
