"""`lmcache.v1.cache_engine.LMCacheEngineBuilder`, as LMCache's offline examples end::

    from lmcache.v1.cache_engine import LMCacheEngineBuilder
    from lmcache.integration.vllm.utils import ENGINE_NAME
    LMCacheEngineBuilder.destroy(ENGINE_NAME)

With lmcd, embedded mode (``LMCacheConnectorV1``) starts a local ``lmcache server`` for vLLM;
``destroy`` stops the servers it started for this process (or for vLLM's engine processes, its
children). Nothing else of LMCache's engine builder exists here."""

from __future__ import annotations

from lmcache._lmcd_compat import check_no_lmcache_distribution

check_no_lmcache_distribution()


class LMCacheEngineBuilder:
    @classmethod
    def destroy(cls, instance_id: str) -> None:
        """Stop what embedded mode started for this process (any ``instance_id``: lmcd runs one server per node)."""
        from lmcd.connector.autostart import stop_embedded
        from lmcd.connector.vllm import setup_logging

        setup_logging()  # in the user's process, where no connector has set lmcd's logging up
        stop_embedded()
