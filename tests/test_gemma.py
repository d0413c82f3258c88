"""Hybrid models: `layers="global"` makes only the full-attention layers kNN; the embedded Gemma-3-270m."""

import pytest
import torch
from tiny_models import tiny_model

import knn_patch
from knn_patch.assets import bundled_corpus_dir

# tiny Gemma 3 whose sliding and full-attention layers alternate
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
GLOBAL = [1, 3]


def tiny_gemma3():
    return tiny_model("gemma3_text", num_hidden_layers=4, layer_types=LAYER_TYPES)


def tiny_gemma2():
    return tiny_model("gemma2", num_hidden_layers=4)  # its default layer_types alternate, sliding first


def ids(length=24):
    # above the special ids: a zero embedding makes every score of its row tie
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(0))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def knn_layers(model):
    return [i for i, m in knn_patch.patcher.attention_modules(model) if m._knn_state[0] is not None]


def test_global_patches_only_full_attention_layers():
    model, x = tiny_gemma3(), ids()  # 24 tokens > the window of 8: sliding layers really cut keys
    knn_patch.patch(model, k=2, layers="global")
    assert knn_layers(model) == GLOBAL
    assert knn_patch.get_config(model).layers == "global"
    global_only = logits(model, x)
    assert torch.equal(global_only, logits(knn_patch.patch(tiny_gemma3(), k=2, layers=GLOBAL), x))
    assert not torch.allclose(global_only, logits(knn_patch.patch(tiny_gemma3(), k=2), x), atol=1e-4)


@pytest.mark.parametrize("build", [tiny_gemma3, tiny_gemma2])
def test_global_at_k_at_least_n_equals_dense(build):
    model, x = build(), ids()
    dense = logits(model, x)
    with knn_patch.patched(model, k=x.shape[1], layers="global"):
        assert knn_layers(model) == GLOBAL
        torch.testing.assert_close(logits(model, x), dense, rtol=0, atol=1e-5)
    with knn_patch.patched(model, k=2, layers="global"):
        assert not torch.allclose(logits(model, x), dense, atol=1e-4), "k=2 must change the global layers"
    assert torch.equal(logits(model, x), dense)


def test_global_on_a_config_without_layer_types():
    model = tiny_model("mistral", sliding_window=None)  # no window: every layer is global
    knn_patch.patch(model, k=2, layers="global")
    assert knn_layers(model) == [0, 1]
    every_layer = knn_patch.patch(tiny_model("mistral", sliding_window=None), k=2)
    assert torch.equal(logits(model, ids()), logits(every_layer, ids()))
    with pytest.raises(ValueError, match=r"layers='global'.*no attention layer.*sliding window \(8 tokens\)"):
        knn_patch.patch(tiny_model("mistral"), k=2, layers="global")  # the window applies to every layer


def test_global_survives_save_and_from_pretrained(tmp_path):
    model, x = tiny_gemma3(), ids()
    knn_patch.patch(model, k=2, layers="global")
    model.save_pretrained(tmp_path)
    loaded = knn_patch.from_pretrained(str(tmp_path))
    assert knn_patch.get_config(loaded) == knn_patch.get_config(model)
    assert knn_layers(loaded) == GLOBAL
    torch.testing.assert_close(logits(loaded, x), logits(model, x), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- the embedded Gemma-3-270m


@pytest.fixture(scope="module")
def gemma():
    model, tokenizer = knn_patch.load_model("gemma3-270m"), knn_patch.load_tokenizer("gemma3-270m")
    text = sorted(bundled_corpus_dir().glob("*.txt"))[0].read_text(encoding="utf-8")
    return model, tokenizer, tokenizer(text, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def past_the_window(gemma):
    """600 tokens of a speech, so the last queries of the sliding layers see only their 512-token
    window, and the dense logits of the last 32 (all 600 x 262k fp32 logits would take 630 MB)."""
    model, _, text_ids = gemma
    x = text_ids[:, :600]
    assert x.shape[1] == 600
    with torch.no_grad():
        return x, model(input_ids=x, logits_to_keep=32).logits


@pytest.mark.slow
def test_gemma_architecture(gemma):
    model, tokenizer, _ = gemma
    cfg = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and cfg.model_type == "gemma3_text"
    assert cfg.num_hidden_layers == 18 and cfg.head_dim == 256 and cfg.max_position_embeddings == 32768
    assert (
        cfg.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3 and cfg.sliding_window == 512
    )
    assert cfg.vocab_size == len(tokenizer) == 262144
    assert getattr(cfg, "quantization_config", None) is None and model.dtype == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize("layers", ["all", "global"])
def test_gemma_k_at_least_n_equals_dense_past_the_window(gemma, past_the_window, layers):
    """Over 18 fp32 layers the kernels round differently by ~3e-5 on logits of magnitude ~40; the bar
    is 1e-3."""
    model, (x, dense) = gemma[0], past_the_window
    with torch.no_grad(), knn_patch.patched(model, k=600, layers=layers):
        knn = model(input_ids=x, logits_to_keep=32).logits
    torch.testing.assert_close(knn, dense, rtol=0, atol=1e-3)
    assert torch.equal(knn.argmax(-1), dense.argmax(-1))


@pytest.mark.slow
def test_gemma_greedy_generate_at_k_at_least_n_equals_dense(gemma):
    model, _, text_ids = gemma
    prompt = text_ids[:, :64]
    settings = dict(max_new_tokens=8, do_sample=False)
    dense = model.generate(input_ids=prompt, **settings)
    with knn_patch.patched(model, k=1000):
        assert torch.equal(model.generate(input_ids=prompt, **settings), dense)
