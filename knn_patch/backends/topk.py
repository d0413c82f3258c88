"""`topk` backend: exact kNN attention, each query attends to its k keys of largest score.

Options (`KNNConfig.backend_options`):
- `rest`, what becomes of the softmax mass of the keys a query does not keep: "drop" (the
  default: plain top-k attention) renormalises the kept keys' weights without it, "mean" gives it
  to the mean of their values. See `topk_attention`'s `rest_mean`.
- `samples` (with `rest="mean"`): m uniform samples of those keys per query, which correct the
  mean by an unbiased estimate of what it misses; an int for every layer or a {layer: m} dict
  (layers not named take none). It pays where a layer's attention is flat (SmolLM2's layer 0).
- `seed` (default 0): the samples' generator, as for `tail` (`kernels.sampling.layer_generator`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..config import KNNConfig
from ..kernels.sampling import layer_generator, validate_seed
from ..kernels.topk import topk_attention
from ..registry import check_option_keys, register_backend

DEFAULTS = {"rest": "drop", "samples": 0, "seed": 0}
RESTS = ("drop", "mean")


def layer_samples(options: Mapping[str, Any], layer_idx: int | None) -> int:
    """The `samples` of layer `layer_idx` under these (validated) options: 0 where none are asked for."""
    samples = options.get("samples", DEFAULTS["samples"])
    if isinstance(samples, Mapping):
        return int(samples.get(str(layer_idx), 0)) if layer_idx is not None else 0
    return samples


def kernel_options(
    config: KNNConfig, layer_idx: int | None, device: torch.device, *, training: bool = False
) -> dict[str, Any]:
    """`topk_attention`'s estimator arguments for layer `layer_idx` under `config`: sinks, window, the
    rest's mean and its samples with their generator. The backend and `calibrate` both call it, so
    what is calibrated is what runs."""
    options = {**DEFAULTS, **config.backend_options}
    samples = layer_samples(options, layer_idx)
    generator = layer_generator(options["seed"], layer_idx, device, training=training) if samples else None
    return {
        "sink_tokens": config.sink_tokens,
        "local_window": config.local_window,
        "rest_mean": options["rest"] == "mean",
        "tail_samples": samples,
        "generator": generator,
    }


def validate_options(options: Mapping[str, Any]) -> None:
    """Raise ValueError naming the bad key of `backend_options`."""
    check_option_keys("topk", options, DEFAULTS)
    rest = options.get("rest", DEFAULTS["rest"])
    if rest not in RESTS:
        raise ValueError(
            f"KNNConfig.backend_options['rest']={rest!r} is invalid for 'topk': use one of {RESTS}."
        )
    samples = options.get("samples", DEFAULTS["samples"])
    counts = list(samples.values()) if isinstance(samples, Mapping) else [samples]
    layers_ok = not isinstance(samples, Mapping) or all(str(layer).isdigit() for layer in samples)
    if not layers_ok or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in counts):
        raise ValueError(
            f"KNNConfig.backend_options['samples']={samples!r} is invalid for 'topk': use an int >= 0, "
            "or a dict of layer index -> int >= 0."
        )
    if any(counts) and rest != "mean":
        raise ValueError(
            "KNNConfig.backend_options['samples'] correct the rest's mean: also set "
            "backend_options['rest']='mean'."
        )
    validate_seed(options.get("seed", DEFAULTS["seed"]))


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
    layer_idx = getattr(module, "layer_idx", None)
    out, weights = topk_attention(
        query,
        key,
        value,
        attention_mask,
        k=knn_config.resolve_k(key.shape[2], layer_idx),
        scale=scaling,
        is_causal=kwargs.get("is_causal", getattr(module, "is_causal", True)),
        softcap=kwargs.get("softcap"),
        dropout=dropout,
        chunk_size=knn_config.chunk_size,
        return_weights=bool(kwargs.get("output_attentions", False)),
        **kernel_options(knn_config, layer_idx, query.device, training=module.training),
    )
    return out.transpose(1, 2).contiguous(), weights  # (B, Hq, Lq, D) -> (B, Lq, Hq, D)


register_backend("topk", topk_attention_forward, validate_options=validate_options)
