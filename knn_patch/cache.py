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

from .kernels.index import KeyIndexes, faiss_module


class KNNLayer(DynamicLayer):
    """A `DynamicLayer` (keys/values (B, Hkv, L, D), grown by concatenation) plus its `KeyIndexes`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.indexes: KeyIndexes | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        keys._knn_layer = weakref.ref(self)  # read by `indexes_for`; a weak reference makes no cycle
        return keys, values

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
        faiss_module()  # fail early, naming the fix
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
