"""Sliding-window perplexity, with the per-token NLL summed exactly (no token scored twice or missed).

This follows the transformers docs page "Perplexity of fixed-length models": windows of
`max_length` tokens moved by `stride`, scoring in each window only the tokens no earlier window
scored. Unlike the docs' loop, the count is exact: a document of n tokens scores n - 1 tokens
(its first token has no context), whatever the stride.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..train.loss import causal_lm_nll


def windows(
    n_tokens: int, max_length: int, stride: int, score_from: int = 1
) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window; positions are document indices.

    Tokens before `score_from` are context only: a long-context score of a document's tail.
    """
    if not 0 < stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}.")
    if score_from < 1:
        raise ValueError(f"score_from must be >= 1 (token 0 has no context), got {score_from}.")
    scored_until = score_from
    for begin in range(0, max(n_tokens - 1, 0), stride):
        end = min(begin + max_length, n_tokens)
        first = max(scored_until, begin + 1)
        if first < end:
            yield begin, end, first
        scored_until = max(scored_until, end)
        if end == n_tokens:
            break


@torch.no_grad()
def window_nll(
    model: torch.nn.Module, input_ids: torch.Tensor, first_scored: int, *, method: str = "chunked"
) -> tuple[float, int]:
    """Summed NLL (nats) and count of the tokens at positions >= first_scored of a (1, L) window.

    The default computes it from the final hidden states a chunk of positions at a time, so memory
    does not grow with L x vocabulary; method="full" takes the model's full logits (`knn_patch.train.loss`).
    """
    nll, count = causal_lm_nll(model, input_ids, first_scored, method=method)
    return float(nll), count


def document_nll(
    model: torch.nn.Module, input_ids: torch.Tensor, max_length: int, stride: int
) -> tuple[float, int]:
    """Summed NLL and scored-token count of one document (1-D token ids) by sliding windows."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for begin, end, first in windows(len(input_ids), max_length, stride):
        window = input_ids[begin:end].unsqueeze(0).to(device)
        nll, n = window_nll(model, window, first - begin)
        total, count = total + nll, count + n
    return total, count
