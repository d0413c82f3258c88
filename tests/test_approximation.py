"""The approximation report at its quick size: every part runs on a tiny model and real files appear."""

import json

import pytest
import torch
from tiny_models import tiny_model

from knn_patch.bench import approximation
from knn_patch.bench.activations import capture_activations


def test_quick_report_runs_every_part_and_writes_json_and_plots(tmp_path):
    model = tiny_model("llama")
    document = ("random", torch.randint(3, 128, (64,), generator=torch.Generator().manual_seed(0)).tolist())
    report = approximation.run_report(model, document, size="quick", progress=False)
    approximation.print_tables(report)
    paths = approximation.write_outputs(report, tmp_path)
    assert set(paths) == {"json", *approximation.PARTS}
    assert all(p.stat().st_size > 0 for p in paths.values())
    saved = json.loads(paths["json"].read_text())
    assert {r["method"] for r in saved["synthetic"]["rows"]} == {"topk", "tail", "gumbel"}
    assert all(f"{m}_error" in saved["activations"]["rows"][0] for m in approximation.ESTIMATORS)
    layers = {r["layer"] for r in saved["activations"]["rows"]}
    assert layers == {0, 1}  # the tiny model's two layers
    for r in saved["activations"]["rows"]:
        assert 0 < r["topk_mass"] <= 1 + 1e-6
    assert len(saved["gradients"]["rows"]) == 3 and set(saved["gradients"]["slopes"]) == {"dq", "dk", "dv"}
    assert {r["method"] for r in saved["quality"]["rows"]} == {"topk", "tail", "gumbel", "sinks+window+topk"}
    assert not model.config.to_dict().get("knn_attention"), "the model is left unpatched"


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_activation_error_is_zero_when_the_budget_covers_every_key(family):
    """Gemma 3's sliding layers (window 8 of 24 tokens here) are measured under their own window."""
    model = tiny_model(family)
    layers = capture_activations(model, torch.arange(3, 27).view(1, 24))
    methods = ("topk", "topk+mean", "tail")
    rows = approximation.activation_errors(
        layers, budgets=(64,), methods=methods, progress=False, model_config=model.config
    )
    assert [r["global"] for r in rows] == ([True, True] if family == "llama" else [False, True])
    for r in rows:
        assert r["topk_mass"] == pytest.approx(1.0)
        assert all(r[f"{m}_error"] < 1e-5 for m in methods)
    small = approximation.activation_errors(
        layers, budgets=(4,), methods=methods, progress=False, model_config=model.config
    )
    assert all(r["topk_error"] > 1e-3 for r in small), "a budget below the window does cut"


def test_capturing_chosen_layers_of_a_base_model_stops_after_the_last_and_restores_it(monkeypatch):
    model = tiny_model("llama")
    ids = torch.arange(3, 27).view(1, 24)
    everything = capture_activations(model, ids)
    ran = []
    last = model.model.layers[-1]
    monkeypatch.setattr(last, "forward", lambda *a, **k: ran.append(1) or type(last).forward(last, *a, **k))
    first = capture_activations(model.model, ids, layers=iter([0]))  # any iterable
    assert set(first) == {0} and not ran, "layer 1 was run although only layer 0 is recorded"
    assert len(model.model.layers) == 2
    for name in ("q", "k", "v"):
        torch.testing.assert_close(first[0][name], everything[0][name])


def test_gradient_error_slope_is_about_minus_one_half():
    res = approximation.gradient_errors(
        n=32, heads=1, head_dim=8, k=4, samples=(16, 256, 4096), seeds=2, progress=False
    )
    for name, slope in res["slopes"].items():
        assert -0.7 < slope < -0.3, (name, slope)


def test_bad_parts_and_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="Unknown report parts"):
        approximation.run_report(None, None, parts=["synthetic", "speed"])
    with pytest.raises(ValueError, match="size="):
        approximation.run_report(None, None, parts=["synthetic"], size="huge")
    with pytest.raises(ValueError, match="need a model"):
        approximation.run_report(None, None, parts=["quality"])
