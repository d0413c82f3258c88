"""`topk` backend: exact kNN attention, each query attends to its k keys of largest score.

Option (`KNNConfig.backend_options`): `rest`, what becomes of the softmax mass of the keys a query
does not keep: "drop" (the default: plain top-k attention) renormalises the kept keys' weights
without it, "mean" gives it to the mean of their values. See `topk_attention`'s `rest_mean`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..config import KNNConfig
from ..kernels.topk import topk_attention
from ..registry import check_option_keys, register_backend

DEFAULTS = {"rest": "drop"}
RESTS = ("drop", "mean")


def validate_options(options: Mapping[str, Any]) -> None:
    """Raise ValueError naming the bad key of `backend_options`."""
    check_option_keys("topk", options, DEFAULTS)
    rest = options.get("rest", DEFAULTS["rest"])
    if rest not in RESTS:
        raise ValueError(
            f"KNNConfig.backend_options['rest']={rest!r} is invalid for 'topk': use one of {RESTS}."
        )


def topk_attention_forward(
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

    `attention_mask` is the boolean mask of `sdpa_mask` (True = keep), already holding padding and
    sliding windows; None means plain causal (aligned to the bottom right). `softcap` (Gemma 2) is
    applied to the scores before selection. Weights are returned (dense, O(Lq * Lk)) only when
    `output_attentions` is requested.
    """
    out, weights = topk_attention(
        query,
        key,
        value,
        attention_mask,
        k=knn_config.resolve_k(key.shape[2], getattr(module, "layer_idx", None)),
        scale=scaling,
        is_causal=kwargs.get("is_causal", getattr(module, "is_causal", True)),
        sink_tokens=knn_config.sink_tokens,
        local_window=knn_config.local_window,
        softcap=kwargs.get("softcap"),
        dropout=dropout,
        chunk_size=knn_config.chunk_size,
        return_weights=bool(kwargs.get("output_attentions", False)),
        rest_mean={**DEFAULTS, **knn_config.backend_options}["rest"] == "mean",
    )
    return out.transpose(1, 2).contiguous(), weights  # (B, Hq, Lq, D) -> (B, Lq, Hq, D)


register_backend("topk", topk_attention_forward, validate_options=validate_options)
