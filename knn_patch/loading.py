"""Load models and tokenizers by name, with an embedded default that works without the Hugging Face hub."""

from __future__ import annotations

import functools
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from knn_patch.assets import SMOLLM2_GGUF, cache_dir, wheel_member
from knn_patch.io import atomic_dir

DEFAULT_MODEL = "default"
_DEFAULT_ALIASES = (DEFAULT_MODEL, "smollm2-135m-instruct")
_DEFAULT_FOLDER = "smollm2-135m-instruct"

logger = logging.getLogger("knn_patch")


class HubUnavailableError(OSError):
    """A hub id was requested, the hub cannot be reached, and the id is not in the local cache."""


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _default_dir() -> Path:
    """Safetensors folder of the embedded SmolLM2-135M-Instruct, converted from its GGUF on first use.

    Loading the GGUF takes ~30 s and GGUF-loaded models refuse `save_pretrained`, so the weights are copied
    into a plain model once. The folder is written under a temporary name and renamed into place, so a
    crash never leaves a half-written folder that later loads would trust.
    """
    target = cache_dir() / "models" / _DEFAULT_FOLDER
    if target.is_dir():
        return target
    gguf = wheel_member(*SMOLLM2_GGUF)
    logger.info("Converting the embedded SmolLM2-135M-Instruct GGUF to %s (one time, ~30 s)", target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(config_dict))
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    # replace=False: another process may have finished first
    return atomic_dir(
        target, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)), replace=False
    )


@functools.cache
def _hub_reachable() -> bool:
    """One quick TCP probe per process, so an offline machine fails at once instead of retrying ~50 s."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError:
        return False
    return True


def _resolve(name_or_path: str | os.PathLike) -> tuple[str | Path, bool]:
    """Where to load from (embedded default, local folder or hub id), and whether to stay offline."""
    name = os.fspath(name_or_path)
    if name in _DEFAULT_ALIASES:
        return _default_dir(), False
    path = Path(name).expanduser()
    if path.exists():
        return path, False
    if name.startswith(("./", "../", "/", "~")) or (len(path.parts) > 1 and path.parent.is_dir()):
        raise FileNotFoundError(f"No model folder at {name!r} ({path.resolve()})")
    return name, _offline_env() or not _hub_reachable()


def _from_pretrained(loader: type, name_or_path: str | os.PathLike, **kwargs):
    """Call `loader.from_pretrained`, turning an offline cache miss into a one-line HubUnavailableError."""
    source, offline = _resolve(name_or_path)
    if offline:
        kwargs["local_files_only"] = True
        if loader is AutoModelForCausalLM:  # transformers 5 does not pass it on to its adapter lookup
            kwargs["adapter_kwargs"] = {**kwargs.get("adapter_kwargs", {}), "local_files_only": True}
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as err:
        if not offline:
            raise
        reason = "HF_HUB_OFFLINE is set" if _offline_env() else "the hub is unreachable"
        raise HubUnavailableError(
            f"Cannot load {source!r}: {reason} and it is not in the local Hugging Face cache. "
            f"Pass a local model folder, or use {DEFAULT_MODEL!r} for the embedded SmolLM2-135M-Instruct."
        ) from err


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL, *, dtype: torch.dtype | None = None, **kwargs
) -> PreTrainedModel:
    """A causal LM from "default" (embedded SmolLM2-135M-Instruct), a local folder or a hub id.

    kwargs go to `from_pretrained` (e.g. `attn_implementation`). A hub id that cannot be fetched fails
    at once with HubUnavailableError rather than after the hub client's retries.
    """
    if dtype is not None:
        kwargs["dtype"] = dtype
    return _from_pretrained(AutoModelForCausalLM, name_or_path, **kwargs)


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL, **kwargs) -> PreTrainedTokenizerBase:
    """The tokenizer matching `load_model(name_or_path)`; same name resolution and offline handling."""
    return _from_pretrained(AutoTokenizer, name_or_path, **kwargs)


def load_default(
    *, dtype: torch.dtype = torch.float32, **kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The embedded SmolLM2-135M-Instruct and its tokenizer: no hub needed, ~1 s after the first call."""
    return load_model(DEFAULT_MODEL, dtype=dtype, **kwargs), load_tokenizer(DEFAULT_MODEL)
