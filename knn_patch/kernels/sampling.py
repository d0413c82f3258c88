"""Shared math of the kernels: the grouped mask layout, the masked softmax, gathers and scatters of key
rows, and the sampled estimators' parts (`tail`, `gumbel`): masked score blocks, exact attention as
the reference they estimate, the uniform tail sample, and the lazy Gumbel sampler.

Attention reads as an expectation, o_i = E_{j ~ softmax(s_i)}[v_j] with s_ij = q_i·k_j·scale
("kNN Attention Demystified", Haris 2024). The functions here work on one block of score rows
(R, L), with -inf at keys a query may not see, so every kernel shares one masking rule.
"""

from __future__ import annotations

import math

import torch

from .select import draw_seed, extension, topk_rows


def validate_seed(seed: object) -> None:
    """The `seed` backend option: an int >= 0, or None for fresh draws every call."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"KNNConfig.backend_options['seed']={seed!r} is invalid: use an int >= 0 or None.")


def layer_generator(
    seed: int | None, layer_idx: int | None, device: torch.device, *, training: bool = False
) -> torch.Generator:
    """The generator of one attention call.

    In eval mode it is seeded with (seed, layer): equal inputs give equal outputs, a run reproduces,
    and layers draw differently. In training the estimators are unbiased only over fresh draws, so
    each call also mixes in one draw from torch's default CPU generator: steps differ,
    `torch.manual_seed` (Accelerate's `set_seed`) reproduces a run, and activation checkpointing,
    which restores that generator before it recomputes a layer, replays the forward's draws. A
    `seed` of None draws fresh randomness every call, in both modes.
    """
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
        return gen
    stream = seed * 1_000_003 + (layer_idx or 0)
    if training:
        stream = stream * 2_147_483_659 + int(torch.randint(2**31, (1,)))
    gen.manual_seed(stream % 2**63)
    return gen


# Elements of the (pairs x keys) random keys the sampler holds at once for pairs with large tails.
_BIG_BUDGET = 1 << 22


def group_mask(
    attention_mask: torch.Tensor | None, hq: int, hkv: int, lq: int, lk: int
) -> torch.Tensor | None:
    """Boolean mask (B|1, 1|Hq, Lq|1, Lk) -> (B|1, 1|Hkv, 1|G, Lq, Lk), G = Hq / Hkv, matching the
    grouped query layout (B, Hkv, G, Lq, D) of every kernel (a view: nothing is copied)."""
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool:
        raise ValueError(f"attention_mask must be boolean (True = keep), got {attention_mask.dtype}.")
    if attention_mask.dim() != 4:
        raise ValueError(f"attention_mask must be 4-D (B, 1|Hq, Lq, Lk), got {tuple(attention_mask.shape)}.")
    mb, mh = attention_mask.shape[:2]
    mask = attention_mask.expand(mb, mh, lq, lk)
    return mask.unsqueeze(1) if mh == 1 else mask.unflatten(1, (hkv, hq // hkv))


def gather_rows(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rows of x (B, Hkv, L, E) at key positions pos (B, Hkv, G, C, t) in [0, L) -> (B, Hkv, G, C, t, E)."""
    b, hkv, n, e = x.shape
    flat = pos + (torch.arange(b * hkv, device=x.device) * n).view(b, hkv, 1, 1, 1)  # (B, Hkv, G, C, t)
    return torch.index_select(x.reshape(b * hkv * n, e), 0, flat.reshape(-1)).view(*pos.shape, e)


def scatter_rows(dst: torch.Tensor, pos: torch.Tensor, src: torch.Tensor) -> None:
    """dst (B, Hkv, L, E) += src (B, Hkv, G, C, t, E), summed into the rows pos (B, Hkv, G, C, t);
    dst must be contiguous (it is added into through a flat view)."""
    b, hkv, n, e = dst.shape
    flat = pos + (torch.arange(b * hkv, device=dst.device) * n).view(b, hkv, 1, 1, 1)  # (B, Hkv, G, C, t)
    dst.view(b * hkv * n, e).index_add_(0, flat.reshape(-1), src.reshape(-1, e))


def masked_scores(
    q: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    q0: int,
    q1: int,
    causal: bool,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Scores of queries [q0, q1): q (B, Hkv, G, Lq, D), key (B, Hkv, Lk, D) -> (B, Hkv, G, C, L).

    L is Lk, or the causal limit of the chunk's last query when there is no mask (later keys are
    never visible). Keys a query may not see hold -inf. Queries are the last Lq positions (the
    causal mask is aligned to the bottom right, as in decoding).
    """
    lq, lk = q.shape[3], key.shape[2]
    offset = lk - lq
    hi = min(lk, q1 + offset) if mask is None and causal else lk
    s = torch.matmul(q[:, :, :, q0:q1] * scale, key[:, :, None, :hi].transpose(-1, -2))  # (B, Hkv, G, C, L)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        s = s.masked_fill(~mask[..., q0:q1, :hi], -math.inf)
    elif causal:
        qpos = torch.arange(q0, q1, device=s.device).unsqueeze(-1) + offset  # (C, 1)
        s = s.masked_fill(torch.arange(hi, device=s.device) > qpos, -math.inf)
    return s


def masked_softmax(s: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the last dim of s, over the entries `keep` marks (every entry when None); -inf
    entries weigh 0. A row with nothing to weigh (a query that sees no key) gives zeros, not NaN.

    The row maximum subtracted for stability is detached: the result does not depend on it, so
    autograd need not differentiate through it."""
    if keep is not None:
        s = s.masked_fill(~keep, -math.inf)
    mx = s.amax(-1, keepdim=True).detach()
    e = torch.exp(s - torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)))
    return e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)


def exact_attention(
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    causal: bool,
    scale: float,
    softcap: float | None = None,
    chunk_size: int = 512,
) -> torch.Tensor:
    """Dense softmax attention, the quantity the estimators estimate; differentiable by autograd.

    q (B, Hkv, G, Lq, D), key (B, Hkv, Lk, D), value (B, Hkv, Lk, Dv) -> (B, Hkv, G, Lq, Dv), computed
    in query chunks; a fully masked row gives zeros.
    """
    lq = q.shape[3]
    outs = []
    for q0 in range(0, lq, chunk_size):
        q1 = min(q0 + chunk_size, lq)
        s = masked_scores(q, key, mask, q0=q0, q1=q1, causal=causal, scale=scale, softcap=softcap)
        outs.append(masked_softmax(s) @ value[:, :, None, : s.shape[-1]])  # (B, Hkv, G, C, Dv)
    return torch.cat(outs, dim=3)


def rest_mask(s: torch.Tensor, top: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The visible keys outside the top-k of score rows s (R, L), top indices (R, kk) -> (R, L) boolean.

    `keep` (R, kk) marks the slots that hold a kept key (default: every slot); a key whose slots are
    all unkept stays in the rest. A key is kept if any of its slots is, since an unfilled slot of
    the compiled selection may repeat a kept key's position."""
    rest = torch.isfinite(s)
    if keep is None:
        return rest.scatter_(1, top, False)  # unfilled top-k slots point at masked keys, already False
    return rest.scatter_reduce_(1, top, ~keep, reduce="amin")  # a kept slot writes False, others keep


def _topk_set(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of score rows s (R, L): values (R, kk) (-inf in unfilled slots), indices (R, kk), and the
    rest mask (R, L): the visible keys outside the top-k."""
    vals, top = topk_rows(s.contiguous(), min(k, s.shape[-1]))
    top = top.long()
    return vals, top, rest_mask(s, top)


def _nth_rest(rest: torch.Tensor, row: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Key position of the rank-th (from 0) rest key of row `row`, for rest (R, L) and flat row/rank lists."""
    n = rest.shape[-1]
    gcum = rest.reshape(-1).cumsum(0)  # (R*L,) rest keys up to each flat position
    base = torch.where(row > 0, gcum[(row * n - 1).clamp_min(0)], 0)
    return torch.searchsorted(gcum, base + rank + 1) - row * n


def _distinct_ranks(n_rest: torch.Tensor, m: int, generator: torch.Generator | None) -> torch.Tensor:
    """min(m, n_rest[r]) distinct ranks drawn uniformly from [0, n_rest[r]) for each row r -> (R, m),
    -1 in unused slots.

    Floyd's algorithm, vectorised over rows: step i draws t uniform in [0, j] for j = n_rest - mm + i
    and keeps t, or j if t was already taken. Every subset is equally likely, and a row costs O(m^2)
    however many keys it may draw from.
    """
    mm = n_rest.clamp_max(m)  # (R,)
    step = torch.arange(m, device=n_rest.device).unsqueeze(-1)  # (m, 1)
    # steps along dim 0, rows contiguous along dim 1: each step of the loop reads one contiguous slice
    j = n_rest - mm + step  # (m, R): each step's upper bound
    u = torch.rand(j.shape, generator=generator, device=n_rest.device, dtype=torch.float64)
    ranks = torch.minimum((u * (j + 1)).long(), j)  # each step's t, before the sequential check
    for i in range(1, m):
        ranks[i] = torch.where((ranks[:i] == ranks[i]).any(0), j[i], ranks[i])
    return ranks.masked_fill_(step >= mm, -1).T.contiguous()


def tail_sample(
    top: torch.Tensor,
    m: int,
    generator: torch.Generator | None,
    *,
    ends: torch.Tensor | None = None,
    rest: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `tail` estimator's sample for rows with top-k indices top (R, kk): key indices and
    log-weights (R, m) (float64), index 0 and log-weight -inf in unused slots.

    Each row draws min(m, n_rest) keys uniformly without replacement from its n_rest visible keys
    outside the top-k, each weighted n_rest / min(m, n_rest): the inverse of its inclusion
    probability, so the weighted exp-score sum over the sample is an unbiased estimate of the sum
    over the whole tail. The visible keys are either the first ends[r] keys of row r (causal or
    unmasked rows; the top-k must then be their kk best, so nothing of size L is built) or given as
    the `rest` mask (R, L) (any mask; see `rest_mask`). The prefix case runs in the compiled
    extension when it is available (select.cpp, its own seeded stream per row), else in torch.
    """
    kk = top.shape[-1]
    ext = extension() if rest is None and top.device.type == "cpu" else None
    if ext is not None:  # the same draw in one compiled pass per row, no Python loop over m
        return ext.tail_sample(top.long().contiguous(), ends.long().contiguous(), m, draw_seed(generator))
    n_rest = (ends - kk).clamp_min(0) if rest is None else rest.sum(-1)
    rank = _distinct_ranks(n_rest, m, generator)  # (R, m)
    used = rank >= 0
    rank = rank.clamp_min(0)
    if rest is None:
        # rank-th key outside the sorted top-k t_0 < t_1 < ...: skip every t_i with t_i - i <= rank
        gaps = top.sort(-1).values - torch.arange(kk, device=top.device)
        pos = rank + torch.searchsorted(gaps.contiguous(), rank, right=True)
    else:
        row = torch.arange(rank.shape[0], device=top.device).unsqueeze(-1).expand_as(rank)
        pos = _nth_rest(rest, row.reshape(-1), rank.reshape(-1)).view_as(rank)
    logw = torch.log(n_rest.double() / used.sum(-1).clamp_min(1)).unsqueeze(-1)  # (R, 1), float64
    return pos.masked_fill(~used, 0), torch.where(used, logw, -math.inf)


def _gumbel(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(like.dtype).tiny)))


def _distinct_positions(
    count: torch.Tensor, rest: torch.Tensor, row_of: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each pair p, count[p] distinct keys drawn uniformly from the rest keys of its row
    (rest (R, L) boolean, row_of (P,)). Returns flat (pair, key position) lists.

    Pairs drawing at most an eighth of their rest keys draw ranks with replacement and redraw duplicates
    until none are left (a rule symmetric in the keys, so the result is a uniform subset; duplicates
    are rare at that density, and each round only revisits pairs that had one). Pairs drawing more
    take the first `count` keys of a random order of the rest, which costs O(L) per pair: at most
    8x the size of their sample.
    """
    device = count.device
    n_rest = rest.sum(-1)[row_of]  # (P,)
    small = count * 8 <= n_rest
    pairs, positions = [], []
    # ranks among each row's rest keys, mapped to positions through a global cumulative count
    ps = torch.nonzero(small & (count > 0)).flatten()
    if ps.numel():
        pair = torch.repeat_interleave(ps, count[ps])  # (S,)
        n = n_rest[pair]
        rank = (torch.rand(pair.shape, generator=generator, device=device) * n).long().clamp_max(n - 1)
        todo = torch.arange(pair.numel(), device=device)  # the entries whose pairs may hold duplicates
        for _ in range(200):
            key = pair[todo] * rest.shape[-1] + rank[todo]
            order = torch.argsort(key)
            ks = key[order]
            dup = todo[order[1:][ks[1:] == ks[:-1]]]  # every repeat but the first of a key
            if dup.numel() == 0:
                break
            fresh = torch.rand(dup.shape, generator=generator, device=device) * n[dup]
            rank[dup] = fresh.long().clamp_max(n[dup] - 1)
            redo = torch.zeros(count.numel(), dtype=torch.bool, device=device)
            redo[pair[dup]] = True
            todo = torch.nonzero(redo[pair]).flatten()
        else:
            raise RuntimeError("lazy Gumbel sampler: duplicate tail draws did not resolve")
        pairs.append(pair)
        positions.append(_nth_rest(rest, row_of[pair], rank))
    big = torch.nonzero(~small & (count > 0)).flatten()
    step = max(1, _BIG_BUDGET // rest.shape[-1])  # bounds the (pairs, L) random keys held at once
    for pb in big.split(step):
        u = torch.rand(pb.numel(), rest.shape[-1], generator=generator, device=device)
        u.masked_fill_(~rest[row_of[pb]], 2.0)  # non-rest keys sort last
        order = torch.argsort(u, dim=-1)  # (Pb, L): a uniform random order of the rest keys first
        take = torch.arange(rest.shape[-1], device=device) < count[pb].unsqueeze(-1)
        pairs.append(pb.unsqueeze(-1).expand_as(order)[take])
        positions.append(order[take])
    if not pairs:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    return torch.cat(pairs), torch.cat(positions)


def lazy_gumbel_sample(
    s: torch.Tensor, k: int, samples: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`samples` exact draws from softmax(s_r) for each score row s (R, L) -> key indices (R, samples).

    Lazy Gumbel sampling (Mussmann, Levy and Ermon 2017) over the row's top-k set S:
    Gumbels G_j for j in S; M = max_S(s_j + G_j) (drawn through the Gumbel-max identity, below);
    the gap B = M - min_S(s_j). A tail key j can beat
    M only if G_j > M - s_j >= B, so the number of tail keys that could win is
    c ~ Binomial(n - k, P(G > B)) with P(G > B) = 1 - exp(-exp(-B)); those c tail keys are chosen
    uniformly (distinct), given Gumbels conditioned to exceed B, and the draw is the argmax over S and
    them. Each sample costs O(1 + c) draws after O(k) per row; c is small when S holds most of the mass.
    Rows with no visible key give -1.
    """
    r = s.shape[0]
    vals, top, rest = _topk_set(s, k)  # (R, kk)
    valid = torch.isfinite(vals)
    seen = valid.any(-1, keepdim=True)  # (R, 1)
    # max_S(s_j + G_j) and its argmax, drawn by the Gumbel-max identity: the argmax follows
    # softmax over S, the max is logsumexp_S(s) + a standard Gumbel, and the two are independent.
    # Same distribution as drawing k Gumbels per sample, at O(T + k) per row instead of O(T * k).
    probs = torch.where(seen, torch.softmax(vals.masked_fill(~seen, 0.0), -1), 1.0)  # (R, kk)
    arg = torch.multinomial(probs, samples, replacement=True, generator=generator)  # (R, T)
    lse = torch.logsumexp(vals, -1, keepdim=True)  # (R, 1)
    big_m = lse + _gumbel((r, samples), s, generator)  # (R, T)
    best = top.gather(1, arg)  # (R, T) key index of the best top-k draw
    s_min = vals.masked_fill(~valid, math.inf).amin(-1, keepdim=True)  # (R, 1)
    gap = torch.where(seen, big_m - torch.where(seen, s_min, 0.0), math.inf)  # (R, T)
    p_exceed = -torch.expm1(-torch.exp(-gap))  # P(G > B), accurate for large gaps
    n_rest = rest.sum(-1, keepdim=True).to(s.dtype).expand(r, samples)
    count = torch.binomial(n_rest.contiguous(), p_exceed.contiguous(), generator=generator).long()
    pair, pos = _distinct_positions(
        count.reshape(-1), rest, torch.arange(r, device=s.device).repeat_interleave(samples), generator
    )
    if pair.numel():
        row = pair // samples
        # Gumbels conditioned on G > B: G = -log(E), E ~ Exp(1) truncated to [0, exp(-B))
        pe = p_exceed.reshape(-1)[pair]
        u = torch.rand(pair.shape, generator=generator, device=s.device, dtype=s.dtype)
        g = -torch.log((-torch.log1p(-u * pe)).clamp_min(torch.finfo(s.dtype).tiny))
        zc = s[row, pos] + g
        tail_max = torch.full((r * samples,), -math.inf, dtype=s.dtype, device=s.device)
        tail_max.scatter_reduce_(0, pair, zc, "amax")
        win = zc == tail_max[pair]  # the best tail candidate of its pair
        tail_key = torch.zeros(r * samples, dtype=torch.long, device=s.device)
        tail_key[pair[win]] = pos[win]
        beats = tail_max > big_m.reshape(-1)
        best = torch.where(beats, tail_key, best.reshape(-1)).view(r, samples)
    return best.masked_fill(~seen, -1)


def median_of_means(x: torch.Tensor, groups: int) -> torch.Tensor:
    """x (..., T, D) -> (..., D): the coordinate-wise median of the means of `groups` equal groups
    (the mean of the two middle means for an even count); robust to heavy-tailed samples."""
    *lead, t, d = x.shape
    means = x.reshape(*lead, groups, t // groups, d).mean(-2)  # (..., groups, D)
    if groups == 1:
        return means.squeeze(-2)
    srt = means.sort(dim=-2).values
    lo, hi = (groups - 1) // 2, groups // 2
    return 0.5 * (srt[..., lo, :] + srt[..., hi, :])
