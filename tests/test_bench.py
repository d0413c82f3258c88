"""The speed benchmark's structure, ratios and output files at tiny sizes (no timing assertions)."""

import json
import math

import pytest

from knn_patch.bench.kernel import (
    METHODS,
    METRICS,
    RATIOS,
    eager_bytes,
    print_table,
    run_speed_benchmark,
    write_results,
)


@pytest.fixture(scope="module")
def rows():
    # eager fits the budget at n=128 and not at n=256, so both paths run
    budget_gb = (eager_bytes(128, 9) + eager_bytes(256, 9)) / 2 / 1e9
    return run_speed_benchmark(
        [128, 256], repeats=1, max_eager_gb=budget_gb, max_sampled_n=128, progress=False
    )


def test_rows_structure_and_ratios(rows):
    assert [r["n"] for r in rows] == [128, 256]
    for row in rows:
        assert set(row["methods"]) == set(METHODS)
        assert set(row["ratios"]) == set(RATIOS)
        for name, res in row["methods"].items():
            if name == "eager" and row["n"] == 256:
                assert "skipped" in res and row["ratios"]["topk/eager"] is None
                continue
            if name == "gumbel" and row["n"] == 256:  # above max_sampled_n
                assert "skipped" in res and row["ratios"]["gumbel/topk"] is None
                continue
            assert res["fwd_s"] > 0 and res["fwd_bwd_s"] > 0
            # RSS grows in pages, so a tiny layer may show no growth at all
            assert isinstance(res["peak_bytes"], int) and res["peak_bytes"] >= 0, res
        for key, ratio in row["ratios"].items():
            if ratio is None:
                continue
            top, other = (row["methods"][x] for x in key.split("/"))
            for m in METRICS:
                if other[m]:
                    assert math.isclose(ratio[m], top[m] / other[m], rel_tol=1e-9)
                else:
                    assert ratio[m] is None


def test_table_and_files(rows, tmp_path, capsys):
    print_table(rows)
    text = capsys.readouterr().out
    assert "skipped" in text and "topk/sdpa" in text
    paths = write_results(rows, tmp_path / "bench", {"n": [128, 256], "device": "cpu"})
    data = json.loads(paths["json"].read_text())
    assert data["rows"] == rows and data["args"]["n"] == [128, 256]
    assert {"torch", "threads", "cpu_model", "device"} <= set(data["machine"])
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    # no temp files left behind
    assert sorted(p.name for p in (tmp_path / "bench").iterdir()) == ["speed.json", "speed.png"]
