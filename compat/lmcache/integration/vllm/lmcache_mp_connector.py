"""`lmcache.integration.vllm.lmcache_mp_connector.LMCacheMPConnector`: vLLM's built-in
``LMCacheMPConnector`` prefers this class, so ``"kv_connector": "LMCacheMPConnector"`` without a
``kv_connector_module_path`` runs lmcd's connector (``lmcd.connector.vllm``)."""

from lmcache._lmcd_compat import check_no_lmcache_distribution

check_no_lmcache_distribution()

from lmcd.connector.vllm import LMCacheMPConnector  # noqa: E402

__all__ = ["LMCacheMPConnector"]
