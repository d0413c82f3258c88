"""The frontier: every method spends the budget it is given, a full budget is dense, and the
outputs (table, JSON, plot, `knn-patch frontier` and `report`) hold what was measured."""

import json
import math

import pytest
import torch
from rich.console import Console
from tiny_models import tiny_model

from knn_patch.config import PRESETS
from knn_patch.eval.evaluation import keys_read
from knn_patch.eval.frontier import (
    CALIBRATED,
    METHODS,
    frontier_settings,
    method_config,
    print_frontier,
    run_frontier,
    write_frontier,
)


@pytest.fixture(scope="module")
def model():
    return tiny_model("gemma3_text")  # sliding and global layers: keys are counted per layer


@pytest.mark.parametrize("method", [m for m in METHODS if m not in (*PRESETS, *CALIBRATED)])
def test_each_method_reads_the_budget_it_is_given(method):
    layer_types = ["sliding_attention", "full_attention"] * 2
    model_config = tiny_model(
        "gemma3_text", sliding_window=2048, num_hidden_layers=4, layer_types=layer_types
    ).config
    n, budget = 1024, 60
    config = method_config(method, budget, n, model_config)
    read = keys_read(config, n, model_config)
    assert budget - 1 <= read <= budget, "the mean over layers may fall short only by rounding"
    if method.endswith("+first"):
        assert config.resolve_k(n, 0) > config.resolve_k(n, 1), "layer 0 gets more keys"


def test_budgets_too_small_or_unknown_methods_are_refused(model):
    assert method_config("topk+mean", 5, 1000, model.config) is None, "4 sinks + 1 mean leave no k"
    with pytest.raises(ValueError, match="too small"):
        frontier_settings(["topk"], [0.1], 1000, model.config)
    with pytest.raises(ValueError, match="choose from"):
        method_config("nearest", 50, 1000, model.config)
    with pytest.raises(ValueError, match="in %"):
        frontier_settings(["topk"], [0, 2], 1000, model.config)


def _docs(n, lengths):
    gen = torch.Generator().manual_seed(0)
    return [
        (f"d{i}", torch.randint(3, 128, (length,), generator=gen).tolist())
        for i, length in enumerate(lengths)
    ]


def test_a_full_budget_is_dense_and_rows_match_the_totals(model, tmp_path):
    methods = ["topk", "topk+mean", "topk+mean+first", "tail"]
    result = run_frontier(
        model, _docs(64, [64, 70]), max_length=64, budgets=[50, 100], methods=methods, progress=False
    )
    assert [(r["method"], r["budget_percent"]) for r in result["rows"]] == [
        (m, b) for m in methods for b in (50, 100)
    ]
    for row in result["rows"]:
        assert len(row["per_document_ratio"]) == 2
        docs = result["documents"]
        nll = sum(d["nll"][row["setting"]] - d["nll"]["dense"] for d in docs)
        assert math.exp(nll / sum(d["tokens"] for d in docs)) == pytest.approx(row["ratio_to_dense"])
        if row["budget_percent"] == 100:  # every key kept (tail: top half + all the others sampled)
            assert row["ratio_to_dense"] == pytest.approx(1.0, abs=1e-4)
    console = Console(record=True, width=140)
    print_frontier(result, "tiny", console=console)
    assert "topk+mean+first" in console.export_text()
    paths = write_frontier(result, tmp_path, "tiny")
    assert json.loads(paths["json"].read_text())["rows"] == result["rows"]
    assert paths["png"].stat().st_size > 0


def test_documents_shorter_than_the_window_are_refused(model):
    with pytest.raises(ValueError, match="min-tokens"):
        run_frontier(model, _docs(64, [64, 30]), max_length=64, budgets=[50], progress=False)
    with pytest.raises(ValueError, match="at least one document"):
        run_frontier(model, [], max_length=64, budgets=[50], progress=False)


def test_a_preset_runs_once_whatever_the_budgets(model):
    settings = frontier_settings(["balanced", "topk"], [25, 50], 64, model.config)
    assert [(m, b) for m, b, _ in settings] == [("balanced", None), ("topk", 25), ("topk", 50)]
    docs = _docs(64, [64])
    result = run_frontier(model, docs, max_length=64, budgets=[50], methods=["fast"], progress=False)
    (row,) = result["rows"]
    assert row["method"] == "fast" and row["budget_percent"] == row["keys_percent"]
