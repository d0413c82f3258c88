"""`faiss` backend: kNN attention whose far keys come from a faiss index (flat, ivf or hnsw).

Sub-quadratic at long n: each query scores its own causal block exactly and searches an index of the
earlier keys for its k best, instead of scoring every key. With a `KNNCache`, decode steps search
the cache's incrementally grown index. See `knn_patch.kernels.retrieval` for the method.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from transformers.utils import logging

from ..cache import indexes_for
from ..config import KNNConfig
from ..kernels.index import require_faiss, validate_index_options
from ..kernels.retrieval import retrieval_attention
from ..registry import register_backend

logger = logging.get_logger("knn_patch")


def faiss_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    knn_config: KNNConfig,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HF attention signature: query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D) -> out (B, Lq, Hq, D).

    `attention_mask` is `sdpa_mask`'s boolean mask (True = keep) or None for plain causal. Keys that
    came from a `KNNCache` are searched in its index; otherwise an index is built for the call.
    Attention weights are never returned (they would be O(Lq * Lk)).
    """
    if not kwargs.get("is_causal", getattr(module, "is_causal", True)):
        raise ValueError("The faiss backend serves causal attention only; use backend='topk' for this model.")
    if kwargs.get("output_attentions"):
        logger.warning_once("knn_patch: the faiss backend returns no attention weights.")
    options = _options(knn_config.backend_options)
    if options["index"] != "flat" and not knn_config.sink_tokens:
        logger.warning_once(
            "knn_patch: faiss ivf/hnsw without sink_tokens can lose far more quality than exact top-k "
            "(the first keys, attention sinks, are often missed): set sink_tokens "
            "(docs/benchmarks.md, faiss backend)."
        )
    out, _ = retrieval_attention(
        query,
        key,
        value,
        attention_mask,
        k=knn_config.resolve_k(key.shape[2], getattr(module, "layer_idx", None)),
        options=options,
        scale=scaling,
        sink_tokens=knn_config.sink_tokens,
        local_window=knn_config.local_window,
        softcap=kwargs.get("softcap"),
        dropout=dropout,
        indexes=indexes_for(key, query.shape[2], options),
    )
    return out.transpose(1, 2).contiguous(), None  # (B, Hq, Lq, D) -> (B, Lq, Hq, D)


@functools.lru_cache(maxsize=64)
def _frozen_options(items: tuple) -> dict[str, Any]:
    return validate_index_options(dict(items))


def _options(options: Mapping[str, Any]) -> dict[str, Any]:
    return _frozen_options(tuple(sorted(options.items())))


def validate_options(options: Mapping[str, Any]) -> None:
    """Raise ValueError for unknown options or bad values, and ImportError naming the fix without faiss."""
    validate_index_options(options)
    require_faiss()


register_backend("faiss", faiss_attention_forward, validate_options=validate_options)
