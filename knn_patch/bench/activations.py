"""Real attention inputs: the q, k, v each attention layer sees on a dense forward pass.

The approximation report, the faiss recall benchmark and its test measure estimators and indexes
on these rather than only on random tensors.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..patcher import patched
from ..registry import registered_backend


def capture_activations(
    model: torch.nn.Module, input_ids: torch.Tensor, layers: Iterable[int] | None = None
) -> dict[int, dict[str, Any]]:
    """layer index -> {"q", "k", "v"}, fp32 copies (B, H, L, D; after RoPE, before the GQA repeat),
    "scale", the layer's score scaling, and "softcap" (None unless the model caps its scores), for
    `layers` (all by default). Recorded layers attend densely (SDPA), so every layer sees the dense
    model's activations. Pass a base model (`model.model`) to skip the LM head and, when `layers`
    are given, the decoder layers after the last of them."""
    captured: dict[int, dict[str, Any]] = {}

    def capture(
        module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, knn_config, **kwargs
    ):
        captured[module.layer_idx] = {
            name: t.detach().to(torch.float32, copy=True)
            for name, t in (("q", query), ("k", key), ("v", value))
        }
        captured[module.layer_idx]["scale"] = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
        captured[module.layer_idx]["softcap"] = kwargs.get("softcap")
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )

    layers = None if layers is None else list(layers)
    # layers after the last recorded one cannot change it: a base model stops there (restored after)
    stack = getattr(model, "layers", None)
    cut = layers is not None and isinstance(stack, torch.nn.ModuleList)
    if cut:
        model.layers = stack[: max(layers) + 1]
    try:
        # registered for this call only: a global entry would keep `captured` alive after it
        with (
            torch.no_grad(),
            registered_backend(f"capture_{uuid.uuid4().hex[:8]}", capture) as backend,
            patched(model, backend=backend.name, layers=layers),
        ):
            model(input_ids=input_ids)
    finally:
        if cut:
            model.layers = stack
    return captured
