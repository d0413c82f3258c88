"""The memory benchmark (evals/memory.py) on a tiny saved model: one fresh process per row, same NLL for
both methods, a JSON and a table (no memory assertions: a tiny model's logits are noise in its RSS)."""

import json
import subprocess
import sys
from pathlib import Path

from tiny_models import tiny_model

SCRIPT = Path(__file__).resolve().parent.parent / "evals" / "memory.py"


def test_one_row_per_method_with_equal_nll(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "model")
    cmd = [sys.executable, str(SCRIPT), "--model", str(tmp_path / "model"), "--tokens", "64"]
    cmd += ["--method", "full", "chunked", "--out", str(tmp_path / "out")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "peak GB" in run.stdout
    result = json.loads((tmp_path / "out" / "memory.json").read_text())
    rows = result["rows"]
    assert [(r["tokens"], r["method"]) for r in rows] == [(64, "full"), (64, "chunked")]
    full, chunked = rows
    assert full["scored"] == chunked["scored"] == 63
    assert abs(full["nll"] - chunked["nll"]) <= 1e-5 * abs(full["nll"])
    for r in rows:
        assert (
            r["peak_bytes"] >= r["rss_before_bytes"] > 0
            and r["added_bytes"] >= 0
            and r["load_peak_bytes"] > 0
        )
    assert result["model"] == str(tmp_path / "model") and result["k"] is None and "environment" in result
