"""The `gumbel` estimator: dense at k >= n, unbiased output, masks respected, seeded, sampled
gradients converging at ~1/sqrt(samples), the exact backward option, training, clear errors."""

import pytest
import torch
import torch.nn.functional as F
from test_kernel import inputs, padding_mask
from test_tail import exact, gen, train_losses
from tiny_models import tiny_model

import knn_patch
from knn_patch import KNNConfig
from knn_patch.kernels.gumbel import gumbel_attention


def test_k_at_least_n_falls_back_to_dense_sdpa():
    q, k, v = inputs(lq=20, lk=20, dtype=torch.float32)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out = gumbel_attention(q, k, v, k=25, samples=4, generator=gen())
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)


def exact_moments(q, k, v, mask=None):
    """Exact output E_P[v] and per-coordinate variance Var_P[v] of every query."""
    mean = exact(q, k, v, mask)
    second = exact(q, k, v * v, mask)
    return mean, (second - mean * mean).clamp_min(0)


@pytest.mark.parametrize("masked", [False, True])
def test_output_is_unbiased_within_standard_errors(masked):
    """With groups = 1 the output is the mean of T exact draws: its error is within a few standard
    errors sqrt(Var_P[v] / T), and the masked keys (whose values are huge) are never drawn."""
    q, k, v = inputs(b=2, hq=2, hkv=1, lq=12, lk=30)
    mask = padding_mask(2, 12, 30, [0, 6]) if masked else None
    if masked:
        v = v.detach().clone()
        v[1, :, :6] = 1e6  # a masked key sampled even once would show
    samples = 2000
    out = gumbel_attention(q, k, v, mask, k=3, samples=samples, generator=gen(1))
    mean, var = exact_moments(q, k, v, mask)
    z = (out - mean) / (var / samples).sqrt().clamp_min(1e-12)
    assert z.abs().max() < 5  # of 2*2*12*8 = 384 coordinates, |z| > 5 has probability ~2e-4
    assert z.pow(2).mean() < 1.5  # and the spread is that of the standard error


def test_median_of_means_converges_as_samples_grow():
    q, k, v = inputs(lq=30, lk=30)
    errors = [
        (gumbel_attention(q, k, v, k=3, samples=t, groups=4, generator=gen(2)) - exact(q, k, v)).abs().mean()
        for t in (16, 256)
    ]
    assert errors[1] < errors[0] / 2  # sqrt(256 / 16) = 4 in expectation


def test_fully_masked_rows_give_zeros_and_seeds_reproduce():
    q, k, v = inputs(b=2, lq=10, lk=10, dtype=torch.float32)
    mask = padding_mask(2, 10, 10, [0, 10])  # the second sequence sees nothing
    a, b, c = (gumbel_attention(q, k, v, mask, k=2, samples=8, generator=gen(s)) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[1] == 0).all() and torch.isfinite(a).all()


def sampled_gradient_errors(samples, masked=False, seed=0):
    """Relative errors of the sampled dQ, dK, dV against autograd through exact attention."""
    q, k, v = inputs(b=1, hq=2, hkv=1, lq=24, lk=24, d=8)
    mask = padding_mask(1, 24, 24, [4]) if masked else None
    d_out = torch.randn(1, 2, 24, 8, generator=gen(9), dtype=torch.float64)
    truth = torch.autograd.grad(exact(q, k, v, mask), (q, k, v), d_out)
    est = torch.autograd.grad(
        gumbel_attention(q, k, v, mask, k=3, samples=samples, generator=gen(seed)), (q, k, v), d_out
    )
    if masked:  # the padded queries' rows see nothing
        est = (est[0][:, :, 4:], *est[1:])
        truth = (truth[0][:, :, 4:], *truth[1:])
    return torch.stack([(e - t).norm() / t.norm() for e, t in zip(est, truth, strict=True)])


@pytest.mark.parametrize("masked", [False, True])
def test_sampled_gradients_converge_to_autograd(masked):
    """Errors of dQ, dK, dV shrink like 1/sqrt(samples): 16x the samples gives about 1/4 of the error
    (asserted: below 1/2.5), and at 4096 samples each is within 10% of the gradient's norm."""
    small, large = (
        torch.stack([sampled_gradient_errors(t, masked, seed) for seed in range(2)]).mean(0)
        for t in (256, 4096)
    )
    assert (large < small / 2.5).all(), (small, large)
    assert (large < 0.1).all(), large


def test_exact_backward_option_is_autograd_of_dense_attention():
    q, k, v = inputs(lq=16, lk=16)
    d_out = torch.randn(2, 4, 16, 8, generator=gen(1), dtype=torch.float64)
    truth = torch.autograd.grad(exact(q, k, v), (q, k, v), d_out)
    out = gumbel_attention(q, k, v, k=2, samples=4, exact_backward=True, generator=gen())
    for e, t in zip(torch.autograd.grad(out, (q, k, v), d_out), truth, strict=True):
        torch.testing.assert_close(e, t, atol=1e-12, rtol=0)


def test_backend_in_a_model_matches_dense_at_k_ge_n_and_is_reproducible():
    model = tiny_model("llama")
    ids = torch.arange(3, 43).view(2, 20)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        knn_patch.patch(model, KNNConfig(k=64, backend="gumbel"))
        torch.testing.assert_close(model(input_ids=ids).logits, dense, atol=1e-5, rtol=0)
        knn_patch.patch(model, KNNConfig(k=2, backend="gumbel", backend_options={"samples": 8, "seed": 1}))
        first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(first, second) and not torch.allclose(first, dense)


def test_training_with_the_sampled_backward_reduces_the_loss():
    before, after = train_losses("gumbel", {"samples": 16})
    assert after < before - 0.5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"samples": 0}, r"'samples'\]=0"),
        ({"samples": -3}, r"'samples'\]=-3"),
        ({"samples": 10, "groups": 3}, "groups=3 must divide samples=10"),
        ({"groups": 0}, r"'groups'\]=0"),
        ({"samples": 1}, "sampled backward needs samples >= 2"),
        ({"exact_backward": "yes"}, "exact_backward"),
        ({"m": 3}, "unknown keys"),
    ],
)
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        KNNConfig(backend="gumbel", backend_options=options)


def test_k_above_n_in_a_model_is_the_documented_exact_fallback():
    """k > n is not an error: the call returns exact attention (module docstring's rule)."""
    model = tiny_model("llama")
    ids = torch.arange(3, 13).view(1, 10)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        knn_patch.patch(model, KNNConfig(k=1000, backend="gumbel", backend_options={"samples": 2}))
        torch.testing.assert_close(model(input_ids=ids).logits, dense, atol=1e-5, rtol=0)
