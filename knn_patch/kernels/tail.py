"""Top-k attention with a sampled, reweighted estimate of the rest (the `tail` estimator).

Each query keeps its k keys of largest score exactly and adds m keys drawn uniformly without
replacement from its other n_rest visible keys; a sampled key's exp-score counts n_rest / m times in
both the numerator and the normaliser:

    o_i = (sum_{j in top} e^{s_ij} v_j + (n_rest/m) sum_{j in sample} e^{s_ij} v_j)
          / (sum_{j in top} e^{s_ij} + (n_rest/m) sum_{j in sample} e^{s_ij})

Both sums over the sample are unbiased for the sums over the whole tail, so the ratio is a
consistent (slightly biased, O(1/m)) estimate of exact attention. Written as a softmax over the kept
keys with log(n_rest/m) added to the sampled keys' scores, it is differentiable through the kept
and sampled entries by plain autograd; the selection itself carries no gradient.
"""

from __future__ import annotations

import torch

from .sampling import group_mask, masked_scores, masked_softmax, tail_select
from .topk import topk_attention

# (queries x visible keys) score elements per chunk; chunks shrink to respect it at long n.
_SCORE_BUDGET = 1 << 23


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, Hkv, Lk, E), idx (B, Hkv, G, C, t) -> (B, Hkv, G, C, t, E)."""
    b, hkv, lk, e = x.shape
    flat = idx + (torch.arange(b * hkv, device=x.device) * lk).view(b, hkv, 1, 1, 1)
    return x.reshape(b * hkv * lk, e).index_select(0, flat.reshape(-1)).view(*idx.shape, e)


def tail_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    k: int,
    m: int,
    scale: float | None = None,
    is_causal: bool = True,
    softcap: float | None = None,
    dropout: float = 0.0,
    chunk_size: int = 512,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Top-k plus m uniform tail samples, reweighted.

    Shapes as `topk_attention`: query (B, Hq, Lq, D), key (B, Hkv, Lk, D), value (B, Hkv, Lk, Dv),
    boolean `attention_mask` (True = keep) broadcastable to (B, Hq, Lq, Lk), or None for causal
    aligned to the bottom right. Returns (B, Hq, Lq, Dv) in the query's dtype.

    m = 0, or k >= Lk, runs the exact `topk_attention` kernel itself, so the result equals `topk`
    (and dense attention when k >= Lk). A query with at most m keys outside its top-k takes them all
    with weight 1, so its output is exact. Fully masked rows give zeros. Draws come from `generator`.
    """
    if k < 1 or m < 0:
        raise ValueError(f"tail attention needs k >= 1 and m >= 0, got k={k}, m={m}.")
    lk = key.shape[2]
    if m == 0 or k >= lk:
        out, _ = topk_attention(
            query,
            key,
            value,
            attention_mask,
            k=k,
            scale=scale,
            is_causal=is_causal,
            softcap=softcap,
            dropout=dropout,
            chunk_size=chunk_size,
            generator=generator,
        )
        return out
    b, hq, lq, d = query.shape
    hkv = key.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}).")
    g = hq // hkv
    mask = group_mask(attention_mask, hq, hkv, lq, lk)
    scale = d**-0.5 if scale is None else float(scale)
    chunk = max(1, min(chunk_size, _SCORE_BUDGET // max(1, b * hq * lk)))
    acc = torch.promote_types(query.dtype, torch.float32)
    outs = []
    with torch.autocast(device_type=query.device.type, enabled=False):
        q = query.to(acc).view(b, hkv, g, lq, d)  # (B, Hq, Lq, D) -> (B, Hkv, G, Lq, D)
        k32, v32 = key.to(acc), value.to(acc)
        for q0 in range(0, lq, chunk):
            q1 = min(q0 + chunk, lq)
            with torch.no_grad():  # the selection is discrete: no gradient through it
                s = masked_scores(
                    q.detach(),
                    k32.detach(),
                    mask,
                    q0=q0,
                    q1=q1,
                    causal=is_causal,
                    scale=scale,
                    softcap=softcap,
                )  # (B, Hkv, G, C, L)
                idx, logw = tail_select(s.reshape(-1, s.shape[-1]), k, m, generator)  # (R, t) each
                idx, logw = idx.view(*s.shape[:-1], -1), logw.view(*s.shape[:-1], -1)  # (B, Hkv, G, C, t)
            k_sel = _gather(k32, idx)  # (B, Hkv, G, C, t, D)
            logits = (k_sel @ q[:, :, :, q0:q1].unsqueeze(-1)).squeeze(-1) * scale  # (B, Hkv, G, C, t)
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            p = masked_softmax(logits + logw)
            if dropout > 0:
                keep = torch.rand(p.shape, generator=generator, device=p.device) >= dropout
                p = p * keep / (1 - dropout)
            outs.append((p.unsqueeze(-2) @ _gather(v32, idx)).squeeze(-2))  # (B, Hkv, G, C, Dv)
    return (
        torch.cat(outs, dim=3).view(b, hq, lq, -1).to(query.dtype)
    )  # (B, Hkv, G, Lq, Dv) -> (B, Hq, Lq, Dv)
