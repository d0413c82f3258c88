"""At k >= n, kNN attention equals the dense model in every family: logits, gradients, generate()."""

import re
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, model_type, tiny_model

import knn_patch
from knn_patch.patcher import TESTED_FAMILIES


def batch(seed=0, length=24, pad=6):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0  # left padding, as generate() batches are padded
    ids[1, :pad] = 0
    return ids, mask


def logits_and_grads(model, ids, mask):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    loss = torch.nn.functional.cross_entropy(out[keep][:-1], ids[keep][1:])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach()[keep], grads


def test_error_messages_and_readme_name_exactly_the_families_tested_here():
    assert sorted(TESTED_FAMILIES) == sorted({model_type(name) for name in FAMILIES})
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### Tested families", 1)[1]
    listed = section.split("tokens, for:", 1)[1].split(".\n", 1)[0]
    assert sorted(re.findall(r"`(\w+)`", listed)) == sorted(TESTED_FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("pad", [0, 6], ids=["unpadded", "left_padded"])
def test_k_at_least_n_matches_dense_logits_and_gradients(family, pad):
    model = tiny_model(family)
    ids, mask = batch(pad=pad)
    dense_logits, dense_grads = logits_and_grads(model, ids, mask)
    knn_patch.patch(model, k=ids.shape[1])
    assert model.config._attn_implementation == "knn_topk"
    logits, grads = logits_and_grads(model, ids, mask)
    torch.testing.assert_close(logits, dense_logits, rtol=0, atol=1e-5)
    assert grads.keys() == dense_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], dense_grads[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_generate_matches_dense_and_small_k_changes_logits(family):
    model = tiny_model(family)
    ids, mask = batch(length=10, pad=3)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    dense = model.generate(input_ids=ids, attention_mask=mask, **settings)
    dense_logits = model(input_ids=ids, attention_mask=mask).logits
    with knn_patch.patched(model, k=64):
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **settings), dense)
    with knn_patch.patched(model, k=2):
        small = model(input_ids=ids, attention_mask=mask).logits
        model.generate(input_ids=ids, attention_mask=mask, **settings)  # decode steps: Lq=1, long cache
    assert not torch.allclose(small, dense_logits, atol=1e-3), "k=2 must really cut attention"


@pytest.mark.parametrize("family", ["llama", "gemma2", "mistral"])
def test_attention_weights_keep_exactly_min_k_visible(family):
    model = knn_patch.patch(tiny_model(family), k=3)
    ids, mask = batch(length=16, pad=5)
    attentions = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    for weights in attentions:  # (B, H, Lq, Lk)
        kept = (weights > 0).sum(-1)
        assert kept.max() == 3
        assert (kept[0, :, 2:] == 3).all() and (kept[1, :, :5] == 0).all() and (kept[1, :, 7:] == 3).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_have_no_nan_with_padding(dtype):
    model = knn_patch.patch(tiny_model("llama").to(dtype), k=4)
    ids, mask = batch(length=20, pad=8)
    logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.dtype == dtype and not logits[mask.bool()].isnan().any()


def test_attention_dropout_is_applied_in_training_mode_only():
    model = knn_patch.patch(tiny_model("llama", attention_dropout=0.5), k=4)
    ids, _ = batch(pad=0)
    eval_a, eval_b = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(eval_a, eval_b)
    model.train()
    train_a = model(input_ids=ids).logits
    train_b = model(input_ids=ids).logits
    assert not torch.allclose(train_a, train_b)
    train_a.sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_small_k_on_an_unpadded_batch_equals_each_row_alone(family):
    # unpadded batches take the causal path without a mask, where strided queries (gpt2, opt) once failed
    model = knn_patch.patch(tiny_model(family), k=3)
    ids, _ = batch(pad=0)
    with torch.no_grad():
        together = model(input_ids=ids).logits
        alone = torch.cat([model(input_ids=row[None]).logits for row in ids])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
