"""Two processes (torchrun, gloo on this machine) give the totals of a one-process run."""

import json
import subprocess
import sys

import pytest

from knn_patch.cli import main

pytestmark = pytest.mark.slow

ARGS = [
    "eval",
    "--max-docs",
    "3",
    "--min-tokens",
    "150",
    "--max-tokens",
    "150",
    "--max-length",
    "64",
    "--k",
    "4",
]


def test_two_processes_equal_one(tmp_path):
    main([*ARGS, "--out", str(tmp_path / "one")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "knn_patch.cli", *ARGS, "--out", str(tmp_path / "two")]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "perplexity.json").read_text())
    two = json.loads((tmp_path / "two" / "perplexity.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)
    assert [d["name"] for d in two["documents"]] == [d["name"] for d in one["documents"]]
    for a, b in zip(one["documents"], two["documents"], strict=True):
        assert a["tokens"] == b["tokens"]
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-6)
    for name, total in one["totals"].items():
        assert two["totals"][name]["tokens"] == total["tokens"]
        assert two["totals"][name]["perplexity"] == pytest.approx(total["perplexity"], rel=1e-6)
    # only the main process writes: one JSON, one plot, one evaluate record, no partial file left
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "evaluate",
        "perplexity.json",
        "perplexity.png",
    ]
    assert len(list((tmp_path / "two" / "evaluate").iterdir())) == 1
