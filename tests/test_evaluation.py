"""Dense against kNN on the same windows: totals, exact counts, restored model state, reports."""

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from rich.console import Console
from tiny_models import tiny_model

import knn_patch
from knn_patch import KNNConfig
from knn_patch.eval.evaluation import (
    environment,
    evaluate_perplexity,
    keys_read,
    print_report,
    setting_name,
    write_report,
)
from knn_patch.eval.perplexity import document_nll, windows


@pytest.fixture(scope="module")
def docs():
    gen = torch.Generator().manual_seed(0)
    return [
        ("a", torch.randint(3, 128, (40,), generator=gen).tolist()),
        ("b", torch.randint(3, 128, (17,), generator=gen).tolist()),
    ]


def test_dense_totals_match_the_per_document_computation_and_k_at_least_n_matches_dense(docs):
    model = tiny_model("llama")
    result = evaluate_perplexity(
        model, docs, [KNNConfig(k=16), KNNConfig(k=2)], max_length=16, stride=8, progress=False
    )
    want = [document_nll(model, torch.tensor(ids), 16, 8) for _, ids in docs]
    assert [d["tokens"] for d in result["documents"]] == [n for _, n in want] == [39, 16]
    dense = result["totals"]["dense"]
    assert dense["tokens"] == 55 and dense["nll"] == pytest.approx(sum(v for v, _ in want), rel=1e-6)
    assert dense["perplexity"] == pytest.approx(math.exp(dense["nll"] / 55))
    assert result["totals"]["topk k=16"]["nll"] == pytest.approx(dense["nll"], rel=1e-6)  # k >= max_length
    assert result["totals"]["topk k=2"]["ratio_to_dense"] != 1.0
    assert not knn_patch.is_patched(model), "the model is left as it was found"


def test_a_patched_model_keeps_its_config(docs):
    model = knn_patch.patch(tiny_model("llama"), k=5)
    evaluate_perplexity(model, docs[:1], [KNNConfig(k=2)], max_length=16, stride=16, progress=False)
    assert knn_patch.get_config(model) == KNNConfig(k=5)


def test_bad_input_is_rejected_early(docs):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="positions"):
        evaluate_perplexity(model, docs, [], max_length=10_000, stride=16, progress=False)
    with pytest.raises(ValueError, match="No documents"):
        evaluate_perplexity(model, [], [], max_length=16, stride=16, progress=False)
    with pytest.raises(ValueError, match="differ"):
        evaluate_perplexity(
            model, docs, [KNNConfig(k=2), KNNConfig(k=2)], max_length=16, stride=16, progress=False
        )


def test_reports(docs, tmp_path):
    model = tiny_model("llama")
    result = evaluate_perplexity(
        model, docs, [KNNConfig(k=2), KNNConfig(k="sqrt")], max_length=16, stride=16, progress=False
    )
    console = Console(record=True, width=140)
    print_report(result, "tiny", console=console)
    text = console.export_text()
    assert "dense" in text and "topk k=sqrt" in text and "× dense" in text
    paths = write_report(result, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["totals"].keys() == result["totals"].keys()
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "evaluate",
        "perplexity.json",
        "perplexity.png",
    ]
    record = json.loads(paths["evaluate"].read_text())  # the evaluate.save record of this run
    assert paths["evaluate"].parent == tmp_path / "out" / "evaluate" and record["_evaluate_version"]
    assert record["perplexity"] == {name: t["perplexity"] for name, t in result["totals"].items()}


def _result(points: list[tuple[int, int, int, float]]) -> dict:
    """A saved result's plotted part: (k, sinks, window, ratio to dense) per kNN setting at n = 2048."""
    settings, totals = [{"name": "dense", "config": None}], {"dense": {"ratio_to_dense": 1.0}}
    for k, sinks, window, ratio in points:
        config = KNNConfig(k=k, sink_tokens=sinks, local_window=window).to_dict()
        name = setting_name(KNNConfig.from_dict(config))
        settings.append({"name": name, "config": config, "keys_read_at_max_length": sinks + window + k})
        totals[name] = {"ratio_to_dense": ratio}
    return {"max_length": 2048, "settings": settings, "totals": totals}


def test_the_plot_labels_each_points_keys_and_round_ratios_on_log_axes(tmp_path, monkeypatch):
    """Plain numbers at the keys the points read, none overlapping; a 9x point neither flattens the
    ratios near 1 (log y) nor goes unlabelled (the axis ends on a round ratio)."""
    import matplotlib.pyplot as plt

    from knn_patch.eval.evaluation import _plot_ratios

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    _plot_ratios(_result([(3, 0, 0, 9.1), (16, 0, 0, 1.8), (46, 0, 0, 1.3), (64, 0, 0, 1.15),
                          (16, 4, 64, 1.04), (32, 4, 64, 1.02)]), tmp_path / "plot.png")  # fmt: skip
    ((ax,),) = [fig.axes for fig in figures]
    assert ax.get_xscale() == ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["3", "16", "46", "64", "84", "100"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "1.2", "1.5", "2", "3", "5", "10"]
    assert not [t for t in ax.get_xticklabels(minor=True) + ax.get_yticklabels(minor=True) if t.get_text()]
    _plot_ratios(_result([(16, 0, 0, 1.008), (32, 0, 0, 1.003), (64, 0, 0, 0.995)]), tmp_path / "near.png")
    assert [t.get_text() for t in figures[1].axes[0].get_yticklabels()] == ["0.99", "1", "1.01"]


def test_environment_records_versions_and_what_timings_depend_on():
    env = environment("cpu")
    assert {"knn_patch", "git", "torch", "transformers", "python", "platform", "cpu_model"} <= set(env)
    assert env["threads"] == torch.get_num_threads() and env["cpu_count"] and "loadavg" in env
    assert env["device"] == "cpu" and env["cuda"] is None  # a CPU run on a GPU machine names no GPU


def test_decode_mode_equals_sliding_mode(docs):
    """Exact top-k is per query and causal, so token-by-token decoding through the cache scores
    exactly what one sliding forward scores, dense or kNN; only a dense prefill changes kNN."""
    model = tiny_model("llama")
    configs = [KNNConfig(k=16), KNNConfig(k=2)]
    sliding = evaluate_perplexity(model, docs, configs, max_length=16, stride=8, progress=False)
    decode = evaluate_perplexity(model, docs, configs, max_length=16, stride=8, mode="decode", progress=False)
    for name in ("dense", "topk k=16"):  # k >= max_length: kNN decode is dense decode
        assert decode["totals"][name]["tokens"] == sliding["totals"][name]["tokens"] == 55
        assert decode["totals"][name]["nll"] == pytest.approx(sliding["totals"]["dense"]["nll"], rel=1e-5)
    assert decode["mode"] == "decode"
    assert decode["totals"]["topk k=2"]["nll"] == pytest.approx(
        sliding["totals"]["topk k=2"]["nll"], rel=1e-5
    )


def test_dense_prefill_changes_only_the_prefix_attention(docs):
    model = tiny_model("llama")
    args = dict(max_length=16, stride=4, mode="decode", progress=False)
    knn_prefill = evaluate_perplexity(model, docs, [KNNConfig(k=2)], **args)
    dense_prefill = evaluate_perplexity(model, docs, [KNNConfig(k=2)], dense_prefill=True, **args)
    assert dense_prefill["totals"]["dense"]["nll"] == pytest.approx(knn_prefill["totals"]["dense"]["nll"])
    assert dense_prefill["totals"]["topk k=2"]["nll"] != knn_prefill["totals"]["topk k=2"]["nll"]
    with pytest.raises(ValueError, match="mode"):
        evaluate_perplexity(model, docs, [], max_length=16, stride=4, mode="greedy", progress=False)


def test_score_from_and_shared_dense_prefill(docs):
    """The tail score equals the explicit per-token NLL of positions >= score_from given their
    window's context; a dense prefill shared by all settings gives dense decode for k >= n."""
    model = tiny_model("llama")
    args = dict(max_length=16, stride=16, score_from=12, progress=False)
    sliding = evaluate_perplexity(model, docs, [KNNConfig(k=16)], **args)
    want, count = 0.0, 0
    for _, ids in docs:
        ids = torch.tensor(ids)
        for begin, end, first in windows(len(ids), 16, 16, 12):
            for t in range(first, end):
                log_probs = model(input_ids=ids[begin:t].unsqueeze(0)).logits[0, -1].log_softmax(-1)
                want, count = want - log_probs[ids[t]].item(), count + 1
    # doc a: 12..15, 17..31, 33..39 (16 and 32 start new chunks); doc b: 12..15
    assert sliding["totals"]["dense"]["tokens"] == count == 4 + 15 + 7 + 4
    assert sliding["totals"]["dense"]["nll"] == pytest.approx(want, rel=1e-5)
    decode = evaluate_perplexity(model, docs, [KNNConfig(k=16)], mode="decode", dense_prefill=True, **args)
    for name in ("dense", "topk k=16"):
        assert decode["totals"][name]["nll"] == pytest.approx(want, rel=1e-5)
    assert decode["shared_prefill_seconds"] > 0
    with pytest.raises(ValueError, match="score_from"):
        evaluate_perplexity(model, docs, [], max_length=16, stride=16, score_from=40, progress=False)


def test_progress_after_each_document(docs):
    model = tiny_model("llama")
    seen = []
    final = evaluate_perplexity(
        model, docs, [KNNConfig(k=2)], max_length=16, stride=16, progress=False, on_document=seen.append
    )
    assert [len(r["documents"]) for r in seen] == [1, 2]
    first = seen[0]["totals"]["topk k=2"]
    assert first["tokens"] == final["documents"][0]["tokens"]
    assert first["nll"] == pytest.approx(final["documents"][0]["nll"]["topk k=2"])
    assert seen[1]["totals"] == final["totals"]


def test_resume_from_a_partial_result(docs):
    model = tiny_model("llama")
    args = dict(max_length=16, stride=8, progress=False)
    seen = []
    full = evaluate_perplexity(model, docs, [KNNConfig(k=2)], on_document=seen.append, **args)
    again = []
    resumed = evaluate_perplexity(
        model, docs, [KNNConfig(k=2)], resume_from=seen[0], on_document=again.append, **args
    )
    assert len(again) == 1, "only the unfinished document is scored"
    assert resumed["documents"] == full["documents"]
    assert {n: t["nll"] for n, t in resumed["totals"].items()} == {
        n: t["nll"] for n, t in full["totals"].items()
    }
    with pytest.raises(ValueError, match=r"differs.*stride"):
        evaluate_perplexity(model, docs, [KNNConfig(k=2)], resume_from=seen[0], max_length=16, stride=16)
    with pytest.raises(ValueError, match=r"differs.*settings"):
        evaluate_perplexity(model, docs, [KNNConfig(k=3)], resume_from=seen[0], **args)
    with pytest.raises(ValueError, match="document 0"):
        evaluate_perplexity(model, docs[::-1], [KNNConfig(k=2)], resume_from=seen[0], **args)


def test_setting_names_show_everything_that_changes_attention():
    assert setting_name(None) == "dense"
    assert setting_name(KNNConfig(k=32)) == "topk k=32"
    assert setting_name(KNNConfig(k=32, sink_tokens=4, local_window=64)) == "topk k=32 sinks=4 window=64"
    assert setting_name(KNNConfig(k="sqrt", layers=[5, 0, 1, 2])) == "topk k=sqrt layers=0-2,5"
    assert setting_name(KNNConfig(k=32, layers="global")) == "topk k=32 layers=global"
    faiss = KNNConfig(k=32, backend="faiss", sink_tokens=4, backend_options={"index": "hnsw"})
    assert setting_name(faiss) == "faiss k=32 sinks=4 index=hnsw"
    distinct = [
        KNNConfig(k=32),
        KNNConfig(k=32, sink_tokens=4),
        KNNConfig(k=32, local_window=4),
        KNNConfig(k=32, layers=[0]),
        KNNConfig(k=32, layers=[0, 1]),
        KNNConfig(k=32, layers="global"),
        KNNConfig(k=32, backend="faiss"),
        KNNConfig(k=32, backend="faiss", backend_options={"index": "hnsw"}),
        KNNConfig(k=32, backend="tail", backend_options={"m": 8}),
        KNNConfig(k=32, layer_k={0: 256}),
        KNNConfig(k=32, layer_k={0: 256, 1: 64}),
    ]
    assert len({setting_name(c) for c in distinct}) == len(distinct)


def test_keys_read_counts_sinks_window_k_and_samples():
    config = KNNConfig(k=32, sink_tokens=4, local_window=64)
    assert keys_read(config, 8192) == 100 and 100 * keys_read(config, 8192) / 8192 == pytest.approx(
        1.22, abs=0.01
    )
    assert keys_read(config, 50) == 50, "never more than the keys there are"
    assert keys_read(None, 8192) == 8192
    assert keys_read(KNNConfig(k="sqrt", sink_tokens=4), 1024) == 32 + 4
    assert keys_read(KNNConfig(k=16, backend="tail", backend_options={"m": 8}), 1024) == 24
    assert keys_read(KNNConfig(k=16, backend="tail"), 1024) == 16 + 32  # the default m
    assert keys_read(config.replace(backend_options={"rest": "mean"}), 8192) == 101, "the rest's mean is one"
    assert keys_read(config.replace(backend_options={"rest": "mean", "samples": 8}), 8192) == 109


def test_keys_read_with_a_model_config_averages_its_layers():
    """Dense layers read all they see (a sliding layer its window); kNN layers their own k."""
    cfg = transformers.Gemma3TextConfig(
        num_hidden_layers=4, sliding_window=100, layer_types=["sliding_attention"] * 3 + ["full_attention"]
    )
    assert keys_read(None, 1000, cfg) == (3 * 100 + 1000) / 4
    config = KNNConfig(k=8, sink_tokens=2, layer_k={0: 40})
    assert keys_read(config, 1000, cfg) == (40 + 2 + 3 * (8 + 2)) / 4
    assert keys_read(config.replace(layers="global"), 1000, cfg) == (3 * 100 + 8 + 2) / 4
    assert keys_read(config.replace(k=500), 1000, cfg) == (42 + 100 + 100 + 502) / 4, (
        "a layer reads what it sees"
    )
    sampled = config.replace(backend_options={"rest": "mean", "samples": {3: 16}})
    assert keys_read(sampled, 1000, cfg) == (43 + 3 * 11 + 16) / 4, "samples count in their layer only"


def test_the_report_counts_every_key_a_query_reads(docs, tmp_path):
    model = tiny_model("llama")
    config = KNNConfig(k=2, sink_tokens=1, local_window=2)
    result = evaluate_perplexity(model, docs, [config], max_length=16, stride=16, progress=False)
    dense, knn = result["settings"]
    assert knn["name"] == "topk k=2 sinks=1 window=2" and knn["k_at_max_length"] == 2
    assert knn["keys_read_at_max_length"] == 5 and knn["keys_percent_at_max_length"] == 100 * 5 / 16
    assert dense["keys_read_at_max_length"] == 16 and dense["keys_percent_at_max_length"] == 100
    console = Console(record=True, width=140)
    print_report(result, "tiny", console=console)
    row = next(line for line in console.export_text().splitlines() if line.strip().startswith("topk"))
    assert row.split()[4:7] == ["2", "5.0", "31.2"]  # k, keys, keys %
    saved = json.loads(write_report(result, tmp_path)["json"].read_text())
    assert saved["settings"][1]["keys_read_at_max_length"] == 5
    del saved["settings"][1]["keys_read_at_max_length"]  # a result saved before keys were recorded
    console = Console(record=True, width=140)
    print_report(saved, "old", console=console)
    assert "31.2" in console.export_text()


def _not_a_checkout(tmp_path, monkeypatch):
    """Work from tmp_path, where git finds no repository (it stops looking above tmp_path)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))


def test_environment_and_report_are_silent_outside_a_git_checkout(docs, tmp_path, monkeypatch, capfd):
    result = evaluate_perplexity(
        tiny_model("llama"), docs, [KNNConfig(k=2)], max_length=16, stride=16, progress=False
    )
    _not_a_checkout(tmp_path, monkeypatch)
    capfd.readouterr()
    env = environment()
    paths = write_report(result, tmp_path / "out")
    err = capfd.readouterr().err  # file descriptor 2: what git's child processes print too
    assert "fatal" not in err and "git" not in err, err
    record = json.loads(paths["evaluate"].read_text())
    assert record["_git_commit_hash"] == (env["git"] and env["git"]["commit"]), (
        "knn_patch's commit, not the cwd's"
    )


def test_the_commit_is_knn_patchs_own_in_its_checkout():
    top = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=Path(knn_patch.__file__).parent,
                         capture_output=True, text=True)  # fmt: skip
    if top.returncode or Path(top.stdout.split()[0]) != Path(knn_patch.__file__).resolve().parents[1]:
        pytest.skip("knn_patch is not run from its own git checkout")
    assert environment()["git"]["commit"] == top.stdout.split()[1]


def test_no_git_executable_is_no_error(docs, tmp_path, monkeypatch, capfd):
    result = evaluate_perplexity(
        tiny_model("llama"), docs, [KNNConfig(k=2)], max_length=16, stride=16, progress=False
    )
    _not_a_checkout(tmp_path, monkeypatch)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git there
    assert environment()["git"] is None
    paths = write_report(result, tmp_path / "out")  # evaluate.save alone would raise FileNotFoundError
    assert json.loads(paths["evaluate"].read_text())["_git_commit_hash"] is None
    assert capfd.readouterr().err == ""
