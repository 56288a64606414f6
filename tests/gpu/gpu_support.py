"""What the GPU tests need: torch with CUDA and CuPy, on a machine with an NVIDIA GPU.

``requires_gpu`` skips a test with the reason naming what is missing; ``skip_unless_gpus(n)`` skips
one that needs more GPUs than the machine has. Nothing here imports torch or CuPy unless they are
installed, so the GPU tests collect (and skip) everywhere.
"""

from __future__ import annotations

import importlib.util

import pytest


def _gpu_problem() -> str | None:
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install 'lmcd[cuda13]' or 'lmcd[cuda12]')"
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    return None


GPU_PROBLEM = _gpu_problem()
requires_gpu = pytest.mark.skipif(GPU_PROBLEM is not None, reason=f"GPU test: {GPU_PROBLEM}")


def skip_unless_gpus(count: int) -> None:
    """Skip the calling test unless ``count`` GPUs are visible."""
    import torch

    found = torch.cuda.device_count()
    if found < count:
        pytest.skip(f"needs {count} GPUs; this machine has {found}")
