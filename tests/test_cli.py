"""`knn-patch demo` and `knn-patch eval` end to end on the embedded model and bundled corpus."""

import json
import subprocess
import sys

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
