"""Documents for long-context evaluation: the bundled corpus, local files or hub datasets, via `datasets`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import datasets
import huggingface_hub.constants

from knn_patch.assets import bundled_corpus_dir
from knn_patch.loading import HubUnavailableError, _hub_reachable, _offline_env

BUNDLED = "bundled"
_JSON_SUFFIXES = (".json", ".jsonl")
_FILE_SUFFIXES = (".txt", *_JSON_SUFFIXES)
_FIX = f"use source={BUNDLED!r} (embedded State of the Union speeches) or a local .txt/.jsonl path"


def _text_files(paths: list[Path]) -> datasets.Dataset:
    """One example per .txt file, named after the file, so results can be traced back to documents."""
    dataset = datasets.load_dataset(
        "text", data_files=[str(p) for p in paths], sample_by="document", split="train"
    )
    return dataset.add_column("name", [p.name for p in paths])


def _txt_paths(path: Path) -> list[Path]:
    """The .txt files a local path stands for: itself, or the sorted .txt files of a folder."""
    if path.is_file():
        return [path]
    paths = sorted(path.glob("*.txt"))
    if not paths:
        raise ValueError(f"No .txt files in folder {str(path)!r}: put one document per .txt file there")
    return paths


@contextlib.contextmanager
def _forced_offline() -> Iterator[None]:
    """Offline mode for `datasets` and the hub client, which read HF_HUB_OFFLINE only at import time.

    Without it an unreachable hub costs ~25 s of retries before `load_dataset` gives up.
    """
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _hub(source: str, config: str | None, split: str) -> datasets.Dataset:
    """A hub dataset; offline, only the local `datasets` cache is tried, and a miss fails at once."""
    if not _offline_env() and _hub_reachable():
        return datasets.load_dataset(source, config, split=split)
    try:
        with _forced_offline():
            return datasets.load_dataset(source, config, split=split)
    except OSError as err:  # ConnectionError or FileNotFoundError, depending on what is cached
        reason = "HF_HUB_OFFLINE is set" if _offline_env() else "the hub is unreachable"
        raise HubUnavailableError(
            f"Cannot load dataset {source!r}: {reason} and it is not in the local datasets cache; {_FIX}"
        ) from err


def _text_column(dataset: datasets.Dataset, source: str, column: str) -> datasets.Dataset:
    """Only `column`, renamed to `text`, plus a `name` column holding the row index."""
    if column not in dataset.column_names:
        raise ValueError(
            f"No column {column!r} in {source!r}; available columns: {', '.join(dataset.column_names)}. "
            "Pass column=... naming the one with the text"
        )
    dataset = dataset.select_columns([column]).rename_columns({column: "text"})
    return dataset.add_column("name", [str(i) for i in range(len(dataset))])


def _json(path: Path, column: str) -> datasets.Dataset:
    """A .json/.jsonl file; an empty one gives zero rows rather than the loader's cryptic errors."""
    try:
        return datasets.load_dataset("json", data_files=str(path), split="train")
    except (StopIteration, ValueError):
        if path.read_text().strip() not in ("", "[]"):
            raise
        return datasets.Dataset.from_dict({column: []})


def _looks_like_path(source: str) -> bool:
    """Whether a missing `source` was meant as a local path (a typo) rather than a hub dataset name."""
    path = Path(source).expanduser()
    return (
        source.startswith(("./", "../", "/", "~"))
        or path.suffix in _FILE_SUFFIXES
        or (len(path.parts) > 1 and path.parent.is_dir())
    )


def load_documents(
    source: str = BUNDLED,
    *,
    config: str | None = None,
    split: str = "test",
    column: str = "text",
    max_docs: int | None = None,
) -> datasets.Dataset:
    """Documents with a `text` and a `name` column, from one of:

    - "bundled": the 249 State of the Union speeches shipped with knn_patch (works offline);
    - a local .txt file or folder of .txt files (one document per file), or a .json/.jsonl file whose
      text is in `column`;
    - a hub dataset name such as "pg19", or "wikitext" with config "wikitext-103-raw-v1".

    `name` is the file name for .txt documents and the row index otherwise. `max_docs` keeps the first
    N documents. Bad input fails here, before any tokenization or model work, with the fix in the message.
    """
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be at least 1, got {max_docs}")
    path = Path(source).expanduser()
    if source == BUNDLED:
        dataset = _text_files(_txt_paths(bundled_corpus_dir()))
    elif path.is_dir() or (path.is_file() and path.suffix == ".txt"):
        dataset = _text_files(_txt_paths(path))
    elif path.is_file() and path.suffix in _JSON_SUFFIXES:
        dataset = _text_column(_json(path, column), source, column)
    elif path.exists():
        raise ValueError(f"Unsupported file {source!r}: use a .txt, .json or .jsonl file, or a folder")
    elif _looks_like_path(source):
        raise FileNotFoundError(f"No such file or folder: {source!r} ({path.resolve()}); {_FIX}")
    else:
        dataset = _text_column(_hub(source, config, split), source, column)
    if len(dataset) == 0:
        raise ValueError(f"{source!r} has no documents; {_FIX}")
    if max_docs is not None and max_docs < len(dataset):
        dataset = dataset.select(range(max_docs))
    return dataset


def tokenize_documents(
    dataset: datasets.Dataset, tokenizer, *, min_tokens: int = 2, max_tokens: int | None = None
) -> tuple[datasets.Dataset, int]:
    """Add `input_ids` (no special tokens) to each document, truncated to `max_tokens` if given.

    Documents with fewer than `min_tokens` tokens are dropped: a 1-token document has no next token to
    score. Returns the kept documents and how many were dropped. Results are cached by `datasets`, so
    re-tokenizing the bundled corpus (~2.5M tokens) with the same tokenizer is instant.
    """
    if min_tokens < 2:
        raise ValueError(
            f"min_tokens must be at least 2 (a 1-token document has nothing to score), got {min_tokens}"
        )
    if max_tokens is not None and max_tokens < min_tokens:
        raise ValueError(f"max_tokens ({max_tokens}) must be at least min_tokens ({min_tokens})")

    def encode(batch: dict) -> dict:
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [x[:max_tokens] for x in ids]}

    tokenized = dataset.map(encode, batched=True, desc="Tokenizing")
    kept = tokenized.filter(
        lambda batch: [len(ids) >= min_tokens for ids in batch],
        batched=True,
        input_columns="input_ids",
        desc="Dropping short documents",
    )
    return kept, len(tokenized) - len(kept)
