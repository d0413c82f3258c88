"""Exact top-k attention: each query attends to its k keys of largest scaled score.

The kernel works in query chunks, so no (Lq, Lk) score matrix for the whole sequence is ever
held, and its autograd backward keeps only O(Lq * k) state: the selected key indices and their
probabilities. Scores are computed in fp32 with autocast off.

Per chunk of C queries (`_weigh_chunk`), the key range is cut to the keys any query of the chunk
may see (causal and window masks skip whole blocks). Plain scores on CPU in fp32 are scored and
selected by the compiled `select.scores_topk` in cache; otherwise the (C, L) scores go into one
reused buffer and `select.topk_rows` takes each row's exact top-k (compiled, it stops at the row's
causal limit, so plain causal scores are never masked). Forced keys, tail samples and the rest
mean follow. The output is a fused gather-and-sum (`embedding_bag`). docs/design.md describes
the whole kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .sampling import gather_rows, group_mask, masked_softmax, rest_mask, scatter_rows, tail_sample
from .select import fused_available, scores_topk, topk_rows

# Working sets, in elements, that bound memory at long n: the forward's score block (queries x
# visible keys, only where scores are materialised) and the backward's gathered rows (queries x k
# x D, about four such tensors at once). Chunks shrink to respect them.
_SCORE_BUDGET = 1 << 23
_GATHER_BUDGET = 1 << 21


def _key_range(
    mask: torch.Tensor | None, causal: bool, q0: int, q1: int, lq: int, lk: int
) -> tuple[int, int]:
    """The smallest [lo, hi) holding every key some query in [q0, q1) may see."""
    if mask is not None:
        cols = mask[..., q0:q1, :].reshape(-1, mask.shape[-1]).any(0).nonzero()  # (nnz, 1)
        if cols.numel() == 0:
            return 0, 0
        return int(cols[0]), int(cols[-1]) + 1
    if causal:
        return 0, min(lk, q1 + lk - lq)
    return 0, lk


def _mask_scores(
    s: torch.Tensor, mask: torch.Tensor | None, causal: bool, q0: int, lo: int, offset: int
) -> torch.Tensor | None:
    """Set the scores of keys a query may not see to -inf, in place; returns the visibility
    (B|1, 1|Hkv, 1|G, C, L) when a mask was given, else None (plain causal or no masking)."""
    c, n = s.shape[-2:]
    if mask is not None:
        visible = mask[..., q0 : q0 + c, lo : lo + n]
        s.masked_fill_(~visible, -math.inf)
        return visible
    if causal:
        first = q0 + offset - lo + 1  # the first column that the chunk's first query may not see
        if first < n:
            # (C, L - first): row r may not see column first + j once j >= r
            hidden = torch.arange(n - first, device=s.device) >= torch.arange(c, device=s.device).unsqueeze(
                -1
            )
            s[..., first:].masked_fill_(hidden, -math.inf)
    return None


def _forced(
    visible: torch.Tensor | None,
    causal: bool,
    shape: torch.Size,
    q0: int,
    lo: int,
    offset: int,
    sink_tokens: int,
    local_window: int,
    device: torch.device,
) -> torch.Tensor:
    """Boolean mask of the always-kept keys: the first `sink_tokens` visible keys and the
    `local_window` keys ending at each query's own position."""
    c, n = shape[-2:]
    qpos = torch.arange(q0, q0 + c, device=device).unsqueeze(-1) + offset  # (C, 1)
    kpos = torch.arange(lo, lo + n, device=device).unsqueeze(0)  # (1, L)
    seen = (kpos <= qpos) if causal and visible is None else torch.ones(c, n, dtype=torch.bool, device=device)
    forced = torch.zeros(c, n, dtype=torch.bool, device=device)
    if local_window:
        forced = forced | ((kpos <= qpos) & (kpos > qpos - local_window))
    if sink_tokens:
        if visible is None:
            forced = forced | (kpos < sink_tokens)
        else:
            # rank of each visible key among the visible ones, so left padding does not eat the sinks
            forced = forced | (visible.to(torch.int32).cumsum(-1) <= sink_tokens)
    forced = forced & (seen if visible is None else visible)
    return forced.expand(shape)


def _select(scores: torch.Tensor, kk: int, row_end: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-kk (values, indices) along the last dim of scores (..., L), sorted descending.

    `row_end` (one per row of the flattened leading dims) limits each row to its first columns:
    the causal limit, so causal scores need no masking pass. Unfilled slots hold -inf."""
    lead, n = scores.shape[:-1], scores.shape[-1]
    values, pos = topk_rows(scores.reshape(-1, n), kk, row_end)
    return values.view(*lead, kk), pos.view(*lead, kk)


class _TopKAttention(torch.autograd.Function):
    """Inputs in grouped layout: q (B, Hkv, G, Lq, D), key (B, Hkv, Lk, D), value (B, Hkv, Lk, Dv).

    Saves the selected indices (B, Hkv, G, Lq, t) and weights, never the score matrix. With
    `tail_samples` m > 0, each row also gets the `tail` estimator's m uniform samples of its other
    visible keys, weighted n_rest/m (`sampling.tail_sample`); the backward is unchanged, as the
    weights enter only through the saved probabilities.

    With `rest_mean`, the keys a query does not keep still get their exact share of the softmax
    mass, carried by the mean of their values (see `topk_attention`); that share and mean are saved
    as one (B, Hkv, G, Lq, Dv) term and held constant in the backward.
    """

    @staticmethod
    def forward(
        ctx,
        q,
        key,
        value,
        mask,
        k,
        scale,
        softcap,
        causal,
        sink_tokens,
        local_window,
        dropout,
        chunk_size,
        generator,
        tail_samples=0,
        rest_mean=False,
    ):
        b, hkv, g, lq, d = q.shape
        lk, dv = key.shape[2], value.shape[-1]
        device = q.device
        call = _Call.build(
            q, key, mask, k, softcap, causal, sink_tokens, local_window, generator, tail_samples, rest_mean
        )
        acc = call.acc
        width = min(call.kk + tail_samples, lk)  # saved slots per query: top-k, then tail samples
        chunk = (
            chunk_size if call.fused else max(1, min(chunk_size, _SCORE_BUDGET // max(1, b * hkv * g * lk)))
        )

        k32, v32 = key.to(acc), value.to(acc)
        out = torch.zeros(b, hkv, g, lq, dv, dtype=acc, device=device)
        # int32 halves the saved state; key indices stay far below 2**31
        idx_all = torch.zeros(b, hkv, g, lq, width, dtype=torch.int32, device=device)
        p_all = torch.zeros(b, hkv, g, lq, width, dtype=acc, device=device)
        drop_all = torch.ones(b, hkv, g, lq, width, dtype=torch.bool, device=device) if dropout > 0 else None
        s_all = torch.zeros_like(p_all) if softcap is not None else None  # the kept scores, for the backward
        rest_all = torch.zeros_like(out) if rest_mean else None
        # running sums of the values (float64: differences of them stay exact), for the rest's mean
        v_cum = _prefix_sums(value) if rest_mean and mask is None else None
        scratch = _Scratch()
        ranges = []
        for q0 in range(0, lq, chunk):
            q1 = min(q0 + chunk, lq)
            lo, hi = _key_range(mask, causal, q0, q1, lq, lk)
            ranges.append((q0, q1, lo, hi))
            if hi == lo:
                continue
            qc = q[:, :, :, q0:q1].to(acc).reshape(b, hkv, g * (q1 - q0), d) * scale  # (B, Hkv, G*C, D)
            kept = _weigh_chunk(call, qc, k32, v32, v_cum, q0, lo, hi - lo, scratch)
            t = kept.p.shape[-1]
            pw = kept.p
            if dropout > 0:
                drop = torch.rand(pw.shape, device=device, generator=generator) >= dropout
                drop_all[:, :, :, q0:q1, :t] = drop
                pw = pw * drop / (1 - dropout)
            out[:, :, :, q0:q1] = _apply_weights(pw, kept.pos, v32, lo, hi - lo)
            if kept.rest is not None:
                rest_all[:, :, :, q0:q1] = kept.rest
                out[:, :, :, q0:q1] += kept.rest
            idx_all[:, :, :, q0:q1, :t] = kept.pos + lo
            p_all[:, :, :, q0:q1, :t] = kept.p
            if s_all is not None:
                s_all[:, :, :, q0:q1, :t] = torch.where(kept.keep, kept.vals, torch.zeros_like(kept.vals))

        ctx.save_for_backward(q, key, value, idx_all, p_all, drop_all, s_all, rest_all)
        ctx.meta = (scale, softcap, dropout, ranges)
        ctx.mark_non_differentiable(idx_all, p_all)
        return out, idx_all, p_all

    @staticmethod
    def backward(ctx, d_out, _d_idx, _d_p):
        q, key, value, idx_all, p_all, drop_all, s_all, rest_all = ctx.saved_tensors
        scale, softcap, dropout, ranges = ctx.meta
        b, hkv, g, _, d = q.shape
        dv = value.shape[-1]
        acc = p_all.dtype
        k32, v32 = key.to(acc), value.to(acc)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(key.shape, dtype=acc, device=q.device)
        dvv = torch.zeros(value.shape, dtype=acc, device=q.device)
        d_out = d_out.to(acc)
        step = max(1, _GATHER_BUDGET // max(1, b * hkv * g * idx_all.shape[-1] * max(d, dv)))
        # each forward chunk's key range [lo, hi), cut into backward chunks of `step` queries
        pieces = [(s0, min(s0 + step, q1), lo, hi) for q0, q1, lo, hi in ranges for s0 in range(q0, q1, step)]
        for q0, q1, lo, hi in pieces:
            n = hi - lo
            if n == 0:
                continue
            c = q1 - q0
            take = min(idx_all.shape[-1], n)
            pos = idx_all[:, :, :, q0:q1, :take].long() - lo  # (B, Hkv, G, C, take)
            p = p_all[:, :, :, q0:q1, :take]
            keep_scale = drop_all[:, :, :, q0:q1, :take] / (1 - dropout) if drop_all is not None else None
            pw = p * keep_scale if keep_scale is not None else p
            do = d_out[:, :, :, q0:q1]  # (B, Hkv, G, C, Dv)
            qc = q[:, :, :, q0:q1].to(acc)
            if _dense_chunk(take, n):
                w = torch.zeros(b, hkv, g, c, n, dtype=acc, device=q.device).scatter_add_(
                    -1, pos, pw
                )  # (B, Hkv, G, C, L)
                dvv[:, :, lo:hi] += w.reshape(b, hkv, g * c, n).transpose(-1, -2) @ do.reshape(
                    b, hkv, g * c, dv
                )
                dpw = (do.reshape(b, hkv, g * c, dv) @ v32[:, :, lo:hi].transpose(-1, -2)).view(
                    b, hkv, g, c, n
                )
                dpw = dpw.gather(-1, pos)
            else:
                v_sel = gather_rows(v32[:, :, lo:hi], pos)  # (B, Hkv, G, C, take, Dv)
                dpw = (v_sel @ do.unsqueeze(-1)).squeeze(-1)  # (B, Hkv, G, C, take)
                scatter_rows(dvv, pos + lo, pw.unsqueeze(-1) * do.unsqueeze(-2))
            dp = dpw * keep_scale if keep_scale is not None else dpw
            total = (p * dp).sum(-1, keepdim=True)
            if rest_all is not None:  # the rest is one more softmax entry, its score and value constant
                total = total + (rest_all[:, :, :, q0:q1] * do).sum(-1, keepdim=True)
            ds = p * (dp - total)  # softmax backward
            if softcap is not None:
                ds = ds * (1 - (s_all[:, :, :, q0:q1, :take] / softcap) ** 2)
            ds = ds * scale
            if _dense_chunk(take, n):
                dsf = (
                    torch.zeros(b, hkv, g, c, n, dtype=acc, device=q.device)
                    .scatter_add_(-1, pos, ds)
                    .reshape(b, hkv, g * c, n)
                )
                dq[:, :, :, q0:q1] = (dsf @ k32[:, :, lo:hi]).view(b, hkv, g, c, d)
                dk[:, :, lo:hi] += dsf.transpose(-1, -2) @ qc.reshape(b, hkv, g * c, d)
            else:
                k_sel = gather_rows(k32[:, :, lo:hi], pos)  # (B, Hkv, G, C, take, D)
                dq[:, :, :, q0:q1] = (ds.unsqueeze(-2) @ k_sel).squeeze(-2)
                scatter_rows(dk, pos + lo, ds.unsqueeze(-1) * qc.unsqueeze(-2))
        return (dq.to(q.dtype), dk.to(key.dtype), dvv.to(value.dtype)) + (None,) * 12


# ---- One forward chunk: select its keys, weigh them ----


@dataclass(frozen=True)
class _Call:
    """What every chunk of one `_TopKAttention.forward` shares."""

    shape: tuple[int, int, int]  # (B, Hkv, G)
    mask: torch.Tensor | None  # grouped boolean mask (B|1, 1|Hkv, 1|G, Lq, Lk), True = may see
    causal: bool
    offset: int  # Lk - Lq: query i sits at key position i + offset
    k: int
    kk: int  # selected slots per query: k plus the forced keys, at most Lk
    sink_tokens: int
    local_window: int
    softcap: float | None
    tail_samples: int
    rest_mean: bool
    generator: torch.Generator | None
    acc: torch.dtype  # the scores' dtype
    device: torch.device
    fused: bool  # selection by the compiled `scores_topk`, which never materialises a score block

    @property
    def n_forced(self) -> int:
        return self.sink_tokens + self.local_window

    @staticmethod
    def build(
        q: torch.Tensor,
        key: torch.Tensor,
        mask: torch.Tensor | None,
        k: int,
        softcap: float | None,
        causal: bool,
        sink_tokens: int,
        local_window: int,
        generator: torch.Generator | None,
        tail_samples: int,
        rest_mean: bool,
    ) -> _Call:
        """The settings of a call on q (B, Hkv, G, Lq, D) and key (B, Hkv, Lk, D)."""
        b, hkv, g, lq, _ = q.shape
        lk = key.shape[2]
        acc = torch.promote_types(q.dtype, torch.float32)  # fp32 scores; float64 kept for gradcheck
        n_forced = sink_tokens + local_window
        # the compiled selection ranks plain scores only, and the rest's share needs every score
        plain = mask is None and not n_forced and softcap is None and not rest_mean
        return _Call(
            shape=(b, hkv, g),
            mask=mask,
            causal=causal,
            offset=lk - lq,  # queries are the last lq positions (bottom-right causal alignment)
            k=k,
            kk=min(k + n_forced, lk),
            sink_tokens=sink_tokens,
            local_window=local_window,
            softcap=softcap,
            tail_samples=tail_samples,
            rest_mean=rest_mean,
            generator=generator,
            acc=acc,
            device=q.device,
            fused=plain and fused_available(q.device, acc),
        )


class _Kept(NamedTuple):
    """One chunk's kept keys, each (B, Hkv, G, C, t) but `rest`."""

    pos: torch.Tensor  # key positions, counted from the chunk's first key lo
    p: torch.Tensor  # softmax weights; 0 in slots that hold no kept key
    vals: torch.Tensor  # scores (softcapped), before any tail log-weight
    keep: torch.Tensor  # whether the slot holds a kept key
    rest: torch.Tensor | None  # `rest_mean`'s term (B, Hkv, G, C, Dv), or None


class _Scratch:
    """One score block reused by every chunk of a call that materialises its scores, grown as needed."""

    def __init__(self) -> None:
        self.block: torch.Tensor | None = None

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.block is None or self.block.numel() < numel:
            self.block = torch.empty(numel, dtype=dtype, device=device)
        return self.block[:numel]


def _weigh_chunk(
    call: _Call,
    qc: torch.Tensor,
    k32: torch.Tensor,
    v32: torch.Tensor,
    v_cum: torch.Tensor | None,
    q0: int,
    lo: int,
    n: int,
    scratch: _Scratch,
) -> _Kept:
    """The kept keys of one chunk of C queries (rows q0..q0+C-1) and their softmax weights.

    qc (B, Hkv, G*C, D): the chunk's scaled queries; k32, v32 (B, Hkv, Lk, E): keys and values in
    the scores' dtype, of which the chunk sees lo..lo+n-1 at most. The selection is compiled and
    fused (`call.fused`) or runs on a materialised score block; then come the forced keys, the tail
    samples and the rest term, each only when asked for.
    """
    # a chunk whose top-k and tail samples would cover every key takes them all: exact
    take = call.kk if call.kk + call.tail_samples < n else n
    row_end = _row_end(call, q0, qc.shape[2] // call.shape[2], lo, n) if take < n else None
    logw = None
    if call.fused and take < n:  # tail samples, if any, come along in the last slots
        s = visible = None
        vals, pos, logw = _fused_select(call, qc, k32, lo, n, take, row_end)
        keep = vals > -math.inf
    else:
        s = _chunk_scores(call, qc, k32, lo, n, scratch)  # (B, Hkv, G, C, L)
        visible, sel, pos = _select_scores(call, s, q0, lo, take, row_end)
        vals, keep = _keep_forced(call, s, sel, pos) if call.n_forced else (sel, sel > -math.inf)
    logits = vals
    if call.tail_samples and take < n and not call.rest_mean:  # with the mean, samples correct it
        vals, pos, logits = _with_tail_samples(call, s, vals, pos, logw, take, visible, row_end)
        keep = torch.isfinite(logits)
    p = masked_softmax(logits, keep)
    rest = None
    if call.rest_mean and (take < n or call.n_forced):
        p, rest = _rest_term(call, s, vals, keep, p, pos, v32, visible, v_cum, q0, lo)
    return _Kept(pos, p, vals, keep, rest)


def _row_end(call: _Call, q0: int, c: int, lo: int, n: int) -> torch.Tensor | None:
    """Each score row's causal limit (B*Hkv*G*C,), in columns from lo: the selection stops there, so
    plain causal scores need no masking pass. None under a mask, without causality, and with
    `rest_mean`, whose share of the softmax needs every score masked instead."""
    if call.mask is not None or not call.causal or call.rest_mean:
        return None
    b, hkv, g = call.shape
    row_end = (torch.arange(c, device=call.device) + (q0 + call.offset + 1 - lo)).clamp(max=n)
    return row_end.expand(b, hkv, g, c).reshape(-1)  # one per score row


def _fused_select(
    call: _Call,
    qc: torch.Tensor,
    k32: torch.Tensor,
    lo: int,
    n: int,
    take: int,
    row_end: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's top `take` keys by the compiled `scores_topk`, which scores blocks of rows in cache
    and never writes the (rows, keys) scores out. Returns scores and positions (B, Hkv, G, C, take + m),
    with the m tail samples, if any, in the last slots, and their log-weights (B*Hkv*G*C, m)."""
    b, hkv, g = call.shape
    gc, d = qc.shape[2:]
    sel, pos, logw = scores_topk(
        qc.reshape(b * hkv, gc, d),  # a copy only when the query came strided (gpt2, opt)
        k32[:, :, lo : lo + n].reshape(b * hkv, n, d),
        take,
        row_end,
        call.tail_samples,
        call.generator,
    )
    return sel.view(b, hkv, g, gc // g, -1), pos.view(b, hkv, g, gc // g, -1), logw


def _chunk_scores(
    call: _Call, qc: torch.Tensor, k32: torch.Tensor, lo: int, n: int, scratch: _Scratch
) -> torch.Tensor:
    """The chunk's scores (B, Hkv, G, C, L) against keys lo..lo+n-1 (softcapped, not yet masked), in
    the call's reused score block."""
    b, hkv, g = call.shape
    gc = qc.shape[2]
    s = scratch.take(b * hkv * gc * n, call.acc, call.device).view(b, hkv, gc, n)
    torch.matmul(qc, k32[:, :, lo : lo + n].transpose(-1, -2), out=s)  # (B, Hkv, G*C, L)
    if call.softcap is not None:
        s = torch.tanh(s.div_(call.softcap), out=s).mul_(call.softcap)
    return s.view(b, hkv, g, gc // g, n)


def _select_scores(
    call: _Call, s: torch.Tensor, q0: int, lo: int, take: int, row_end: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Mask the scores s (B, Hkv, G, C, L) in place (unless `row_end` stands for the causal mask) and
    take each row's top `take`, its forced keys first (ranked at +inf).

    Returns the visibility (B|1, 1|Hkv, 1|G, C, L) when a mask decided it (else None), and the
    selected scores (+inf at forced keys, -inf in unfilled slots) and positions (B, Hkv, G, C, take)."""
    n = s.shape[-1]
    if take == n and not call.n_forced:  # every visible key is kept: mask, no selection
        _mask_scores(s, call.mask, call.causal, q0, lo, call.offset)
        return None, s, torch.arange(n, device=s.device).expand(s.shape)
    visible = None if row_end is not None else _mask_scores(s, call.mask, call.causal, q0, lo, call.offset)
    ranked = s
    if call.n_forced:
        forced = _forced(
            visible, call.causal, s.shape, q0, lo, call.offset, call.sink_tokens, call.local_window, s.device
        )
        ranked = s.masked_fill(forced, math.inf)
    sel, pos = _select(ranked, take, row_end)
    return visible, sel, pos


def _keep_forced(
    call: _Call, s: torch.Tensor, sel: torch.Tensor, pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forced keys were ranked first at +inf: keep them and the k best others. Returns the selected
    slots' scores (B, Hkv, G, C, t) and which slots are kept."""
    is_forced = sel == math.inf
    rank = (~is_forced).cumsum(-1)  # overlapping sinks and window free slots
    return s.gather(-1, pos), (sel > -math.inf) & (is_forced | (rank <= call.k))


def _with_tail_samples(
    call: _Call,
    s: torch.Tensor | None,
    vals: torch.Tensor,
    pos: torch.Tensor,
    logw: torch.Tensor | None,
    take: int,
    visible: torch.Tensor | None,
    row_end: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-`take` slots followed by the chunk's m tail samples (`sampling.tail_sample`): drawn
    here from the materialised scores s, or (s None) already in the last slots of vals and pos with
    their log-weights logw (B*Hkv*G*C, m), as the fused selection returns them.

    Returns scores and positions (B, Hkv, G, C, take + m) and the logits: the scores plus each
    slot's log-weight, 0 for the top-k and log(n_rest / m) for a sample (-inf in unused slots)."""
    b, hkv, g = call.shape
    c, m = vals.shape[3], call.tail_samples
    if s is not None:
        n = s.shape[-1]
        rows = pos.reshape(-1, take)
        if visible is None:  # causal or unmasked: row r sees its first row_end[r] (or n) keys
            ends = row_end if row_end is not None else torch.full_like(rows[:, 0], n)
            spos, logw = tail_sample(rows, m, call.generator, ends=ends)
        else:
            spos, logw = tail_sample(rows, m, call.generator, rest=rest_mask(s.reshape(-1, n), rows))
        spos = spos.view(b, hkv, g, c, m)
        vals, pos = torch.cat([vals, s.gather(-1, spos)], -1), torch.cat([pos, spos], -1)
    zeros = torch.zeros(b, hkv, g, c, take, dtype=call.acc, device=call.device)
    logw = torch.cat([zeros, logw.view(b, hkv, g, c, m).to(call.acc)], -1)
    return vals, pos, vals + logw


# ---- The rest mean ----


def _prefix_sums(value: torch.Tensor) -> torch.Tensor:
    """value (B, Hkv, Lk, Dv) -> (B, Hkv, Lk + 1, Dv) float64: row j holds the sum of the first j values."""
    b, hkv, _, dv = value.shape
    zero = torch.zeros(b, hkv, 1, dv, dtype=torch.float64, device=value.device)
    return torch.cat([zero, value.to(torch.float64).cumsum(2)], 2)


def _rest_term(
    call: _Call,
    s: torch.Tensor,
    vals: torch.Tensor,
    keep: torch.Tensor,
    p: torch.Tensor,
    pos: torch.Tensor,
    v32: torch.Tensor,
    visible: torch.Tensor | None,
    v_cum: torch.Tensor | None,
    q0: int,
    lo: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys a chunk's queries see but do not keep, as one softmax entry: their exact mass and
    the mean of their values.

    s (B, Hkv, G, C, L): masked scores (-inf where not visible); vals, keep, p, pos (B, Hkv, G, C, t):
    the kept slots' scores, which slots are kept, their softmax over the kept slots and key
    positions (from lo). Returns the kept slots' probabilities rescaled to the whole row's softmax,
    and the rest's term (its probability times its values' mean), (B, Hkv, G, C, Dv).
    """
    c, n = s.shape[-2:]
    kept = vals.masked_fill(~keep, -math.inf)
    top = kept.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    z_all = torch.exp(s - top).sum(-1, keepdim=True)
    z_kept = torch.exp(kept - top).sum(-1, keepdim=True)
    share = ((z_all - z_kept) / z_all.clamp_min(torch.finfo(s.dtype).tiny)).clamp_(0, 1)  # (.., C, 1)
    if visible is None:  # causal or unmasked: query i sees the keys [0, end_i)
        ends = (
            torch.arange(q0, q0 + c, device=s.device) + call.offset + 1
            if call.causal
            else torch.full((c,), lo + n)
        )
        ends = ends.clamp(max=lo + n).to(s.device)
        seen_sum = v_cum.index_select(2, ends).unsqueeze(2).to(s.dtype)  # (B, Hkv, 1, C, Dv)
        seen = (ends - lo).to(s.dtype).view(c, 1)
    else:
        vis = visible.to(s.dtype)
        seen_sum = vis @ v32[:, :, None, lo : lo + n]  # (B|1, Hkv, G|1, C, Dv)
        seen = vis.sum(-1, keepdim=True)
    kept_sum = _apply_weights(keep.to(s.dtype), pos, v32, lo, n)
    count = (seen - keep.sum(-1, keepdim=True)).clamp_min(1)
    mean = (seen_sum - kept_sum) / count
    rest = share * mean
    if call.tail_samples:
        rest = rest + _sampled_correction(call, s, keep, pos, v32, lo, top, z_all, share / count, mean)
    return p * (1 - share), rest


def _sampled_correction(
    call: _Call,
    s: torch.Tensor,
    keep: torch.Tensor,
    pos: torch.Tensor,
    v32: torch.Tensor,
    lo: int,
    top: torch.Tensor,
    z_all: torch.Tensor,
    p_mean: torch.Tensor,
    mean: torch.Tensor,
) -> torch.Tensor:
    """What the rest's mean misses, estimated from m uniform samples of the rest (a control variate):

        sum_{j rest} p_j v_j - share * mean = sum_{j rest} (p_j - p_mean) (v_j - mean)
                                           ~ (n_rest / m) * sum_{j sampled} (p_j - p_mean) (v_j - mean),

    unbiased, exact once the samples cover the rest, and small where the rest's weights are alike,
    which is where the mean alone is weakest (flat rows, such as SmolLM2's layer 0). Returns the
    (B, Hkv, G, C, Dv) term to add to share * mean."""
    n, t = s.shape[-1], pos.shape[-1]
    rows = pos.reshape(-1, t)
    rest = rest_mask(s.reshape(-1, n), rows, keep.reshape(-1, t))
    spos, logw = tail_sample(rows, call.tail_samples, call.generator, rest=rest)
    spos = spos.view(*pos.shape[:-1], -1)
    p_s = torch.exp(s.gather(-1, spos) - top) / z_all.clamp_min(torch.finfo(s.dtype).tiny)
    w = torch.exp(logw.to(s.dtype)).view_as(p_s) * (p_s - p_mean)  # 0 in unused slots
    return _apply_weights(w, spos, v32, lo, n) - w.sum(-1, keepdim=True) * mean


# ---- Weighted sums of value rows ----


def _dense_chunk(take: int, n: int) -> bool:
    """Whether a chunk is cheaper as a masked dense matmul than as a gather of its selected rows."""
    return 4 * take >= n


def _apply_weights(w: torch.Tensor, pos: torch.Tensor, value: torch.Tensor, lo: int, n: int) -> torch.Tensor:
    """Weights w (B, Hkv, G, C, t) at key positions lo + pos, values (B, Hkv, Lk, Dv) -> (B, Hkv, G, C, Dv).

    Sparse chunks use `embedding_bag`, a fused gather and weighted sum that never materialises the
    gathered rows; chunks where k is a large share of the keys use a matmul."""
    b, hkv, g, c, t = w.shape
    lk, dv = value.shape[-2:]
    if _dense_chunk(t, n):
        dense = torch.zeros(b, hkv, g, c, n, dtype=w.dtype, device=w.device).scatter_add_(-1, pos, w)
        return (dense.reshape(b, hkv, g * c, n) @ value[:, :, lo : lo + n]).view(b, hkv, g, c, dv)
    flat = pos + (lo + torch.arange(b * hkv, device=w.device) * lk).view(b, hkv, 1, 1, 1)  # rows of value
    out = torch.nn.functional.embedding_bag(
        flat.reshape(-1, t), value.reshape(b * hkv * lk, dv), per_sample_weights=w.reshape(-1, t), mode="sum"
    )
    return out.view(b, hkv, g, c, dv)


def topk_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    k: int,
    scale: float | None = None,
    is_causal: bool = True,
    sink_tokens: int = 0,
    local_window: int = 0,
    softcap: float | None = None,
    dropout: float = 0.0,
    chunk_size: int = 512,
    generator: torch.Generator | None = None,
    return_weights: bool = False,
    tail_samples: int = 0,
    rest_mean: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact kNN attention.

    Shapes: query (B, Hq, Lq, D); key (B, Hkv, Lk, D); value (B, Hkv, Lk, Dv); Hq a multiple of Hkv
    (GQA is computed per KV head, K/V are never repeated). `attention_mask` is a boolean mask
    broadcastable to (B, Hq, Lq, Lk), True meaning the key may be seen. With no mask and
    `is_causal`, query i sees keys j <= i + Lk - Lq (aligned to the bottom right, as in decoding):

        Lq=3, Lk=5:   x x x . .
                      x x x x .
                      x x x x x

    Each query keeps the `sink_tokens` first visible keys, the `local_window` keys ending at its
    own position, and its `k` visible keys of largest scaled score (softcapped if `softcap`):
    exactly min(k, visible) beyond the forced ones, never more. Ties between equal scores keep the
    lower key index on CPU in fp32 (the compiled selection) and follow `torch.topk`'s fixed order
    elsewhere, so results are reproducible. A query that may see no key
    (a fully padded row) gets zero output and zero weights, never NaN.

    `tail_samples` m > 0 adds the `tail` estimator's m reweighted uniform samples of the other
    visible keys (see `tail.tail_attention`, its entry point); not with sinks or a window unless
    with `rest_mean`, where the samples instead correct the rest's mean (below).

    `rest_mean` keeps the softmax mass of the visible keys a query does not keep instead of
    renormalising it away: they count as one more entry whose weight is their exact share of the
    softmax and whose value is the mean of their values,

        o_i = sum_{j kept} p_ij v_j + (sum_{j rest} p_ij) * mean_{j rest} v_j,   p_i = softmax(s_i),

    exact where the rest's values are alike. The share needs every visible score (the scores are
    computed anyway to select the k nearest) and the mean a running sum of the values, so the
    compiled selection that never holds a score block is not used. With `tail_samples` m > 0, m
    uniform samples of the rest add an unbiased estimate of what the mean misses,
    (n_rest / m) * sum_{j sampled} (p_ij - share / n_rest) (v_j - mean), exact once m covers the
    rest (`_sampled_correction`). The backward treats the rest's term as a constant: gradients flow
    through the kept keys only.

    Returns the output (B, Hq, Lq, Dv) in the query's dtype and, with `return_weights`, the dense
    weights (B, Hq, Lq, Lk) (O(Lq * Lk) memory: for inspection only).
    """
    b, hq, lq, d = query.shape
    hkv = key.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}).")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    if tail_samples and (sink_tokens or local_window) and not rest_mean:
        raise ValueError("tail samples combine with sink_tokens or local_window only with rest_mean.")
    g = hq // hkv
    mask = group_mask(attention_mask, hq, hkv, lq, key.shape[2])  # (B|1, 1|Hkv, 1|G, Lq, Lk) or None
    scale = d**-0.5 if scale is None else scale
    with torch.autocast(device_type=query.device.type, enabled=False):
        # (B, Hq, Lq, D) -> (B, Hkv, G, Lq, D): the heads of one KV group together (a view)
        q = query.view(b, hkv, g, lq, d)
        out, idx, p = _TopKAttention.apply(
            q,
            key,
            value,
            mask,
            k,
            float(scale),
            softcap,
            is_causal,
            sink_tokens,
            local_window,
            float(dropout),
            chunk_size,
            generator,
            tail_samples,
            rest_mean,
        )
    out = out.view(b, hq, lq, -1).to(query.dtype)  # (B, Hkv, G, Lq, Dv) -> (B, Hq, Lq, Dv)
    if not return_weights:
        return out, None
    weights = torch.zeros(b, hkv, g, lq, key.shape[2], dtype=p.dtype, device=query.device)
    weights.scatter_add_(-1, idx.long(), p)
    return out, weights.view(b, hq, lq, -1)
