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


def run_check(script: str) -> None:
    """``script`` in a fresh interpreter with vLLM (skipped where it is missing); it must print OK last."""
    reason = vllm_available()
    if reason:
        pytest.skip(reason)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=vllm_env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")


def test_import_has_no_side_effects_and_exports_both_classes():
    run_check(CHECK)


DELAYED_FREES = """
from lmcd.connector import vllm as m
from lmcd.connector.scheduler import MISS, LoadSpec, RequestPlan, SchedulerState, StoreSpec

class Worker:  # the WorkerState calls the connector makes, recorded (GPU: stores finish later)
    def __init__(self):
        self.stored, self.loaded, self.fenced, self.done, self.settled = [], [], 0, False, 0
    def store(self, spec):
        self.stored.append(spec)
    def load(self, spec):  # the block ids that did not load: here the second chunk's
        self.loaded.append(spec)
        return set(spec.block_ids[spec.blocks_per_chunk:])
    def fence_stores(self):
        self.fenced += 1
    def stores_done(self):
        return self.done
    def settle(self):
        self.settled += 1

c = object.__new__(m.LMCacheMPConnector)
c._connector_metadata = None
c._worker, c._scheduler, c._delay_frees = Worker(), None, True
c._storing, c._finishing, c._load_errors = set(), set(), set()
meta = m.LmcdConnectorMetadata([RequestPlan("a", store=StoreSpec([b"x" * 32], [1, 2], 2)),
                                RequestPlan("b", load=LoadSpec([b"y" * 32, b"z" * 32], [3, 4, 5, 6], 2, 0, None))],
                               fence_stores=True)
c.bind_connector_metadata(meta)
c.start_load_kv(None)
assert c._worker.fenced == 1, "a preemption must make the next step wait for stores in flight"
assert [spec.blocks_per_chunk for spec in c._worker.loaded] == [2], "the plan's LoadSpec goes to the worker as is"
assert c.get_block_ids_with_load_errors() == {5, 6}, "blocks that did not load are vLLM's to recompute"
assert c.get_block_ids_with_load_errors() == set(), "reported once"
c.wait_for_save()
assert c._storing == {"a"} and [spec.blocks_per_chunk for spec in c._worker.stored] == [2]
assert c.get_finished(set()) == (None, None)            # not finished yet
assert c._worker.settled == 1, "every get_finished sends the Commit/Loaded of copies that ended"
assert c.get_finished({"a", "b"}) == (None, None)       # finished, but its store is still running
assert c.get_finished(set()) == (None, None)
c._worker.done = True
assert c.get_finished(set()) == ({"a"}, None)           # reported once, when the store completed
assert c.get_finished(set()) == (None, None)

# scheduler side: a request's blocks are kept (True) only if a store was planned for it, on GPU
c._worker = None
c._scheduler = SchedulerState(256, 16, lambda keys: MISS, lambda lease: None)
class Req:
    def __init__(self, rid):
        self.request_id = rid
prompt = list(range(600))
c._scheduler.num_new_matched_tokens("s", prompt, 0)
c._scheduler.after_alloc("s", 0)
assert c._scheduler.plan_step("s", prompt, list(range(40)), True, 0, 600).store is not None
assert c.request_finished(Req("s"), []) == (True, None)
assert c.request_finished(Req("never"), []) == (False, None)
c._delay_frees = False                                   # CPU: stores finish within their step
c._scheduler.num_new_matched_tokens("t", prompt, 0)
c._scheduler.after_alloc("t", 0)
c._scheduler.plan_step("t", prompt, list(range(40)), True, 0, 600)
assert c.request_finished(Req("t"), []) == (False, None)
print("OK")
"""


def test_gpu_stores_delay_block_frees_until_get_finished_reports_them():
    run_check(DELAYED_FREES)


SLEEP_AND_FLAGS = """
import logging
from lmcd.connector import vllm as m

class Worker:
    def __init__(self):
        self.registered, self.closed = [], False
    def register_kv_caches(self, kv, num_blocks, block_size):
        self.registered.append(kv)
    def close(self):
        self.closed = True

c = object.__new__(m.LMCacheMPConnector)
first = Worker()
c._worker, c._kv_caches, c.block_size = first, None, 16
c._kv_cache_config = type("K", (), {"num_blocks": 8})()
c._new_worker = Worker
assert m.LMCacheMPConnector.supports_sleep_mode() is False
c.register_kv_caches({"layer": "kv"})
c.unregister_kv_caches()
assert first.closed, "sleep: the registration and every mapping of the KV must go before vLLM frees it"
assert c._worker is not first and c._worker.registered == []
c.restore_kv_caches()
assert c._worker.registered == [{"layer": "kv"}], "wake: registered again"
c.restore_kv_caches({"layer": "new"})
assert c._worker.registered[-1] == {"layer": "new"}

seen = []
class H(logging.Handler):
    def emit(self, record):
        seen.append(record.getMessage())
logging.getLogger("lmcd.connector").addHandler(H())
assert m._request_flag("r1", {"lmcache.skip_save": True}, "lmcache.skip_save") is True
assert m._request_flag("r1", {}, "lmcache.skip_save") is False
assert m._request_flag("r2", {"lmcache.skip_load": "yes"}, "lmcache.skip_load") is False
assert seen and "r2" in seen[-1] and "lmcache.skip_load" in seen[-1] and "not a boolean" in seen[-1], seen
print("OK")
"""


def test_sleep_mode_hooks_drop_and_restore_the_registration_and_request_flags_are_booleans():
    run_check(SLEEP_AND_FLAGS)
