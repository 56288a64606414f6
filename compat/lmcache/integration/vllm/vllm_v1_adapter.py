"""`lmcache.integration.vllm.vllm_v1_adapter.LMCacheConnectorV1Impl(vllm_config, role, parent)`:
vLLM's built-in ``LMCacheConnectorV1`` builds this and drives it through the usual connector
methods; here each one goes to lmcd's embedded connector (``lmcd.connector.vllm.LMCacheConnectorV1``,
which starts a local server when none answers)."""

from __future__ import annotations

from typing import Any

from lmcache._lmcd_compat import check_no_lmcache_distribution

check_no_lmcache_distribution()

from lmcd.connector.vllm import LMCacheConnectorV1  # noqa: E402


class LMCacheConnectorV1Impl:
    def __init__(self, vllm_config: Any, role: Any, parent: Any) -> None:
        self._connector = LMCacheConnectorV1(vllm_config, role, parent._kv_cache_config)

    # worker side
    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        self._connector.bind_connector_metadata(connector_metadata)

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self._connector.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self._connector.start_load_kv(forward_context, **kwargs)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._connector.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        self._connector.save_kv_layer(layer_name, kv_layer, attn_metadata, **kwargs)

    def wait_for_save(self) -> None:
        self._connector.wait_for_save()
        self._connector.clear_connector_metadata()  # vLLM's wrapper clears only its own copy

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._connector.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._connector.get_block_ids_with_load_errors()

    def get_kv_events(self) -> list[Any]:
        return []  # lmcd reports no KV cache events to vLLM

    def shutdown(self) -> None:
        self._connector.shutdown()

    # scheduler side
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> int:
        tokens, _ = self._connector.get_num_new_matched_tokens(request, num_computed_tokens)
        return tokens or 0

    def update_state_after_alloc(self, request: Any, num_external_tokens: int) -> None:
        self._connector.update_state_after_alloc(request, None, num_external_tokens)  # type: ignore[arg-type]

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        return self._connector.build_connector_meta(scheduler_output)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._connector.request_finished(request, block_ids)
