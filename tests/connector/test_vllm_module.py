"""The connector module itself: importable with no side effects, both classes exported."""

import subprocess
import sys

import pytest

from tests.vllm_support import vllm_available, vllm_env

CHECK = """
import logging, threading, sys
before_threads = threading.active_count()
import lmcd.connector.vllm as m
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1
assert issubclass(m.LMCacheMPConnector, KVConnectorBase_V1)
assert issubclass(m.LMCacheConnectorV1, m.LMCacheMPConnector)
assert threading.active_count() == before_threads, "import started threads"
assert not logging.getLogger("lmcd").handlers, "import configured logging"
assert "zmq" not in sys.modules or not any(t.name.startswith("lmcd") for t in threading.enumerate())
import inspect
params = list(inspect.signature(m.LMCacheMPConnector.__init__).parameters)
assert params == ["self", "vllm_config", "role", "kv_cache_config"], params
print("OK")
"""


def test_import_has_no_side_effects_and_exports_both_classes():
    reason = vllm_available()
    if reason:
        pytest.skip(reason)
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=180, env=vllm_env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")
