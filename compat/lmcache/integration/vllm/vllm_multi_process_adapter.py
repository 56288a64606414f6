"""Names vLLM's ``lmcache_mp_connector`` module imports at import time for its own built-in
implementation (``LMCacheMPConnectorUpstream``), which never runs with this layer: vLLM takes
``lmcache.integration.vllm.lmcache_mp_connector.LMCacheMPConnector`` (lmcd's) instead, unless
``LMCACHE_USE_UPSTREAM_MP`` is set, and then these refuse with the reason."""

from __future__ import annotations

from typing import Any, NoReturn

from lmcache._lmcd_compat import check_no_lmcache_distribution

check_no_lmcache_distribution()


class _NotInLmcd:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        refuse(type(self).__name__)


def refuse(name: str) -> NoReturn:
    raise NotImplementedError(
        f"{name} belongs to vLLM's built-in LMCache multi-process connector, which needs LMCache itself; with lmcd's "
        "compatibility layer vLLM runs lmcd's LMCacheMPConnector: unset LMCACHE_USE_UPSTREAM_MP")


class LMCacheMPSchedulerAdapter(_NotInLmcd):
    pass


class LMCacheMPWorkerAdapter(_NotInLmcd):
    pass


class LoadStoreOp(_NotInLmcd):
    pass


class ParallelStrategy(_NotInLmcd):
    pass
