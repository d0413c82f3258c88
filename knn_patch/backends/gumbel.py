"""`gumbel` backend: attention estimated from exact softmax draws (lazy Gumbel sampling over the
top-k), a median-of-means output and the paper's sampled backward (see `knn_patch.kernels.gumbel`).

Options (`KNNConfig.backend_options`): `samples` (draws per query, default 32), `groups` (median of
means over that many groups, dividing `samples`; default 1, the plain mean), `exact_backward`
(default False: the sampled dQ, dK and dV estimators, which need samples >= 2; True: the exact
gradient of dense attention, for comparison) and `seed` (as in `tail`: default 0, reproducible per
(seed, layer) in eval mode and fresh every call in training; None for fresh draws every call).

Rule for k >= n: with at least as many nearest keys as keys there is no tail to sample, and the call
returns exact attention (the estimator's limit), so k >= n equals dense attention.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers.utils import logging

from ..config import KNNConfig
from ..kernels.gumbel import gumbel_attention
from ..kernels.sampling import layer_generator, validate_seed
from ..registry import check_option_keys, register_backend

logger = logging.get_logger("knn_patch")

DEFAULTS = {"samples": 32, "groups": 1, "exact_backward": False, "seed": 0}


def validate_options(options: Mapping[str, Any]) -> None:
    """Raise ValueError naming the bad key of `backend_options`."""
    check_option_keys("gumbel", options, DEFAULTS)
    opts = {**DEFAULTS, **options}
    for name in ("samples", "groups"):
        v = opts[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(
                f"KNNConfig.backend_options[{name!r}]={v!r} is invalid for 'gumbel': use an int >= 1."
            )
    if opts["samples"] % opts["groups"]:
        raise ValueError(
            f"KNNConfig.backend_options: groups={opts['groups']} must divide samples={opts['samples']} "
            "(median of means over equal groups)."
        )
    if not isinstance(opts["exact_backward"], bool):
        raise ValueError(
            f"KNNConfig.backend_options['exact_backward']={opts['exact_backward']!r}: use True or False."
        )
    if not opts["exact_backward"] and opts["samples"] < 2:
        raise ValueError(
            "KNNConfig.backend_options['samples']=1: the sampled backward needs samples >= 2 "
            "(or set exact_backward=True)."
        )
    validate_seed(opts["seed"])


def gumbel_attention_forward(
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

    The mask is `sdpa_mask`'s boolean (True = keep) or None for plain causal. Softcapped scores and
    attention dropout are not estimated: they raise / are ignored with a warning.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError(
            "backend 'gumbel' does not support softcapped scores (Gemma 2); use 'topk' or 'tail'."
        )
    if dropout > 0:
        logger.warning_once("knn_patch: backend 'gumbel' ignores attention dropout (sampling is its noise).")
    options = {**DEFAULTS, **knn_config.backend_options}
    k = knn_config.resolve_k(key.shape[2], getattr(module, "layer_idx", None))
    if k >= key.shape[2]:
        logger.warning_once("knn_patch: gumbel with k >= n keys returns exact attention (no tail to sample).")
    out = gumbel_attention(
        query,
        key,
        value,
        attention_mask,
        k=k,
        samples=options["samples"],
        groups=options["groups"],
        scale=scaling,
        is_causal=kwargs.get("is_causal", getattr(module, "is_causal", True)),
        exact_backward=options["exact_backward"],
        chunk_size=knn_config.chunk_size,
        generator=layer_generator(
            options["seed"], getattr(module, "layer_idx", None), query.device, training=module.training
        ),
    )
    return out.transpose(1, 2).contiguous(), None  # (B, Hq, Lq, D) -> (B, Lq, Hq, D)


register_backend(
    "gumbel", gumbel_attention_forward, validate_options=validate_options, sinks_and_window=False
)
