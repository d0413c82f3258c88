"""The shared kernel math: the masked softmax, the grouped mask and row gathers every kernel uses;
the lazy Gumbel sampler draws exactly from softmax, the tail sample is a uniform subset with
inverse-inclusion weights, median of means."""

import itertools
import math

import pytest
import torch

from knn_patch.kernels import sampling, select
from knn_patch.kernels.sampling import (
    gather_rows,
    group_mask,
    lazy_gumbel_sample,
    masked_softmax,
    median_of_means,
    rest_mask,
    scatter_rows,
    tail_sample,
)
from knn_patch.kernels.select import extension_available, scores_topk


def chi_square_pvalue(draws: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit of integer draws to `probs`; zero-probability keys must
    never be drawn (any such draw gives p = 0)."""
    counts = torch.bincount(draws.flatten(), minlength=probs.numel()).double()
    expected = probs.double() * draws.numel()
    support = expected > 0
    if counts[~support].sum() > 0:
        return 0.0
    stat = ((counts[support] - expected[support]) ** 2 / expected[support]).sum()
    df = torch.tensor((int(support.sum()) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, stat / 2))  # P(chi2_df > stat)


def scores(n=48, masked=(40, 48), seed=0, spread=1.5):
    s = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * spread
    s[masked[0] : masked[1]] = -math.inf  # keys the query may not see
    return s


def test_masked_softmax_weighs_kept_finite_entries_and_gives_zeros_to_empty_rows():
    s = torch.tensor([[1.0, 2.0, -math.inf, 0.5], [-math.inf] * 4, [3.0, 1.0, 2.0, 0.0]])
    keep = torch.tensor([[True] * 4, [True] * 4, [True, False, True, False]])
    p = masked_softmax(s, keep)
    assert torch.allclose(p[0], torch.softmax(s[0], -1))
    assert torch.equal(p[1], torch.zeros(4))  # a query that sees nothing: zeros, not NaN
    assert torch.allclose(p[2], torch.tensor([math.e / (math.e + 1), 0.0, 1 / (math.e + 1), 0.0]))
    assert torch.equal(masked_softmax(s), masked_softmax(s, torch.ones_like(keep)))


def test_group_mask_matches_the_grouped_query_layout():
    b, hq, hkv, lq, lk = 2, 6, 2, 3, 5
    full = torch.rand(b, hq, lq, lk) > 0.5
    grouped = group_mask(full, hq, hkv, lq, lk)  # (B, Hkv, G, Lq, Lk)
    assert torch.equal(grouped.reshape(b, hq, lq, lk), full)
    shared = group_mask(full[:, :1], hq, hkv, lq, lk)  # one mask for every head
    assert shared.shape == (b, 1, 1, lq, lk) and torch.equal(shared[:, 0, 0], full[:, 0])
    assert group_mask(None, hq, hkv, lq, lk) is None
    with pytest.raises(ValueError, match="boolean"):
        group_mask(full.float(), hq, hkv, lq, lk)
    with pytest.raises(ValueError, match="4-D"):
        group_mask(full[0], hq, hkv, lq, lk)


def test_scatter_rows_is_the_adjoint_of_gather_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 4, generator=g)  # (B, Hkv, L, E)
    pos = torch.randint(7, (2, 3, 2, 5, 6), generator=g)  # (B, Hkv, G, C, t)
    rows = gather_rows(x, pos)
    assert torch.equal(rows[1, 2, 0, 3, 4], x[1, 2, pos[1, 2, 0, 3, 4]])
    y = torch.randn(rows.shape, generator=g)
    dst = torch.zeros_like(x)
    scatter_rows(dst, pos, y)  # <gather(x), y> == <x, scatter(y)>
    assert torch.allclose((rows * y).sum(), (x * dst).sum(), atol=1e-4)


@pytest.mark.parametrize("spread", [3.0, 1.0, 0.0])  # peaked, moderate, flat (every tail key a candidate)
def test_lazy_gumbel_draws_follow_softmax(spread):
    s = scores(spread=spread)
    draws = lazy_gumbel_sample(s.expand(400, -1).contiguous(), 5, 100, torch.Generator().manual_seed(1))
    assert draws.shape == (400, 100)
    assert chi_square_pvalue(draws, torch.softmax(s, 0)) > 1e-3


def test_chi_square_rejects_a_sampler_that_ignores_the_tail():
    """The test above can fail: draws from the top-k only (truncation) are rejected."""
    s = scores(spread=1.0)
    top = s.topk(5).indices
    gen = torch.Generator().manual_seed(1)
    truncated = top[torch.multinomial(torch.softmax(s[top], 0), 40_000, replacement=True, generator=gen)]
    assert chi_square_pvalue(truncated, torch.softmax(s, 0)) < 1e-6
    tempered = torch.multinomial(torch.softmax(s / 1.1, 0), 40_000, replacement=True, generator=gen)
    assert chi_square_pvalue(tempered, torch.softmax(s, 0)) < 1e-3


def test_lazy_gumbel_rows_are_independent_and_masked_rows_give_minus_one():
    s = torch.stack([scores(seed=0), scores(seed=1), torch.full((48,), -math.inf)])
    draws = lazy_gumbel_sample(s.repeat_interleave(200, 0), 3, 100, torch.Generator().manual_seed(2))
    for row in range(2):
        assert chi_square_pvalue(draws[row * 200 : (row + 1) * 200], torch.softmax(s[row], 0)) > 1e-3
    assert (draws[400:] == -1).all()


def test_lazy_gumbel_is_reproducible_with_a_seed():
    s = scores().expand(8, -1).contiguous()
    a = lazy_gumbel_sample(s, 4, 16, torch.Generator().manual_seed(3))
    b = lazy_gumbel_sample(s, 4, 16, torch.Generator().manual_seed(3))
    c = lazy_gumbel_sample(s, 4, 16, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def masked_tail_sample(s: torch.Tensor, k: int, m: int, rows: int, generator=None):
    """`tail_sample` through its mask path (as the kernel runs it under a padding mask) for `rows`
    copies of the score row s (L,): (top-k indices (k,), sampled keys and log-weights (rows, m))."""
    top = s.topk(k).indices.expand(rows, -1)
    rest = rest_mask(s.expand(rows, -1), top)
    return top[0], *tail_sample(top, m, generator, rest=rest)


def test_tail_sample_under_a_mask_is_a_uniform_distinct_sample_with_inverse_weights():
    s = scores(n=30, masked=(25, 30), spread=1.0)
    rows = 4000
    top, sample, logw = masked_tail_sample(s, 5, 4, rows, torch.Generator().manual_seed(0))
    torch.testing.assert_close(logw, torch.full((rows, 4), math.log(20 / 4), dtype=torch.float64))
    assert all(len(set(r.tolist())) == 4 for r in sample[:200]), "distinct within a row"
    top = set(top.tolist())
    assert not any(j in top or j >= 25 for j in sample.flatten().tolist()), "only visible tail keys"
    rest = torch.tensor(sorted(set(range(25)) - top))
    probs = torch.zeros(30)
    probs[rest] = 1 / 20
    assert chi_square_pvalue(sample, probs) > 1e-3  # each tail key equally likely


def test_tail_sample_under_a_mask_takes_the_whole_tail_when_m_covers_it():
    s = scores(n=30, masked=(25, 30))
    top, sample, logw = masked_tail_sample(s, 5, 100, 1)
    kept = sample[0][torch.isfinite(logw[0])]
    assert sorted(kept.tolist()) == sorted(set(range(25)) - set(top.tolist()))
    assert (logw[0][torch.isfinite(logw[0])] == 0).all(), "weight n_rest / m = 1"


def subset_ids(idx: torch.Tensor, rest: list[int], m: int) -> torch.Tensor:
    """Each row's set of m keys (all in `rest`) as its index among the m-subsets of `rest`."""
    ids = {c: i for i, c in enumerate(itertools.combinations(rest, m))}
    return torch.tensor([ids[tuple(sorted(r))] for r in idx.tolist()])


@pytest.fixture(params=["compiled", "torch"])
def prefix_sampler(request, monkeypatch):
    """Runs a test through each sampler of the prefix path: the compiled one and the torch fallback
    (no extension at all, as without a compiler)."""
    if request.param == "torch":
        monkeypatch.setattr(sampling, "extension", lambda: None)
        monkeypatch.setattr(select, "extension", lambda: None)
    else:
        assert extension_available(), "g++ and ninja are in the setup; the compiled sampler must build"
    return request.param


def test_tail_sample_of_a_causal_prefix_is_a_uniform_subset(prefix_sampler):
    """The prefix path (row r sees keys [0, ends[r]), no (R, L) mask): 3 distinct keys of the 6 visible
    keys outside the top-k, each of the 20 subsets equally likely, weight 6/3; and the test has power
    against a sampler whose keys are distinct but not a uniform subset."""
    rows, rest = 30_000, [0, 1, 3, 5, 6, 8]
    top = torch.tensor([7, 2, 9, 4]).expand(rows, -1)  # unsorted, as the fused selection returns it
    idx, logw = tail_sample(top, 3, torch.Generator().manual_seed(0), ends=torch.full((rows,), 10))
    torch.testing.assert_close(logw, torch.full((rows, 3), math.log(6 / 3), dtype=torch.float64))
    uniform = torch.full((20,), 1 / 20)
    assert chi_square_pvalue(subset_ids(idx, rest, 3), uniform) > 1e-3  # also: distinct, only rest keys
    # sorted i.i.d. ranks shifted apart: distinct keys, but a non-uniform subset
    ranks = torch.randint(0, 4, (rows, 3), generator=torch.Generator().manual_seed(1)).sort(-1).values
    shifted = torch.tensor(rest)[ranks + torch.arange(3)]
    assert chi_square_pvalue(subset_ids(shifted, rest, 3), uniform) < 1e-6


def test_tail_sample_of_causal_prefixes_of_any_length_draws_each_tail_key_equally(prefix_sampler):
    """Rows of different lengths (as one causal chunk): m distinct keys outside the row's top-k and
    before its end, weight n_rest / m, and each tail key of a long prefix equally likely."""
    rows, m = 20_000, 4
    ends = torch.tensor([7, 12, 40]).repeat(rows)
    top = torch.tensor([5, 0, 3]).expand(ends.numel(), -1)
    idx, logw = tail_sample(top, m, torch.Generator().manual_seed(0), ends=ends)
    expected = torch.log((ends - 3).double() / m).unsqueeze(-1).expand(-1, m)
    torch.testing.assert_close(logw, expected)
    assert all(len(set(r)) == m for r in idx[:300].tolist()), "distinct within a row"
    assert ((idx < ends.unsqueeze(-1)) & (idx != 0) & (idx != 3) & (idx != 5)).all(), "only tail keys"
    probs = torch.full((40,), 1 / 37)
    probs[[0, 3, 5]] = 0
    assert chi_square_pvalue(idx[2::3], probs) > 1e-3


def test_tail_sample_of_a_causal_prefix_is_reproducible_with_a_seed(prefix_sampler):
    top, ends = torch.tensor([7, 2, 9, 4]).expand(64, -1), torch.arange(64) + 10

    def draw(seed):
        return tail_sample(top, 3, torch.Generator().manual_seed(seed), ends=ends)[0]

    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))


def test_fused_selection_draws_the_tail_sample_with_its_scores():
    """`scores_topk` with a tail (the kernel's fused path, compiled only): the top-k, then
    `tail_sample`'s draw for the same generator state, the sampled keys' scores, and -inf / index 0
    in unused slots."""
    assert extension_available(), "g++ and ninja are in the setup; the compiled sampler must build"
    g = torch.Generator().manual_seed(0)
    q, key = torch.randn(2, 50, 8, generator=g), torch.randn(2, 60, 8, generator=g)
    ends = torch.randint(0, 61, (100,), generator=g)  # short rows leave slots unused
    vals, idx, logw = scores_topk(q, key, 5, ends, 6, torch.Generator().manual_seed(1))
    sample, expected_logw = tail_sample(idx[:, :5], 6, torch.Generator().manual_seed(1), ends=ends)
    assert torch.equal(idx[:, 5:], sample)
    torch.testing.assert_close(logw, expected_logw)
    scores = (q @ key.transpose(-1, -2)).reshape(100, 60)
    masked = scores.masked_fill(torch.arange(60) >= ends.unsqueeze(-1), -math.inf)
    full = ends >= 5  # rows with 5 visible keys: the top-5 set is unique
    assert torch.equal(idx[full, :5].sort(-1).values, masked[full].topk(5).indices.sort(-1).values)
    used = torch.isfinite(logw)
    torch.testing.assert_close(vals[:, 5:][used], scores.gather(1, sample)[used])
    assert (vals[:, 5:][~used] == -math.inf).all() and (sample[~used] == 0).all()


@pytest.mark.parametrize("n_seeds", [0, 6, 40])
def test_fused_selection_with_seeds_ranks_them_with_the_keys(monkeypatch, n_seeds):
    """With `seeds`, a row's top-k is taken over its seeds (ids as given, -inf slots empty) and its
    scores (ids offset), in the compiled and torch paths alike; even zero seeds offset. With 40
    seeds (38 given) the compiled path skips the scores below each row's 5th seed, which must not
    change the result."""
    g = torch.Generator().manual_seed(0)
    q, key = torch.randn(2, 50, 8, generator=g), torch.randn(2, 60, 8, generator=g)
    ends = torch.randint(1, 61, (100,), generator=g)
    scores = (q @ key.transpose(-1, -2)).reshape(100, 60)
    scores = scores.masked_fill(torch.arange(60) >= ends.unsqueeze(-1), -math.inf)
    seed_v = torch.randn(100, n_seeds, generator=g) * 3
    seed_v[:, :2] = -math.inf  # empty slots
    seed_i = 1000 + torch.randperm(100 * n_seeds, generator=g).view(100, n_seeds)  # distinct ids
    offset = 500
    # expected: top-5 over (seeds, scores) by value, as (value, id) sets per row
    cand_v = torch.cat([seed_v, scores], -1)
    cand_i = torch.cat([seed_i, torch.arange(60).expand(100, 60) + offset], -1)
    top_v, top_c = cand_v.topk(5, -1)
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(select, "extension", lambda: None)
        vals, idx, _ = scores_topk(q, key, 5, ends, seeds=(seed_v, seed_i), offset=offset)
        order = vals.argsort(-1, descending=True)
        vals, idx = vals.gather(-1, order), idx.gather(-1, order)
        torch.testing.assert_close(vals, top_v)
        found = top_v > -math.inf
        assert torch.equal(idx[found], cand_i.gather(-1, top_c)[found])
    from_keys = (idx[found] >= offset) & (idx[found] < 1000)
    assert from_keys.any() and (idx[found] >= 1000).any() == bool(n_seeds)


def test_fused_selection_never_returns_a_masked_key():
    """A key whose score is -inf (here: a key of -inf against positive queries) never comes back,
    with seeds or without: a slot no key fills is (-inf, 0) and the selection reads the row in
    the vectorised loop (6 keys) and the scalar one alike."""
    if not extension_available():
        pytest.skip("compiled path only")
    q = torch.rand(1, 3, 4) + 0.5
    key = torch.randn(1, 6, 4)
    key[0, 2] = -math.inf  # scores -inf for every query
    key[0, 5] = -math.inf  # in the scalar tail of the row
    empty = (torch.full((3, 1), -math.inf), torch.zeros(3, 1, dtype=torch.int64))
    for seeds in (empty, None):
        vals, idx, _ = scores_topk(q, key, 6, seeds=seeds, offset=10 if seeds else 0)
        unfilled = vals == -math.inf
        assert unfilled.sum(-1).tolist() == [2, 2, 2] and (idx[unfilled] == 0).all()


def test_tail_sample_takes_a_short_tail_whole_and_an_empty_one_not_at_all(prefix_sampler):
    top = torch.tensor([[2, 4, 1, 0], [3, 1, 0, 2]])
    idx, logw = tail_sample(top, 3, torch.Generator().manual_seed(0), ends=torch.tensor([6, 3]))
    assert sorted(idx[0, torch.isfinite(logw[0])].tolist()) == [3, 5]  # the whole tail, weight 1
    assert (logw[0].sort().values == torch.tensor([-math.inf, 0.0, 0.0], dtype=torch.float64)).all()
    assert (logw[1] == -math.inf).all() and (idx[1] == 0).all()  # 3 visible keys, all in the top-k


def test_median_of_means():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0, 200.0]).view(6, 1)
    assert median_of_means(x, 1).item() == pytest.approx(x.mean().item())
    assert median_of_means(x, 3).item() == pytest.approx(3.5)  # means 1.5, 3.5, 150
    x4 = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 100.0, 200.0]).view(8, 1)
    assert median_of_means(x4, 4).item() == pytest.approx(
        (3.5 + 5.5) / 2
    )  # the two middle of 1.5, 3.5, 5.5, 150
