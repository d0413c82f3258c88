"""Documents for long-context evaluation: the bundled corpus, local files or hub datasets, via `datasets`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import huggingface_hub.constants

from knn_patch.assets import bundled_corpus_dir
from knn_patch.extras import require
from knn_patch.loading import HubUnavailableError, _hub_reachable, _offline_env

datasets = require("datasets", "document loading")

BUNDLED = "bundled"
_JSON_SUFFIXES = (".json", ".jsonl")
_FILE_SUFFIXES = (".txt", ".parquet", *_JSON_SUFFIXES)
_FIX = f"use source={BUNDLED!r} (embedded State of the Union speeches) or a local .txt/.jsonl/.parquet path"

# Short names for hub datasets: name -> (hub repository, column that names each document).
HUB_ALIASES = {"pg19": ("deepmind/pg19", "short_book_title")}
# Between joined documents, as between paragraphs: the parts stay readable as separate texts.
JOIN_SEPARATOR = "\n\n"


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


def _load_hub(repo: str, config: str | None, split: str) -> datasets.Dataset:
    """`load_dataset`, falling back to the hub's parquet conversion for a repository that still has a
    loading script, which `datasets` >= 4 no longer runs (huggingface/datasets#7693)."""
    try:
        return datasets.load_dataset(repo, config, split=split)
    except RuntimeError as err:
        if "scripts are no longer supported" not in str(err):
            raise
        return datasets.load_dataset(repo, config, split=split, revision="refs/convert/parquet")


def _hub(source: str, config: str | None, split: str) -> datasets.Dataset:
    """A hub dataset (or the repository of an alias in `HUB_ALIASES`); offline, only the local
    `datasets` cache is tried, and a miss fails at once."""
    repo = HUB_ALIASES.get(source, (source, None))[0]
    if not _offline_env() and _hub_reachable():
        return _load_hub(repo, config, split)
    try:
        with _forced_offline():
            return _load_hub(repo, config, split)
    except OSError as err:  # ConnectionError or FileNotFoundError, depending on what is cached
        reason = "HF_HUB_OFFLINE is set" if _offline_env() else "the hub is unreachable"
        name = repr(source) if repo == source else f"{source!r} ({repo})"
        raise HubUnavailableError(
            f"Cannot load dataset {name}: {reason} and it is not in the local datasets cache; {_FIX}"
        ) from err


def _text_column(
    dataset: datasets.Dataset, source: str, column: str, name_column: str | None
) -> datasets.Dataset:
    """Only `column`, renamed to `text`, plus a `name` column: `name_column`'s values as strings,
    or the row index."""
    for wanted, option in ((column, "column"), (name_column, "name_column")):
        if wanted is not None and wanted not in dataset.column_names:
            raise ValueError(
                f"No column {wanted!r} in {source!r}; available columns: {', '.join(dataset.column_names)}. "
                f"Pass {option}=... naming the one with the {'text' if option == 'column' else 'names'}"
            )
    names = [str(v) for v in dataset[name_column]] if name_column else [str(i) for i in range(len(dataset))]
    dataset = dataset.select_columns([column]).rename_columns({column: "text"})
    return dataset.add_column("name", names)


def _table(path: Path, column: str) -> datasets.Dataset:
    """A .json/.jsonl or .parquet file; an empty JSON file gives zero rows rather than the loader's
    cryptic errors."""
    if path.suffix == ".parquet":
        return datasets.load_dataset("parquet", data_files=str(path), split="train")
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
    name_column: str | None = None,
    max_docs: int | None = None,
) -> datasets.Dataset:
    """Documents with a `text` and a `name` column, from one of:

    - "bundled": the 249 State of the Union speeches shipped with knn_patch (works offline);
    - a local .txt file or folder of .txt files (one document per file), or a .json/.jsonl/.parquet
      file whose text is in `column`;
    - a hub dataset: "pg19" (`deepmind/pg19`, splits train/validation/test, named by book title), any
      hub name such as "wikitext" with config "wikitext-103-raw-v1", as `datasets.load_dataset` takes it.

    `name` is the file name for .txt documents, else the value of `name_column` (for PG-19 by default
    `short_book_title`) or the row index. `max_docs` keeps the first N documents. Bad input fails here,
    before any tokenization or model work, with the fix in the message.
    """
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be at least 1, got {max_docs}")
    path = Path(source).expanduser()
    if source == BUNDLED:
        dataset = _text_files(_txt_paths(bundled_corpus_dir()))
    elif path.is_dir() or (path.is_file() and path.suffix == ".txt"):
        dataset = _text_files(_txt_paths(path))
    elif path.is_file() and path.suffix in _FILE_SUFFIXES:
        dataset = _text_column(_table(path, column), source, column, name_column)
    elif path.exists():
        raise ValueError(
            f"Unsupported file {source!r}: use a .txt, .json, .jsonl or .parquet file, or a folder"
        )
    elif _looks_like_path(source):
        raise FileNotFoundError(f"No such file or folder: {source!r} ({path.resolve()}); {_FIX}")
    else:
        default_names = HUB_ALIASES.get(source, (source, None))[1]
        dataset = _text_column(_hub(source, config, split), source, column, name_column or default_names)
    if len(dataset) == 0:
        raise ValueError(f"{source!r} has no documents; {_FIX}")
    if max_docs is not None and max_docs < len(dataset):
        dataset = dataset.select(range(max_docs))
    return dataset


def join_documents(
    dataset: datasets.Dataset,
    min_tokens: int,
    *,
    separator: Sequence[int] = (),
    max_tokens: int | None = None,
) -> tuple[datasets.Dataset, int]:
    """Join consecutive tokenized documents, in their order, into documents of at least `min_tokens`
    tokens: long context from a corpus with few long documents (4 bundled speeches reach 32k tokens).

    `separator` (token ids) goes between parts. A document long enough alone stands alone and keeps
    its name; a joined one is named after its parts and their token spans in it, e.g.
    "a.txt[0:900] + b.txt[902:2100]", so results trace back to the sources. Documents are cut to
    `max_tokens` after joining (the name lists what is kept). The last documents, if together still
    too short, are dropped. Returns the documents (`text`, `name`, `input_ids`, and `parts`: how many
    source documents each holds) and how many source documents were dropped.
    """
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be at least 1, got {min_tokens}")
    groups: list[list[int]] = []
    group: list[int] = []
    count = 0
    for i, ids in enumerate(dataset["input_ids"]):
        count += len(ids) + (len(separator) if group else 0)
        group.append(i)
        if count >= min_tokens:
            groups.append(group)
            group, count = [], 0
    columns: dict[str, list] = {"text": [], "name": [], "input_ids": [], "parts": []}
    for group in groups:
        rows = dataset[group]  # {column: [one value per part]}
        ids: list[int] = []
        spans = []  # (name, text, start, end) of each part in `ids`
        for name, text, part in zip(rows["name"], rows["text"], rows["input_ids"], strict=True):
            ids += list(separator) if ids else []
            spans.append((name, text, len(ids), len(ids) + len(part)))
            ids += part
        ids = ids[:max_tokens]
        spans = [(name, text, s, min(e, len(ids))) for name, text, s, e in spans if s < len(ids)]
        columns["name"].append(
            spans[0][0] if len(spans) == 1 else " + ".join(f"{n}[{s}:{e}]" for n, _, s, e in spans)
        )
        columns["text"].append(JOIN_SEPARATOR.join(text for _, text, _, _ in spans))
        columns["input_ids"].append(ids)
        columns["parts"].append(len(spans))
    return datasets.Dataset.from_dict(columns), len(dataset) - sum(columns["parts"])


def tokenize_documents(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    min_tokens: int = 2,
    max_tokens: int | None = None,
    join_to: int | None = None,
) -> tuple[datasets.Dataset, int]:
    """Add `input_ids` (no special tokens) to each document, truncated to `max_tokens` if given.

    With `join_to`, consecutive documents are first joined into documents of at least that many
    tokens, a blank line between parts (`join_documents`: names list the parts and their token
    spans), and cut to `max_tokens` once joined. Documents with fewer than `min_tokens` tokens are
    then dropped: a 1-token document has no next token to score. Returns the kept documents and how
    many source documents were dropped. Tokens are cached by `datasets`, so re-tokenizing the bundled
    corpus (~2.5M tokens) with the same tokenizer is fast.
    """
    if min_tokens < 2:
        raise ValueError(
            f"min_tokens must be at least 2 (a 1-token document has nothing to score), got {min_tokens}"
        )
    if max_tokens is not None and max_tokens < min_tokens:
        raise ValueError(f"max_tokens ({max_tokens}) must be at least min_tokens ({min_tokens})")
    if join_to is not None and join_to < 2:
        raise ValueError(f"join_to must be at least 2 tokens, got {join_to}")
    cut = max_tokens if join_to is None else None  # joined documents are cut once joined

    def encode(batch: dict) -> dict:
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [x[:cut] for x in ids]}

    tokenized = dataset.map(encode, batched=True, desc="Tokenizing")
    if join_to is not None:
        separator = tokenizer(JOIN_SEPARATOR, add_special_tokens=False)["input_ids"]
        tokenized, _ = join_documents(tokenized, join_to, separator=separator, max_tokens=max_tokens)
    kept = tokenized.filter(
        lambda batch: [len(ids) >= min_tokens for ids in batch],
        batched=True,
        input_columns="input_ids",
        desc="Dropping short documents",
    )
    used = sum(kept["parts"]) if join_to is not None else len(kept)
    return kept, len(dataset) - used
