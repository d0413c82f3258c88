"""Patch lifecycle: unpatch restores, layers are selected, configs survive reload, bad input fails early."""

import gc
import weakref

import pytest
import torch
from tiny_models import tiny_model
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.masking_utils import AttentionMaskInterface

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
    with pytest.raises(ValueError, match=r"layer_k names layer 5: this model has layers 0\.\.1"):
        knn_patch.patch(tiny_model("llama"), k=2, layer_k={5: 8})


def test_layer_k_gives_its_layer_more_keys():
    """k = 1 everywhere but layer 0 at k >= n: layer 0 is then dense, so it matches a model whose
    layer 1 alone is kNN with k = 1."""
    ids = torch.arange(3, 23)[None]
    model = tiny_model("llama")
    plain = knn_patch.KNNConfig(k=1, sink_tokens=0, local_window=0, layer_k={})
    with torch.no_grad():
        knn_patch.patch(model, plain, layer_k={0: 100})
        per_layer = model(ids).logits
        knn_patch.patch(model, plain, layers=[1])
        only_second = model(ids).logits
        knn_patch.patch(model, plain)
        everywhere = model(ids).logits
    torch.testing.assert_close(per_layer, only_second, rtol=0, atol=1e-5)
    assert (per_layer - everywhere).abs().max() > 1e-3


class OwnAttentionConfig(PretrainedConfig):
    model_type = "own_attention"

    def __init__(self, vocab_size=64, hidden_size=16, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        super().__init__(**kwargs)


class OwnAttention(torch.nn.Module):
    """Attention computed in its own forward, as families not ported to the AttentionInterface do."""

    def __init__(self, hidden_size):
        super().__init__()
        self.qkv = torch.nn.Linear(hidden_size, 3 * hidden_size)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


class OwnAttentionForCausalLM(PreTrainedModel):
    config_class = OwnAttentionConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.attn = OwnAttention(config.hidden_size)
        self.head = torch.nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids, **kwargs):
        return self.head(self.attn(self.embed(input_ids)))


def test_a_model_whose_attention_does_not_dispatch_is_named_and_left_untouched():
    model = OwnAttentionForCausalLM(OwnAttentionConfig())
    ids = torch.arange(3, 13)[None]
    before = model(ids)
    with pytest.raises(UnsupportedModelError, match=r"'own_attention'.*AttentionInterface.*llama"):
        knn_patch.patch(model, k=4)
    assert not knn_patch.is_patched(model) and torch.equal(model(ids), before)


def test_a_family_without_attention_is_named():
    # mamba is a state-space model: it has no attention to patch, whatever transformers ports
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("mamba", vocab_size=64, hidden_size=32, num_hidden_layers=1)
    )
    with pytest.raises(UnsupportedModelError, match="'mamba'"):
        knn_patch.patch(model, k=4)


def test_unpatch_of_a_model_loaded_with_the_knn_name_restores_dense(tmp_path):
    model = tiny_model("llama")
    dense = logits(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="knn_topk")
    knn_patch.patch(loaded, k=2)
    assert not torch.equal(logits(loaded), dense)
    knn_patch.unpatch(loaded)
    assert loaded.config._attn_implementation == "sdpa"
    torch.testing.assert_close(logits(loaded), dense, rtol=0, atol=1e-6)


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

    before_registry = knn_patch.available_backends()
    knn_patch.register_backend("mirror", mirror, validate_options=validate)
    try:
        assert "mirror" in knn_patch.available_backends()
        with pytest.raises(ValueError, match="backend_options"):
            KNNConfig(backend="mirror")
        model = tiny_model("llama")
        before = logits(model)
        knn_patch.patch(model, backend="mirror", backend_options={"tag": "x"})
        assert model.config._attn_implementation == "knn_mirror"
        assert torch.equal(logits(model), before) and calls == ["x", "x"]  # one call per layer
        knn_patch.unpatch(model)
    finally:
        knn_patch.unregister_backend("mirror")
    assert knn_patch.available_backends() == before_registry
    assert "knn_mirror" not in AttentionInterface._global_mapping
    assert "knn_mirror" not in AttentionMaskInterface._global_mapping
    with pytest.raises(ValueError, match="'mirror' is unknown"):
        KNNConfig(backend="mirror")


def test_builtin_backends_cannot_be_unregistered_and_scoped_names_must_be_free():
    with pytest.raises(ValueError, match="built in"):
        knn_patch.unregister_backend("topk")
    with pytest.raises(ValueError, match="No backend 'nothing'"):
        knn_patch.unregister_backend("nothing")
    with pytest.raises(ValueError, match="already registered"), knn_patch.registered_backend("topk", print):
        pass


def test_a_scoped_backend_is_gone_after_its_block_even_on_error():
    before = knn_patch.available_backends()
    with pytest.raises(RuntimeError, match="boom"), knn_patch.registered_backend("scoped", print):
        assert "scoped" in knn_patch.available_backends()
        raise RuntimeError("boom")
    assert knn_patch.available_backends() == before


def test_capturing_activations_leaves_no_backend_and_keeps_no_tensor():
    from knn_patch.bench.activations import capture_activations

    model = tiny_model("llama")
    before = knn_patch.available_backends(), set(AttentionInterface._global_mapping)
    captured = capture_activations(model, torch.arange(3, 23)[None], layers=[0])
    assert captured[0]["k"].shape == (1, 2, 20, 8)  # (B, Hkv, L, D)
    assert (knn_patch.available_backends(), set(AttentionInterface._global_mapping)) == before
    alive = weakref.ref(captured[0]["k"])
    del captured
    gc.collect()
    assert alive() is None, "something still holds the captured tensors"


def test_rest_samples_change_only_their_layers_and_reproduce_in_eval(tmp_path):
    model = tiny_model("qwen2").eval()
    mean = KNNConfig(k=2, sink_tokens=1, local_window=2, backend_options={"rest": "mean"})
    sampled = mean.replace(backend_options={"rest": "mean", "samples": {1: 4}})
    dense = logits(model)
    with knn_patch.patched(model, mean):
        by_mean = logits(model)
    with knn_patch.patched(model, mean.replace(layers=[0])):
        layer_0 = logits(model)
    with knn_patch.patched(model, sampled):
        first, second = logits(model), logits(model)
        model.save_pretrained(tmp_path)
    assert torch.equal(first, second), "eval draws are seeded per layer"
    assert not torch.allclose(first, by_mean, atol=1e-4), "layer 1's rest is sampled"
    with knn_patch.patched(model, sampled.replace(layers=[0])):
        assert torch.equal(logits(model), layer_0), "layer 0 takes no samples"
    reloaded = knn_patch.from_pretrained(str(tmp_path))
    assert knn_patch.get_config(reloaded) == sampled and torch.equal(logits(reloaded), first)
    with knn_patch.patched(model, sampled.replace(k=20)):
        torch.testing.assert_close(logits(model), dense, rtol=0, atol=1e-5)
