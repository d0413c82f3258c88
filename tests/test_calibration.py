"""`calibrate`: the per-layer k it fits reads the budget it is given, goes where the error falls
most, and at a full budget is exact attention; `knn-patch calibrate` and the frontier's
`calibrated` method use it."""

import json
import math

import pytest
import torch
import yaml
from rich.console import Console
from tiny_models import tiny_model

import knn_patch
from knn_patch.calibration import (
    BASE,
    _grid,
    _k_rule,
    allocate,
    calibrate,
    layer_errors,
    measure,
    print_calibration,
)
from knn_patch.config import KNNConfig, resolve_k
from knn_patch.eval.evaluation import keys_read
from knn_patch.eval.frontier import frontier_settings, run_frontier


@pytest.fixture(scope="module")
def model():
    layer_types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    return tiny_model("gemma3_text", num_hidden_layers=4, layer_types=layer_types, sliding_window=48).eval()


def _ids(n, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def test_allocate_spends_the_budget_where_the_squared_error_falls_most():
    costs = [[1, 2, 4, 8]] * 2
    steep = [1.0, 0.5, 0.1, 0.0]  # each step removes much error
    flat = [0.3, 0.299, 0.298, 0.297]
    choice = allocate([steep, flat], costs, budget=10)
    assert choice == [3, 1], "the steep layer takes every step it can before the flat one"
    assert sum(c[i] for c, i in zip(costs, choice, strict=True)) <= 10
    assert allocate([steep, flat], costs, budget=2) == [0, 0], "the floor when nothing more fits"
    with pytest.raises(ValueError, match="raise it"):
        allocate([steep, flat], costs, budget=1.5)
    assert allocate([steep, [0.3] * 4], costs, budget=100) == [3, 0], "no keys for no fall in error"


@pytest.mark.parametrize("n", [100, 4096, 16384])
def test_a_global_layers_rule_gives_back_its_k_at_the_calibration_length(n):
    for k in _grid(n - 12):
        rule = _k_rule(k, n, is_global=True)
        assert resolve_k(rule, n) == k, rule
    assert _k_rule(64, n, is_global=False) == 64, "a sliding layer's k does not grow with n"


def test_the_error_falls_to_zero_at_the_top_of_the_grid():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, n, 16, generator=gen) for n in (32, 96, 96))
    k, v = k[:, :2], v[:, :2]  # GQA
    grid = _grid(96 - 4 - 8)
    errors = layer_errors(q, k, v, grid, BASE, scale=0.25)
    assert errors[-1] < 1e-5 and errors[0] > 0.01
    windowed = layer_errors(q, k, v, _grid(24 - 12), BASE, scale=0.25, window=24)
    assert windowed[-1] < 1e-5, "a sliding layer is exact once k covers its window"


def test_the_fitted_config_reads_the_budget_and_each_layer_its_k(model):
    n = 160
    result = calibrate(model, _ids(n), budget=25, queries=64, progress=False)
    config = result["config"]
    assert result["keys_read"] == pytest.approx(keys_read(config, n, model.config))
    assert 25 / 100 * n - 40 < result["keys_read"] <= 25 / 100 * n, "spent up to what one more step costs"
    for row in result["rows"]:
        assert config.resolve_k(n, row["layer"]) == row["k"]
        assert row["error"] == row["curve"][row["k"]]
    assert [r["global"] for r in result["rows"]] == [False, True, False, True]
    saved = KNNConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert saved == config, "the per-layer k is saved with the model"


def test_a_full_budget_is_dense_attention(model):
    ids = _ids(96, seed=1)
    config = calibrate(model, ids, budget=100, queries=32, progress=False)["config"]
    with torch.no_grad():
        dense = model(ids).logits
        with knn_patch.patched(model, config):
            knn = model(ids).logits
    torch.testing.assert_close(knn, dense, atol=1e-5, rtol=1e-5)


def test_bad_calibration_input_is_refused(model):
    with pytest.raises(ValueError, match="'topk' backend"):
        calibrate(model, _ids(64), base=KNNConfig(k=4, backend="tail"), progress=False)
    with pytest.raises(ValueError, match=r"in \(0, 100\]"):
        calibrate(model, _ids(64), budget=0, progress=False)
    with pytest.raises(ValueError, match="raise it"):
        calibrate(model, _ids(200), budget=1, progress=False)  # 2 keys: below 4 sinks + 8 window
    with pytest.raises(ValueError, match=r"a batch \(B, n\)"):
        calibrate(model, _ids(64).reshape(1, 1, 64), progress=False)


def test_a_base_layer_k_is_a_floor(model):
    n = 160
    base = BASE.replace(layer_k={3: 100})
    result = calibrate(model, _ids(n), budget=25, base=base, queries=32, progress=False)
    assert result["rows"][3]["k"] >= 100 and min(result["rows"][3]["curve"]) == 100
    assert result["keys_read"] <= 25 / 100 * n


def test_layers_the_base_leaves_dense_count_all_they_see(model):
    n = 160
    base = BASE.replace(layers=(1, 3))
    result = calibrate(model, _ids(n), budget=50, base=base, queries=32, progress=False)
    assert [r["layer"] for r in result["rows"]] == [1, 3]
    assert result["keys_read"] <= 50 / 100 * n and result["config"].layers == (1, 3)


def test_texts_calibrated_together_pool_their_errors(model):
    a, b = _ids(128, seed=8), _ids(128, seed=9)
    apart = [measure(model, ids, queries=32, progress=False)["layers"] for ids in (a, b)]
    pooled = measure(model, torch.cat([a, b]), queries=32, progress=False)["layers"]
    spread = 0
    for row, row_a, row_b in zip(pooled, *apart, strict=True):
        for e, ea, eb in zip(row["errors"], row_a["errors"], row_b["errors"], strict=True):
            assert min(ea, eb) - 1e-6 <= e <= max(ea, eb) + 1e-6, "one error over both texts' outputs"
            spread = max(spread, abs(ea - eb))
    assert spread > 1e-3, "the texts differ, so pooling is tested"


def test_the_table_names_every_layer(model):
    result = calibrate(model, _ids(128), budget=30, queries=32, progress=False)
    console = Console(record=True, width=120)
    print_calibration(result, console=console)
    text = console.export_text()
    assert "sliding" in text and "global" in text and f"{result['rows'][-1]['error']:.4f}" in text


def test_the_frontier_calibrates_on_its_held_out_text(model):
    with pytest.raises(ValueError, match="calibration text"):
        frontier_settings(["calibrated"], [20], 128, model.config)
    docs = [("a", _ids(128, 2)[0].tolist()), ("b", _ids(128, 3)[0].tolist())]
    result = run_frontier(
        model,
        docs,
        max_length=128,
        budgets=[25, 100],
        methods=["calibrated"],
        progress=False,
        calibration_texts=[_ids(140, 4)[0].tolist()],
    )
    low, full = result["rows"]
    assert low["keys_percent"] <= 25 and full["ratio_to_dense"] == pytest.approx(1.0, abs=1e-4)
    assert math.isfinite(low["ratio_to_dense"])
    asked = []
    frontier_settings(
        ["calibrated+first"], [2], 128, model.config, lambda m, b: asked.append((m, b)) or KNNConfig(k=1)
    )
    assert asked == [("calibrated+first", 2)]
    sampled = run_frontier(
        model,
        docs[:1],
        max_length=128,
        budgets=[40],
        methods=["calibrated+first+samples"],
        progress=False,
        calibration_texts=[_ids(140, 4)[0].tolist()],
    )
    (row,) = sampled["rows"]
    config = KNNConfig.from_dict(sampled["settings"][1]["config"])
    assert config.backend_options["samples"] == {"0": 32} and config.resolve_k(128, 0) >= math.ceil(128**0.67)
    assert row["keys_percent"] <= 40 and math.isfinite(row["ratio_to_dense"])


@pytest.mark.slow
def test_knn_patch_calibrate_writes_a_settings_file_that_eval_reads(tmp_path, capsys):
    from knn_patch.cli import main

    out = tmp_path / "cal"
    main(["calibrate", "--tokens", "256", "--budget", "20", "--queries", "64", "--layer-k", "{0: 100}",
          "--samples", "{0: 8}", "--documents", "2", "--out", str(out)])  # fmt: skip
    saved = json.loads((out / "calibration.json").read_text())
    assert saved["n"] == 256 and saved["keys_read"] <= 0.2 * 256 and len(saved["rows"]) == 30
    assert len(set(saved["documents"])) == 2
    assert saved["rows"][0]["k"] >= 100, "--layer-k is a floor"
    assert saved["config"]["backend_options"] == {"rest": "mean", "samples": {"0": 8}}
    (entry,) = yaml.safe_load((out / "settings.yaml").read_text())
    assert KNNConfig.from_dict(entry) == KNNConfig.from_dict(saved["config"])
    assert "k per layer" in capsys.readouterr().out
    main(["eval", "--settings", str(out / "settings.yaml"), "--max-docs", "1", "--min-tokens", "256",
          "--max-tokens", "256", "--max-length", "256", "--out", str(tmp_path / "eval")])  # fmt: skip
    result = json.loads((tmp_path / "eval" / "perplexity.json").read_text())
    assert result["settings"][1]["keys_read_at_max_length"] == pytest.approx(saved["keys_read"])
    with pytest.raises(ValueError, match="lower --tokens, --document or --documents"):
        main(["calibrate", "--tokens", "256", "--document", "100000", "--out", str(out)])


@pytest.mark.slow
def test_the_frontier_calibrates_on_documents_it_does_not_score(tmp_path):
    from knn_patch.cli import main

    out = tmp_path / "frontier"
    main(["frontier", "--max-length", "256", "--max-docs", "1", "--calibration-docs", "2", "--budgets", "20",
          "--methods", "calibrated", "--out", str(out)])  # fmt: skip
    result = json.loads((out / "frontier.json").read_text())
    scored = [d["name"] for d in result["documents"]]
    assert len(scored) == 1 and len(set(result["calibration_documents"])) == 2
    assert not set(scored) & set(result["calibration_documents"])
    with pytest.raises(ValueError, match="--calibration-docs is a count"):
        main(["frontier", "--methods", "calibrated", "--calibration-docs", "0", "--out", str(out)])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--budget", "0"], "budget is a share"),
        (["--budget", "101"], "budget is a share"),
        (["--tokens", "1"], "--tokens >= 2"),
        (["--document", "-1"], "--document >= 0"),
        (["--documents", "0"], "--documents >= 1"),
        (["--layer-k", "{0: -3}"], r"layer_k\[0\]"),
        (["--layer-k", "[1, 2]"], "dict of layer index"),
        (["--samples", "-2"], "samples"),
    ],
)
def test_bad_calibrate_flags_fail_before_the_model_loads(tmp_path, monkeypatch, args, match):
    from knn_patch import cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ValueError, match=match):
        cli.main(["calibrate", *args, "--out", str(tmp_path)])
