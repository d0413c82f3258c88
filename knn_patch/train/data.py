"""Training data: documents tokenised (cached by `datasets`), split by document, packed into blocks.

The split is drawn over whole documents before packing, so no validation text is ever trained on;
validation keeps its documents whole for sliding-window perplexity.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np

from ..eval.data import load_documents, tokenize_documents
from ..extras import require
from .recipe_config import DataSection

datasets = require("datasets", "fine-tuning")


@dataclass
class TrainingData:
    blocks: datasets.Dataset  # `input_ids` of data.block_size tokens each
    validation: list[tuple[str, list[int]]]  # (document name, token ids), whole held-out documents
    train_documents: list[str]


def split_documents(docs: datasets.Dataset, validation_docs: int, seed: int) -> tuple[datasets.Dataset, ...]:
    """(train, validation): a seeded draw of `validation_docs` whole documents is held out."""
    if validation_docs >= len(docs):
        raise ValueError(
            f"data.validation_docs={validation_docs} leaves no training document: the data has only "
            f"{len(docs)} documents. Lower it or add documents."
        )
    order = np.random.default_rng(seed).permutation(len(docs))
    held_out = sorted(int(i) for i in order[:validation_docs])
    kept = sorted(int(i) for i in order[validation_docs:])
    return docs.select(kept), docs.select(held_out)


def pack_blocks(docs: datasets.Dataset, block_size: int, eos_token_id: int | None) -> datasets.Dataset:
    """Concatenate the documents, each followed by EOS (when the tokenizer has one), and cut the stream
    into blocks of `block_size` tokens; the last partial block is dropped. Cached like any `map`."""
    sep = [] if eos_token_id is None else [eos_token_id]

    def group(batch: dict) -> dict:
        stream = list(chain.from_iterable(ids + sep for ids in batch["input_ids"]))
        n = len(stream) // block_size * block_size
        return {"input_ids": [stream[i : i + block_size] for i in range(0, n, block_size)]}

    # one map batch for up to 100k documents, so only the stream's very end is dropped
    return docs.map(
        group, batched=True, batch_size=100_000, remove_columns=docs.column_names, desc="Packing blocks"
    )


def prepare_data(
    data: DataSection, tokenizer, *, seed: int, eval_max_tokens: int | None = None
) -> TrainingData:
    """Load, tokenise (cached), split by document and pack the training documents into blocks."""
    docs = load_documents(data.source, config=data.config, split=data.split, column=data.column)
    if data.max_docs is not None and data.max_docs < len(docs):
        docs = docs.select(range(data.max_docs))
    docs, _ = tokenize_documents(docs, tokenizer, min_tokens=2)
    train, validation = split_documents(docs, data.validation_docs, seed)
    blocks = pack_blocks(train, data.block_size, tokenizer.eos_token_id)
    if len(blocks) == 0:
        raise ValueError(
            f"The {len(train)} training documents give no block of data.block_size={data.block_size} tokens; "
            "lower the block size or add documents."
        )
    names, ids = validation["name"], validation["input_ids"]
    held_out = [(name, doc[:eval_max_tokens]) for name, doc in zip(names, ids, strict=True)]
    return TrainingData(
        blocks=blocks.with_format("torch"),
        validation=held_out,
        train_documents=list(train["name"]),
    )
