"""The backend registry: a backend name maps to one attention function with the HF signature.

Registering a backend with transformers registers both its attention function and its mask
function (`sdpa_mask`, boolean, True = keep) under the name `knn_<backend>`. Without the mask
function transformers builds no mask for an unknown name and padding is silently ignored.

Each backend function is called as
`fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, knn_config, **kwargs)`
only for calls it can serve; the dispatcher here sends every other call (layers left dense,
float or flex masks, attention sinks, position biases) to the layer's previous implementation.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import logging

logger = logging.get_logger("knn_patch")

AttentionFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]

# Modules that define a backend; imported on first use so importing knn_patch stays light.
_BUILTIN = {
    "topk": "knn_patch.backends.topk",
    "tail": "knn_patch.backends.tail",
    "gumbel": "knn_patch.backends.gumbel",
    "faiss": "knn_patch.backends.faiss",
}


@dataclass(frozen=True)
class Backend:
    name: str
    forward: AttentionFn
    validate_options: Callable[[Mapping[str, Any]], None] | None = None
    sinks_and_window: bool = True

    @property
    def attn_implementation(self) -> str:
        """The name transformers knows it by (no "/", "flash", "sdpa" or "flex": those have special paths)."""
        return f"knn_{self.name}"


_BACKENDS: dict[str, Backend] = {}


def register_backend(
    name: str,
    forward: AttentionFn,
    *,
    validate_options: Callable[[Mapping[str, Any]], None] | None = None,
    sinks_and_window: bool = True,
) -> Backend:
    """Add a backend by name. `validate_options(options)` raises ValueError for bad `backend_options`;
    `sinks_and_window=False` makes a config with `sink_tokens` or `local_window` an error."""
    if not name.isidentifier() or any(bad in name for bad in ("flash", "sdpa", "flex")):
        raise ValueError(f"Backend name {name!r} must be an identifier without 'flash', 'sdpa' or 'flex'.")
    backend = Backend(name, forward, validate_options, sinks_and_window)
    _BACKENDS[name] = backend
    return backend


def unregister_backend(name: str) -> None:
    """Remove a backend added with `register_backend`, from knn_patch and from transformers'
    interfaces, so that nothing keeps its function (or what the function holds) alive. A model still
    patched with it cannot run afterwards: unpatch it first. Built-in backends stay."""
    if name in _BUILTIN:
        raise ValueError(f"Backend {name!r} is built in and cannot be unregistered.")
    backend = _BACKENDS.pop(name, None)
    if backend is None:
        raise ValueError(f"No backend {name!r} is registered; registered: {available_backends()}.")
    # transformers has `register` but no way to remove a global entry: its global mappings are plain
    # class-level dicts, one per interface.
    for interface in (AttentionInterface, AttentionMaskInterface):
        interface._global_mapping.pop(backend.attn_implementation, None)


@contextlib.contextmanager
def registered_backend(
    name: str,
    forward: AttentionFn,
    *,
    validate_options: Callable[[Mapping[str, Any]], None] | None = None,
    sinks_and_window: bool = True,
) -> Iterator[Backend]:
    """`register_backend` for the `with` block only: unregistered on exit, even on error. The name
    must be free, so that leaving the block cannot remove someone else's backend."""
    if name in _BACKENDS or name in _BUILTIN:
        raise ValueError(f"Backend {name!r} is already registered; pick another name.")
    backend = register_backend(
        name, forward, validate_options=validate_options, sinks_and_window=sinks_and_window
    )
    try:
        yield backend
    finally:
        unregister_backend(name)


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])  # the module registers itself
    if name not in _BACKENDS:
        raise ValueError(
            f"KNNConfig.backend={name!r} is unknown; available backends: {available_backends()}."
        )
    return _BACKENDS[name]


def available_backends() -> list[str]:
    return sorted(set(_BACKENDS) | set(_BUILTIN))


def check_option_keys(backend: str, options: Mapping[str, Any], allowed: Mapping[str, Any]) -> None:
    """Raise ValueError naming the keys of `backend_options` that `backend` does not take."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"KNNConfig.backend_options: unknown keys {unknown} for {backend!r}; allowed {sorted(allowed)}."
        )


def validate_backend(name: str, options: Mapping[str, Any], *, sinks_or_window: bool = False) -> None:
    """Raise ValueError naming the field for an unknown backend, options it rejects, or sinks or a
    local window it does not take."""
    if not isinstance(name, str):
        raise ValueError(
            f"KNNConfig.backend={name!r} is invalid; available backends: {available_backends()}."
        )
    backend = get_backend(name)
    if sinks_or_window and not backend.sinks_and_window:
        raise ValueError(
            f"KNNConfig.backend={name!r} does not take sink_tokens or local_window; "
            "use backend='topk' for those."
        )
    if backend.validate_options is not None:
        backend.validate_options(options)
    elif options:
        raise ValueError(f"KNNConfig.backend_options={dict(options)!r}: backend {name!r} takes no options.")


def install(backend: Backend) -> str:
    """Make `backend` selectable in transformers; returns its `attn_implementation` name."""
    name = backend.attn_implementation
    AttentionInterface.register(name, _dispatcher(backend))
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def _unservable(attention_mask: Any, kwargs: dict[str, Any]) -> str | None:
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype != torch.bool
    ):
        return "a non-boolean attention mask"
    for key in ("s_aux", "sinks", "position_bias"):
        if kwargs.get(key) is not None:
            return f"`{key}`"
    return None


def _dispatcher(backend: Backend) -> AttentionFn:
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        state = getattr(module, "_knn_state", None)
        if state is None:
            raise RuntimeError(
                f"attn_implementation={backend.attn_implementation!r} needs a model patched by knn_patch: "
                "load it with knn_patch.from_pretrained(path) or call knn_patch.patch(model, ...)."
            )
        config, fallback = state
        if config is not None:
            reason = _unservable(attention_mask, kwargs)
            if reason is None:
                return backend.forward(
                    module,
                    query,
                    key,
                    value,
                    attention_mask,
                    scaling=scaling,
                    dropout=dropout,
                    knn_config=config,
                    **kwargs,
                )
            logger.warning_once(
                f"knn_patch: {reason} cannot be served by kNN attention; those calls run dense."
            )
        return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    attention.__name__ = f"{backend.attn_implementation}_attention_forward"
    return attention
