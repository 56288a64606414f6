"""`lmcache.utils.init_logger`, which vLLM's `LMCacheMPConnector` wrapper uses for its own lines."""

from __future__ import annotations

import logging

from lmcache._lmcd_compat import check_no_lmcache_distribution

check_no_lmcache_distribution()


def init_logger(name: str) -> logging.Logger:
    """A logger under lmcd's (``lmcd.compat.<name>``): its lines look like lmcd's own, ``LMCache INFO: ...``."""
    from lmcd.connector.vllm import setup_logging

    setup_logging()
    return logging.getLogger(f"lmcd.compat.{name}")
