"""`KNNConfig`: the one frozen description of how a model's attention is made kNN attention.

It is validated when built, saved in the model's `config.json` under `knn_attention` (without the
run-time-only fields) and read back by `knn_patch.from_pretrained`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import __version__

_K_RULE = re.compile(r"^n\^(\d*\.?\d+)$")
K_RULES = ("sqrt", "log", "n^<p>")


def _k_error(value: Any) -> ValueError:
    return ValueError(
        f"KNNConfig.k={value!r} is invalid: use an int >= 1, or a rule of the number of keys n: "
        f"{', '.join(repr(r) for r in K_RULES)} (for example 'n^0.125', with 0 < p <= 1)."
    )


def _validate_k(value: Any) -> int | str:
    if isinstance(value, bool):
        raise _k_error(value)
    if isinstance(value, int):
        if value < 1:
            raise _k_error(value)
        return value
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if text.isdigit():
            return _validate_k(int(text))
        if text in ("sqrt", "log"):
            return text
        match = _K_RULE.match(text)
        if match and 0.0 < float(match.group(1)) <= 1.0:
            return text
    raise _k_error(value)


def resolve_k(k: int | str, n: int) -> int:
    """The number of nearest keys per query for a call with `n` keys: an int as is, or a rule of n.

    Rules round up and never go below 1: "sqrt" is ceil(sqrt(n)), "log" is ceil(log2(n)),
    "n^p" is ceil(n ** p).
    """
    if isinstance(k, int):
        return k
    n = max(int(n), 1)
    if k == "sqrt":
        return max(1, math.ceil(math.sqrt(n)))
    if k == "log":
        return max(1, math.ceil(math.log2(n)))
    return max(1, math.ceil(n ** float(k[2:]) - 1e-9))


_LAYERS_FORMS = "'all' (or None), 'global', a list of layer indices or a range"
# Layer types (transformers' `config.layer_types`) that attend to a local span, not to the whole context.
_LOCAL_LAYER_TYPES = ("sliding_attention", "chunked_attention", "window_attention", "hybrid_sliding")


def _validate_layer_k(value: Any) -> dict[int, int | str]:
    if not isinstance(value, Mapping):
        raise ValueError(f"KNNConfig.layer_k={value!r} is invalid: use a dict of layer index -> k.")
    out = {}
    for layer, k in value.items():
        index = int(layer) if isinstance(layer, str) and layer.isdigit() else layer  # JSON keys are strings
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"KNNConfig.layer_k has key {layer!r}: layer indices are ints >= 0.")
        try:
            out[index] = _validate_k(k)
        except ValueError as error:
            raise ValueError(f"KNNConfig.layer_k[{index}]: {error}") from None
    return dict(sorted(out.items()))


def _validate_layers(value: Any) -> tuple[int, ...] | str | None:
    if value is None or (isinstance(value, str) and value.lower() == "all"):
        return None
    if isinstance(value, str) and value.lower() == "global":
        return "global"
    if isinstance(value, (int, str)) or not isinstance(value, Iterable):
        raise ValueError(f"KNNConfig.layers={value!r} is invalid: use {_LAYERS_FORMS}.")
    layers = tuple(value)
    if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
        raise ValueError(
            f"KNNConfig.layers={value!r} is invalid: the indices must be a non-empty list of ints >= 0, "
            "or 'all', or 'global'."
        )
    return tuple(sorted(set(layers)))


def is_global_layer(model_config: Any, layer_idx: int) -> bool:
    """Whether layer `layer_idx` of a model with this transformers config attends to the whole context.

    With `layer_types` (Gemma 2/3, Qwen2, Cohere2, GPT-OSS, ...), a layer is global unless its type is
    a local one (sliding, chunked or windowed attention). Without it (Llama, Mistral, Phi-3, ...), the
    modeling files apply `sliding_window` to every layer whenever it is set, so then no layer is global.
    """
    layer_types = getattr(model_config, "layer_types", None)
    if layer_types is not None:
        return layer_types[layer_idx] not in _LOCAL_LAYER_TYPES
    return getattr(model_config, "sliding_window", None) is None


# Layer 0's attention is the flattest: the presets and the frontier's "+first" methods give it this
# k, and their "+samples" (and the presets) this many samples of its rest to correct the rest's mean.
FIRST_LAYER_K = "n^0.67"
FIRST_LAYER_SAMPLES = 32

# Named trade-offs between keys read and quality (measured in docs/frontier.md). Each keeps 4 sinks
# and a 16-key window, carries the other keys' softmax mass on their values' mean, and gives layer 0
# its own k and samples (above). `patch(model)` with no settings takes "balanced".
_KEPT = {
    "sink_tokens": 4,
    "local_window": 16,
    "layer_k": {0: FIRST_LAYER_K},
    "backend_options": {"rest": "mean", "samples": {0: FIRST_LAYER_SAMPLES}},
}
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"k": 16, **_KEPT},
    "balanced": {"k": "sqrt", **_KEPT},
    "accurate": {"k": "n^0.6", **_KEPT},
}
DEFAULT_PRESET = "balanced"


@dataclass(frozen=True)
class KNNConfig:
    """How to turn dense attention into kNN attention.

    Each selected layer's queries attend to their `k` keys of largest scaled score among the keys
    they may see (causal, padding and sliding-window masks applied first), plus the always-kept
    `sink_tokens` and `local_window` keys. The field defaults are plain top-k attention, which
    every backend supports; `KNNConfig.preset` gives the measured trade-offs (`PRESETS`).
    """

    k: int | str = field(
        default=32,
        metadata={"help": "Keys per query: an int >= 1, or 'sqrt', 'log', 'n^p' of the call's key count n."},
    )
    backend: str = field(
        default="topk",
        metadata={"help": "Registered backend name; see knn_patch.available_backends()."},
    )
    layers: tuple[int, ...] | str | None = field(
        default=None,
        metadata={
            "help": "Layers made kNN; the others stay dense. None or 'all': every layer. A list or range of "
            "indices. 'global': the full-attention layers, read from the model config when patching: "
            "those whose `layer_types` entry is not sliding, chunked or windowed; a config without "
            "`layer_types` has no global layer if it sets `sliding_window` (it applies to every layer) "
            "and is all global otherwise."
        },
    )
    layer_k: Mapping[int, int | str] = field(
        default_factory=dict,
        metadata={
            "help": "Per-layer k, {layer index: k}, overriding `k` in those layers: a layer whose "
            "attention is flat (often the first) needs more keys than the others."
        },
    )
    sink_tokens: int = field(
        default=0,
        metadata={"help": "The first keys of the sequence, always kept on top of the k nearest."},
    )
    local_window: int = field(
        default=0,
        metadata={
            "help": "The keys just before each query (itself included), always kept on top of the k nearest."
        },
    )
    backend_options: Mapping[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Extra settings the backend validates itself (for sampled estimators)."},
    )
    chunk_size: int = field(
        default=512,
        metadata={
            "help": "Queries per kernel chunk; bounds memory. Run-time only, not saved.",
            "runtime": True,
        },
    )

    def __post_init__(self) -> None:
        from .registry import validate_backend  # late: the registry imports this module

        object.__setattr__(self, "k", _validate_k(self.k))
        object.__setattr__(self, "layers", _validate_layers(self.layers))
        object.__setattr__(self, "layer_k", _validate_layer_k(self.layer_k))
        for name in ("sink_tokens", "local_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"KNNConfig.{name}={value!r} is invalid: use an int >= 0.")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"KNNConfig.chunk_size={self.chunk_size!r} is invalid: use an int >= 1.")
        if not isinstance(self.backend_options, Mapping):
            raise ValueError(f"KNNConfig.backend_options={self.backend_options!r} is invalid: use a dict.")
        try:  # kept in its saved (JSON) form, so a saved config loads equal: {0: m} becomes {"0": m}
            object.__setattr__(self, "backend_options", json.loads(json.dumps(dict(self.backend_options))))
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"KNNConfig.backend_options={self.backend_options!r} is invalid: it is saved in config.json, "
                f"so use JSON values (numbers, strings, lists, dicts, None): {error}"
            ) from None
        validate_backend(
            self.backend, self.backend_options, sinks_or_window=bool(self.sink_tokens or self.local_window)
        )

    @classmethod
    def preset(cls, name: str, **changes: Any) -> KNNConfig:
        """A named trade-off of `PRESETS`: "fast", "balanced" (what `patch(model)` takes) or
        "accurate"; `changes` override its fields."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose from {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **changes})

    def resolve_k(self, n: int, layer_idx: int | None = None) -> int:
        """Keys per query for a call with `n` keys in layer `layer_idx` (its `layer_k`, else `k`)."""
        return resolve_k(self.layer_k.get(layer_idx, self.k) if layer_idx is not None else self.k, n)

    def uses_layer(self, layer_idx: int, model_config: Any = None) -> bool:
        """Whether layer `layer_idx` is made kNN; `layers="global"` needs the model's config to tell."""
        if self.layers == "global":
            if model_config is None:
                raise ValueError("KNNConfig.layers='global' is resolved from a model config; pass it.")
            return is_global_layer(model_config, layer_idx)
        return self.layers is None or layer_idx in self.layers

    def replace(self, **changes: Any) -> KNNConfig:
        """A copy with `changes` applied and validated."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The saved form: every field but the run-time ones, plus the knn_patch version."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("runtime"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif f.name == "layer_k":
                value = {str(layer): k for layer, k in value.items()}  # JSON object keys are strings
            out[f.name] = value
        out["knn_patch_version"] = __version__
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KNNConfig:
        """Inverse of `to_dict`. Unknown keys are an error naming them."""
        if not isinstance(data, Mapping):
            raise ValueError(f"A KNNConfig dict is expected, got {type(data).__name__}.")
        data = dict(data)
        data.pop("knn_patch_version", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"Unknown KNNConfig keys {unknown}; allowed keys are {sorted(names)}.")
        return cls(**data)


def keys_read(config: KNNConfig | None, n: int, model_config: Any = None) -> float:
    """Keys a query at position `n` reads: everything it attends to.

    A kNN layer reads its sinks, local window and k nearest (its `layer_k`), plus `tail`'s m
    samples, plus 1 for `topk`'s mean of the rest (one value-sized aggregate) and the samples that
    correct it, never more than it sees. Without `model_config`, one kNN layer's count (k = 32, 4
    sinks and a 64-key window read 100 keys, 1.2% at 8k). With it, the mean over the model's layers,
    where a layer left dense reads all it sees: n, or its sliding window. The share of n is the
    budget settings are compared at.
    """
    if model_config is None:
        return n if config is None else layer_keys_read(config.to_dict(), config.resolve_k(n), n)
    model_config = model_config.get_text_config()
    saved = None if config is None else config.to_dict()
    counts = []
    for layer in range(model_config.num_hidden_layers):
        window = (
            None if is_global_layer(model_config, layer) else getattr(model_config, "sliding_window", None)
        )
        seen = n if window is None else min(n, window)
        if config is None or not config.uses_layer(layer, model_config):
            counts.append(seen)
        else:
            counts.append(layer_keys_read(saved, config.resolve_k(n, layer), seen, layer))
    return sum(counts) / len(counts)


def layer_keys_read(config: Mapping[str, Any], k: int, n: int, layer: int | None = None) -> int:
    """One kNN layer's `keys_read` from a config's saved form, its k resolved, and the n keys it
    sees; `layer` picks per-layer options (`topk`'s `samples`)."""
    from .backends.tail import DEFAULTS as TAIL_DEFAULTS  # late: importing a backend registers it
    from .backends.topk import DEFAULTS as TOPK_DEFAULTS
    from .backends.topk import layer_samples

    options = config.get("backend_options") or {}
    extra = 0
    if config["backend"] == "tail":
        extra = options.get("m", TAIL_DEFAULTS["m"])
    elif config["backend"] == "topk" and options.get("rest", TOPK_DEFAULTS["rest"]) == "mean":
        extra = 1 + layer_samples(options, layer)
    return min(n, config.get("sink_tokens", 0) + config.get("local_window", 0) + k + extra)
