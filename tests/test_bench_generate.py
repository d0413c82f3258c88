"""The whole-model generation benchmark on a tiny random model: what it measures, its files, resuming
(no timing assertions)."""

import json

import pytest
import torch
from tiny_models import tiny_model

from knn_patch import load_tokenizer
from knn_patch.bench.generate import knn_config, print_table, run_generation_benchmark, write_results
from knn_patch.cli import main

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny llama with the embedded tokenizer's vocabulary, saved with that tokenizer: the CLI can
    load both by folder, as it loads a real model."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model("llama", vocab_size=49152).save_pretrained(folder)
    load_tokenizer("default").save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(3, 128, (80,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def result(model_dir, prompt):
    """Every setting with k beyond the prompt and the decoded tokens: kNN is then exact attention."""
    options = dict(k=256, sink_tokens=2, local_window=4, backend_options={"index": "flat"})
    configs = {name: knn_config(name, **options) for name in ("dense", "faiss", "topk")}
    return run_generation_benchmark(model_dir, prompt, configs, decode_steps=6, isolate=False, progress=False)


def test_k_beyond_the_context_generates_what_dense_generates(result):
    assert result["prompt_tokens"] == 80 and result["decode_steps"] == 6
    rows = result["settings"]
    assert list(rows) == ["dense", "faiss", "topk"]
    assert rows["faiss"]["name"] == "faiss k=256 sinks=2 window=4 index=flat"
    assert rows["topk"]["config"]["backend_options"] == {}, "faiss options are the faiss setting's only"
    for row in rows.values():
        assert len(row["tokens"]) == 7  # the prefill's token, then one per decode step
        assert row["tokens"] == rows["dense"]["tokens"] and row["agree_with_dense"] == 7
        assert row["prefill_s"] > 0 and row["decode_s"] > 0
        assert row["decode_tokens_per_s"] == pytest.approx(6 / row["decode_s"])
        assert row["peak_rss_bytes"] > 0 and row["added_bytes"] >= 0  # RSS grows in pages: maybe none
        for key, ratio in row["ratio_to_dense"].items():
            if row[key]:
                assert ratio == pytest.approx(row[key] / rows["dense"][key])


def test_table_and_files(result, tmp_path, capsys):
    print_table(result)
    text = capsys.readouterr().out
    assert "faiss k=256 sinks=2 window=4 index=flat" in text and "× decode" in text and "7/7" in text
    paths = write_results(result, tmp_path / "out")
    saved = json.loads(paths["json"].read_text())
    assert saved["settings"] == result["settings"] and {"torch", "cpu_model", "loadavg"} <= set(
        saved["machine"]
    )
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["generate.json", "generate.png"]


def test_each_setting_in_a_fresh_process(model_dir, prompt):
    """The default: a spawned process per setting, whose memory peak is its own."""
    run = run_generation_benchmark(model_dir, prompt, {"dense": None}, decode_steps=2, progress=False)
    row = run["settings"]["dense"]
    assert row["peak_rss_bytes"] > row["added_bytes"] >= 0 and len(row["tokens"]) == 3


def test_command_writes_results_and_resumes(model_dir, tmp_path, capsys):
    text = tmp_path / "prompt.txt"
    text.write_text("Four score and seven years ago our fathers brought forth on this continent. " * 20)
    out = tmp_path / "out"
    args = ["bench", "generate", "--model", model_dir, "--dataset", str(text), "--tokens", "64",
            "--decode-steps", "3", "--k", "8", "--in-process", "--out", str(out)]  # fmt: skip
    main([*args, "--methods", "dense"])
    first = json.loads((out / "generate.json").read_text())
    assert first["prompt"] == "prompt.txt" and first["prompt_tokens"] == 64
    assert first["args"]["sink_tokens"] == 4 and first["args"]["local_window"] == 64  # the defaults
    assert not (out / "generate.partial.json").exists()
    (out / "generate.json").rename(out / "generate.partial.json")  # as if stopped after dense
    main([*args, "--methods", "dense,topk", "--resume"])
    resumed = json.loads((out / "generate.json").read_text())
    assert list(resumed["settings"]) == ["dense", "topk"]
    assert resumed["settings"]["dense"]["prefill_s"] == first["settings"]["dense"]["prefill_s"], "not rerun"
    assert resumed["settings"]["topk"]["name"] == "topk k=8 sinks=4 window=64"
    assert "topk k=8 sinks=4 window=64" in capsys.readouterr().out
    (out / "generate.json").rename(out / "generate.partial.json")
    with pytest.raises(ValueError, match="Cannot resume: k differ"):
        main([*args[:-2], "--k", "16", "--out", str(out), "--resume"])


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--methods", "dense,sdpa"], "Unknown setting 'sdpa'"),
        (["--k", "0"], "KNNConfig.k"),
        (["--backend-options", '{"nprobe": 0}'], "nprobe"),
    ],
)
def test_bad_settings_fail_before_any_work(tmp_path, args, error, monkeypatch):
    import knn_patch.loading as loading

    monkeypatch.setattr(loading, "load_tokenizer", lambda *a, **k: pytest.fail("the tokenizer was loaded"))
    with pytest.raises(ValueError, match=error):
        main(["bench", "generate", *args, "--out", str(tmp_path)])
