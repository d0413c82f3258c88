"""Fine-tuning recipe configs: frozen dataclasses, one per YAML section, every key validated.

`load_recipe(path, overrides)` reads a YAML file, applies `--set a.b=c` overrides and builds a
`RecipeConfig`. An unknown key anywhere is an error naming it and the keys allowed there; a bad
value is an error naming its dotted key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import KNNConfig

MIXED_PRECISION = ("no", "bf16", "fp16")
DTYPES = ("float32", "bfloat16")


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} is invalid: {rule}.")


@dataclass(frozen=True)
class ModelSection:
    name: str | None = field(
        default="default",
        metadata={"help": "'default' (embedded SmolLM2-135M-Instruct), a local folder or a hub id."},
    )
    from_config: dict | None = field(
        default=None,
        metadata={
            "help": "Instead of `name`: a transformers config dict (with model_type) for a random model."
        },
    )
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer name or path; default: `name`."})
    dtype: str = field(default="float32", metadata={"help": "Weight dtype: float32 or bfloat16."})
    activation_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute layer activations in the backward to save memory."}
    )

    def __post_init__(self) -> None:
        _check(self.dtype in DTYPES, "model.dtype", self.dtype, f"use one of {DTYPES}")
        if (self.name is None) == (self.from_config is None):
            raise ValueError(
                "Set exactly one of model.name (a pretrained model) and model.from_config (a random model "
                "built from a config); set the other to null."
            )
        if self.from_config is not None:
            _check("model_type" in self.from_config, "model.from_config", self.from_config, "add model_type")
            _check(self.tokenizer is not None, "model.tokenizer", None, "a random model needs a tokenizer")


@dataclass(frozen=True)
class LoRASection:
    enabled: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of every weight."})
    r: int = field(default=8, metadata={"help": "Adapter rank."})
    alpha: int = field(default=16, metadata={"help": "Adapter scale numerator (scale = alpha / r)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names; null infers the attention projections of the family."}
    )
    merge: bool = field(default=True, metadata={"help": "Also save the model with the adapter merged in."})

    def __post_init__(self) -> None:
        _check(self.r >= 1, "lora.r", self.r, "use an int >= 1")
        _check(self.alpha >= 1, "lora.alpha", self.alpha, "use an int >= 1")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "use 0 <= dropout < 1")


@dataclass(frozen=True)
class DataSection:
    source: str = field(
        default="bundled", metadata={"help": "'bundled', a .txt file or folder, a .jsonl, or a hub dataset."}
    )
    config: str | None = field(default=None, metadata={"help": "Hub dataset config."})
    split: str = field(default="train", metadata={"help": "Hub dataset split."})
    column: str = field(default="text", metadata={"help": "Text column of a .jsonl or hub dataset."})
    max_docs: int | None = field(default=None, metadata={"help": "Use only the first N documents."})
    validation_docs: int = field(
        default=8, metadata={"help": "Whole documents held out for validation, never trained on."}
    )
    block_size: int = field(default=512, metadata={"help": "Tokens per training block (packed documents)."})

    def __post_init__(self) -> None:
        _check(
            self.max_docs is None or self.max_docs >= 2, "data.max_docs", self.max_docs, "use >= 2 or null"
        )
        _check(self.validation_docs >= 1, "data.validation_docs", self.validation_docs, "use an int >= 1")
        _check(self.block_size >= 2, "data.block_size", self.block_size, "use an int >= 2")


@dataclass(frozen=True)
class TrainSection:
    seed: int = field(
        default=0, metadata={"help": "Seeds the weights of a random model, LoRA and data order."}
    )
    max_steps: int = field(default=100, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=1, metadata={"help": "Blocks per process per micro-batch."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    lr: float = field(default=1e-4, metadata={"help": "Peak learning rate of AdamW."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_steps: int = field(default=10, metadata={"help": "Linear warmup steps before the cosine decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 turns it off."})
    mixed_precision: str = field(
        default="no", metadata={"help": "'no', 'bf16' (autocast on CPU and GPU) or 'fp16' (GPU only)."}
    )
    cpu: bool = field(default=False, metadata={"help": "Train on CPU even when a GPU is present."})
    log_every: int = field(default=1, metadata={"help": "Steps between log lines."})

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "log_every"):
            _check(getattr(self, name) >= 1, f"train.{name}", getattr(self, name), "use an int >= 1")
        _check(self.lr > 0, "train.lr", self.lr, "use a number > 0")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "use a number >= 0")
        _check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "use an int >= 0")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, "use a number >= 0")
        _check(
            self.mixed_precision in MIXED_PRECISION,
            "train.mixed_precision",
            self.mixed_precision,
            f"use one of {MIXED_PRECISION}",
        )


@dataclass(frozen=True)
class EvalSection:
    every: int = field(
        default=0, metadata={"help": "Steps between evaluations; 0: before and at the end only."}
    )
    max_length: int | None = field(default=None, metadata={"help": "Window length; default data.block_size."})
    stride: int | None = field(default=None, metadata={"help": "Window step; default max_length."})
    max_tokens: int | None = field(
        default=None, metadata={"help": "Cut each validation document to N tokens."}
    )

    def __post_init__(self) -> None:
        _check(self.every >= 0, "eval.every", self.every, "use an int >= 0")
        for name in ("max_length", "stride", "max_tokens"):
            value = getattr(self, name)
            _check(value is None or value >= 2, f"eval.{name}", value, "use an int >= 2 or null")


@dataclass(frozen=True)
class CheckpointSection:
    every: int = field(default=0, metadata={"help": "Steps between checkpoints; 0: none."})
    keep: int = field(
        default=2, metadata={"help": "Newest complete checkpoints kept; older ones are deleted."}
    )

    def __post_init__(self) -> None:
        _check(self.every >= 0, "checkpoint.every", self.every, "use an int >= 0")
        _check(self.keep >= 1, "checkpoint.keep", self.keep, "use an int >= 1")


@dataclass(frozen=True)
class OutputSection:
    dir: str = field(default="outputs/finetune", metadata={"help": "Checkpoints, logs, model and results."})
    tensorboard: bool = field(
        default=True, metadata={"help": "Also log through Accelerate's TensorBoard tracker."}
    )


@dataclass(frozen=True)
class RecipeConfig:
    """A whole fine-tuning run. `knn` holds `KNNConfig` fields (k, backend, layers, sinks, window)."""

    model: ModelSection = field(default_factory=ModelSection)
    knn: KNNConfig = field(default_factory=KNNConfig)
    lora: LoRASection = field(default_factory=LoRASection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    output: OutputSection = field(default_factory=OutputSection)

    def __post_init__(self) -> None:
        max_length = self.eval_max_length
        if self.eval.stride is not None and self.eval.stride > max_length:
            raise ValueError(f"eval.stride={self.eval.stride} must be at most eval.max_length={max_length}.")

    @property
    def eval_max_length(self) -> int:
        return self.eval.max_length or self.data.block_size

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (the resolved config saved with a run); loads back with `recipe_from_dict`."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, KNNConfig):
                out[f.name] = {k: v for k, v in value.to_dict().items() if k != "knn_patch_version"}
                out[f.name]["chunk_size"] = value.chunk_size
            else:
                out[f.name] = dataclasses.asdict(value)
        return out


# ---------------------------------------------------------------- building from plain data


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Check `value` against a field type (int, float, bool, str, dict, list[str], optional ones)."""
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else ()
    if options:
        if value is None and type(None) in options:
            return None
        kind = next(o for o in options if o is not type(None))
    if value is None:
        raise ValueError(f"{key}=None is invalid: a value is required.")
    origin = typing.get_origin(kind) or kind
    if kind is bool:
        _check(isinstance(value, bool), key, value, "use true or false")
    elif kind is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, value, "use an int")
    elif kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, value, "use a number")
        value = float(value)
    elif kind is str:
        _check(isinstance(value, str), key, value, "use a string")
    elif origin is dict:
        _check(isinstance(value, Mapping), key, value, "use a mapping")
        value = dict(value)
    elif origin is list:
        ok = (
            isinstance(value, Sequence)
            and not isinstance(value, str)
            and all(isinstance(v, str) for v in value)
        )
        _check(ok, key, value, "use a list of strings")
        value = list(value)
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(f"Section {prefix or 'top level'!r} must be a mapping, got {type(data).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    where = f"in {prefix!r}" if prefix else "at the top level"
    for key in data:
        if key not in fields:
            raise ValueError(
                f"Unknown config key {prefix + '.' if prefix else ''}{key!r}: allowed keys {where} are "
                f"{', '.join(fields)}."
            )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kind = hints[name]
        if kind is KNNConfig:
            kwargs[name] = _knn(value, key)
        elif dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, value, key)
        else:
            kwargs[name] = _coerce(value, kind, key)
    return cls(**kwargs)


def _knn(data: Any, key: str) -> KNNConfig:
    if not isinstance(data, Mapping):
        raise ValueError(f"Section {key!r} must be a mapping of KNNConfig fields, got {type(data).__name__}.")
    names = [f.name for f in dataclasses.fields(KNNConfig)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ValueError(
            f"Unknown config key {key}.{unknown[0]!r}: allowed keys in {key!r} are {', '.join(names)}."
        )
    try:
        return KNNConfig(**data)
    except ValueError as err:
        raise ValueError(f"In section {key!r}: {err}") from err


def recipe_from_dict(data: Mapping[str, Any]) -> RecipeConfig:
    """Build and validate a RecipeConfig from nested plain data (what the YAML holds)."""
    return _build(RecipeConfig, data, "")


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides to nested data in place; values are read as YAML (1e-4, null, [1, 2])."""
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or not path or any(not part for part in path.split(".")):
            raise ValueError(f"Override {item!r} is invalid: write section.key=value, e.g. train.lr=1e-4.")
        *parents, last = path.split(".")
        node = data
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"Override {item!r}: {part!r} is not a section.")
            node = child
        node[last] = yaml.safe_load(text)
    return data


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Read a recipe YAML, apply `--set` overrides, validate every key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No recipe config at {str(path)!r}; see recipes/configs/ for examples.")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe config is a mapping of sections, got {type(data).__name__}.")
    return recipe_from_dict(apply_overrides(data, overrides))
