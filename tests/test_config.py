"""KNNConfig: validation names the field, rules of n resolve as documented, and it round-trips."""

import copy
import dataclasses
import json
import math
import pickle

import pytest
from tiny_models import tiny_model
from transformers import AutoConfig

import knn_patch
from knn_patch import KNNConfig, resolve_k
from knn_patch.config import is_global_layer


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"k": 0}, "k"),
        ({"k": -3}, "k"),
        ({"k": "cube"}, "k"),
        ({"k": "n^1.5"}, "k"),
        ({"k": 2.5}, "k"),
        ({"k": True}, "k"),
        ({"backend": "nope"}, "backend"),
        ({"layers": [-1]}, "layers"),
        ({"layers": []}, "layers"),
        ({"layers": 3}, "layers"),
        ({"layers": "local"}, "layers"),
        ({"sink_tokens": -1}, "sink_tokens"),
        ({"local_window": 1.5}, "local_window"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"backend_options": {"m": 3}}, "backend_options"),
        ({"backend_options": {"rest": "sum"}}, "rest"),
        ({"backend_options": {"rest": "mean", "samples": -1}}, "samples"),
        ({"backend_options": {"rest": "mean", "samples": {"first": 8}}}, "samples"),
        ({"backend_options": {"rest": "mean", "samples": {0: 1.5}}}, "samples"),
        ({"backend_options": {"samples": 8}}, "rest"),
        ({"backend_options": {"rest": "mean", "samples": 8, "seed": "x"}}, "seed"),
        ({"backend_options": {"rest": "mean", "samples": {0, 1}}}, "JSON"),
        ({"layer_k": {-1: 4}}, "layer_k"),
        ({"layer_k": {0: 0}}, "layer_k"),
        ({"layer_k": [4]}, "layer_k"),
    ],
)
def test_bad_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        KNNConfig(**kwargs)


def test_unknown_backend_lists_available_ones():
    with pytest.raises(ValueError, match="topk"):
        KNNConfig(backend="cube")


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [
        (32, 1000, 32),
        ("sqrt", 1000, math.ceil(math.sqrt(1000))),
        ("sqrt", 1024, 32),
        ("log", 1024, 10),
        ("log", 1000, 10),
        ("n^0.125", 2048, math.ceil(2048**0.125)),
        ("n^0.5", 4096, 64),
        ("n^1", 77, 77),
        ("sqrt", 1, 1),
        ("log", 1, 1),
    ],
)
def test_resolve_k(k, n, expected):
    assert resolve_k(KNNConfig(k=k).k, n) == expected
    assert KNNConfig(k=k).resolve_k(n) == expected


def test_layers_accept_ranges_lists_and_all():
    assert KNNConfig(layers=range(3)).layers == (0, 1, 2)
    assert KNNConfig(layers=[4, 1, 1]).layers == (1, 4)
    assert KNNConfig(layers="all").layers is None
    assert KNNConfig(layers=[2]).uses_layer(2) and not KNNConfig(layers=[2]).uses_layer(0)


def test_layers_global_names_the_allowed_values():
    assert KNNConfig(layers="Global").layers == "global"
    with pytest.raises(ValueError, match=r"layers='sliding'.*'all'.*'global'.*indices"):
        KNNConfig(layers="sliding")
    with pytest.raises(ValueError, match=r"layers='global'.*model config"):
        KNNConfig(layers="global").uses_layer(0)


@pytest.mark.parametrize(
    ("model_type", "settings", "expected"),
    [
        # layer_types: the sliding ones are local, whatever else the config says
        ("gemma3_text", {"num_hidden_layers": 7}, [False] * 5 + [True, False]),
        ("gemma2", {"num_hidden_layers": 4}, [False, True, False, True]),
        ("qwen2", {"num_hidden_layers": 3}, [True] * 3),
        (
            "qwen2",
            {"num_hidden_layers": 3, "use_sliding_window": True, "max_window_layers": 1},
            [True, False, False],
        ),
        # no layer_types: a set sliding_window applies to every layer
        ("mistral", {"num_hidden_layers": 2}, [False, False]),
        ("mistral", {"num_hidden_layers": 2, "sliding_window": None}, [True, True]),
        ("llama", {"num_hidden_layers": 2}, [True, True]),
        ("qwen3_moe", {"num_hidden_layers": 2}, [True, True]),  # use_sliding_window=False clears the window
    ],
)
def test_global_layers_follow_what_the_modeling_files_do(model_type, settings, expected):
    model_config = AutoConfig.for_model(model_type, **settings)
    assert [is_global_layer(model_config, i) for i in range(len(expected))] == expected
    config = KNNConfig(layers="global")
    assert [config.uses_layer(i, model_config) for i in range(len(expected))] == expected


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        KNNConfig().k = 5


def test_round_trips():
    config = KNNConfig(k="sqrt", layers=[0, 2], sink_tokens=4, local_window=16, chunk_size=64)
    saved = config.to_dict()
    assert "chunk_size" not in saved, "run-time settings are not saved"
    assert saved["knn_patch_version"]
    assert KNNConfig.from_dict(saved) == config.replace(chunk_size=KNNConfig().chunk_size)
    assert copy.deepcopy(config) == config
    assert pickle.loads(pickle.dumps(config)) == config
    config = KNNConfig(k=8, layers="global")
    assert config.to_dict()["layers"] == "global"
    assert KNNConfig.from_dict(config.to_dict()) == config
    assert copy.deepcopy(config) == config and pickle.loads(pickle.dumps(config)) == config


def test_layer_k_overrides_k_in_its_layers_and_survives_json():
    config = KNNConfig(k=16, layer_k={0: 256, 3: "sqrt"})
    assert [config.resolve_k(1024, layer) for layer in (0, 1, 3)] == [256, 16, 32]
    assert config.resolve_k(1024) == 16
    saved = json.loads(json.dumps(config.to_dict()))  # config.json turns the layer keys into strings
    assert KNNConfig.from_dict(saved) == config


def test_backend_options_are_kept_in_their_saved_form():
    config = KNNConfig(backend_options={"rest": "mean", "samples": {0: 32}})
    assert config.backend_options == {"rest": "mean", "samples": {"0": 32}}
    assert KNNConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_presets_are_configs_and_patch_without_settings_takes_balanced():
    assert KNNConfig.preset("fast", k=8).k == 8
    assert KNNConfig.preset("balanced").backend_options == {"rest": "mean", "samples": {"0": 32}}
    with pytest.raises(ValueError, match="choose from"):
        KNNConfig.preset("quick")
    model = knn_patch.patch(tiny_model("llama"))
    assert knn_patch.get_config(model) == KNNConfig.preset("balanced")
    assert knn_patch.get_config(knn_patch.patch(model, "fast")) == KNNConfig.preset("fast")
    assert knn_patch.get_config(knn_patch.patch(model, k=4)) == KNNConfig(k=4), "settings given: no preset"


def test_configs_saved_before_layer_k_load_as_they_were():
    old = {"k": 32, "backend": "topk", "backend_options": {}, "sink_tokens": 0, "knn_patch_version": "0.1.0"}
    assert KNNConfig.from_dict(old) == KNNConfig(k=32)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="nearest"):
        KNNConfig.from_dict({"k": 4, "nearest": 3})
