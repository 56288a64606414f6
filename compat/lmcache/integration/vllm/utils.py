"""`lmcache.integration.vllm.utils`: ``ENGINE_NAME`` (for ``LMCacheEngineBuilder.destroy``) and
``mla_enabled``, which vLLM's wrappers import."""

from __future__ import annotations

from typing import Any

from lmcache._lmcd_compat import check_no_lmcache_distribution

check_no_lmcache_distribution()

ENGINE_NAME = "vllm-instance"


def mla_enabled(model_config: Any) -> bool:
    """Whether the model uses multi-head latent attention (vLLM's ``ModelConfig.use_mla``)."""
    return bool(getattr(model_config, "use_mla", False))
