"""Top-k attention with a sampled, reweighted estimate of the rest (the `tail` estimator).

Each query keeps its k keys of largest score exactly and adds m keys drawn uniformly without
replacement from its other n_rest visible keys; a sampled key's exp-score counts n_rest / m times in
both the numerator and the normaliser:

    o_i = (sum_{j in top} e^{s_ij} v_j + (n_rest/m) sum_{j in sample} e^{s_ij} v_j)
          / (sum_{j in top} e^{s_ij} + (n_rest/m) sum_{j in sample} e^{s_ij})

Both sums over the sample are unbiased for the sums over the whole tail, so the ratio is a
consistent (slightly biased, O(1/m)) estimate of exact attention. Written as a softmax over the kept
keys with log(n_rest/m) added to the sampled keys' scores, it is differentiable through the kept
and sampled entries by the `topk` kernel's own backward; the selection itself carries no gradient.
"""

from __future__ import annotations

import torch

from .topk import topk_attention


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

    It runs the `topk_attention` kernel with its tail samples: the same chunked, fused selection and
    the same backward (the sample's weights enter through the saved probabilities), plus O(m^2) per
    query to draw the sample (and O(visible keys) under an attention mask). So m = 0 is `topk`
    exactly, and k >= Lk is dense attention. A query with at most m keys outside its top-k takes
    them all with weight 1, so its output is exact.
    Fully masked rows give zeros. Draws come from `generator`.
    """
    if k < 1 or m < 0:
        raise ValueError(f"tail attention needs k >= 1 and m >= 0, got k={k}, m={m}.")
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
        tail_samples=m,
    )
    return out
