"""Names vLLM's ``lmcache_mp_connector`` module imports at import time (see
``lmcache.integration.vllm.vllm_multi_process_adapter``); they refuse if used."""

from lmcache._lmcd_compat import check_no_lmcache_distribution
from lmcache.integration.vllm.vllm_multi_process_adapter import _NotInLmcd

check_no_lmcache_distribution()


class RequestAllocationRecord(_NotInLmcd):
    pass


BlockAllocationRecord = RequestAllocationRecord
