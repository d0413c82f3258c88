"""The `evaluate` metric module loads from its path and gives the library's numbers."""

from pathlib import Path

import evaluate
import pytest
import torch
from tiny_models import tiny_model

from knn_patch import KNNConfig
from knn_patch.eval.evaluation import evaluate_perplexity

METRIC = str(Path(__file__).parents[1] / "evals" / "metrics" / "knn_perplexity")


class _Ids:
    """A stand-in tokenizer for the tiny random model: one token per character."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[3 + ord(c) % 120 for c in text] for text in texts]}


def test_metric_matches_the_library():
    texts = ["the first document, long enough to need two windows", "a second one", "x"]
    model = tiny_model("llama")
    metric = evaluate.load(METRIC)
    got = metric.compute(predictions=texts, model=model, tokenizer=_Ids(), k=[4, "sqrt"], max_length=16)
    ids = _Ids()(texts)["input_ids"]
    want = evaluate_perplexity(
        model, [(str(i), d) for i, d in enumerate(ids) if len(d) >= 2], [KNNConfig(k=4), KNNConfig(k="sqrt")],
        max_length=16, stride=16, progress=False,
    )  # fmt: skip
    assert got["tokens"] == want["totals"]["dense"]["tokens"]
    for name, total in want["totals"].items():
        assert got["perplexity"][name] == pytest.approx(total["perplexity"], rel=1e-6)
    assert got["ratio_to_dense"]["dense"] == 1.0 and torch.isfinite(
        torch.tensor(got["perplexity"]["topk k=4"])
    )
