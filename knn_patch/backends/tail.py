"""`tail` backend: the top-k keys exact plus m uniformly sampled other keys, reweighted by n_rest/m.

Options (`KNNConfig.backend_options`): `m` (sampled keys per query, default 32; 0 gives `topk`
exactly) and `seed` (default 0: in eval mode each call draws from a generator seeded with (seed,
layer), so a run is reproducible and equal inputs give equal outputs; in training mode every call
draws afresh, reproducibly under `torch.manual_seed`; None draws fresh randomness every call).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..config import KNNConfig
from ..kernels.sampling import layer_generator, validate_seed
from ..kernels.tail import tail_attention
from ..registry import check_option_keys, register_backend

DEFAULTS = {"m": 32, "seed": 0}


def validate_options(options: Mapping[str, Any]) -> None:
    """Raise ValueError naming the bad key of `backend_options`."""
    check_option_keys("tail", options, DEFAULTS)
    m = options.get("m", DEFAULTS["m"])
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        raise ValueError(f"KNNConfig.backend_options['m']={m!r} is invalid for 'tail': use an int >= 0.")
    validate_seed(options.get("seed", DEFAULTS["seed"]))


def tail_attention_forward(
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

    The mask is `sdpa_mask`'s boolean (True = keep) or None for plain causal; `softcap` (Gemma 2) is
    applied to the scores. No weights are returned.
    """
    options = {**DEFAULTS, **knn_config.backend_options}
    out = tail_attention(
        query,
        key,
        value,
        attention_mask,
        k=knn_config.resolve_k(key.shape[2], getattr(module, "layer_idx", None)),
        m=options["m"],
        scale=scaling,
        is_causal=kwargs.get("is_causal", getattr(module, "is_causal", True)),
        softcap=kwargs.get("softcap"),
        dropout=dropout,
        chunk_size=knn_config.chunk_size,
        generator=layer_generator(
            options["seed"], getattr(module, "layer_idx", None), query.device, training=module.training
        ),
    )
    return out.transpose(1, 2).contiguous(), None  # (B, Hq, Lq, D) -> (B, Lq, Hq, D)


register_backend("tail", tail_attention_forward, validate_options=validate_options, sinks_and_window=False)
