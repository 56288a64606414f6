"""The one check every module of lmcd's compatibility layer makes at import: LMCache's own `lmcache`
distribution must not be installed beside it (both provide the Python package `lmcache`, and
their files would mix in one directory)."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "lmcd-lmcache-compat"


class LmcacheConflictError(RuntimeError):
    """LMCache's `lmcache` distribution and lmcd's compatibility layer are both installed."""


def check_no_lmcache_distribution() -> None:
    try:
        real = metadata.distribution("lmcache")
    except metadata.PackageNotFoundError:
        return
    raise LmcacheConflictError(
        f"LMCache's own distribution 'lmcache' {real.version} is installed beside lmcd's compatibility layer "
        f"'{DISTRIBUTION}': both provide the Python package 'lmcache'. Keep one: `pip uninstall lmcache` (and "
        f"then `pip install --force-reinstall ./compat`) to run lmcd, or `pip uninstall {DISTRIBUTION}` to run "
        "LMCache.")


def version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a source tree
        return "source"
