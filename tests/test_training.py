"""Fine-tuning end to end on `tiny_debug.yaml`: a tiny random llama, a few steps, short blocks.

Smoke run and reload, kill and resume, two DDP processes against one, LoRA, and bad input.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import knn_patch
from knn_patch.cli import main
from knn_patch.train.checkpoints import complete_checkpoints
from knn_patch.train.recipe_config import load_recipe
from knn_patch.train.training import finetune

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "configs" / "tiny_debug.yaml"
SCRIPT = ROOT / "recipes" / "finetune.py"


def tiny(out: Path, *overrides: str):
    return load_recipe(TINY, [f"output.dir={out}", "output.tensorboard=false", *overrides])


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in log(out) if r["kind"] == "train"}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_smoke_run_writes_checkpoints_logs_and_a_model_that_reloads_patched(tmp_path):
    out = tmp_path / "run"
    main(
        ["finetune", "--config", str(TINY), "--set", f"output.dir={out}", "--no-progress"]
    )  # knn-patch finetune
    result = json.loads((out / "results.json").read_text())
    assert [c.name for c in complete_checkpoints(out / "checkpoints")] == ["step_00000003", "step_00000006"]
    assert [r["step"] for r in result["evaluations"]] == [0, 3, 6]
    assert result["before"]["tokens"] == result["after"]["tokens"] > 0
    assert all(r["knn_perplexity"] > 0 and r["dense_perplexity"] > 0 for r in result["evaluations"])
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]
    assert result["steps"] == 6 and result["outputs"] == {"model": str(out / "model")}
    assert (out / "history.png").exists() and any((out / "tensorboard").rglob("events.out.tfevents*"))

    # The final model comes back patched from its config.json, with the trained weights: its
    # logits equal those of a fresh tiny model given the last checkpoint's weights and patched.
    reloaded = knn_patch.from_pretrained(str(out / "model"))
    assert knn_patch.get_config(reloaded) == tiny(out).knn
    fresh = knn_patch.from_pretrained(str(out / "model"))
    knn_patch.unpatch(fresh)
    missing, unexpected = fresh.load_state_dict(weights(out / "checkpoints" / "step_00000006"), strict=False)
    assert not unexpected and missing == ["lm_head.weight"]  # tied to the embedding, saved once
    knn_patch.patch(fresh, tiny(out).knn)
    ids = torch.arange(5, 69).view(1, 64)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, fresh(input_ids=ids).logits)
        dense = knn_patch.unpatch(fresh)(input_ids=ids).logits
    assert not torch.allclose(reloaded(input_ids=ids).logits, dense), "k=8 of 64 keys differs from dense"


def test_bf16_autocast_trains_with_the_chunked_loss(tmp_path):
    """The loss is computed outside the model's forward, under the same autocast: its check of the
    output embedding against the model's own logits holds at bf16 rounding."""
    out = tmp_path / "bf16"
    args = ["train.mixed_precision=bf16", "train.max_steps=2", "train.grad_accum=1", "checkpoint.every=0"]
    result = finetune(tiny(out, *args, "eval.every=0"), progress=False)
    assert result["steps"] == 2 and sorted(losses(out)) == [1, 2]
    assert all(math.isfinite(v) and v > 0 for v in losses(out).values())


def test_validation_documents_are_never_trained_on(tmp_path):
    from knn_patch import load_tokenizer
    from knn_patch.train.data import prepare_data

    config = tiny(tmp_path)
    tokenizer = load_tokenizer("default")
    data = prepare_data(config.data, tokenizer, seed=0, eval_max_tokens=None)
    held_out = {name for name, _ in data.validation}
    assert len(held_out) == 2 and len(data.train_documents) == 4
    assert not held_out & set(data.train_documents)
    assert data.blocks[0]["input_ids"].shape == (64,)
    # the same seed gives the same split; tokenisation comes from the datasets cache
    again = prepare_data(config.data, tokenizer, seed=0, eval_max_tokens=None)
    assert [n for n, _ in again.validation] == [n for n, _ in data.validation]
    assert again.blocks.cache_files and again.blocks.cache_files == data.blocks.cache_files


@pytest.mark.slow
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    args = ["train.max_steps=10", "train.grad_accum=1", "checkpoint.every=2", "eval.every=5"]
    finetune(tiny(tmp_path / "straight", *args), progress=False)

    out = tmp_path / "crashed"
    sets = [x for a in [f"output.dir={out}", "output.tensorboard=false", *args] for x in ("--set", a)]
    cmd = [sys.executable, str(SCRIPT), "--config", str(TINY), *sets, "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while (
        not complete_checkpoints(out / "checkpoints") and proc.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended on its own before the kill: {stderr[-2000:]}"
    assert not (out / "model").exists()
    killed_at = complete_checkpoints(out / "checkpoints")[-1]

    result = finetune(tiny(out, *args), resume=True, progress=False)
    assert result["resumed_from"] == str(killed_at)
    resumed_step = int(killed_at.name.removeprefix("step_"))
    assert resumed_step < 10

    straight, resumed = weights(tmp_path / "straight" / "model"), weights(out / "model")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)
    expected, got = losses(tmp_path / "straight"), losses(out)
    assert sorted(got) == list(range(1, 11)), "the log holds each step once"
    after = [s for s in expected if s > resumed_step]
    assert after and [got[s] for s in after] == pytest.approx([expected[s] for s in after], rel=1e-6, abs=0)


@pytest.mark.slow
def test_two_ddp_processes_give_the_loss_curve_of_one(tmp_path):
    """Same effective batch (2 blocks per step): 1 process x batch 2, against 2 processes x batch 1.
    Tolerance: 1e-5 relative on every step's loss (only the gradient reduction order differs)."""
    args = ["train.max_steps=6", "train.grad_accum=1", "checkpoint.every=0", "eval.every=0"]
    one = finetune(tiny(tmp_path / "one", *args, "train.batch_size=2"), progress=False)
    out = tmp_path / "two"
    sets = [x for a in [f"output.dir={out}", "output.tensorboard=false", *args, "train.batch_size=1"]
            for x in ("--set", a)]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(SCRIPT), "--config", str(TINY), *sets, "--no-progress"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((out / "results.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["effective_batch_blocks"] == two["effective_batch_blocks"] == 2
    a, b = losses(tmp_path / "one"), losses(out)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert [b[s] for s in a] == pytest.approx([a[s] for s in a], rel=1e-5)
    assert len(set(a.values())) > 1, "the loss moves"
    for when in ("before", "after"):
        for key in ("knn_perplexity", "dense_perplexity"):
            assert two[when][key] == pytest.approx(one[when][key], rel=1e-5)


def test_bad_input_fails_early_with_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such file or folder"):
        finetune(tiny(tmp_path / "a", f"data.source={tmp_path / 'missing.txt'}"), progress=False)
    with pytest.raises(ValueError, match=r"data\.block_size=512 exceeds the model's 256 positions"):
        finetune(tiny(tmp_path / "b", "data.block_size=512"), progress=False)
    with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
        finetune(tiny(tmp_path / "c"), resume=True, progress=False)
    half = tmp_path / "d" / "checkpoints" / ".tmp-step_00000003"  # a crash during a save
    half.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
        finetune(tiny(tmp_path / "d"), resume=True, progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"fp16.*needs a GPU.*silently"):
            finetune(tiny(tmp_path / "e", "train.mixed_precision=fp16"), progress=False)
    with pytest.raises(ValueError, match=r"knn.*k='n\^2' is invalid"):
        tiny(tmp_path / "f", "knn.k=n^2")
