"""faiss benchmarks: the growth fit and the growth/decode runners on small sizes (timings not asserted)."""

import math

import pytest

from knn_patch.bench import faiss as bench_faiss
from knn_patch.bench.faiss import _index_options, fit_exponent, main, real_inputs, run_decode, run_growth
from knn_patch.kernels.index import validate_index_options

pytest.importorskip("faiss")


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def test_fit_exponent_recovers_a_power_law():
    ns = [1024, 2048, 4096, 8192]
    assert fit_exponent(ns, [3e-9 * n**1.5 for n in ns]) == pytest.approx(1.5)
    assert fit_exponent(ns, [2e-10 * n**2 for n in ns]) == pytest.approx(2.0)
    assert fit_exponent([1024], [1.0]) is None


def test_growth_methods_name_their_index_and_sweep_value():
    assert _index_options("faiss-ivf-np48", {"nlist": 64}) == validate_index_options(
        {"index": "ivf", "nlist": 64, "nprobe": 48}
    )
    assert _index_options("faiss-ivf-sf0.25", {}) == validate_index_options(
        {"index": "ivf", "scan_fraction": 0.25}
    )
    assert _index_options("faiss-ivf-bs768", {}) == validate_index_options(
        {"index": "ivf", "block_size": 768}
    )
    assert _index_options("faiss-hnsw", {})["index"] == "hnsw"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["recall", "--nprobe", "16", "32"], "--nprobe takes several values only with growth"),
        (
            ["recall", "--scan-fraction", "0.1", "0.2"],
            "--scan-fraction takes several values only with growth",
        ),
        (["recall", "--block-size", "512", "768"], "--block-size takes several values only with growth"),
        (["growth", "--nprobe", "16", "32", "--scan-fraction", "0.1", "0.2"], "not to more"),
        (["growth", "--scan-fraction", "0.1", "0.2", "--block-size", "512", "768"], "not to more"),
    ],
)
def test_sweeps_are_for_growth_only_and_one_at_a_time(capsys, argv, message):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_bad_settings_fail_before_any_model_loads(capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("knn_patch.loading.load_default", no_model)
    with pytest.raises(SystemExit):
        main(["recall", "--sink-tokens", "-1"])
    assert "--sink-tokens must be >= 0" in capsys.readouterr().err
    for argv in (
        ["recall", "--nprobe", "0"],
        ["growth", "--nprobe", "16", "0"],
        ["recall", "--nlist", "0"],
        ["growth", "--scan-fraction", "0.1", "1.5"],
    ):
        with pytest.raises(ValueError, match=r"'(nprobe|nlist|scan_fraction)'"):
            main(argv)
    with pytest.raises(ValueError, match="'index'"):
        main(["decode", "--index", "lsh"])


def test_growth_methods_take_turns_run_by_run(monkeypatch):
    """Each round runs every method once, so that a machine whose speed drifts slows them alike."""
    calls = []
    monkeypatch.setattr(bench_faiss, "_layer_fn", lambda method, k, options: lambda *a: calls.append(method))
    run_growth([64], methods=("sdpa", "topk"), repeats=3, progress=False)
    assert calls == ["sdpa", "topk"] + ["sdpa", "topk"] * 3  # the warm-up, then three rounds


@pytest.mark.slow
def test_growth_rows_hold_times_recall_and_exponents():
    result = run_growth(
        [1024, 2048],
        methods=("sdpa", "faiss-hnsw"),
        options={"block_size": 256},
        repeats=3,
        recall_queries=32,
        progress=False,
    )
    assert [r["n"] for r in result["rows"]] == [1024, 2048]
    for row in result["rows"]:
        assert row["times"].keys() == {"sdpa", "faiss-hnsw"} and all(t > 0 for t in row["times"].values())
        for method, samples in row["samples"].items():  # three alternating runs each; times: their median
            assert len(samples) == 3 and row["times"][method] == sorted(samples)[1]
        assert 0.0 <= row["recall"]["faiss-hnsw"] <= 1.0
    assert all(math.isfinite(s) for s in result["exponents"].values())


@pytest.mark.slow
def test_growth_on_real_activations_times_prefixes_of_one_capture():
    inputs = real_inputs(3100, layer=1)
    assert [x.shape for x in inputs] == [(1, 9, 3100, 64), (1, 3, 3100, 64), (1, 3, 3100, 64)]
    result = run_growth(
        [1024, 3072],
        methods=("topk", "faiss-ivf"),
        options={"block_size": 256},
        inputs=inputs,
        progress=False,
    )
    assert [r["n"] for r in result["rows"]] == [1024, 3072]
    assert all(t > 0 for r in result["rows"] for t in r["times"].values())
    # 1024 keys never train the ivf (26 lists need 39 keys each before a block); 3072 do, and on
    # real activations its recall is high (random keys at this size: ~0.6)
    assert result["rows"][0]["recall"]["faiss-ivf"] is None
    assert result["rows"][1]["recall"]["faiss-ivf"] >= 0.8


@pytest.mark.slow
def test_decode_rows_compare_the_dense_cache_and_knn_cache_on_the_embedded_model():
    result = run_decode([600], steps=1, warmup=1, local_window=16, progress=False)
    (row,) = result["rows"]
    assert row["cache"] == 600 and row["dense_s"] > 0 and row["knn_s"] > 0
    assert row["ratio"] == pytest.approx(row["knn_s"] / row["dense_s"])
    assert row["index_bytes"] >= 30 * 3 * 500 * 64 * 4  # every layer and KV head indexed its keys
