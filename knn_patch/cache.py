"""`KNNCache`: a transformers KV cache that also keeps a faiss index of its keys, per layer and KV head.

With a model patched with `backend="faiss"`, a decode step (Lq = 1) then searches the index for its
k best keys instead of scoring the whole cache; sinks and the local window are attended exactly.
The index grows lazily: keys are added when an attention call first needs them, so a cache
filled by a dense prefill is indexed at the first kNN step.

    cache = KNNCache()
    model.generate(**inputs, past_key_values=cache)
    cache.index_memory_bytes()

How the attention function finds the index: `KNNLayer.update` returns its key tensor tagged with a
weak reference to the layer, and `indexes_for` accepts the tag only on that very tensor object
(`layer.keys is key`), so sliced, copied or foreign keys never reach a wrong index.

Beam search works: `reorder_cache` permutes the per-row indexes and clones a row kept twice (faiss
indexes cannot be shared, since each copy grows differently). `crop`, `batch_select_indices` and
`batch_repeat_interleave` drop the indexes, which are rebuilt from the cached keys on next use.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .kernels.index import KeyIndexes, require_faiss


class KNNLayer(DynamicLayer):
    """A `DynamicLayer` plus its `KeyIndexes`. Keys/values (B, Hkv, L, D) are length-L views of
    buffers that grow geometrically: appending a token copies only the token, where the dense
    cache's concatenation copies the whole cache every step."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.indexes: KeyIndexes | None = None
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, add = self.get_seq_length(), key_states.shape[-2]
        buffers = self._buffers
        # a buffer is reused only while self.keys is still its view (crop, reorder... replace it)
        fresh = (
            buffers is None
            or self.keys.data_ptr() != buffers[0].data_ptr()
            or self.keys.shape[:2] != key_states.shape[:2]
        )
        if fresh or buffers[0].shape[-2] < n + add:
            cap = max(256, 2 * (n + add))
            grown = []
            for old, new in ((self.keys, key_states), (self.values, value_states)):
                buf = new.new_empty(*new.shape[:2], cap, new.shape[-1])  # (B, Hkv, capacity, D)
                if n:
                    buf[:, :, :n] = old
                grown.append(buf)
            buffers = self._buffers = (grown[0], grown[1])
        buffers[0][:, :, n : n + add] = key_states
        buffers[1][:, :, n : n + add] = value_states
        self.keys, self.values = buffers[0][:, :, : n + add], buffers[1][:, :, : n + add]
        self.keys._knn_layer = weakref.ref(self)  # read by `indexes_for`; a weak reference makes no cycle
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self.indexes = None

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.indexes = None  # faiss cannot delete: rebuilt from the kept keys on next use

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.indexes is not None:
            self.indexes.reorder(beam_idx.cpu())

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.indexes = None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.indexes = None

    def index_memory_bytes(self) -> int:
        return 0 if self.indexes is None else self.indexes.memory_bytes()


class KNNCache(Cache):
    """A dynamic KV cache whose layers keep faiss key indexes for the `faiss` backend.

    The index settings (type, nlist, nprobe, ...) and k, sinks and window come from the patched
    model's `KNNConfig`; the cache holds only state. Layers a model leaves dense simply never
    build an index. Needs faiss (`pip install faiss-cpu`).
    """

    def __init__(self) -> None:
        require_faiss()  # fail early, naming the fix; faiss itself loads with the first index
        super().__init__(layer_class_to_replicate=KNNLayer)

    def index_memory_bytes(self) -> int:
        """Bytes held by the faiss indexes of all layers (on top of the cached keys and values)."""
        return sum(layer.index_memory_bytes() for layer in self.layers if isinstance(layer, KNNLayer))


def indexes_for(key: torch.Tensor, query_length: int, options: Mapping[str, Any]) -> KeyIndexes | None:
    """The index of the `KNNLayer` that returned `key` (B, Hkv, L, D), created on first use; None for
    keys that did not come straight from a KNNCache (the backend then builds one for the call)."""
    ref = getattr(key, "_knn_layer", None)
    layer = ref() if ref is not None else None
    if layer is None or layer.keys is not key:
        return None
    if layer.indexes is not None and layer.indexes.seen > key.shape[2] - query_length:
        layer.indexes = None  # holds keys of positions now queried again: rebuild
    if layer.indexes is None:
        layer.indexes = KeyIndexes(key, options=options)
    return layer.indexes
