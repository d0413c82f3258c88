"""The embedded default model (SmolLM2-135M-Instruct, real weights) on real bundled text."""

import math

import pytest
import torch

import knn_patch
from knn_patch.assets import bundled_corpus_dir
from knn_patch.eval.perplexity import document_nll

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_and_ids():
    model, tokenizer = knn_patch.load_default()
    text = sorted(bundled_corpus_dir().glob("*.txt"))[0].read_text(encoding="utf-8")
    return model, tokenizer(text, return_tensors="pt").input_ids[:, :256]


def test_k_at_least_n_equals_sdpa_on_256_tokens(model_and_ids):
    """Over 30 fp32 layers rounding differs by ~1e-4 between any two kernels, so the bar is the
    flash-attention one: kNN's error against a float64 reference is at most 2x SDPA's."""
    model, ids = model_and_ids
    assert ids.shape[1] == 256
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        with knn_patch.patched(model, k=256):
            knn = model(input_ids=ids).logits
        exact = model.double()(input_ids=ids).logits
        model.float()  # fp32 -> fp64 -> fp32 is lossless
    sdpa_error = (dense.double() - exact).abs().max()
    assert (knn.double() - exact).abs().max() <= 2 * sdpa_error
    assert sdpa_error < 1e-3
    assert torch.equal(knn.argmax(-1), dense.argmax(-1))


def test_k32_gives_a_finite_perplexity_different_from_dense(model_and_ids):
    model, ids = model_and_ids
    nll, count = document_nll(model, ids[0], max_length=256, stride=256)
    with knn_patch.patched(model, k=32):
        knn_nll, knn_count = document_nll(model, ids[0], max_length=256, stride=256)
    assert count == knn_count == 255
    dense_ppl, knn_ppl = math.exp(nll / count), math.exp(knn_nll / knn_count)
    assert math.isfinite(knn_ppl) and 1.0 < knn_ppl < 1000.0
    assert knn_ppl != dense_ppl
