"""The vLLM KV connector: ``LMCacheMPConnector`` (and ``LMCacheConnectorV1`` for embedded use).

Load it with vLLM's ``--kv-transfer-config``::

    {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
     "kv_connector_module_path": "lmcd.connector.vllm",
     "kv_connector_extra_config": {"lmcache.mp.host": "tcp://localhost", "lmcache.mp.port": 5555}}

Scheduler role: looks up the prompt's full chunks (one lease per lookup), tells vLLM how many
tokens it may load, and plans per step which chunks each worker loads (before the forward)
and stores (after it). Worker role (``lmcd.connector.worker``): registers vLLM's KV memory for
server copies or worker copies, decided at registration, and loads and stores the planned chunks.
CPU copies end within the step, so a finished request's blocks can be freed at once; GPU copies
are ordered with the forward on the GPU, so a finished request's blocks are freed once
``get_finished`` reports its stores done. If the server is unreachable, vLLM recomputes
(``kv_load_failure_policy`` recompute) and the connector reconnects when the server returns.

Importing this module has no side effects.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from lmcd import protocol as p
from lmcd.connector.autostart import ensure_local_server
from lmcd.connector.client import LookupResult
from lmcd.connector.scheduler import MISS, RequestPlan, SchedulerState
from lmcd.connector.session import ServerSession
from lmcd.connector.settings import ConnectorSettings, EmbeddedSettings

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

    from lmcd.connector.worker import WorkerState

log = logging.getLogger("lmcd.connector")
LOG_FORMAT = "[%(asctime)s] LMCache %(levelname)s: %(message)s"


@dataclass
class LmcdConnectorMetadata(KVConnectorMetadata):
    plans: list[RequestPlan] = field(default_factory=list)
    fence_stores: bool = False  # requests were preempted: their blocks may be rewritten this step


def setup_logging() -> None:
    """Our INFO lines (the ones LMCache users look for) go to stderr like vLLM's own, at the level
    ``LMCACHE_LOG_LEVEL`` names (INFO by default; DEBUG adds the time of every connector hook)."""
    lmcd_log = logging.getLogger("lmcd")
    if not lmcd_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        lmcd_log.addHandler(handler)
        level = os.environ.get("LMCACHE_LOG_LEVEL", "INFO").upper()
        lmcd_log.setLevel(level if level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") else logging.INFO)
        lmcd_log.propagate = False


_compat_said = False


def _say_compat_once() -> None:
    """One INFO line per process when vLLM reached this connector through lmcd's `lmcache` compatibility layer."""
    global _compat_said
    compat = sys.modules.get("lmcache")
    if not _compat_said and getattr(compat, "__lmcd_compat__", False):
        _compat_said = True
        log.info("LMCache compatibility layer in use (lmcd-lmcache-compat %s): vLLM's LMCache connectors and "
                 "`lmcache` imports run lmcd", getattr(compat, "__version__", "?"))


F = TypeVar("F", bound=Callable[..., Any])


def _timed(hook: F) -> F:
    """At DEBUG, log how long each call of a vLLM hook took (what the connector adds to a step)."""
    name = hook.__name__

    @functools.wraps(hook)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not log.isEnabledFor(logging.DEBUG):
            return hook(*args, **kwargs)
        started = time.perf_counter()
        try:
            return hook(*args, **kwargs)
        finally:
            log.debug("Connector %s took %.3f ms", name, (time.perf_counter() - started) * 1e3)

    return cast(F, wrapper)


def _namespace(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, rank: int | None) -> p.Namespace:
    """Everything that changes a chunk's bytes, identical on the scheduler and on every worker."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(f"this connector supports models with one KV cache group, this one has {len(groups)}")
    spec = groups[0].kv_cache_spec
    layout = kv_cache_config.kv_cache_layout or "default"
    geometry = (f"{type(spec).__name__}.L{len(groups[0].layer_names)}.N{spec.block_size}"
                f".H{getattr(spec, 'num_kv_heads', 0)}.D{getattr(spec, 'head_size', 0)}.P{spec.page_size_bytes}"
                f".{layout}")
    parallel = vllm_config.parallel_config
    world_size = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
    dtype = str(getattr(spec, "dtype", vllm_config.cache_config.cache_dtype)).removeprefix("torch.")
    return p.Namespace(str(vllm_config.model_config.model), f"{dtype}/{vllm_config.cache_config.cache_dtype}",
                       geometry, world_size, rank)


def _global_rank(vllm_config: VllmConfig) -> int:
    from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

    tp = vllm_config.parallel_config.tensor_parallel_size
    return get_tensor_model_parallel_rank() + tp * get_pp_group().rank_in_group


SKIP_LOAD, SKIP_SAVE = "lmcache.skip_load", "lmcache.skip_save"  # per request, in kv_transfer_params


def _request_flag(req_id: str, params: dict[str, Any], key: str) -> bool:
    """A boolean of a request's ``kv_transfer_params``; anything else is ignored with a warning (a
    request must not stop the engine)."""
    value = params.get(key, False)
    if isinstance(value, bool):
        return value
    log.warning("Request %s: kv_transfer_params %s=%r is not a boolean (true or false): ignored", req_id, key,
                value)
    return False


class LMCacheMPConnector(KVConnectorBase_V1):
    """kv_role ``kv_both`` loads and stores, ``kv_producer`` only stores, ``kv_consumer`` only loads
    (a consumer never writes: a warmed cache can be served read-only); one request can skip either
    with ``kv_transfer_params`` ``{"lmcache.skip_load": true}`` / ``{"lmcache.skip_save": true}``."""

    autostart_default = False

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        setup_logging()
        _say_compat_once()
        transfer = self._kv_transfer_config
        self.settings = ConnectorSettings.from_extra_config(transfer.kv_connector_extra_config,
                                                            autostart_default=self.autostart_default)
        # the scheduler and every worker of this engine share its engine id (a uuid vLLM makes once, with
        # "_dp<rank>" appended per data-parallel engine): they share the leases the scheduler takes
        self.settings = dataclasses.replace(self.settings, instance_id=str(transfer.engine_id or ""))
        self.block_size = vllm_config.cache_config.block_size
        if self.settings.autostart:
            self.settings = ensure_local_server(self.settings, EmbeddedSettings.from_env())
        log.info("lmcache.mp.mp_transfer_mode = %s; server %s", self.settings.transfer_mode, self.settings.url)
        self._scheduler: SchedulerState | None = None
        self._session: ServerSession | None = None
        self._worker: WorkerState | None = None
        self._kv_caches: dict[str, torch.Tensor] | None = None  # worker: what vLLM registered
        self._load_errors: set[int] = set()
        # GPU stores finish after their step (the server copies asynchronously): vLLM must keep a
        # finished request's blocks until the workers report the store done (get_finished).
        self._delay_frees = str(getattr(vllm_config.device_config, "device_type", "")) == "cuda"
        self._storing: set[str] = set()  # worker: requests with stores sent
        self._finishing: set[str] = set()  # worker: finished requests waiting for their stores
        if role == KVConnectorRole.SCHEDULER:
            if self.settings.load_failure_policy == "recompute":
                transfer.kv_load_failure_policy = "recompute"  # read by vLLM's scheduler after this
            self._session = ServerSession(self.settings, _namespace(vllm_config, kv_cache_config, None),
                                          p.Role.SCHEDULER, "the vLLM scheduler")
        else:
            self._worker = self._new_worker()

    def _new_worker(self) -> WorkerState:
        from lmcd.connector.worker import WorkerState

        rank = _global_rank(self._vllm_config)
        return WorkerState(self.settings, _namespace(self._vllm_config, self._kv_cache_config, rank),
                           f"vLLM worker rank {rank}")

    # ------------------------------------------------------------ scheduler role

    def _state(self) -> SchedulerState | None:
        if self._scheduler is None:
            assert self._session is not None
            chunk_size = self._session.call(lambda client: client.chunk_size, None, "hello")
            if chunk_size is None:
                return None
            transfer = self._kv_transfer_config
            self._scheduler = SchedulerState(chunk_size, self.block_size, self._lookup, self._release,
                                             loads=transfer.is_kv_consumer, stores=transfer.is_kv_producer)
        return self._scheduler

    def _lookup(self, keys: list[bytes]) -> LookupResult:
        assert self._session is not None
        return self._session.call(lambda client: client.lookup_for_load(keys), MISS, "lookup")

    def _release(self, lease_id: int) -> None:
        assert self._session is not None
        self._session.call(lambda client: client.release(lease_id), 0, "release")

    @_timed
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        state = self._state()
        if state is None:
            return 0, False
        prompt = request.prompt_token_ids or []
        params = getattr(request, "kv_transfer_params", None) or {}
        skip_load, skip_save = (_request_flag(request.request_id, params, key) for key in (SKIP_LOAD, SKIP_SAVE))
        return state.num_new_matched_tokens(request.request_id, prompt, num_computed_tokens, skip_load=skip_load,
                                            skip_save=skip_save), False

    @_timed
    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if self._scheduler is not None:
            self._scheduler.after_alloc(request.request_id, num_external_tokens)

    @_timed
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = LmcdConnectorMetadata()
        state = self._scheduler
        if state is None:
            return meta
        counts = scheduler_output.num_scheduled_tokens
        meta.fence_stores = bool(getattr(scheduler_output, "preempted_req_ids", None))
        for new in scheduler_output.scheduled_new_reqs:
            plan = state.plan_step(new.req_id, new.prompt_token_ids, new.block_ids[0], True,
                                   new.num_computed_tokens, counts.get(new.req_id, 0))
            if plan is not None:
                meta.plans.append(plan)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_blocks = cached.new_block_ids[i]
            plan = state.plan_step(req_id, None, new_blocks[0] if new_blocks is not None else None,
                                   req_id in cached.resumed_req_ids, cached.num_computed_tokens[i],
                                   counts.get(req_id, 0))
            if plan is not None:
                meta.plans.append(plan)
        return meta

    @_timed
    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self._scheduler is None:
            return False, None
        stored = self._scheduler.finished(request.request_id)
        # CPU: stores finish within their step, the blocks can go now; GPU: after get_finished says so
        return self._delay_frees and stored, None

    # ------------------------------------------------------------ worker role

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        log.info("Registering kv caches!")
        assert self._worker is not None
        self._kv_caches = kv_caches
        self._worker.register_kv_caches(kv_caches, self._kv_cache_config.num_blocks, self.block_size)

    # vLLM 0.33's sleep mode frees the KV memory and creates it again: this connector answers that it does
    # not support that; if its hooks are called anyway, it drops its registration and every mapping of the
    # KV before the memory goes (unregister_kv_caches) and registers again after (restore_kv_caches).
    @classmethod
    def supports_sleep_mode(cls, *args: Any, **kwargs: Any) -> bool:
        return False

    def unregister_kv_caches(self, *args: Any, **kwargs: Any) -> None:
        if self._worker is not None:
            log.info("Unregistering kv caches (vLLM frees them)")
            self._worker.close()
            self._worker = self._new_worker()

    def restore_kv_caches(self, kv_caches: dict[str, torch.Tensor] | None = None, *args: Any, **kwargs: Any) -> None:
        kv_caches = kv_caches or self._kv_caches
        if self._worker is not None and kv_caches:
            self.register_kv_caches(kv_caches)

    @_timed
    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if self._worker is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, LmcdConnectorMetadata)
        if meta.fence_stores:
            self._worker.fence_stores()
        for plan in meta.plans:
            if plan.load is not None:
                self._load_errors |= self._worker.load(plan.load)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete in start_load_kv, before the forward

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        return  # whole chunks are stored after the forward, in wait_for_save

    @_timed
    def wait_for_save(self) -> None:
        if self._worker is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, LmcdConnectorMetadata)
        for plan in meta.plans:
            if plan.store is not None:
                self._worker.store(plan.store)
                if self._delay_frees:
                    self._storing.add(plan.req_id)

    @_timed
    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Finished requests whose stores are complete: vLLM may free their blocks now (GPU only)."""
        if self._worker is not None:
            self._worker.settle()  # copies this worker made itself: their Commit/Loaded go out
        if self._worker is None or not self._delay_frees:
            return None, None
        ended = finished_req_ids & self._storing
        self._storing -= ended
        self._finishing |= ended
        if not self._finishing or not self._worker.stores_done():
            return None, None
        done, self._finishing = self._finishing, set()
        return done, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
        if self._session is not None:
            self._session.close()


class LMCacheConnectorV1(LMCacheMPConnector):
    """Embedded use, as in LMCache's in-process quick starts: starts a local server if none answers."""

    autostart_default = True
