"""Atomic files and folders: a crash or a failed rename never loses the old copy or leaves half a new one."""

import os

import pytest
import torch
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

import knn_patch.io as io_module
from knn_patch.io import atomic_dir, discard, publish


def save(model):
    return lambda folder: model.save_pretrained(folder)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_failed_replace_keeps_the_old_model_loadable(tmp_path, monkeypatch):
    target = tmp_path / "model"
    old, new = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    atomic_dir(target, save(old))
    real_replace = os.replace

    def replace_fails_for_the_new_copy(src, dst):
        if ".tmp-" in str(src):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(io_module.os, "replace", replace_fails_for_the_new_copy)
    with pytest.raises(OSError, match="disk full"):
        atomic_dir(target, save(new))
    monkeypatch.undo()
    loaded = AutoModelForCausalLM.from_pretrained(target)
    for name, param in old.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], param), name
    assert leftovers(tmp_path) == []


def test_a_write_that_fails_leaves_the_old_copy_and_no_temporary(tmp_path):
    target = tmp_path / "out"
    atomic_dir(target, lambda folder: (folder / "a.txt").write_text("old"))

    def crash(folder):
        (folder / "a.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_dir(target, crash)
    assert (target / "a.txt").read_text() == "old" and leftovers(tmp_path) == []


def test_a_new_copy_replaces_the_old_one_whole(tmp_path):
    target = tmp_path / "out"
    atomic_dir(target, lambda folder: (folder / "old.txt").write_text("old"))
    atomic_dir(target, lambda folder: (folder / "new.txt").write_text("new"))
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"] and leftovers(tmp_path) == []


def test_without_replace_the_first_finished_copy_wins(tmp_path):
    target, late = tmp_path / "f.bin", tmp_path / "late.bin"
    target.write_text("first")
    late.write_text("second")
    assert publish(late, target, replace=False) == target
    assert target.read_text() == "first" and late.exists()


def test_discard_is_never_seen_half_deleted(tmp_path, monkeypatch):
    for name in ("old", "crashed"):
        atomic_dir(tmp_path / name, lambda folder: (folder / "a.txt").write_text("x"))
    discard(tmp_path / "old")
    assert not (tmp_path / "old").exists() and leftovers(tmp_path) == []

    def crash(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(io_module, "_remove", crash)  # a kill during the slow delete
    with pytest.raises(KeyboardInterrupt):
        discard(tmp_path / "crashed")
    assert not (tmp_path / "crashed").exists()
    assert [name.split("-")[:2] for name in leftovers(tmp_path)] == [[".old", "crashed"]]
