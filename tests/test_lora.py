"""LoRA: patching sees through a peft PeftModel, targets are inferred per family, only adapters train."""

import json
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from tiny_models import tiny_model

import knn_patch
from knn_patch import load_tokenizer
from knn_patch.train.recipe_config import load_recipe
from knn_patch.train.training import build_model, finetune, lora_targets

TINY = Path(__file__).resolve().parent.parent / "recipes" / "configs" / "tiny_debug.yaml"


def test_patch_unpatch_and_get_config_work_on_a_peft_model():
    base = tiny_model("llama")
    ids = torch.arange(3, 43).view(2, 20)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    dense = model(input_ids=ids).logits
    assert knn_patch.patch(model, k=2) is model
    assert knn_patch.is_patched(model) and knn_patch.get_config(model) == knn_patch.KNNConfig(k=2)
    assert knn_patch.get_config(base).k == 2 and base.config.knn_attention["k"] == 2
    expected = knn_patch.patch(tiny_model("llama"), k=2)(input_ids=ids).logits  # LoRA B starts at 0
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
    assert knn_patch.unpatch(model) is model and not knn_patch.is_patched(base)
    assert torch.equal(model(input_ids=ids).logits, dense)


@pytest.mark.parametrize(
    ("family", "names", "conv1d"),
    [("llama", {"q_proj", "k_proj", "v_proj", "o_proj"}, False), ("gpt2", {"c_attn", "c_proj"}, True),
     ("gpt_neox", {"query_key_value", "dense"}, False)],
)  # fmt: skip
def test_lora_targets_are_the_attention_projections(family, names, conv1d):
    targets, fan_in_fan_out = lora_targets(tiny_model(family))
    assert {t.rsplit(".", 1)[1] for t in targets} == names and fan_in_fan_out is conv1d
    assert all(".mlp." not in t for t in targets), "GPT-2's MLP c_proj is not an attention projection"
    assert len(targets) == 2 * len(names)  # two layers


def test_lora_run_changes_only_adapter_weights_and_the_merged_model_keeps_knn(tmp_path):
    """With activation checkpointing on: recomputed kNN layers train the adapters too."""
    out = tmp_path / "lora"
    sets = ["lora.enabled=true", "lora.r=4", "train.lr=1e-2", "eval.every=0", "checkpoint.every=6",
            "model.activation_checkpointing=true"]  # fmt: skip
    config = load_recipe(TINY, [f"output.dir={out}", "output.tensorboard=false", *sets])
    finetune(config, progress=False)
    set_seed(config.train.seed)  # the same draw as the run's random initial weights
    initial = build_model(config.model, load_tokenizer("default")).state_dict()
    trained = load_file(out / "checkpoints" / "step_00000006" / "model.safetensors")
    adapters = [k for k in trained if "lora_" in k]
    base = {k for k in trained if "lora_" not in k}
    names = {k: k.removeprefix("base_model.model.").replace(".base_layer", "") for k in base}
    assert adapters and set(names.values()) == set(initial) - {"lm_head.weight"}  # tied, saved once
    for key, name in names.items():  # peft's names: base_model.model.<name>, .base_layer when wrapped
        assert torch.equal(trained[key], initial[name]), f"{name} changed"
    assert all(trained[k].abs().sum() > 0 for k in adapters if "lora_B" in k), "every adapter trained"

    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and (out / "adapter" / "adapter_model.safetensors").exists()
    merged = knn_patch.from_pretrained(str(out / "model"))
    assert knn_patch.get_config(merged) == config.knn
    assert not any("lora_" in k for k in merged.state_dict())
