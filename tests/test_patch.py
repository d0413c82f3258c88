"""Patch lifecycle: unpatch restores, layers are selected, configs survive reload, bad input fails early."""

import pytest
import torch
from tiny_models import tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

import knn_patch
from knn_patch import KNNConfig, UnsupportedModelError


def logits(model, ids=None):
    ids = torch.arange(3, 43).view(2, 20) if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_patch_is_in_place_and_unpatch_restores_bit_identical_outputs():
    model = tiny_model("llama")
    before = logits(model)
    assert knn_patch.patch(model, k=2) is model
    assert knn_patch.is_patched(model) and knn_patch.get_config(model) == KNNConfig(k=2)
    assert not torch.equal(logits(model), before)
    assert knn_patch.unpatch(model) is model
    assert model.config._attn_implementation == "sdpa"
    assert not knn_patch.is_patched(model) and not hasattr(model.config, "knn_attention")
    assert torch.equal(logits(model), before)
    with pytest.raises(ValueError, match="not patched"):
        knn_patch.unpatch(model)


def test_unpatch_restores_eager_and_dense_layers_run_eager():
    model = tiny_model("llama", attn_implementation="eager")
    before = logits(model)
    knn_patch.patch(model, k=1000, layers=[1])  # layer 0 delegates to eager, layer 1 is kNN at k >= n
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)
    knn_patch.unpatch(model)
    assert model.config._attn_implementation == "eager"
    assert torch.equal(logits(model), before)


def test_patch_twice_replaces_the_config_and_keeps_the_original_implementation():
    model = tiny_model("llama")
    knn_patch.patch(model, k=2)
    knn_patch.patch(model, k=5, backend="topk")
    assert knn_patch.get_config(model).k == 5
    assert torch.equal(logits(model), logits(knn_patch.patch(tiny_model("llama"), k=5)))
    knn_patch.unpatch(model)
    assert model.config._attn_implementation == "sdpa"


def test_only_selected_layers_change():
    model = tiny_model("llama")
    ids = torch.arange(3, 43).view(2, 20)
    dense = model(input_ids=ids, output_hidden_states=True).hidden_states
    knn_patch.patch(model, k=2, layers=[1])
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.equal(hidden[1], dense[1]), "layer 0 stays dense"
    assert not torch.allclose(hidden[2], dense[2]), "layer 1 is kNN"


def test_context_manager_restores_state_even_on_error():
    model = tiny_model("llama")
    before = logits(model)
    with pytest.raises(RuntimeError, match="boom"), knn_patch.patched(model, k=2):
        raise RuntimeError("boom")
    assert not knn_patch.is_patched(model) and torch.equal(logits(model), before)
    knn_patch.patch(model, k=7)
    with knn_patch.patched(model, k="sqrt"):
        assert knn_patch.get_config(model).k == "sqrt"
    assert knn_patch.get_config(model).k == 7


def test_save_and_reload_keeps_the_knn_config(tmp_path):
    model = knn_patch.patch(tiny_model("qwen2"), k=3, sink_tokens=1, layers=[0])
    expected = logits(model)
    model.save_pretrained(tmp_path)
    reloaded = knn_patch.from_pretrained(str(tmp_path))
    assert knn_patch.get_config(reloaded) == knn_patch.get_config(model)
    assert torch.equal(logits(reloaded), expected)
    # A plain transformers load gives the dense model; the saved entry is inert.
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert plain.config.knn_attention["k"] == 3 and not knn_patch.is_patched(plain)
    assert torch.equal(logits(plain), logits(knn_patch.unpatch(reloaded)))
    # Selecting the kNN name without patching fails with instructions.
    bare = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="knn_topk")
    with pytest.raises(RuntimeError, match="from_pretrained"):
        logits(bare)
    assert AutoConfig.from_pretrained(tmp_path).knn_attention["sink_tokens"] == 1


@pytest.mark.parametrize("bad", [{"k": 0}, {"k": -3}, {"k": "cube"}, {"backend": "unknown"}])
def test_bad_settings_raise_before_touching_the_model(bad):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=next(iter(bad))):
        knn_patch.patch(model, **bad)
    assert not knn_patch.is_patched(model) and model.config._attn_implementation == "sdpa"


def test_layer_out_of_range():
    with pytest.raises(ValueError, match=r"layers 0\.\.1"):
        knn_patch.patch(tiny_model("llama"), k=2, layers=[5])


@pytest.mark.parametrize(
    ("family", "kwargs"),
    [
        ("falcon", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4)),
        ("bloom", dict(hidden_size=32, n_layer=1, n_head=4)),
        ("mpt", dict(d_model=32, n_layers=1, n_heads=4)),
        (
            "gpt_neo",
            dict(hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]]),
        ),
        ("mamba", dict(hidden_size=32, num_hidden_layers=1)),
    ],
)
def test_unsupported_family_is_named(family, kwargs):
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, vocab_size=64, **kwargs))
    with pytest.raises(UnsupportedModelError, match=f"'{family}'.*llama"):
        knn_patch.patch(model, k=4)


@pytest.mark.parametrize("thing", [torch.nn.Linear(2, 2), "llama", None])
def test_non_model_objects_are_rejected(thing):
    with pytest.raises(TypeError, match="PreTrainedModel"):
        knn_patch.patch(thing, k=4)


def test_backends_are_added_by_name_without_touching_the_patcher():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def mirror(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, knn_config, **kwargs):
        calls.append(knn_config.backend_options["tag"])
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    def validate(options):
        if set(options) != {"tag"}:
            raise ValueError(f"KNNConfig.backend_options must be {{'tag': ...}}, got {dict(options)}")

    knn_patch.register_backend("mirror", mirror, validate_options=validate)
    assert "mirror" in knn_patch.available_backends()
    with pytest.raises(ValueError, match="backend_options"):
        KNNConfig(backend="mirror")
    model = tiny_model("llama")
    before = logits(model)
    knn_patch.patch(model, backend="mirror", backend_options={"tag": "x"})
    assert model.config._attn_implementation == "knn_mirror"
    assert torch.equal(logits(model), before) and calls == ["x", "x"]  # one call per layer
