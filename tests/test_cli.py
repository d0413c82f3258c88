"""`knn-patch demo` and `knn-patch eval` end to end on the embedded model and bundled corpus."""

import json
import os
import subprocess
import sys

import datasets
import pytest

from knn_patch.cli import main

pytestmark = pytest.mark.slow


def test_eval_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "eval"
    main(["eval", "--max-docs", "2", "--min-tokens", "300", "--max-tokens", "300", "--max-length", "128",
          "--stride", "64", "--k", "4,sqrt", "--out", str(out)])  # fmt: skip
    result = json.loads((out / "perplexity.json").read_text())
    assert [s["name"] for s in result["settings"]] == ["dense", "topk k=4", "topk k=sqrt"]
    assert len(result["documents"]) == 2 and all(d["tokens"] == 299 for d in result["documents"])
    assert result["totals"]["dense"]["tokens"] == 598 and result["environment"]["torch"]
    assert (out / "perplexity.png").exists() and not (out / "perplexity.partial.json").exists()
    assert "topk k=4" in capsys.readouterr().out
    main(["report", str(out / "perplexity.json")])  # the table again, from the saved result
    table = capsys.readouterr().out
    assert "topk k=sqrt" in table and f"{result['totals']['topk k=4']['perplexity']:.3f}" in table


def test_demo_is_eval_with_demo_defaults(tmp_path):
    main(["demo", "--max-docs", "2", "--min-tokens", "256", "--max-tokens", "256", "--max-length", "128",
          "--k", "4", "--out", str(tmp_path)])  # fmt: skip
    result = json.loads((tmp_path / "perplexity.json").read_text())
    assert len(result["documents"]) == 2 and result["totals"]["dense"]["tokens"] == 2 * 254
    assert result["totals"]["topk k=4"]["ratio_to_dense"] > 0 and (tmp_path / "perplexity.png").exists()
    assert len(list((tmp_path / "evaluate").glob("result-*.json"))) == 1


def test_unwritable_output_fails_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="not writable"):
        main(["eval", "--out", str(blocker / "out")])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--stride", "0"], r"--stride must be in \[1, --max-length=2048\], got 0"),  # 0 is not "not given"
        (["--stride", "-4"], r"--stride .* got -4"),
        (["--max-length", "64", "--stride", "65"], r"--stride must be in \[1, --max-length=64\], got 65"),
        (["--max-length", "0"], r"--max-length must be >= 1, got 0"),
        (["--join-to", "1"], r"--join-to must be >= 2 tokens, got 1"),
    ],
)
def test_bad_windows_fail_before_the_model_loads(tmp_path, args, match, monkeypatch):
    import knn_patch.cli as cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=match):
        main(["eval", *args, "--out", str(tmp_path)])


def test_eval_decode_mode_with_dense_prefill(tmp_path):
    main(["eval", "--max-docs", "1", "--min-tokens", "100", "--max-tokens", "100", "--max-length", "64",
          "--k", "4", "--mode", "decode", "--dense-prefill", "--out", str(tmp_path)])  # fmt: skip
    result = json.loads((tmp_path / "perplexity.json").read_text())
    assert result["mode"] == "decode" and result["dense_prefill"] is True
    assert result["totals"]["dense"]["tokens"] == 98


def test_eval_passes_backend_options_and_rejects_bad_ones_before_loading(tmp_path, capsys):
    main(["eval", "--max-docs", "1", "--min-tokens", "100", "--max-tokens", "100", "--max-length", "64",
          "--k", "4", "--backend", "faiss", "--backend-options", '{"index": "hnsw", "block_size": 16}',
          "--out", str(tmp_path)])  # fmt: skip
    settings = json.loads((tmp_path / "perplexity.json").read_text())["settings"]
    (setting,) = [s for s in settings if s["config"]]
    assert setting["config"]["backend_options"] == {"index": "hnsw", "block_size": 16}
    with pytest.raises(SystemExit):
        main(["eval", "--backend-options", "[1]", "--out", str(tmp_path)])
    assert "is not a JSON object" in capsys.readouterr().err
    with pytest.raises(ValueError, match="nprobe"):  # the config fails before any model loads
        main(["eval", "--backend", "faiss", "--backend-options", '{"nprobe": 0}', "--out", str(tmp_path)])


def test_the_command_reports_bad_input_in_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    run = subprocess.run([sys.executable, "-m", "knn_patch.cli", "eval", "--out", str(blocker / "out")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("knn-patch: error: Output folder")


def test_eval_from_outside_a_checkout_joins_speeches_and_names_settings_fully(tmp_path):
    """As a user runs it, from a folder that is no git checkout: nothing from git on stderr, the joined
    document lists its parts and their token spans, the setting names its sinks and window, and the
    keys a query reads count them."""
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path.parent), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "knn_patch.cli", "eval", "--max-docs", "1", "--join-to", "2000",
         "--max-tokens", "2000", "--max-length", "256", "--k", "4", "--sink-tokens", "2",
         "--local-window", "8", "--out", "out"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "fatal" not in run.stderr and "not a git repository" not in run.stderr, run.stderr
    result = json.loads((tmp_path / "out" / "perplexity.json").read_text())
    (document,) = result["documents"]
    assert document["name"] == "1790-Washington-1.txt[0:1275] + 1790-Washington-2.txt[1276:2000]"
    assert document["tokens"] == 2000 - 8 and result["args"]["join_to"] == 2000  # 8 windows: 8 unscored
    assert [s["name"] for s in result["settings"]] == ["dense", "topk k=4 sinks=2 window=8"]
    assert result["settings"][1]["keys_read_at_max_length"] == 2 + 8 + 4
    assert "topk k=4 sinks=2 window=8" in run.stdout and f"{100 * 14 / 256:.1f}" in run.stdout


def test_eval_on_a_parquet_file_shaped_like_pg19(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))  # a throwaway
    path = tmp_path / "pg19.parquet"
    story = "It was a dark and stormy night; the rain fell in torrents. " * 8
    rows = {"short_book_title": ["A Night", "Two Nights"], "publication_date": [1900, 1901]}
    rows.update(
        url=["http://www.gutenberg.org/ebooks/1", "http://www.gutenberg.org/ebooks/2"], text=[story] * 2
    )
    datasets.Dataset.from_dict(rows).to_parquet(str(path))
    main(["eval", "--dataset", str(path), "--name-column", "short_book_title", "--max-length", "64",
          "--k", "4", "--out", str(tmp_path / "out")])  # fmt: skip
    result = json.loads((tmp_path / "out" / "perplexity.json").read_text())
    assert [d["name"] for d in result["documents"]] == ["A Night", "Two Nights"]


def test_every_settings_file_in_the_repo_parses(tmp_path):
    import argparse
    from pathlib import Path

    from knn_patch.cli import _eval_arguments, _settings

    parser = argparse.ArgumentParser()
    _eval_arguments(parser, max_docs=None, min_tokens=2, max_tokens=None, out=str(tmp_path))
    files = sorted((Path(__file__).parents[1] / "evals" / "configs").glob("*.yaml"))
    assert files
    for path in files:
        configs = _settings(parser.parse_args(["--settings", str(path)]))
        assert len({(c.backend, c.k, c.layers, c.sink_tokens, c.local_window) for c in configs}) == len(
            configs
        )


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("- {k: 0}\n", r"entry 0: KNNConfig.k"),
        ("- {k: 8}\n- {kk: 8}\n", r"entry 1: Unknown KNNConfig keys \['kk'\]"),
        ("k: 8\n", "non-empty YAML list"),
        ("- [unclosed\n", "cannot be read as YAML"),
    ],
)
def test_a_bad_settings_file_fails_before_the_model_loads(tmp_path, monkeypatch, text, match):
    import knn_patch.cli as cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        main(["eval", "--settings", str(path), "--out", str(tmp_path)])


def test_needle_end_to_end_on_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "needle"
    main(["needle", "--task", "multikey", "--lengths", "1024", "--depths", "0.5", "--trials", "1",
          "--k", "32", "--sink-tokens", "4", "--local-window", "64", "--max-new-tokens", "12",
          "--out", str(out)])  # fmt: skip
    result = json.loads((out / "needle.json").read_text())
    assert [s["name"] for s in result["settings_detail"]] == ["dense", "topk k=32 sinks=4 window=64"]
    (prompt,) = result["prompts"]
    assert prompt["length"] == 1024 and len(prompt["needles"]) == 4 and result["template"]["chat"]
    assert result["environment"]["torch"] and not (out / "needle.partial.json").exists()
    assert {"needle_dense.png", "needle_keys.png"} <= {p.name for p in out.glob("*.png")}
    table = capsys.readouterr().out
    assert "1024 tokens" in table and "topk k=32 sinks=4 window=64" in table
    main(["report", str(out / "needle.json")])  # the table again, from the saved result
    again = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.lstrip().startswith(("dense", "topk"))]
    assert len(rows) == 2 and all(row in again for row in rows)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--trials", "0"], "trials must be >= 1"),
        (["--task", "single", "--needles", "3"], "exactly 1"),
        (["--depths", "0,2"], "depths must be fractions"),
        (["--lengths", "16384"], "exceeds the model's 8192 positions"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--resume"], "no .*needle.partial.json to continue"),
    ],
)
def test_bad_needle_input_fails_before_any_work(tmp_path, args, match, monkeypatch):
    import knn_patch.cli as cli

    monkeypatch.setattr(cli, "load_documents", lambda *a, **k: pytest.fail("the haystack was loaded"))
    with pytest.raises((ValueError, OSError), match=match):
        main(["needle", *args, "--out", str(tmp_path)])


def test_frontier_writes_table_json_and_plot_and_report_reads_it(tmp_path, capsys):
    out = tmp_path / "frontier"
    main(["frontier", "--max-length", "256", "--max-docs", "2", "--budgets", "10,50",
          "--methods", "topk,topk+mean+first", "--out", str(out)])  # fmt: skip
    result = json.loads((out / "frontier.json").read_text())
    assert [(r["method"], r["budget_percent"]) for r in result["rows"]] == [
        ("topk", 10), ("topk", 50), ("topk+mean+first", 10), ("topk+mean+first", 50)
    ]  # fmt: skip
    assert len(result["documents"]) == 2 and all(d["tokens"] == 255 for d in result["documents"])
    assert (out / "frontier.png").exists() and not (out / "frontier.partial.json").exists()
    main(["report", str(out / "frontier.json")])
    assert "topk+mean+first" in capsys.readouterr().out.split("windows of 256")[-1]
    with pytest.raises(ValueError, match="choose from"):
        main(["frontier", "--methods", "nearest", "--out", str(out)])


def _parser():
    from knn_patch.cli import build_parser

    return build_parser()


def test_every_option_of_every_command_has_help_and_knnconfig_flags_read_its_fields():
    import argparse
    import dataclasses

    from knn_patch import KNNConfig

    (sub,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for command in ("demo", "eval", "needle", "frontier", "calibrate", "approx", "report"):
        actions = sub.choices[command]._actions
        assert not [a.dest for a in actions if not a.help], command
    fields = {f.name: f for f in dataclasses.fields(KNNConfig)}
    flags = {a.dest: a for a in sub.choices["eval"]._actions}
    for name in ("k", "backend", "backend_options", "layers", "sink_tokens", "local_window", "chunk_size"):
        assert fields[name].metadata["help"].replace("%", "%%") in flags[name].help, name
    for name in ("backend", "sink_tokens", "local_window", "chunk_size"):
        assert flags[name].default == fields[name].default, name
    assert flags["k"].default == "16,64,sqrt,n^0.125" and flags["backend_options"].default == {}


@pytest.mark.parametrize(
    ("setting", "want"),
    [
        ("faiss k=32 sink_tokens=4", dict(backend="faiss", k=32, sink_tokens=4)),
        ("k=sqrt local_window=9 layers=global", dict(k="sqrt", local_window=9, layers="global")),
        ("k=4 layer_k={0: 256, 1: n^0.5}", dict(k=4, layer_k={0: 256, 1: "n^0.5"})),
        ("k=16 backend_options={rest: mean}", dict(k=16, backend_options={"rest": "mean"})),
        ("k=n^0.125 layers=0,2", dict(k="n^0.125", layers=(0, 2))),
        ("k = 8 layers=[3, 1]", dict(k=8, layers=(1, 3))),
        ("tail k=8 backend_options={m: 4}", dict(backend="tail", k=8, backend_options={"m": 4})),
    ],
)
def test_a_setting_is_an_optional_backend_then_fields_with_yaml_values(setting, want):
    from knn_patch import KNNConfig
    from knn_patch.cli import _settings

    args = _parser().parse_args(["eval", "--setting", setting, "--k", "99"])
    assert _settings(args) == [KNNConfig(**want)]  # the --k list is replaced


def test_a_setting_starts_from_the_shared_flags():
    from knn_patch import KNNConfig
    from knn_patch.cli import _settings

    args = _parser().parse_args(["needle", "--sink-tokens", "4", "--local-window", "16", "--chunk-size", "64",
                                 "--setting", "k=8", "--setting", "faiss k=8 local_window=0"])  # fmt: skip
    assert _settings(args) == [
        KNNConfig(k=8, sink_tokens=4, local_window=16, chunk_size=64),
        KNNConfig(backend="faiss", k=8, sink_tokens=4, chunk_size=64),
    ]


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (["kk=3"], r"--setting 'kk=3': 'kk' is not a KNNConfig field \(k, backend,"),
        (["faiss topk k=3"], r"'faiss topk' is neither a backend name nor field=value pairs"),
        ([""], r"--setting '': it is empty"),
        (["k="], r"k= has no value"),
        (["k=3 layer_k={0: 1"], r"layer_k=\{0: 1 is not a YAML value"),
        (["topk k=3 backend=faiss"], r"backend is given twice"),
        (["k=0"], r"--setting 'k=0': KNNConfig.k=0 is invalid"),
        (["nosuch k=3"], r"KNNConfig.backend='nosuch' is unknown"),
        (["faiss k=3 backend_options={nprobe: 0}"], r"nprobe"),
        (["k=3", "k=3"], r"must differ; given more than once: topk k=3"),
    ],
)
def test_a_bad_setting_fails_in_one_line_with_an_example_before_the_model_loads(
    tmp_path, monkeypatch, settings, match
):
    import knn_patch.cli as cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=match) as err:
        main(["eval", *[a for s in settings for a in ("--setting", s)], "--out", str(tmp_path)])
    assert "\n" not in str(err.value)
    assert "differ" in match or str(err.value).endswith(f"(e.g. {cli.SETTING_EXAMPLE})")


def test_setting_and_settings_together_is_an_error(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text("- {k: 8}\n")
    with pytest.raises(ValueError, match="--setting and --settings both give the settings; use one"):
        main(["eval", "--setting", "k=8", "--settings", str(path), "--out", str(tmp_path)])


def test_eval_runs_each_setting_beside_dense(tmp_path):
    settings = ["k=4 sink_tokens=2 local_window=8", "topk k=sqrt backend_options={rest: mean}"]
    main(["eval", "--max-docs", "1", "--min-tokens", "300", "--max-tokens", "300", "--max-length", "128",
          "--setting", settings[0], "--setting", settings[1], "--out", str(tmp_path)])  # fmt: skip
    result = json.loads((tmp_path / "perplexity.json").read_text())
    names = ["dense", "topk k=4 sinks=2 window=8", "topk k=sqrt rest=mean"]
    assert [s["name"] for s in result["settings"]] == names and result["args"]["setting"] == settings
    assert all(result["totals"][name]["tokens"] == 300 - 3 for name in names)  # 3 windows: 3 unscored
    assert (tmp_path / "perplexity.png").exists()
