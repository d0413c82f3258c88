"""Loading documents (bundled corpus, local files, hub names offline) and tokenizing them."""

import json

import datasets
import pytest

from knn_patch import load_tokenizer
from knn_patch.assets import bundled_corpus_dir
from knn_patch.data import load_documents, tokenize_documents
from knn_patch.loading import HubUnavailableError


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("default")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep the `datasets` cache of throwaway files out of the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


@pytest.fixture
def txt_folder(tmp_path, hf_cache):
    folder = tmp_path / "docs"
    folder.mkdir()
    docs = {"b.txt": "Second document.\nTwo lines.", "a.txt": "First document.", "c.txt": "Hello"}
    for name, text in docs.items():
        (folder / name).write_text(text)
    (folder / "notes.md").write_text("not a document")
    return folder


def test_bundled_corpus():
    docs = load_documents()
    assert len(docs) == 249
    assert docs.column_names == ["text", "name"]
    assert all(name.endswith(".txt") for name in docs["name"])
    assert all(text.strip() for text in docs["text"])
    first = docs[0]
    assert first["text"] == (bundled_corpus_dir() / first["name"]).read_text()
    three = load_documents("bundled", max_docs=3)
    assert three["name"] == docs["name"][:3]


def test_txt_folder_and_single_file(txt_folder):
    docs = load_documents(str(txt_folder))
    assert docs["name"] == ["a.txt", "b.txt", "c.txt"]
    assert docs["text"] == ["First document.", "Second document.\nTwo lines.", "Hello"]
    single = load_documents(str(txt_folder / "b.txt"))
    assert single["name"] == ["b.txt"] and single["text"] == ["Second document.\nTwo lines."]


def test_jsonl_with_custom_column(tmp_path, hf_cache):
    path = tmp_path / "docs.jsonl"
    rows = [{"id": i, "body": f"document {i}"} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = load_documents(str(path), column="body", max_docs=2)
    assert docs.column_names == ["text", "name"]
    assert docs["text"] == ["document 0", "document 1"] and docs["name"] == ["0", "1"]
    with pytest.raises(ValueError, match=r"'content'.*available columns: id, body"):
        load_documents(str(path), column="content")


def test_empty_jsonl(tmp_path, hf_cache):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match="no documents"):
        load_documents(str(path))


def test_missing_path_and_folder_without_txt(tmp_path):
    with pytest.raises(FileNotFoundError, match="bundled"):
        load_documents(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError):
        load_documents("missing.jsonl")
    (tmp_path / "notes.md").write_text("not a document")
    with pytest.raises(ValueError, match=r"No \.txt files"):
        load_documents(str(tmp_path))


def test_hub_name_offline_fails_fast(monkeypatch):
    before = datasets.config.HF_HUB_OFFLINE
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError) as info:
        load_documents("pg19")
    message = str(info.value)
    assert "\n" not in message and "'pg19'" in message and "bundled" in message
    assert before == datasets.config.HF_HUB_OFFLINE  # the forced offline mode is undone


def test_tokenize_filters_and_truncates(txt_folder, tokenizer):
    docs = load_documents(str(txt_folder))
    assert len(tokenizer("Hello", add_special_tokens=False)["input_ids"]) == 1
    kept, skipped = tokenize_documents(docs, tokenizer)
    assert skipped == 1 and kept["name"] == ["a.txt", "b.txt"]
    expected = tokenizer("First document.", add_special_tokens=False)["input_ids"]
    assert kept[0]["input_ids"] == expected

    long_only, skipped = tokenize_documents(docs, tokenizer, min_tokens=len(expected) + 1)
    assert long_only["name"] == ["b.txt"] and skipped == 2

    truncated, skipped = tokenize_documents(docs, tokenizer, max_tokens=2)
    assert skipped == 1 and all(len(ids) == 2 for ids in truncated["input_ids"])
    with pytest.raises(ValueError, match="at least 2"):
        tokenize_documents(docs, tokenizer, min_tokens=1)
