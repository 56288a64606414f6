"""lmcd's compatibility layer for LMCache users (distribution `lmcd-lmcache-compat`): the `lmcache`
import names that vLLM's built-in LMCache connectors and LMCache's documented scripts use, each a
thin alias onto lmcd. Nothing else of LMCache's API is imitated."""

from lmcache._lmcd_compat import check_no_lmcache_distribution, version

check_no_lmcache_distribution()

__lmcd_compat__ = True  # read by lmcd's connector, which says once in its log that this layer is in use
__version__ = version()
