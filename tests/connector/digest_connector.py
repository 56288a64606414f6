"""A test-only vLLM connector: ``LMCacheMPConnector`` that logs a digest of every chunk it stores
and loads, so a test can check byte by byte that vLLM's blocks hold, after a load, what they
held when the chunk was stored (``tests.vllm_support.check_loaded_kv``).

Load it with ``"kv_connector": "DigestConnector", "kv_connector_module_path":
"tests.connector.digest_connector"``. In the worker role, after every store (``wait_for_save``)
and after every load (``start_load_kv``, before the forward that would overwrite a recomputed
token) it logs one line per chunk::

    LMCD_KV_DIGEST stored|loaded <chunk key hex> skip=<s> blocks=<b_s>,...,<b_{n-1}> <d_s>,...,<d_{n-1}>

where n is blocks per chunk, ``b_i`` the vLLM block id of the chunk's i-th block and ``d_i`` a
BLAKE2b digest of that block: the page of every plane of every layer, in the registered KV
tensors' order. A load leaves out the ``skip_blocks`` leading blocks of its first chunk (vLLM
had them); a store logs every block (skip=0). Before a load, the blocks it must fill are set to
NaN, so a load that copies nothing shows; loaded chunks whose blocks vLLM reports as failed (and
recomputes) are not logged.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch

from lmcd.connector.vllm import LMCacheMPConnector, LmcdConnectorMetadata
from tests.vllm_support import DIGEST_PREFIX

log = logging.getLogger("lmcd.connector.digest")


class DigestConnector(LMCacheMPConnector):
    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        loads = [(key, skip, blocks[skip:]) for key, skip, blocks in self._loads()]
        for _, _, blocks in loads:  # blocks a load must fill: NaN until it does
            self._poison(blocks)
        super().start_load_kv(forward_context, **kwargs)
        for key, skip, blocks in loads:
            if not self._load_errors.intersection(blocks):  # else vLLM recomputes them
                self._log("loaded", key, skip, blocks)

    def _loads(self) -> list[tuple[bytes, int, list[int]]]:
        """(chunk key, skip blocks, the chunk's block ids) of every chunk this step loads."""
        out = []
        for plan in self._plans():
            spec = plan.load
            if spec is not None:
                bpc = spec.blocks_per_chunk
                out += [(key, spec.skip_blocks if i == 0 else 0, spec.block_ids[i * bpc : (i + 1) * bpc])
                        for i, key in enumerate(spec.chunk_keys)]
        return out

    def wait_for_save(self) -> None:
        super().wait_for_save()
        for plan in self._plans():
            spec = plan.store
            if spec is None:
                continue
            bpc = spec.blocks_per_chunk
            for i, key in enumerate(spec.chunk_keys):
                self._log("stored", key, 0, spec.block_ids[i * bpc : (i + 1) * bpc])

    def _plans(self) -> list[Any]:
        if self._worker is None or not self.has_connector_metadata():
            return []
        meta = self._get_connector_metadata()
        assert isinstance(meta, LmcdConnectorMetadata)
        return meta.plans

    def _log(self, what: str, key: bytes, skip: int, block_ids: list[int]) -> None:
        digests = ",".join(self._block_digests(block_ids))
        log.info("%s %s %s skip=%d blocks=%s %s", DIGEST_PREFIX, what, key.hex(), skip,
                 ",".join(map(str, block_ids)), digests)

    def _layers(self) -> list[tuple[torch.Tensor, int]]:
        """Each registered layer tensor with its block dimension (as lmcd.connector.layout finds it)."""
        assert self._worker is not None
        num_blocks = self._worker.num_blocks
        return [(t, list(t.shape).index(num_blocks)) for t in self._worker.kv_caches.values()]

    def _poison(self, block_ids: list[int]) -> None:
        if not block_ids:
            return
        with torch.inference_mode():  # vLLM may have made the KV tensors inside inference mode
            layers = self._layers()
            ids = torch.tensor(block_ids, device=layers[0][0].device)
            for tensor, dim in layers:
                tensor.index_fill_(dim, ids, float("nan"))

    def _block_digests(self, block_ids: list[int]) -> list[str]:
        """One BLAKE2b digest per block: its page in every layer, in the registered order. The pages are
        read on the current stream (on a GPU, after the copies it waits for) with one copy per layer."""
        if not block_ids:
            return []
        hashes = [hashlib.blake2b(digest_size=16) for _ in block_ids]
        with torch.inference_mode():
            layers = self._layers()
            ids = torch.tensor(block_ids, device=layers[0][0].device)
            for tensor, dim in layers:
                pages = tensor.index_select(dim, ids).movedim(dim, 0).contiguous().cpu()
                for h, page in zip(hashes, pages, strict=True):
                    h.update(page.view(torch.uint8).numpy().tobytes())
        return [h.hexdigest() for h in hashes]
