"""Patch a transformers model's attention into kNN attention, in place, and undo it.

`patch` selects a registered `knn_<backend>` attention implementation through transformers'
`AttentionInterface` (and its mask through `AttentionMaskInterface`), and marks each attention
module with its layer's settings. Layers left out, and calls kNN cannot serve, run the model's
previous implementation. `unpatch` restores that implementation exactly.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from collections.abc import Iterator
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.utils import logging

from .config import DEFAULT_PRESET, KNNConfig
from .loading import load_model
from .registry import get_backend, install

logger = logging.get_logger("knn_patch")

CONFIG_KEY = "knn_attention"

# Families checked in this project's tests; any other family whose attention modules dispatch
# through transformers' AttentionInterface works the same way.
TESTED_FAMILIES = (
    "falcon", "gemma2", "gemma3_text", "gpt2", "gpt_neox", "granite", "llama", "mistral", "mixtral", "olmo2",
    "opt", "phi", "phi3", "qwen2", "qwen3", "qwen3_moe", "smollm3", "starcoder2",
)  # fmt: skip


class UnsupportedModelError(TypeError):
    """The model's attention does not dispatch through transformers' AttentionInterface."""


_DISPATCHES: dict[type, bool] = {}


def _dispatches_through_interface(cls: type) -> bool:
    """Whether an attention class's forward looks its function up in ALL_ATTENTION_FUNCTIONS."""
    if cls not in _DISPATCHES:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        _DISPATCHES[cls] = "ALL_ATTENTION_FUNCTIONS" in source
    return _DISPATCHES[cls]


def attention_modules(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, module) for every attention module that dispatches through the interface."""
    found = [m for m in model.modules() if _dispatches_through_interface(type(m))]
    return [
        (getattr(m, "layer_idx", None) if getattr(m, "layer_idx", None) is not None else i, m)
        for i, m in enumerate(found)
    ]


def _eager_with_additive_mask(eager, module, query, key, value, attention_mask, **kwargs):
    """Run a modeling file's `eager_attention_forward` on the boolean mask the kNN name builds:
    eager adds its mask to the scores, so it needs the additive float form (None = causal)."""
    lq, lk = query.shape[2], key.shape[2]
    if attention_mask is None:
        attention_mask = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril(lk - lq)[None, None]
    additive = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
    additive = additive.masked_fill(~attention_mask, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, additive, **kwargs)


def _fallback(module: torch.nn.Module, previous: str):
    """The function dense calls run: the model's previous implementation when it reads sdpa-style
    boolean masks (sdpa, or eager with the mask converted), else SDPA."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if previous == "eager" and eager is not None:
        return functools.partial(_eager_with_additive_mask, eager)
    return sdpa_attention_forward


def _base_model(model: Any) -> Any:
    """The transformers model under a peft `PeftModel` (patching acts on it); any other object as is.

    LoRA wraps only projections, so the attention modules the patch marks are the base model's.
    """
    return model.get_base_model() if hasattr(type(model), "get_base_model") else model


def _check_model(model: Any) -> list[tuple[int, torch.nn.Module]]:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"knn_patch expects a transformers PreTrainedModel (e.g. from AutoModelForCausalLM), "
            f"got {type(model).__name__}."
        )
    modules = attention_modules(model)
    if not modules or not model._can_set_attn_implementation():
        family = getattr(model.config, "model_type", type(model).__name__)
        raise UnsupportedModelError(
            f"Model family {family!r} ({type(model).__name__}) does not dispatch its attention through "
            f"transformers' AttentionInterface, so it cannot be patched. Supported: any family that does, "
            f"tested on {', '.join(TESTED_FAMILIES)}."
        )
    return modules


def patch(
    model: PreTrainedModel, config: KNNConfig | str | None = None, /, **overrides: Any
) -> PreTrainedModel:
    """Make `model`'s attention kNN attention, **in place**, and return it.

    `config` decides k, the backend and the layers: a `KNNConfig`, a preset name ("fast",
    "balanced", "accurate"), `KNNConfig(**overrides)`, or `config` with `overrides` applied; with
    neither, the "balanced" preset. `layers="global"` is resolved here from `model.config`, so
    hybrid models keep their sliding-window layers dense. `knn_patch.unpatch` reverses it. Patching a patched
    model replaces its kNN config; `unpatch` still restores the implementation from before the first
    patch. A peft `PeftModel` is accepted: its base model is patched.
    """
    wrapper, model = model, _base_model(model)
    if config is None and not overrides:
        config = DEFAULT_PRESET
    if isinstance(config, str):
        config = KNNConfig.preset(config)
    config = (
        KNNConfig(**overrides) if config is None else config.replace(**overrides) if overrides else config
    )
    if not isinstance(config, KNNConfig):
        raise TypeError(f"config must be a KNNConfig, got {type(config).__name__}.")
    modules = _check_model(model)
    n_layers = max(i for i, _ in modules) + 1
    if isinstance(config.layers, tuple) and max(config.layers) >= n_layers:
        raise ValueError(
            f"KNNConfig.layers={list(config.layers)} is out of range: this model has "
            f"layers 0..{n_layers - 1}."
        )
    if config.layer_k and max(config.layer_k) >= n_layers:
        raise ValueError(
            f"KNNConfig.layer_k names layer {max(config.layer_k)}: this model has layers 0..{n_layers - 1}."
        )
    text_config = model.config.get_text_config(decoder=True)  # multimodal models nest layer_types here
    chosen = {i for i, _ in modules if config.uses_layer(i, text_config)}
    if not chosen:  # patching would silently change nothing
        why = (
            f"every layer has a sliding window ({getattr(text_config, 'sliding_window', None)} tokens)"
            if config.layers == "global"
            else f"its attention layers are {sorted(i for i, _ in modules)}"
        )
        layers = config.layers if isinstance(config.layers, str) else list(config.layers)
        raise ValueError(
            f"KNNConfig.layers={layers!r} selects no attention layer of this {model.config.model_type!r} "
            f"model: {why}. Use layers='all' or a list of attention layer indices."
        )
    previous = getattr(model, "_knn_previous_attn", None) or model.config._attn_implementation or "sdpa"
    if previous.startswith("knn_"):
        # loaded with attn_implementation="knn_<backend>" but never patched: the model's own
        # implementation is unknown, so unpatch restores transformers' default
        previous = "sdpa"
    if previous not in ("sdpa", "eager"):
        logger.warning_once(
            f"knn_patch: while patched, dense layers run SDPA instead of {previous!r}; unpatch restores it."
        )
    name = install(get_backend(config.backend))
    for layer_idx, module in modules:
        module._knn_state = (config if layer_idx in chosen else None, _fallback(module, previous))
    model.set_attn_implementation(name)
    model._knn_previous_attn = previous
    model._knn_config = config
    model.config.knn_attention = config.to_dict()
    return wrapper


def unpatch(model: PreTrainedModel) -> PreTrainedModel:
    """Restore the attention implementation `patch` replaced, in place; drops the saved kNN config."""
    wrapper, model = model, _base_model(model)
    if not is_patched(model):
        raise ValueError("This model is not patched by knn_patch; nothing to unpatch.")
    for _, module in attention_modules(model):
        if hasattr(module, "_knn_state"):
            del module._knn_state
    model.set_attn_implementation(model._knn_previous_attn)
    del model._knn_previous_attn, model._knn_config
    if hasattr(model.config, CONFIG_KEY):
        delattr(model.config, CONFIG_KEY)
    return wrapper


def is_patched(model: torch.nn.Module) -> bool:
    return get_config(model) is not None


def get_config(model: torch.nn.Module) -> KNNConfig | None:
    """The model's active KNNConfig, or None when it is not patched."""
    return getattr(_base_model(model), "_knn_config", None)


@contextlib.contextmanager
def patched(
    model: PreTrainedModel, config: KNNConfig | str | None = None, /, **overrides: Any
) -> Iterator[PreTrainedModel]:
    """Temporarily patch `model`; on exit restore exactly the state before (dense, or its old kNN config)."""
    before = get_config(model)
    patch(model, config, **overrides)
    try:
        yield model
    finally:
        if before is None:
            unpatch(model)
        else:
            patch(model, before)


def from_pretrained(path_or_id: str, config: KNNConfig | None = None, **kwargs: Any) -> PreTrainedModel:
    """Load a causal LM and re-patch it from the `knn_attention` entry of its config.json.

    `config` overrides the saved settings (or patches a model saved without them). kwargs go to
    `knn_patch.load_model` (dtype, device_map, ...). A plain transformers load of the same folder
    gives the dense model: the `knn_attention` entry is kept on its config but does nothing.
    """
    model = load_model(path_or_id, **kwargs)
    saved = getattr(model.config, CONFIG_KEY, None)
    if config is None and saved is not None:
        config = KNNConfig.from_dict(saved)
    if config is not None:
        patch(model, config)
    return model
