"""Scheduler-side planning: what vLLM may load, and which chunks each step loads and stores."""

import logging

import pytest

from lmcd.connector.client import LookupResult
from lmcd.connector.keys import chunk_keys
from lmcd.connector.scheduler import MISS, SchedulerState
from lmcd.connector.settings import ConnectorSettings, EmbeddedSettings, SettingsError

C, B = 256, 128  # chunk size, vLLM block size: 2 blocks per chunk


class FakeServer:
    """The lookup/release pair a SchedulerState calls, over a set of cached chunk keys."""

    def __init__(self, cached: set[bytes]):
        self.cached = cached
        self.leases: dict[int, int] = {}
        self.next_lease = 1

    def lookup(self, keys):
        n = 0
        while n < len(keys) and keys[n] in self.cached:
            n += 1
        if not n:
            return MISS
        self.leases[self.next_lease] = n
        self.next_lease += 1
        slots = [[1000 * rank + i for i in range(n)] for rank in range(2)]  # two ranks' slots
        return LookupResult(n, self.next_lease - 1, slots, 123.0)

    def release(self, lease_id):
        del self.leases[lease_id]


def state_for(prompt, cached_chunks):
    server = FakeServer(set(chunk_keys(prompt, C)[:cached_chunks]))
    return SchedulerState(C, B, server.lookup, server.release), server


def test_miss_stores_every_full_prompt_chunk_once():
    prompt = list(range(1000))  # 3 full chunks + 232 tokens
    state, server = state_for(prompt, 0)
    assert state.num_new_matched_tokens("r", prompt, 0) == 0
    state.after_alloc("r", 0)
    blocks = list(range(10, 18))
    plan = state.plan_step("r", prompt, blocks, True, 0, 1000)
    assert plan is not None and plan.load is None
    assert plan.store.chunk_keys == chunk_keys(prompt, C)
    assert plan.store.block_ids == blocks[:6]
    assert plan.store.blocks_per_chunk == 2  # travels in the plan: workers never derive it from list lengths
    assert state.plan_step("r", None, [18], False, 1000, 1) is None  # decode: nothing new to store
    assert state.finished("r") is True  # a store was planned: GPU workers delay the block frees
    assert len(state) == 0 and not server.leases


def test_finished_says_whether_a_store_was_planned():
    short = list(range(100))  # no full chunk: nothing to store
    state, _ = state_for(short, 0)
    state.num_new_matched_tokens("s", short, 0)
    state.after_alloc("s", 0)
    assert state.plan_step("s", short, [1], True, 0, 100) is None
    assert state.finished("s") is False
    assert state.finished("never-seen") is False


def test_chunked_prefill_stores_chunks_as_they_fill():
    prompt = list(range(600))
    state, _ = state_for(prompt, 0)
    state.num_new_matched_tokens("r", prompt, 0)
    state.after_alloc("r", 0)
    first = state.plan_step("r", prompt, [0, 1], True, 0, 300)
    assert len(first.store.chunk_keys) == 1 and first.store.block_ids == [0, 1]
    second = state.plan_step("r", None, [2, 3, 4], False, 300, 300)
    assert len(second.store.chunk_keys) == 1 and second.store.block_ids == [2, 3]


def test_hit_loads_and_does_not_store_again():
    prompt = list(range(1000))
    state, server = state_for(prompt, 3)
    assert state.num_new_matched_tokens("r", prompt, 0) == 768
    assert len(server.leases) == 1
    state.after_alloc("r", 768)
    plan = state.plan_step("r", prompt, list(range(8)), True, 0, 1000 - 768)
    assert plan.load.chunk_keys == chunk_keys(prompt, C)
    assert plan.load.block_ids == list(range(6)) and plan.load.skip_blocks == 0
    assert plan.load.blocks_per_chunk == 2
    assert plan.load.lease_id is not None
    assert plan.store is None  # the cached chunks are not stored again
    state.finished("r")
    assert len(server.leases) == 1  # the workers consume the lease, not the scheduler


def test_whole_prompt_hit_leaves_one_token_to_compute():
    prompt = list(range(512))
    state, _ = state_for(prompt, 2)
    assert state.num_new_matched_tokens("r", prompt, 0) == 511
    state.after_alloc("r", 511)
    plan = state.plan_step("r", prompt, [4, 5, 6, 7], True, 0, 1)
    assert plan.load.block_ids == [4, 5, 6, 7]  # the whole last chunk: its last token is recomputed


def test_local_prefix_cache_is_not_reloaded():
    prompt = list(range(1000))
    state, _ = state_for(prompt, 3)
    assert state.num_new_matched_tokens("r", prompt, 384) == 768 - 384
    state.after_alloc("r", 384)
    plan = state.plan_step("r", prompt, list(range(8)), True, 384, 1000 - 768)
    # chunk 1 is half local (block 2 of it is vLLM's); only block 3 and chunk 2 are written
    assert plan.load.chunk_keys == chunk_keys(prompt, C)[1:3]
    assert plan.load.block_ids == [2, 3, 4, 5] and plan.load.skip_blocks == 1
    # the workers get every rank's slots of exactly the loaded chunks (1 and 2), and the deadline
    assert plan.load.slots == [[1, 2], [1001, 1002]] and plan.load.slots_valid_until == 123.0


def test_asking_again_releases_the_previous_lease():
    prompt = list(range(600))
    state, server = state_for(prompt, 2)
    state.num_new_matched_tokens("r", prompt, 0)
    state.num_new_matched_tokens("r", prompt, 0)
    assert len(server.leases) == 1
    state.after_alloc("r", 0)  # vLLM decided not to load
    assert not server.leases


class CountingServer(FakeServer):
    def __init__(self, cached: set[bytes]):
        super().__init__(cached)
        self.lookups = 0

    def lookup(self, keys):
        self.lookups += 1
        return super().lookup(keys)


def test_a_consumer_loads_but_never_stores_and_a_producer_stores_but_never_looks_up():
    prompt = list(range(1000))
    server = CountingServer(set(chunk_keys(prompt, C)[:1]))
    consumer = SchedulerState(C, B, server.lookup, server.release, loads=True, stores=False)
    assert consumer.num_new_matched_tokens("r", prompt, 0) == 256
    consumer.after_alloc("r", 256)
    plan = consumer.plan_step("r", prompt, list(range(8)), True, 0, 1000 - 256)
    assert plan is not None and plan.load is not None and plan.store is None  # chunks 1, 2 not stored
    assert consumer.finished("r") is False
    producer = SchedulerState(C, B, server.lookup, server.release, loads=False, stores=True)
    lookups = server.lookups
    assert producer.num_new_matched_tokens("p", prompt, 0) == 0 and server.lookups == lookups
    producer.after_alloc("p", 0)
    plan = producer.plan_step("p", prompt, list(range(8)), True, 0, 1000)
    assert plan is not None and plan.load is None and len(plan.store.chunk_keys) == 3  # chunk 0 too: not looked up


def test_a_request_can_skip_its_load_or_its_store():
    prompt = list(range(1000))
    server = CountingServer(set(chunk_keys(prompt, C)[:2]))
    state = SchedulerState(C, B, server.lookup, server.release)
    assert state.num_new_matched_tokens("a", prompt, 0, skip_load=True) == 0 and server.lookups == 0
    state.after_alloc("a", 0)
    assert len(state.plan_step("a", prompt, list(range(8)), True, 0, 1000).store.chunk_keys) == 3
    assert state.num_new_matched_tokens("b", prompt, 0, skip_save=True) == 512 and server.lookups == 1
    state.after_alloc("b", 512)
    plan = state.plan_step("b", prompt, list(range(8)), True, 0, 1000 - 512)
    assert plan.load is not None and plan.store is None
    assert not server.leases or len(server.leases) == 1  # b's lease went to its load


def test_block_size_must_divide_chunk_size():
    with pytest.raises(ValueError, match="--chunk-size"):
        SchedulerState(256, 96, lambda keys: MISS, lambda lease: None)


def test_settings_from_extra_config():
    s = ConnectorSettings.from_extra_config(
        {"lmcache.mp.host": "tcp://localhost", "lmcache.mp.port": 6555, "lmcache.mp.mp_transfer_mode": "engine_driven"},
        environ={})
    assert s.url == "tcp://localhost:6555" and s.transfer_mode == "engine_driven"
    assert ConnectorSettings.from_extra_config({"lmcache.mp.host": "10.0.0.1"}, environ={}).url == "tcp://10.0.0.1:5555"
    assert ConnectorSettings.from_extra_config({}, environ={"LMCD_AUTH_TOKEN": "t"}).auth_token == "t"
    for bad in ({"lmcache.mp.mp_transfer_mode": "fast"}, {"lmcache.mp.prot": 1}, {"lmcache.mp.port": "x"}):
        with pytest.raises(SettingsError):
            ConnectorSettings.from_extra_config(bad, environ={})


def test_embedded_settings_env_and_yaml(tmp_path):
    assert EmbeddedSettings.from_env({}).max_local_cpu_size_gb == 5.0
    cfg = tmp_path / "lmcache.yaml"
    cfg.write_text("chunk_size: 128\nlocal_cpu: true\nmax_local_cpu_size: 2\n")
    e = EmbeddedSettings.from_env({"LMCACHE_CONFIG_FILE": str(cfg), "LMCACHE_MAX_LOCAL_CPU_SIZE": "3"})
    assert (e.chunk_size, e.max_local_cpu_size_gb, e.local_cpu) == (128, 3.0, True)  # env over file
    assert not EmbeddedSettings.from_env({"LMCACHE_LOCAL_CPU": "False"}).local_cpu


def test_embedded_settings_refuse_cacheblend(tmp_path):
    """Blending asked for in vLLM's environment or its LMCACHE_CONFIG_FILE stops vLLM with one message."""
    for value in ("1", "True"):
        with pytest.raises(SettingsError, match=rf"^CacheBlend \(LMCACHE_ENABLE_BLENDING={value}\) is not available "
                           r"in lmcd yet: unset LMCACHE_ENABLE_BLENDING to serve without blending$"):
            EmbeddedSettings.from_env({"LMCACHE_ENABLE_BLENDING": value})
    cfg = tmp_path / "lmcache.yaml"
    cfg.write_text("chunk_size: 256\nenable_blending: true\nblend_special_str: \" # # \"\n")
    with pytest.raises(SettingsError) as info:
        EmbeddedSettings.from_env({"LMCACHE_CONFIG_FILE": str(cfg)})
    assert str(info.value) == (f"CacheBlend (enable_blending: True in LMCACHE_CONFIG_FILE={cfg}) is not available in "
                               f"lmcd yet: remove enable_blending from LMCACHE_CONFIG_FILE={cfg} to serve without "
                               "blending")


def test_embedded_settings_warn_once_on_cacheblend_tuning_keys(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("lmcd"), "propagate", True)  # the vLLM connector's logging may be set up
    caplog.set_level(logging.DEBUG)
    cfg = tmp_path / "lmcache.yaml"
    cfg.write_text("enable_blending: false\nblend_check_layers: 1\nmax_local_cpu_size: 2\n")
    e = EmbeddedSettings.from_env({"LMCACHE_CONFIG_FILE": str(cfg), "LMCACHE_BLEND_RECOMPUTE_RATIOS": "0.15"})
    assert e.max_local_cpu_size_gb == 2.0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "CacheBlend is not available in lmcd yet, so its settings are ignored: LMCACHE_BLEND_RECOMPUTE_RATIOS, "
        f"blend_check_layers in LMCACHE_CONFIG_FILE={cfg}"]
