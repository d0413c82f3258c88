"""The `tail` estimator: topk at m = 0, exact when the whole tail is sampled or k >= n, an unbiased
estimate of the softmax sums, differentiable, seeded, trainable, and clear errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_kernel import inputs, padding_mask
from tiny_models import tiny_model

import knn_patch
from knn_patch import KNNConfig
from knn_patch.bench.approximation import exact
from knn_patch.kernels.sampling import masked_scores, rest_mask, tail_sample
from knn_patch.kernels.tail import tail_attention
from knn_patch.kernels.topk import topk_attention


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("masked", [False, True])
def test_m_zero_is_topk_exactly(masked):
    q, k, v = inputs(lq=30, lk=30, dtype=torch.float32)
    mask = padding_mask(2, 30, 30, [0, 7]) if masked else None
    out = tail_attention(q, k, v, mask, k=4, m=0, generator=gen())
    assert torch.equal(out, topk_attention(q, k, v, mask, k=4)[0])


def test_k_at_least_n_is_dense_sdpa():
    q, k, v = inputs(lq=20, lk=20, dtype=torch.float32)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(tail_attention(q, k, v, k=20, m=5, generator=gen()), ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("masked", [False, True])
def test_sampling_the_whole_tail_is_exact(masked):
    q, k, v = inputs(lq=25, lk=40)
    mask = padding_mask(2, 25, 40, [0, 9]) if masked else None
    out = tail_attention(q, k, v, mask, k=3, m=40, generator=gen())
    torch.testing.assert_close(out, exact(q, k, v, mask), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float32: the compiled selection
@pytest.mark.parametrize("case", ["causal", "padded", "softcap"])
def test_queries_whose_tail_fits_in_m_are_exact_and_later_ones_are_sampled(case, dtype):
    """Each way the kernel draws samples: the fused causal selection (keys [0, i] visible, no score
    block), a padding mask (any visible set) and materialised causal scores (softcap). A query whose
    visible keys number at most k + m takes them all; later ones differ from exact attention."""
    q, k, v = inputs(lq=48, lk=48, dtype=dtype)
    pads = [0, 5] if case == "padded" else [0, 0]
    mask = padding_mask(2, 48, 48, pads) if case == "padded" else None
    softcap = 2.0 if case == "softcap" else None
    with torch.no_grad():
        out = tail_attention(q, k, v, mask, k=3, m=6, softcap=softcap, chunk_size=16, generator=gen())
        ref = exact(q, k, v, mask, softcap)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for row, pad in enumerate(pads):
        whole = 3 + 6 + pad  # queries [0, whole) see at most k + m keys
        torch.testing.assert_close(out[row, :, :whole], ref[row, :, :whole].to(dtype), atol=tol, rtol=0)
        assert (out[row, :, whole + 8 :] - ref[row, :, whole + 8 :]).abs().amax() > 1e-3


def test_weighted_sums_are_unbiased_and_the_output_converges():
    """sum_sel w e^s (v) estimates sum_all e^s (v) without bias: the mean over draws is within 4
    standard errors; and the output error shrinks as m grows."""
    q, k, v = inputs(b=1, hq=1, hkv=1, lq=1, lk=200)
    s = masked_scores(q.detach().view(1, 1, 1, 1, -1), k.detach(), None, q0=0, q1=1, causal=False, scale=0.35)
    s = s.reshape(1, -1)
    draws = 4000
    top = s[0].topk(10).indices.expand(draws, -1)
    sample, logw = tail_sample(top, 20, gen(), rest=rest_mask(s.expand(draws, -1), top))
    idx, logw = torch.cat([top, sample], -1), torch.cat([torch.zeros(draws, 10, dtype=logw.dtype), logw], -1)
    z = torch.exp(s[0, idx] + logw)  # (draws, 30): weighted exp-scores of the kept keys
    v0 = v[0, 0, :, 0].detach()  # one value coordinate
    for est, truth in [
        (z.sum(-1), torch.exp(s[0]).sum()),  # the normaliser
        ((z * v0[idx]).sum(-1), (torch.exp(s[0]) * v0).sum()),  # the numerator
    ]:
        assert abs(est.mean() - truth) < 4 * est.std() / math.sqrt(draws)
    q, k, v = inputs(lq=60, lk=60)
    errors = [
        torch.stack(
            [
                (tail_attention(q, k, v, k=4, m=m, generator=gen(i)) - exact(q, k, v)).abs().mean()
                for i in range(4)
            ]
        ).mean()
        for m in (2, 8, 32)
    ]
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("masked", [False, True])
def test_gradients_flow_through_kept_and_sampled_keys(masked):
    q, k, v = inputs(b=2, hq=2, hkv=1, lq=8, lk=8, d=4)
    mask = padding_mask(2, 8, 8, [0, 2]) if masked else None
    torch.autograd.gradcheck(
        lambda q, k, v: tail_attention(q, k, v, mask, k=2, m=3, chunk_size=4, generator=gen(5)), (q, k, v)
    )


def test_seed_reproduces_and_another_seed_differs():
    q, k, v = inputs(lq=40, lk=40, dtype=torch.float32)
    a, b, c = (tail_attention(q, k, v, k=3, m=4, generator=gen(s)) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_backend_in_a_model_matches_dense_at_k_ge_n_and_is_reproducible():
    model = tiny_model("llama")
    ids = torch.arange(3, 43).view(2, 20)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        knn_patch.patch(model, KNNConfig(k=64, backend="tail", backend_options={"m": 4}))
        torch.testing.assert_close(model(input_ids=ids).logits, dense, atol=1e-5, rtol=0)
        knn_patch.patch(model, KNNConfig(k=2, backend="tail", backend_options={"m": 3, "seed": 7}))
        first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(first, second) and not torch.allclose(first, dense)


def train_losses(backend, options, steps=8):
    """Loss of the patched tiny model on a fixed batch before and after a few AdamW steps."""
    model = tiny_model("llama").train()
    knn_patch.patch(model, KNNConfig(k=4, backend=backend, backend_options=options))
    ids = torch.randint(3, 128, (2, 32), generator=gen(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def loss():
        return model(input_ids=ids, labels=ids).loss

    with torch.no_grad():
        before = loss().item()
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        return before, loss().item()


def test_training_with_tail_reduces_the_loss():
    before, after = train_losses("tail", {"m": 4})
    assert after < before - 0.5


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match=r"'m'\]=-1"):
        KNNConfig(backend="tail", backend_options={"m": -1})
    with pytest.raises(ValueError, match="unknown keys"):
        KNNConfig(backend="tail", backend_options={"samples": 3})
    with pytest.raises(ValueError, match="seed"):
        KNNConfig(backend="tail", backend_options={"seed": "x"})
    for backend in ("tail", "gumbel"):  # refused when the config is built, not at the first forward
        with pytest.raises(ValueError, match="does not take sink_tokens or local_window"):
            KNNConfig(k=2, backend=backend, sink_tokens=1)
        with pytest.raises(ValueError, match="does not take sink_tokens or local_window"):
            KNNConfig(k=2, backend=backend, local_window=4)


SAMPLED = [("tail", {"m": 3}), ("gumbel", {"samples": 4})]


@pytest.mark.parametrize(("backend", "options"), SAMPLED, ids=[b for b, _ in SAMPLED])
def test_training_draws_afresh_every_call_and_eval_repeats_its_draws(backend, options):
    # the estimators are unbiased only over fresh draws: replaying one sample every step is a bias
    model = knn_patch.patch(tiny_model("llama"), KNNConfig(k=2, backend=backend, backend_options=options))
    ids = torch.arange(3, 43).view(2, 20)
    with torch.no_grad():
        model.train()
        torch.manual_seed(0)
        first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
        torch.manual_seed(0)
        replay = model(input_ids=ids).logits
        model.eval()
        eval_a, eval_b = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.allclose(first, second), "two training steps drew the same keys"
    assert torch.equal(first, replay), "torch.manual_seed reproduces a training run"
    assert torch.equal(eval_a, eval_b)


@pytest.mark.parametrize(("backend", "options"), SAMPLED, ids=[b for b, _ in SAMPLED])
def test_activation_checkpointing_recomputes_with_the_forwards_draws(backend, options):
    ids = torch.arange(3, 43).view(2, 20)

    def grads(checkpointing):
        model = tiny_model("llama").train()
        knn_patch.patch(model, KNNConfig(k=2, backend=backend, backend_options=options))
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(0)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, recomputed = grads(False), grads(True)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
