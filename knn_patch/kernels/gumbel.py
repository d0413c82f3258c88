"""Sampled attention: exact draws from softmax(s_i) by lazy Gumbel sampling, a median-of-means
output, and the paper's sampled gradients.

Forward. For each query, `samples` keys j_1..j_T are drawn exactly from P_i = softmax(s_i) by
`lazy_gumbel_sample` over its top-k set; the output is the median of means of v_{j_1..j_T} in
`groups` groups (groups = 1 is the plain mean, an unbiased estimate of o_i = E_{j~P_i}[v_j]).
The draws are discrete, so autograd could give no useful gradient; the backward instead estimates
the gradient of exact attention with the same draws (or computes it exactly, `exact_backward`).

Backward (sampled). With w_ij = dO_i·v_j and delta_i = sum_l P_il w_il = dO_i·o_i, the exact
gradients of o = P V, P = softmax(S), S = scale·Q Kᵀ are

    dV = Pᵀ dO,   dS_ij = P_ij (w_ij - delta_i),   dQ_i = scale·sum_j dS_ij k_j,
    dK_j = scale·sum_i dS_ij q_i.

- dV: the random-walk (Markov-chain) estimator. For each column d of dO, shift it to a_id =
  dO_id - min_i dO_id >= 0, draw start rows i with probability a_id / A_d (A_d = sum_i a_id), step
  once through the softmax row (take one of row i's stored draws at random, a draw from P_i), and
  count arrivals: dV_jd ~ (A_d / W)·#{walks arriving at j}, W walks, since E = A_d·sum_i (a_id/A_d) P_ij
  = (Pᵀ a)_jd. The shift is corrected by adding min_i dO_id·(Pᵀ 1)_j, with the column sums Pᵀ 1
  estimated by every stored draw counting 1/T at its key.
- dQ_i = scale·(E_{j~P_i}[k_j w_ij] - E_{j~P_i}[k_j]·E_{j~P_i}[w_ij]), each expectation from the T
  draws. The product of two estimates from the same draws is biased by O(1/T); the unbiased form
  used is T/(T-1)·(mean(k w) - mean(k)·mean(w)) (the sample covariance), which equals
  scale·sum_t k_{j_t}·ds_t with ds_t = (w_t - wbar_{-t}) / T and wbar_{-t} the mean of w over the
  other T - 1 draws.
- dK (left unimplemented in the paper's code), derived here. dK_j = scale·sum_i dS_ij q_i, and for
  one query i and one draw j_t ~ P_i,
      E[1{j_t = j}·(w_{i j_t} - wbar_{-t})] = P_ij·w_ij - P_ij·E[wbar_{-t}] = P_ij (w_ij - delta_i)
      = dS_ij,
  because wbar_{-t} is independent of j_t and has mean delta_i. So each draw adds
  scale·ds_t·q_i to dK_{j_t}, summed over draws t and queries i: an unbiased estimate of dK whose
  terms are the same ds_t that give dQ (dQ_i = scale·sum_t ds_t k_{j_t}, dK_j = scale·sum ds_t q_i).
All three need samples >= 2 and cost O(T) per query (dV: O(T·Dv) walks per query).
"""

from __future__ import annotations

import torch

from .sampling import (
    exact_attention,
    gather_rows,
    group_mask,
    lazy_gumbel_sample,
    masked_scores,
    median_of_means,
    scatter_rows,
)

# Elements per chunk: queries x keys in the forward (the sampler bounds its own worst case),
# queries x samples x D in the backward, walks x columns for dV. Large chunks matter: on a busy
# CPU every op costs a thread-scheduling delay, so fewer, bigger ops are much faster.
_SCORE_BUDGET = 1 << 22
_SAMPLE_BUDGET = 1 << 24


def _random_walk_dv(
    idx: torch.Tensor, d_out: torch.Tensor, lk: int, generator: torch.Generator
) -> torch.Tensor:
    """Pᵀ dO by the shifted random walk: idx (B, Hkv, G, Lq, T) stored draws (-1: none), d_out
    (B, Hkv, G, Lq, Dv) -> (B, Hkv, Lk, Dv). One walk per stored draw and column (W = G·Lq·T)."""
    b, hkv, g, lq, t = idx.shape
    dv = d_out.shape[-1]
    bh, rows = b * hkv, g * lq
    draws = idx.reshape(bh, rows * t)  # row r's draws at [r*T, (r+1)*T)
    do = d_out.reshape(bh, rows, dv)
    low = do.amin(1, keepdim=True)  # (BH, 1, Dv)
    a = do - low  # (BH, rows, Dv) >= 0
    total = a.sum(1)  # (BH, Dv)
    walks = rows * t
    out = torch.zeros(bh * lk * dv, dtype=d_out.dtype, device=d_out.device)
    base = (torch.arange(bh, device=idx.device) * lk).view(bh, 1, 1)
    cols = max(1, min(dv, _SAMPLE_BUDGET // max(1, bh * walks)))
    for c0 in range(0, dv, cols):
        c1 = min(c0 + cols, dv)
        weight = a[:, :, c0:c1].permute(0, 2, 1).reshape(-1, rows)  # (BH*C, rows)
        empty = weight.sum(-1, keepdim=True) <= 0  # a constant column: nothing to walk
        weight = torch.where(empty, torch.ones_like(weight), weight)
        start = torch.multinomial(weight, walks, replacement=True, generator=generator)  # (BH*C, W)
        step = torch.randint(t, start.shape, generator=generator, device=idx.device)
        arrive = draws.repeat_interleave(c1 - c0, 0).gather(1, start * t + step).view(bh, c1 - c0, walks)
        col = torch.arange(c0, c1, device=idx.device).view(1, -1, 1)
        flat = (base + arrive.clamp_min(0)) * dv + col  # (BH, C, W) positions in (BH*Lk*Dv)
        amount = (total[:, c0:c1] / walks).unsqueeze(-1).expand(bh, c1 - c0, walks)
        out.index_add_(0, flat.reshape(-1), (amount * (arrive >= 0)).reshape(-1))
    out = out.view(bh, lk, dv)
    # shift correction: + low_d · (Pᵀ 1)_j, each stored draw counting 1/T
    colsum = torch.zeros(bh, lk, dtype=d_out.dtype, device=d_out.device)
    colsum.scatter_add_(1, draws.clamp_min(0), (draws >= 0).to(d_out.dtype) / t)
    return (out + colsum.unsqueeze(-1) * low).view(b, hkv, lk, dv)


class _GumbelAttention(torch.autograd.Function):
    """Grouped layout: q (B, Hkv, G, Lq, D), key (B, Hkv, Lk, D), value (B, Hkv, Lk, Dv), in the
    accumulation dtype. Saves the draws (B, Hkv, G, Lq, T), never a score matrix."""

    @staticmethod
    def forward(ctx, q, key, value, mask, k, samples, groups, scale, causal, exact_backward, chunk_size, gen):
        b, hkv, g, lq, _ = q.shape
        lk, dv = key.shape[2], value.shape[-1]
        chunk = max(1, min(chunk_size, _SCORE_BUDGET // max(1, b * hkv * g * lk)))
        out = torch.zeros(b, hkv, g, lq, dv, dtype=q.dtype, device=q.device)
        draws = torch.full((b, hkv, g, lq, samples), -1, dtype=torch.long, device=q.device)
        for q0 in range(0, lq, chunk):
            q1 = min(q0 + chunk, lq)
            s = masked_scores(q, key, mask, q0=q0, q1=q1, causal=causal, scale=scale)  # (B, Hkv, G, C, L)
            idx = lazy_gumbel_sample(s.reshape(-1, s.shape[-1]), k, samples, gen).view(*s.shape[:-1], samples)
            draws[:, :, :, q0:q1] = idx
            v_sel = gather_rows(value, idx.clamp_min(0))  # (B, Hkv, G, C, T, Dv)
            est = median_of_means(v_sel, groups)  # (B, Hkv, G, C, Dv)
            out[:, :, :, q0:q1] = est * (idx[..., :1] >= 0)  # rows that see nothing stay zero
        # the backward's own stream, drawn from the forward's so that a seeded run is reproducible
        backward_seed = int(torch.randint(2**62, (1,), generator=gen, device=gen.device))
        ctx.save_for_backward(q, key, value, draws, mask)
        ctx.meta = (scale, causal, exact_backward, chunk_size, backward_seed)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, key, value, draws, mask = ctx.saved_tensors
        scale, causal, exact_backward, chunk_size, seed = ctx.meta
        if exact_backward:
            with torch.enable_grad():
                leaves = [x.detach().requires_grad_() for x in (q, key, value)]
                out = exact_attention(*leaves, mask, causal=causal, scale=scale, chunk_size=chunk_size)
                grads = torch.autograd.grad(out, leaves, d_out)
            return (*grads, *(None,) * 9)
        b, hkv, g, lq, t = draws.shape
        d, dv = q.shape[-1], value.shape[-1]
        # contiguous: `scatter_rows` adds into a flat view, and zeros_like would copy a transposed key's
        # strides
        dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
        dk = torch.zeros_like(key, memory_format=torch.contiguous_format)
        chunk = max(1, _SAMPLE_BUDGET // max(1, b * hkv * g * t * max(d, dv)))
        for q0 in range(0, lq, chunk):
            q1 = min(q0 + chunk, lq)
            idx = draws[:, :, :, q0:q1]  # (B, Hkv, G, C, T)
            ok = (idx >= 0).to(q.dtype)
            idx = idx.clamp_min(0)
            w = (gather_rows(value, idx) @ d_out[:, :, :, q0:q1].unsqueeze(-1)).squeeze(
                -1
            )  # (B, Hkv, G, C, T)
            loo = (w.sum(-1, keepdim=True) - w) / (t - 1)  # mean of the other draws' w
            ds = (w - loo) * ok * (scale / t)  # (B, Hkv, G, C, T)
            dq[:, :, :, q0:q1] = (ds.unsqueeze(-2) @ gather_rows(key, idx)).squeeze(-2)
            scatter_rows(dk, idx, ds.unsqueeze(-1) * q[:, :, :, q0:q1].unsqueeze(-2))
        gen = torch.Generator(device=q.device).manual_seed(seed)
        dvv = _random_walk_dv(draws, d_out, key.shape[2], gen)
        return (dq, dk, dvv, *(None,) * 9)


def gumbel_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    k: int,
    samples: int,
    groups: int = 1,
    scale: float | None = None,
    is_causal: bool = True,
    exact_backward: bool = False,
    chunk_size: int = 512,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Attention estimated from `samples` exact draws per query from softmax, by lazy Gumbel sampling.

    Shapes as `topk_attention`: query (B, Hq, Lq, D), key (B, Hkv, Lk, D), value (B, Hkv, Lk, Dv),
    boolean `attention_mask` (True = keep) broadcastable to (B, Hq, Lq, Lk), or None for causal
    aligned to the bottom right. Returns (B, Hq, Lq, Dv) in the query's dtype; fully masked rows
    give zeros. `groups` must divide `samples` (median of means); the sampled backward needs
    samples >= 2. With k >= Lk there is no tail to sample lazily and exact attention is returned
    (the estimator's limit), with its exact autograd gradient: so k >= n equals dense attention.
    """
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}).")
    if k < 1 or samples < 1 or groups < 1 or samples % groups:
        raise ValueError(
            f"gumbel attention needs k >= 1, samples >= 1 and groups dividing samples; got k={k}, "
            f"samples={samples}, groups={groups}."
        )
    if (
        not exact_backward
        and samples < 2
        and torch.is_grad_enabled()
        and query.requires_grad | key.requires_grad
    ):
        raise ValueError("the sampled gumbel backward needs samples >= 2 (or exact_backward=True).")
    g = hq // hkv
    mask = group_mask(attention_mask, hq, hkv, lq, lk)
    scale = d**-0.5 if scale is None else float(scale)
    acc = torch.promote_types(query.dtype, torch.float32)
    with torch.autocast(device_type=query.device.type, enabled=False):
        q = query.to(acc).view(b, hkv, g, lq, d)  # (B, Hq, Lq, D) -> (B, Hkv, G, Lq, D)
        k32, v32 = key.to(acc), value.to(acc)
        if k >= lk:
            out = exact_attention(q, k32, v32, mask, causal=is_causal, scale=scale, chunk_size=chunk_size)
        else:
            if generator is None:
                generator = torch.Generator(device=query.device)
                generator.seed()
            out = _GumbelAttention.apply(
                q, k32, v32, mask, k, samples, groups, scale, is_causal, exact_backward, chunk_size, generator
            )
    return out.reshape(b, hq, lq, -1).to(query.dtype)  # (B, Hkv, G, Lq, Dv) -> (B, Hq, Lq, Dv)
