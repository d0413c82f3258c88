"""Recipe configs: every YAML in the repo parses, every key is validated, overrides work."""

from pathlib import Path

import accelerate
import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

from knn_patch import KNNConfig
from knn_patch.train.recipe_config import RecipeConfig, apply_overrides, load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
ACCELERATE = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))


def test_the_repo_ships_the_recipes():
    assert {p.name for p in CONFIGS} >= {"smollm2_knn_lora.yaml", "smollm2_knn_full.yaml", "tiny_debug.yaml"}
    assert {p.name for p in ACCELERATE} == {"ddp.yaml", "fsdp.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_parses_and_opens_with_its_command(path):
    config = load_recipe(path)
    assert isinstance(config.knn, KNNConfig)
    assert path.read_text().startswith("#") and "recipes/finetune.py --config" in path.read_text()
    assert recipe_from_dict(config.to_dict()) == config  # the saved form loads back


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_load_as_accelerate_reads_them(path):
    config = load_config_from_file(str(path))  # rejects unknown keys
    assert config.distributed_type in ("MULTI_GPU", "FSDP") and config.num_processes >= 1
    assert path.read_text().startswith("#") and "accelerate launch --config_file" in path.read_text()
    launch_options = (Path(accelerate.__file__).parent / "commands" / "launch.py").read_text()
    for key in yaml.safe_load(path.read_text()).get("fsdp_config", {}):
        assert f'"--{key}"' in launch_options, f"accelerate launch has no --{key}"


def test_overrides_are_typed_as_yaml():
    path = ROOT / "recipes" / "configs" / "tiny_debug.yaml"
    config = load_recipe(path, ["train.lr=1e-4", "knn.k=sqrt", "knn.layers=[0]", "data.max_docs=null"])
    assert config.train.lr == 1e-4 and config.knn.k == "sqrt" and config.knn.layers == (0,)
    assert config.data.max_docs is None
    with pytest.raises(ValueError, match=r"section\.key=value"):
        apply_overrides({}, ["train.lr"])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train": {"lrr": 1.0}}, r"Unknown config key train\.'lrr'.*lr"),
        ({"trian": {}}, r"Unknown config key 'trian'"),
        ({"knn": {"kk": 3}}, r"Unknown config key knn\.'kk'"),
        ({"knn": {"k": "cube"}}, r"knn.*k='cube' is invalid.*sqrt"),
        ({"train": {"lr": "fast"}}, r"train\.lr='fast' is invalid: use a number"),
        ({"train": {"max_steps": 0}}, r"train\.max_steps=0"),
        ({"train": {"mixed_precision": "fp8"}}, r"train\.mixed_precision='fp8'.*'bf16'"),
        ({"lora": {"enabled": "yes"}}, r"lora\.enabled='yes'.*true or false"),
        ({"model": {"from_config": {"model_type": "llama"}}}, r"exactly one of model\.name"),
        ({"data": {"block_size": 1}}, r"data\.block_size=1"),
        ({"eval": {"max_length": 64, "stride": 128}}, r"eval\.stride=128"),
    ],
)
def test_bad_values_name_their_key(data, message):
    with pytest.raises(ValueError, match=message):
        recipe_from_dict(data)


def test_defaults_and_missing_file(tmp_path):
    assert recipe_from_dict({}) == RecipeConfig()
    with pytest.raises(FileNotFoundError, match="No recipe config"):
        load_recipe(tmp_path / "missing.yaml")
