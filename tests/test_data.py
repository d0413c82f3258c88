"""Loading documents (bundled corpus, local files, hub names offline) and tokenizing them."""

import json

import datasets
import pytest

from knn_patch import load_tokenizer
from knn_patch.assets import bundled_corpus_dir
from knn_patch.eval.data import join_documents, load_documents, tokenize_documents
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


PG19_ROWS = {
    "short_book_title": ["The Mystery of the Yellow Room", "Middlemarch", "The Time Machine"],
    "publication_date": [1908, 1871, 1895],
    "url": [f"http://www.gutenberg.org/ebooks/{i}" for i in (1, 2, 3)],
    "text": ["It was a dark night.", "Miss Brooke had that kind of beauty.", "The Time Traveller spoke."],
}


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_local_files_shaped_like_pg19(tmp_path, hf_cache, suffix):
    path = tmp_path / f"pg19{suffix}"
    table = datasets.Dataset.from_dict(PG19_ROWS)
    if suffix == ".parquet":
        table.to_parquet(str(path))
    else:
        table.to_json(str(path))  # JSON Lines: one row a line
    docs = load_documents(str(path), name_column="short_book_title")
    assert docs.column_names == ["text", "name"]
    assert docs["text"] == PG19_ROWS["text"] and docs["name"] == PG19_ROWS["short_book_title"]
    assert load_documents(str(path), max_docs=2)["name"] == ["0", "1"]  # row index by default
    with pytest.raises(ValueError, match=r"'title'.*available columns: short_book_title"):
        load_documents(str(path), name_column="title")


@pytest.fixture
def fake_hub(monkeypatch):
    """The hub as reachable, answering `load_dataset` from PG19_ROWS; records each call's arguments."""
    import knn_patch.eval.data as data

    calls = []

    def load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split, revision))
        return datasets.Dataset.from_dict(PG19_ROWS)

    monkeypatch.setattr(data, "_offline_env", lambda: False)
    monkeypatch.setattr(data, "_hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_pg19_resolves_to_deepmind_pg19_named_by_title(fake_hub):
    docs = load_documents("pg19", split="validation")
    assert fake_hub == [("deepmind/pg19", None, "validation", None)]
    assert docs["name"] == PG19_ROWS["short_book_title"] and docs["text"] == PG19_ROWS["text"]
    assert load_documents("pg19", name_column="url")["name"] == PG19_ROWS["url"]
    load_documents("someone/books", column="text")  # any hub dataset goes the same way
    assert fake_hub[-1] == ("someone/books", None, "test", None)


def test_a_hub_loading_script_falls_back_to_the_parquet_conversion(fake_hub, monkeypatch):
    answer = datasets.load_dataset

    def scripted(path, name=None, split=None, revision=None):
        if revision is None:
            raise RuntimeError("Dataset scripts are no longer supported, but found pg19.py")
        return answer(path, name, split, revision)

    monkeypatch.setattr(datasets, "load_dataset", scripted)
    assert len(load_documents("pg19")) == 3
    assert fake_hub == [("deepmind/pg19", None, "test", "refs/convert/parquet")]


def test_pg19_offline_names_the_repository(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError, match=r"'pg19' \(deepmind/pg19\)"):
        load_documents("pg19")


def test_join_documents_names_parts_and_token_spans():
    docs = datasets.Dataset.from_dict(
        {
            "text": ["A", "B", "C", "D", "E", "F"],
            "name": ["a", "b", "c", "d", "e", "f"],
            "input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11], [12], [13, 14, 15, 16], [17]],
        }
    )
    joined, dropped = join_documents(docs, 6, separator=[0])
    assert joined["name"] == ["a[0:3] + b[4:6]", "c", "d[0:1] + e[2:6]"]  # c is long enough alone
    assert joined["input_ids"] == [[1, 2, 3, 0, 4, 5], [6, 7, 8, 9, 10, 11], [12, 0, 13, 14, 15, 16]]
    assert joined["parts"] == [2, 1, 2] and joined["text"][0] == "A\n\nB"
    assert dropped == 1  # f: too short, and nothing follows it
    cut, dropped = join_documents(docs, 6, separator=[0], max_tokens=5)
    assert cut["name"] == ["a[0:3] + b[4:5]", "c", "d[0:1] + e[2:5]"]
    assert all(len(ids) == 5 for ids in cut["input_ids"])
    short, dropped = join_documents(docs, 6, separator=[0], max_tokens=3)
    assert short["name"] == ["a", "c", "d[0:1] + e[2:3]"] and dropped == 2  # b (cut off) and f


def test_tokenize_with_join_to(txt_folder, tokenizer):
    docs = load_documents(str(txt_folder))
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in docs["text"]]
    blank = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    need = len(ids[0]) + len(blank) + 1  # a.txt alone is too short, joined with b.txt it is not
    kept, skipped = tokenize_documents(docs, tokenizer, join_to=need)
    a, b = len(ids[0]), len(ids[0]) + len(blank)
    assert kept["name"] == [f"a.txt[0:{a}] + b.txt[{b}:{b + len(ids[1])}]"]
    assert kept[0]["input_ids"] == ids[0] + blank + ids[1]
    assert skipped == 1  # c.txt ("Hello") is left over, too short
    cut, _ = tokenize_documents(docs, tokenizer, join_to=need, max_tokens=need)
    assert cut["name"] == [f"a.txt[0:{a}] + b.txt[{b}:{need}]"] and len(cut[0]["input_ids"]) == need
    with pytest.raises(ValueError, match="join_to must be at least 2"):
        tokenize_documents(docs, tokenizer, join_to=1)


@pytest.mark.slow
def test_bundled_speeches_reach_32k_tokens_alone_or_joined(tokenizer):
    """4 speeches have >= 32,768 SmolLM2 tokens; joined in order, the corpus makes 60 such documents."""
    docs = load_documents()
    long, skipped = tokenize_documents(docs, tokenizer, min_tokens=32768)
    assert long["name"] == ["1910-Taft-1.txt", "1946-Truman-1.txt", "1980-Carter-1.txt", "1981-Carter-1.txt"]
    assert skipped == 245 and min(len(ids) for ids in long["input_ids"]) >= 32768
    joined, skipped = tokenize_documents(docs, tokenizer, min_tokens=32768, max_tokens=32768, join_to=32768)
    assert len(joined) == 60 and all(len(ids) == 32768 for ids in joined["input_ids"])
    first = joined[0]["name"].split(" + ")
    assert first[0] == "1790-Washington-1.txt[0:1275]" and first[-1].endswith(":32768]")
    assert sum(joined["parts"]) + skipped == len(docs)
