"""The top-k kernel against a brute-force reference written plainly here, and against SDPA."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from knn_patch.kernels import select
from knn_patch.kernels.select import extension_available, topk_rows
from knn_patch.kernels.topk import topk_attention


def reference(
    q,
    k,
    v,
    mask=None,
    *,
    kk,
    scale,
    causal=True,
    sinks=0,
    window=0,
    softcap=None,
    rest_mean=False,
    exact_rest=False,
):
    """Loop over every (batch, head, query): keep the forced keys, then the kk best other visible keys.

    With `rest_mean`, the visible keys not kept are one more softmax entry: score log(sum of their
    exp-scores), value the mean of their values (`exact_rest`: their softmax-weighted mean), both
    constants for autograd."""
    b, hq, lq, _ = q.shape
    lk, g = k.shape[2], hq // k.shape[1]
    out = torch.zeros(b, hq, lq, v.shape[-1], dtype=q.dtype)
    for bi in range(b):
        for h in range(hq):
            for i in range(lq):
                qpos = i + lk - lq
                if mask is not None:
                    visible = mask[bi if mask.shape[0] > 1 else 0, h if mask.shape[1] > 1 else 0, i]
                else:
                    visible = torch.arange(lk) <= qpos if causal else torch.ones(lk, dtype=torch.bool)
                cols = visible.nonzero().flatten().tolist()
                if not cols:
                    continue
                forced = set(cols[:sinks]) | {j for j in cols if qpos - window < j <= qpos}
                s = (k[bi, h // g] @ q[bi, h, i]) * scale
                if softcap is not None:
                    s = torch.tanh(s / softcap) * softcap
                rest = sorted((j for j in cols if j not in forced), key=lambda j: -s[j].item())
                keep = sorted(forced) + rest[:kk]
                scores, values = s[keep], v[bi, h // g, keep]
                if rest_mean and rest[kk:]:
                    others = rest[kk:]
                    scores = torch.cat([scores, torch.logsumexp(s[others], 0).detach().view(1)])
                    vals = v[bi, h // g, others]
                    carried = torch.softmax(s[others], 0) @ vals if exact_rest else vals.mean(0)
                    values = torch.cat([values, carried.detach().unsqueeze(0)])
                out[bi, h, i] = torch.softmax(scores, -1) @ values
    return out


def inputs(b=2, hq=4, hkv=2, lq=40, lk=40, d=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=gen, dtype=dtype).requires_grad_()
    k = torch.randn(b, hkv, lk, d, generator=gen, dtype=dtype).requires_grad_()
    v = torch.randn(b, hkv, lk, d, generator=gen, dtype=dtype).requires_grad_()
    return q, k, v


def padding_mask(b, lq, lk, pads, window=None):
    """Boolean (B, 1, Lq, Lk) causal mask with `pads[i]` left-padded keys in row i (and a window)."""
    qpos = torch.arange(lq)[:, None] + lk - lq
    kpos = torch.arange(lk)[None]
    m = (kpos <= qpos) if window is None else (kpos <= qpos) & (kpos > qpos - window)
    m = m.expand(b, 1, lq, lk).clone()
    for i, p in enumerate(pads):
        m[i, :, :, :p] = False
    return m


CASES = {
    "short": dict(lq=40, lk=40, kk=5, chunk=8),
    "two_stage_select": dict(lq=300, lk=300, kk=3, chunk=64),
    "dense_chunk": dict(lq=64, lk=64, kk=24, chunk=16),
    "decode_step": dict(lq=1, lk=70, kk=6, chunk=512),
    "cached_prefix": dict(lq=10, lk=50, kk=4, chunk=3),
    "mha": dict(lq=33, lk=33, kk=4, chunk=512, hkv=4),
}


# float64 runs the torch.topk selection; float32 runs the compiled selection (select.cpp)
PRECISION = {"float64": (torch.float64, 1e-12), "float32": (torch.float32, 2e-5)}


@pytest.mark.parametrize("precision", PRECISION)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("masking", ["causal", "padded", "window"])
def test_matches_reference_output_and_gradients(case, masking, precision):
    c = CASES[case]
    dtype, atol = PRECISION[precision]
    q, k, v = inputs(lq=c["lq"], lk=c["lk"], hkv=c.get("hkv", 2), dtype=dtype)
    mask = None
    if masking == "padded":
        mask = padding_mask(2, c["lq"], c["lk"], [0, 7])
    elif masking == "window":
        mask = padding_mask(2, c["lq"], c["lk"], [3, 0], window=9)
    out, _ = topk_attention(q, k, v, mask, k=c["kk"], scale=0.4, chunk_size=c["chunk"])
    ref = reference(q, k, v, mask, kk=c["kk"], scale=0.4)
    torch.testing.assert_close(out, ref, rtol=0, atol=atol)
    weight = torch.randn_like(ref)
    got = torch.autograd.grad((out * weight).sum(), (q, k, v))
    want = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


@pytest.mark.parametrize("opts", [dict(sinks=2, window=0), dict(sinks=0, window=5), dict(sinks=3, window=4)])
def test_sinks_and_local_window_are_kept_on_top_of_k(opts):
    q, k, v = inputs(lq=60, lk=60)
    mask = padding_mask(2, 60, 60, [0, 6])
    out, w = topk_attention(
        q,
        k,
        v,
        mask,
        k=4,
        scale=0.4,
        sink_tokens=opts["sinks"],
        local_window=opts["window"],
        chunk_size=16,
        return_weights=True,
    )
    ref = reference(q, k, v, mask, kk=4, scale=0.4, sinks=opts["sinks"], window=opts["window"])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # the first real token of the padded row is a sink for every later query
    if opts["sinks"]:
        assert (w[1, :, 10:, 6] > 0).all() and (w[1, :, :, :6] == 0).all()


@pytest.mark.parametrize("precision", PRECISION)
@pytest.mark.parametrize("case", ["short", "two_stage_select", "decode_step", "cached_prefix"])
@pytest.mark.parametrize(
    ("masking", "sinks", "window"), [("causal", 0, 0), ("padded", 2, 3), ("window", 0, 4)]
)
def test_rest_mean_matches_reference_output_and_gradients(case, masking, sinks, window, precision):
    c = CASES[case]
    dtype, atol = PRECISION[precision]
    q, k, v = inputs(lq=c["lq"], lk=c["lk"], dtype=dtype)
    mask = None
    if masking == "padded":
        mask = padding_mask(2, c["lq"], c["lk"], [0, 7])
    elif masking == "window":
        mask = padding_mask(2, c["lq"], c["lk"], [3, 0], window=15)
    opts = dict(k=c["kk"], scale=0.4, sink_tokens=sinks, local_window=window)
    out, _ = topk_attention(q, k, v, mask, **opts, chunk_size=c["chunk"], rest_mean=True)
    ref = reference(q, k, v, mask, kk=c["kk"], scale=0.4, sinks=sinks, window=window, rest_mean=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=atol)
    plain, _ = topk_attention(q, k, v, mask, **opts, chunk_size=c["chunk"])
    assert (out - plain).abs().max() > 1e-3  # the rest's share is not renormalised away
    weight = torch.randn_like(ref)
    got = torch.autograd.grad((out * weight).sum(), (q, k, v))
    want = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


def test_rest_mean_with_softcap_matches_reference():
    q, k, v = inputs(lq=30, lk=30)
    out, _ = topk_attention(q, k, v, k=4, scale=0.4, softcap=2.0, chunk_size=8, rest_mean=True)
    ref = reference(q, k, v, kk=4, scale=0.4, softcap=2.0, rest_mean=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("precision", PRECISION)
@pytest.mark.parametrize("chunk", [8, 40], ids=["chunked", "one_chunk"])
@pytest.mark.parametrize(
    ("masking", "sinks", "window"), [("causal", 0, 0), ("padded", 2, 3), ("window", 1, 2)]
)
def test_rest_samples_are_exact_where_they_cover_the_rest(masking, sinks, window, chunk, precision):
    """m samples of a rest of at most m keys take all of it: the correction makes the row exact.
    In one chunk, the first rows sample while their top-k has unfilled slots (in fp32 on CPU the
    compiled selection fills them with repeated positions)."""
    dtype, atol = PRECISION[precision]
    q, k, v = inputs(lq=40, lk=40, dtype=dtype)
    masks = {"padded": padding_mask(2, 40, 40, [0, 7]), "window": padding_mask(2, 40, 40, [3, 0], 25)}
    mask = masks.get(masking)
    opts = dict(k=3, scale=0.4, sink_tokens=sinks, local_window=window, chunk_size=chunk, rest_mean=True)
    m = 20
    out, _ = topk_attention(q, k, v, mask, **opts, tail_samples=m, generator=torch.Generator().manual_seed(0))
    mean_only, _ = topk_attention(q, k, v, mask, **opts)
    exact = reference(q, k, v, mask, kk=40, scale=0.4)
    seen = (torch.arange(40) <= torch.arange(40).unsqueeze(-1)) if mask is None else mask[:, 0]
    covered = (seen.sum(-1) <= m).expand(2, 40).unsqueeze(1).expand(2, 4, 40)  # (B, Hq, Lq)
    assert covered.any() and (~covered).any()
    torch.testing.assert_close(out[covered], exact[covered], rtol=0, atol=atol)
    assert (out[~covered] - mean_only[~covered]).abs().max() > 1e-3, "the other rows are sampled"


@pytest.mark.parametrize(
    ("masking", "sinks", "window"), [("causal", 0, 0), ("padded", 2, 3), ("window", 1, 2)]
)
def test_rest_samples_backward_holds_the_corrected_rest_constant(masking, sinks, window):
    """Where the samples cover the rest, the rest's term is exact, and the backward matches a
    reference whose rest entry is the exact weighted mean, held constant. One chunk, so every row
    takes the sampled path (a chunk whose top-k and samples cover its keys is plain exact attention)."""
    q, k, v = inputs(lq=40, lk=40)
    masks = {"padded": padding_mask(2, 40, 40, [0, 7]), "window": padding_mask(2, 40, 40, [3, 0], 25)}
    mask = masks.get(masking)
    opts = dict(k=3, scale=0.4, sink_tokens=sinks, local_window=window, chunk_size=40, rest_mean=True)
    out, _ = topk_attention(
        q, k, v, mask, **opts, tail_samples=20, generator=torch.Generator().manual_seed(0)
    )
    seen = (torch.arange(40) <= torch.arange(40).unsqueeze(-1)) if mask is None else mask[:, 0]
    covered = (seen.sum(-1) <= 20).expand(2, 40).unsqueeze(1).expand(2, 4, 40)
    ref = reference(
        q, k, v, mask, kk=3, scale=0.4, sinks=sinks, window=window, rest_mean=True, exact_rest=True
    )
    weight = torch.randn_like(ref) * covered.unsqueeze(-1)
    got = torch.autograd.grad((out * weight).sum(), (q, k, v))
    want = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_rest_samples_correct_the_mean_without_bias():
    """Averaged over draws, mean + sampled correction converges on exact attention; the mean alone
    stays biased. One draw is random but reproducible from its generator's seed."""
    q, k, v = inputs(lq=40, lk=40)
    exact = reference(q, k, v, kk=40, scale=0.4)
    opts = dict(k=3, scale=0.4, chunk_size=8, rest_mean=True)
    mean_only, _ = topk_attention(q, k, v, **opts)

    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        return topk_attention(q, k, v, **opts, tail_samples=4, generator=gen)[0]

    draws = torch.stack([draw(seed) for seed in range(200)])
    assert (draws.mean(0) - exact).norm() < 0.3 * (mean_only - exact).norm()
    assert torch.equal(draw(7), draws[7]) and not torch.equal(draws[7], draws[8])


def test_tail_samples_take_sinks_and_window_only_with_rest_mean():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="rest_mean"):
        topk_attention(q, k, v, k=4, tail_samples=4, sink_tokens=2)


def test_softcap_matches_reference():
    q, k, v = inputs()
    out, _ = topk_attention(q, k, v, k=5, scale=0.4, softcap=1.5, chunk_size=16)
    ref = reference(q, k, v, kk=5, scale=0.4, softcap=1.5)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_each_query_keeps_exactly_min_k_visible():
    q, k, v = inputs(lq=50, lk=50)
    mask = padding_mask(2, 50, 50, [0, 11])
    _, w = topk_attention(q, k, v, mask, k=7, scale=0.4, chunk_size=16, return_weights=True)
    kept = (w > 0).sum(-1)  # (B, Hq, Lq)
    visible = mask.sum(-1).expand_as(kept)
    assert torch.equal(kept, visible.clamp(max=7))
    torch.testing.assert_close(w.sum(-1)[visible > 0], torch.ones_like(w.sum(-1)[visible > 0]))


def test_never_more_than_k_on_ties_and_reproducible():
    q = torch.randn(1, 2, 30, 8)
    k = torch.ones(1, 1, 30, 8)  # every score ties
    v = torch.randn(1, 1, 30, 8)
    _, w1 = topk_attention(q, k, v, k=4, chunk_size=7, return_weights=True)
    _, w2 = topk_attention(q, k, v, k=4, chunk_size=7, return_weights=True)
    assert ((w1 > 0).sum(-1) == torch.arange(1, 31).clamp(max=4)).all()
    assert torch.equal(w1, w2)


@pytest.mark.parametrize("chunk", [1, 7, 512])
def test_chunk_size_does_not_change_the_result(chunk):
    q, k, v = inputs(dtype=torch.float32, lq=64, lk=64)
    ref, _ = topk_attention(q, k, v, k=6, chunk_size=64)
    out, _ = topk_attention(q, k, v, k=6, chunk_size=chunk)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rest_mean", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_k_at_least_n_equals_sdpa(padded, rest_mean):
    q, k, v = inputs(dtype=torch.float32, lq=70, lk=70)
    mask = padding_mask(2, 70, 70, [0, 9]) if padded else None
    out, _ = topk_attention(q, k, v, mask, k=70, chunk_size=16, rest_mean=rest_mean)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    rows = slice(None) if mask is None else mask.any(-1, keepdim=True).expand_as(out)
    torch.testing.assert_close(out[rows], ref[rows], rtol=0, atol=1e-5)
    go = torch.autograd.grad(out[rows].sum(), (q, k, v))
    gr = torch.autograd.grad(ref[rows].sum(), (q, k, v))
    for a, b in zip(go, gr, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_gradcheck_float64():
    q, k, v = inputs(b=1, hq=2, hkv=1, lq=9, lk=9, d=4)
    mask = padding_mask(1, 9, 9, [2])

    def f(q, k, v):
        return topk_attention(q, k, v, mask, k=3, scale=0.7, softcap=2.0, sink_tokens=1, chunk_size=4)[0]

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_dropout_gradcheck_with_fixed_seed_and_scaling():
    q, k, v = inputs(b=1, hq=2, hkv=1, lq=9, lk=9, d=4)

    def f(q, k, v):
        gen = torch.Generator().manual_seed(3)
        return topk_attention(q, k, v, k=3, dropout=0.3, generator=gen, chunk_size=4)[0]

    assert torch.autograd.gradcheck(f, (q, k, v))
    out, plain = f(q, k, v), topk_attention(q, k, v, k=3, chunk_size=4)[0]
    assert not torch.allclose(out, plain), "dropout changes the output"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_has_no_nan_on_fully_padded_rows(dtype):
    q, k, v = inputs(dtype=torch.float32, lq=32, lk=32)
    mask = padding_mask(2, 32, 32, [0, 10])
    mask[1, :, :10] = False  # padded queries see nothing at all
    q, k, v = (t.detach().to(dtype) for t in (q, k, v))
    ref, _ = topk_attention(q.float(), k.float(), v.float(), mask, k=5)  # same rounded inputs, fp32 output
    out, _ = topk_attention(q, k, v, mask, k=5)
    assert out.dtype == dtype and not out.isnan().any()
    assert (out[1, :, :10] == 0).all()
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=2 * torch.finfo(dtype).eps * ref.abs().max())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, _ = topk_attention(q.float(), k.float(), v.float(), mask, k=5)
    assert auto.dtype == torch.float32, "scores are computed with autocast off"


def test_bad_shapes_and_masks_are_rejected():
    q, k, v = inputs(hq=3, hkv=2)
    with pytest.raises(ValueError, match="multiple"):
        topk_attention(q, k, v, k=2)
    q, k, v = inputs()
    with pytest.raises(ValueError, match="boolean"):
        topk_attention(q, k, v, torch.zeros(2, 1, 40, 40), k=2)
    with pytest.raises(ValueError, match="k must be"):
        topk_attention(q, k, v, k=0)
    assert math.isfinite(topk_attention(q, k, v, k=1)[0].sum().item())


def test_compiled_selection_is_built():
    assert extension_available(), "g++ and ninja are in the setup; the fast path must build"


@pytest.mark.parametrize(("rows", "cols", "k"), [(64, 4096, 32), (300, 100, 7), (50, 9, 9), (8, 2000, 1)])
def test_compiled_selection_equals_torch_topk(rows, cols, k):
    gen = torch.Generator().manual_seed(cols)
    x = torch.randn(rows, cols, generator=gen)
    ends = torch.randint(0, cols + 1, (rows,), generator=gen)
    values, idx = topk_rows(x, k, ends)
    want = x.masked_fill(torch.arange(cols) >= ends.unsqueeze(-1), -math.inf).topk(k, dim=-1)
    filled = want.values > -math.inf
    assert torch.equal(values, want.values)
    assert torch.equal(idx[filled], want.indices[filled])
    # unsorted: the same keys and values, in some order
    any_values, any_idx = topk_rows(x, k, ends, sorted=False)
    order = any_values.sort(dim=-1, descending=True, stable=True).indices
    assert torch.equal(any_values.gather(-1, order), want.values)
    assert torch.equal(any_idx.gather(-1, order)[filled], want.indices[filled])


@pytest.mark.parametrize("sorted_", [True, False])
@pytest.mark.parametrize("shape", [(200, 300), (4, 40000)])  # kth_largest on 300 scores, 2500 group maxima
def test_compiled_selection_on_many_ties_and_masked_keys_keeps_the_lowest_indices(sorted_, shape):
    """Scores of 5 values, a fifth of them masked (-inf) anywhere in the row: the selection's
    buckets (kth_largest) see infinities and ties at every boundary; it keeps the k best, the lower
    index first among equal scores, as a stable descending sort does."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, shape, generator=gen).float()
    x[torch.rand(shape, generator=gen) < 0.2] = -math.inf
    values, idx = topk_rows(x, 40, sorted=sorted_)
    want = x.sort(dim=-1, descending=True, stable=True)
    assert torch.equal(idx.sort(-1).values, want.indices[:, :40].sort(-1).values)
    assert torch.equal(values.sort(-1, descending=True).values, want.values[:, :40])


def test_compiled_selection_keeps_the_lower_index_on_ties():
    x = torch.zeros(3, 500)
    x[:, 100:110] = 1.0
    values, idx = topk_rows(x, 4)
    assert torch.equal(idx, torch.tensor([[100, 101, 102, 103]] * 3)) and (values == 1).all()


def test_a_failed_build_for_this_cpu_is_retried_generic_then_left_to_torch(monkeypatch, caplog):
    """A compiler that cannot build for this CPU (-march=native) gets a generic build; when that
    fails too, selection falls back to torch; each step says so."""
    tried = []

    def build(sources, native):
        tried.append(native)
        if native or fail_generic:
            raise RuntimeError("cannot build")
        return "generic build"

    monkeypatch.setattr(select, "_native_cpu", lambda: "avx512f amx_tile")
    monkeypatch.setattr(select, "_build", build)
    try:
        with caplog.at_level(logging.WARNING, logger="knn_patch"):
            fail_generic = False
            select.extension.cache_clear()
            assert select.extension() == "generic build" and tried == ["avx512f amx_tile", ""]
            assert "for this CPU (cannot build); trying a generic build" in caplog.text
            fail_generic = True
            select.extension.cache_clear()
            assert select.extension() is None and tried[2:] == ["avx512f amx_tile", ""]
            assert "using torch.topk and torch sampling" in caplog.text
    finally:
        select.extension.cache_clear()  # the next caller loads the real build again
