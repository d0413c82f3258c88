"""kNN attention with a faiss index over earlier keys: causal blocks, exact inside, retrieval outside.

Queries go in causal blocks of `block_size`. For a block whose first query sits at position p0,
the keys are split in two disjoint parts:

    position:   0 .. s-1     s .. ws-1             ws .. p0-1      p0 .. p1-1
                sinks        the index             window prefix   the block
                (explicit)   (faiss, top-k search) (explicit)      (explicit)

with ws = p0 - local_window + 1, or lower: keys join the index in batches of `sync_every`, and
those not yet added (fewer than sync_every) stay explicit, so a decode step adds no key to faiss
most of the time. Explicit keys are scored exactly by a matmul; the index returns each
query's k best keys of its part with their fp32 inner products. Those scores are used as they are
unless q or k needs a gradient, the scores are float64, or the index is hnsw (L2-reduced distances):
then the retrieved keys are gathered and scored again in torch, so gradients reach q and every
selected k (faiss itself is not differentiable). Values are always gathered in torch, so gradients
reach every selected v. Each query then
keeps its forced keys (sinks, and the local window ending at itself) plus its k best others among
all candidates, and takes one softmax over them: the log-sum-exp merge of the two parts.

Since every index key is non-forced for all queries of the block, the exact top-k of a query is
always inside explicit + top-k(index): with a flat index this equals exact top-k attention.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .index import TRAIN_POINTS_PER_LIST, KeyIndexes, resolve_nlist
from .sampling import group_mask, masked_softmax
from .select import fused_available, scores_topk, topk_rows


def _row_table(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x (B, H, L, E) as a 2-D table of rows and the row count per (b, h), without a copy when x is
    contiguous or a length-L view of a contiguous (B, H, capacity, E) buffer (KNNCache's keys)."""
    b, h, n, e = x.shape
    if x.is_contiguous():
        return x.reshape(b * h * n, e), n
    cap = x.stride(1) // e if x.stride(-1) == 1 and x.stride(-2) == e else 0
    if cap >= n and x.stride(1) == cap * e and x.stride(0) == h * cap * e:
        return x.as_strided((b * h * cap, e), (e, 1)), cap
    return x.reshape(b * h * n, e), n


def _gather(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x (B, Hkv, L, E), pos (B, Hkv, R, t) (any int, -1 allowed: read as 0) -> (B, Hkv, R, t, E)."""
    b, h, _, e = x.shape
    table, n = _row_table(x)
    flat = pos.clamp_min(0) + (torch.arange(b * h, device=x.device) * n).view(b, h, 1, 1)
    return table.index_select(0, flat.reshape(-1)).view(*pos.shape, e)


def _scores_at(x: torch.Tensor, pos: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q . x[b, h, pos[..., t]]: x (B, Hkv, L, D), pos (B, Hkv, R, t), q (B, Hkv, R, D) -> (B, Hkv, R, t)."""
    return (_gather(x, pos) @ q.unsqueeze(-1)).squeeze(-1)


def _weighted_rows(x: torch.Tensor, pos: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_t w[..., t] * x[b, h, pos[..., t]]: x (B, Hkv, L, E), pos and w (B, Hkv, R, t) -> (B, Hkv, R, E).

    `embedding_bag` fuses the gather and the weighted sum (differentiable in x and w), never
    materialising the (R, t, E) gathered rows."""
    b, h, _, e = x.shape
    table, n = _row_table(x)
    flat = pos.clamp_min(0) + (torch.arange(b * h, device=x.device) * n).view(b, h, 1, 1)
    t = pos.shape[-1]
    out = torch.nn.functional.embedding_bag(
        flat.reshape(-1, t), table, per_sample_weights=w.reshape(-1, t), mode="sum"
    )
    return out.view(*pos.shape[:-1], e)


def _mask_at(mask: torch.Tensor | None, pos: torch.Tensor, q0: int, c: int, g: int) -> torch.Tensor | None:
    """Visibility (B, Hkv, G*C, t) of key positions pos (B, Hkv, G*C, t) for queries q0..q0+c-1, from
    the grouped mask (B|1, 1|Hkv, 1|G, Lq, Lk); None when there is no mask."""
    if mask is None:
        return None
    b, h = pos.shape[:2]
    rows = mask[..., q0 : q0 + c, :].expand(b, h, g, c, mask.shape[-1]).reshape(b, h, g * c, -1)
    return rows.gather(-1, pos.clamp_min(0))


def _explicit_masks(
    mask: torch.Tensor | None,
    is_sink: torch.Tensor | None,
    q0: int,
    p0: int,
    ws: int,
    p1: int,
    n_sinks: int,
    local_window: int,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Visibility and forcing of the explicit keys (positions ws..p1-1) for the block's queries (rows
    q0.., positions p0..p1-1): (C, E) tensors shared by every head, or (B|1, 1|Hkv, 1|G, C, E) with
    a mask; each None when it holds nothing (no mask; no sink or window). A query's keys past its
    own position are left to the ranking, which stops each row there (`topk_rows`' row_end).
    Built per block, not per score row, so that no position tensor of the scores' size is
    materialised. `is_sink` (B|1, Lk) with a mask, else None."""
    kpos = torch.arange(ws, p1, device=device)
    qpos = torch.arange(p0, p1, device=device).unsqueeze(-1)  # (C, 1)
    vis = None if mask is None else mask[..., q0 : q0 + p1 - p0, ws:p1]
    forced = kpos > qpos - local_window if local_window else None
    if n_sinks:
        sink = kpos < n_sinks if is_sink is None else is_sink[:, ws:p1].view(-1, 1, 1, 1, p1 - ws)
        forced = sink if forced is None else forced | sink
    if forced is not None and vis is not None:
        forced = forced & vis
    return vis, forced


def retrieval_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    k: int,
    options: Mapping[str, Any],
    scale: float | None = None,
    sink_tokens: int = 0,
    local_window: int = 0,
    softcap: float | None = None,
    dropout: float = 0.0,
    indexes: KeyIndexes | None = None,
    return_positions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal kNN attention whose far keys come from faiss.

    Shapes: query (B, Hq, Lq, D); key (B, Hkv, Lk, D); value (B, Hkv, Lk, Dv); Hq a multiple of Hkv.
    Queries are the last Lq positions (bottom-right causal alignment). `attention_mask` is boolean,
    broadcastable to (B, Hq, Lq, Lk), True = may see; keys no query may see (padding) and sink keys
    are never indexed. `options` are the validated faiss options (index type, block size...).
    `indexes` (a KNNCache's) must hold no key at or after the first block's window start; without
    it a fresh index is built for this call, a flat one when Lq < block_size (an approximate index
    would cost more to build than scoring the keys). The sinks are the first `sink_tokens` keys
    a row may see. A row that may see no key gets zero output.

    Returns out (B, Hq, Lq, Dv) in the query's dtype and, with `return_positions`, the kept key
    positions (B, Hq, Lq, k + sink_tokens + local_window) as int64, -1 in unused slots.
    """
    b, hq, lq = query.shape[:3]
    hkv, dv = key.shape[1], value.shape[-1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}).")
    if sink_tokens < 0 or local_window < 0:
        raise ValueError(f"sink_tokens ({sink_tokens}) and local_window ({local_window}) must be >= 0.")
    mask = group_mask(attention_mask, hq, hkv, lq, key.shape[2])  # (B|1, 1|Hkv, 1|G, Lq, Lk) or None
    call = _Call.build(
        query, key, mask, k, options, scale, sink_tokens, local_window, softcap, dropout, return_positions
    )
    if indexes is None:
        opts = dict(options) if lq >= call.block_size else {**options, "index": "flat"}
        indexes = KeyIndexes(key, options=opts)
    with torch.autocast(device_type=query.device.type, enabled=False):
        out, kept = _attend(call, indexes, query, key, value)
    out = out.view(b, hq, lq, dv).to(query.dtype)  # (B, Hkv, G, Lq, Dv) -> (B, Hq, Lq, Dv)
    return out, (kept.view(b, hq, lq, call.width) if return_positions else None)


def _attend(
    call: _Call, indexes: KeyIndexes, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`retrieval_attention`'s output (B, Hkv, G, Lq, Dv) in the scores' dtype, block by block, and
    the kept positions (B, Hkv, G, Lq, width) when the call returns them (else None)."""
    b, hkv, g = call.shape
    lq, d, dv = query.shape[2], query.shape[3], value.shape[-1]
    q_all = query.to(call.acc).view(b, hkv, g, lq, d)  # the heads of one KV group together (a view)
    k_all, v_all = key.to(call.acc), value.to(call.acc)
    outs, kept = [], []
    for q0 in range(0, lq, call.block_size):
        blk = _next_block(call, indexes, key, q0, min(q0 + call.block_size, lq))
        qb = q_all[:, :, :, q0 : q0 + blk.c].reshape(b, hkv, g * blk.c, d)  # (B, Hkv, G*C, D)
        if call.plain:
            out = _plain_block(qb, k_all, v_all, indexes, call.k, call.scale, blk.ws, blk.p0, blk.p1)
        else:
            out, kept_pos = _general_block(call, blk, qb, k_all, v_all, indexes)
            if kept_pos is not None:
                kept.append(kept_pos.view(b, hkv, g, blk.c, call.width))
        outs.append(out.view(b, hkv, g, blk.c, dv))
    return torch.cat(outs, 3), (torch.cat(kept, 3) if call.return_positions else None)


# ---- What the blocks of one call share ----


class _Sinks(NamedTuple):
    """Where a call's sinks sit, and which keys may join the index."""

    n: int  # sink columns per row: the most sinks a batch row has
    pos: torch.Tensor  # (B|1, n) sink positions, -1 past a row's sinks
    is_sink: torch.Tensor | None  # (B|1, Lk) with a mask; None: the sinks are positions 0..n-1
    index_valid: torch.Tensor | None  # (B|1, Lk) on the CPU, the keys that may be indexed; None: all


def _find_sinks(mask: torch.Tensor | None, sink_tokens: int, lk: int, device: torch.device) -> _Sinks:
    """The first `sink_tokens` keys each row may see, under the grouped mask (B|1, 1|Hkv, 1|G, Lq, Lk)."""
    # plain causal: the sinks are positions 0..s-1, and nothing O(Lk) is built (decode steps)
    if mask is None:
        n_sinks = min(sink_tokens, lk)
        return _Sinks(n_sinks, torch.arange(n_sinks, device=device).view(1, n_sinks), None, None)
    valid = mask.flatten(1, 3).any(1)  # (B|1, Lk): keys some query may see
    is_sink = valid & (valid.cumsum(-1) <= sink_tokens)  # (B|1, Lk): the first visible keys
    n_sinks = int(is_sink.sum(-1).max()) if sink_tokens else 0
    sink_pos = torch.sort(torch.where(is_sink, torch.arange(lk, device=device), lk), -1).values
    sink_pos = torch.where(sink_pos < lk, sink_pos, -1)[:, :n_sinks]  # (B|1, s): -1 past a row's sinks
    index_valid = (valid & ~is_sink).cpu()  # padding and sinks are never indexed
    return _Sinks(n_sinks, sink_pos, is_sink, index_valid)


@dataclass(frozen=True)
class _Call:
    """What every block of one `retrieval_attention` call shares."""

    shape: tuple[int, int, int]  # (B, Hkv, G)
    mask: torch.Tensor | None  # grouped boolean mask (B|1, 1|Hkv, 1|G, Lq, Lk), True = may see
    sinks: _Sinks
    offset: int  # Lk - Lq: query i sits at key position i + offset
    k: int
    width: int  # kept slots per query: k + sink_tokens + local_window
    local_window: int
    scale: float
    softcap: float | None
    dropout: float
    acc: torch.dtype  # the scores' dtype
    rescore: bool  # retrieved keys are gathered and scored again in torch, not by the search
    forced_any: bool  # sinks or a window: the selection must come sorted
    plain: bool  # blocks go through `_plain_block`
    return_positions: bool
    block_size: int
    sync_every: int
    device: torch.device

    @staticmethod
    def build(
        query: torch.Tensor,
        key: torch.Tensor,
        mask: torch.Tensor | None,
        k: int,
        options: Mapping[str, Any],
        scale: float | None,
        sink_tokens: int,
        local_window: int,
        softcap: float | None,
        dropout: float,
        return_positions: bool,
    ) -> _Call:
        """The settings of a call on query (B, Hq, Lq, D) and key (B, Hkv, Lk, D), under the grouped
        mask (B|1, 1|Hkv, 1|G, Lq, Lk) or None."""
        b, hq, lq, d = query.shape
        hkv, lk, device = key.shape[1], key.shape[2], query.device
        acc = torch.promote_types(query.dtype, torch.float32)  # fp32 scores; float64 kept for gradcheck
        # the search's fp32 inner products stand for the retrieved keys' scores unless q or k needs a
        # gradient (the search is not differentiable) or the scores are float64: then those keys are
        # gathered and rescored
        needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
        rescore = needs_grad or acc != torch.float32
        forced_any = bool(sink_tokens or local_window)  # then `_select_kept` needs the candidates sorted
        # Without a mask, forced keys, gradients or extras, a block needs each query's k best explicit
        # keys only: the compiled `scores_topk` selects them without writing the (rows, explicit keys)
        # scores out, and a softmax over the 2k candidates follows.
        plain = mask is None and not forced_any and not rescore and softcap is None and not dropout
        plain = plain and not return_positions and fused_available(device, acc)
        return _Call(
            shape=(b, hkv, hq // hkv),
            mask=mask,
            sinks=_find_sinks(mask, sink_tokens, lk, device),
            offset=lk - lq,
            k=k,
            width=k + sink_tokens + local_window,
            local_window=local_window,
            scale=d**-0.5 if scale is None else scale,
            softcap=softcap,
            dropout=dropout,
            acc=acc,
            rescore=rescore,
            forced_any=forced_any,
            plain=plain,
            return_positions=return_positions,
            block_size=options["block_size"],
            sync_every=options["sync_every"],
            device=device,
        )


# ---- One block of queries ----


class _Block(NamedTuple):
    """A block of C queries, rows q0..q0+C-1 at key positions p0..p1-1; keys ws..p1-1 are explicit."""

    q0: int
    c: int
    p0: int
    p1: int
    ws: int


def _next_block(call: _Call, indexes: KeyIndexes, key: torch.Tensor, q0: int, q1: int) -> _Block:
    """The block of queries q0..q1-1, once the keys before its window start have joined the index
    (in batches of `sync_every`: the keys not yet added, fewer than that, stay explicit)."""
    p0, p1 = call.offset + q0, call.offset + q1
    ws = max(0, p0 - call.local_window + 1) if call.local_window else p0
    if ws - indexes.seen >= call.sync_every:  # keys join the index in batches
        first = call.sinks.n if call.mask is None else 0
        indexes.sync(key, ws, call.sinks.index_valid, first=first)
    return _Block(q0, q1 - q0, p0, p1, indexes.seen)


def _general_block(
    call: _Call,
    blk: _Block,
    qb: torch.Tensor,
    k_all: torch.Tensor,
    v_all: torch.Tensor,
    indexes: KeyIndexes,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One block's output (B, Hkv, G*C, Dv) for queries qb (B, Hkv, G*C, D), keys and values
    (B, Hkv, Lk, E) in the scores' dtype: its front columns (sinks before ws, retrieved keys) and
    explicit columns are scored, ranked and selected, and the kept keys get one softmax. Also the
    kept positions (B, Hkv, G*C, width), -1 in unused slots, when the call returns them (else None)."""
    b, hkv, r = qb.shape[:3]
    fpos, front_s = _front_columns(call, blk, qb, k_all, indexes)
    f = 0 if fpos is None else fpos.shape[-1]
    s = _block_scores(call, blk, qb, k_all, front_s)  # (B, Hkv, G*C, F + p1 - ws)
    idx, keep = _select_kept(call, blk, _ranking(call, blk, s, fpos), f)
    p = masked_softmax(s.gather(-1, idx).masked_fill(~keep, -math.inf))
    if call.dropout > 0:
        p = torch.nn.functional.dropout(p, call.dropout)
    sel_pos = idx + (blk.ws - f)  # (B, Hkv, G*C, take): explicit column -> position
    if f:
        sel_pos = torch.where(idx < f, fpos.gather(-1, idx.clamp_max(f - 1)), sel_pos)
    out = _weighted_rows(v_all, sel_pos, p)  # (B, Hkv, G*C, Dv)
    if not call.return_positions:
        return out, None
    kept_pos = torch.full((b, hkv, r, call.width), -1, dtype=torch.long, device=call.device)
    kept_pos[..., : idx.shape[-1]] = torch.where(keep, sel_pos, -1)
    return out, kept_pos


def _front_columns(
    call: _Call, blk: _Block, qb: torch.Tensor, k_all: torch.Tensor, indexes: KeyIndexes
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """The block's front columns, all before any query's window: the sinks before ws and each query's
    k' keys retrieved by the index. Returns their positions (B, Hkv, G*C, F) (-1 in empty slots; None
    when F = 0) and their scores, unscaled, in parts to concatenate: the sinks (and the retrieved keys
    when rescoring) gathered and scored exactly, else the search's own inner products."""
    b, hkv, r = qb.shape[:3]
    n_sinks = call.sinks.n
    ret, ret_s = indexes.search(qb, call.k)  # (B, Hkv, G*C, k'), k' = 0 while the index is empty
    to_gather, front_pos, parts_s = [], [], []
    if n_sinks:
        sp = torch.where(call.sinks.pos < blk.ws, call.sinks.pos, -1).expand(b, n_sinks)
        to_gather.append(sp.view(b, 1, 1, n_sinks).expand(b, hkv, r, n_sinks))
    if ret.shape[-1] and (ret_s is None or call.rescore):
        to_gather.append(ret)  # (B, Hkv, G*C, k')
    if to_gather:
        gathered = torch.cat(to_gather, -1)
        front_pos.append(gathered)
        parts_s.append(_scores_at(k_all, gathered, qb))  # (B, Hkv, G*C, t)
    if ret.shape[-1] and ret_s is not None and not call.rescore:
        front_pos.append(ret)
        parts_s.append(ret_s)
    return (torch.cat(front_pos, -1) if front_pos else None), parts_s


def _block_scores(
    call: _Call, blk: _Block, qb: torch.Tensor, k_all: torch.Tensor, front_s: list[torch.Tensor]
) -> torch.Tensor:
    """The scores (B, Hkv, G*C, F + p1 - ws), scaled and softcapped: the front columns' parts, then
    the explicit columns, positions ws..p1-1, by a matmul."""
    explicit = qb @ k_all[:, :, blk.ws : blk.p1].transpose(-1, -2)  # (B, Hkv, G*C, p1 - ws)
    s = torch.cat([*front_s, explicit], -1) * call.scale
    if call.softcap is not None:
        s = torch.tanh(s / call.softcap) * call.softcap
    return s


def _ranking(call: _Call, blk: _Block, s: torch.Tensor, fpos: torch.Tensor | None) -> torch.Tensor:
    """A copy of the scores s (B, Hkv, G*C, F + p1 - ws) to rank by: -inf where not visible, +inf
    where forced (sinks, window), else the score. Explicit columns past a query's own position are
    left to `_select_kept`'s row ends."""
    g, n_sinks = call.shape[2], call.sinks.n
    ranked = s.detach().clone()
    f = 0 if fpos is None else fpos.shape[-1]
    if f:
        vis = fpos >= 0
        at = _mask_at(call.mask, fpos, blk.q0, blk.c, g)
        if at is not None:
            vis = vis & at
        ranked[..., :f].masked_fill_(~vis, -math.inf)
        ranked[..., :n_sinks].masked_fill_(vis[..., :n_sinks], math.inf)  # the sink columns
    vis, forced = _explicit_masks(
        call.mask, call.sinks.is_sink, blk.q0, blk.p0, blk.ws, blk.p1, n_sinks, call.local_window, call.device
    )
    explicit = ranked[..., f:].unflatten(2, (g, blk.c))  # (B, Hkv, G, C, p1 - ws), a view
    if vis is not None:
        explicit.masked_fill_(~vis, -math.inf)
    if forced is not None:
        explicit.masked_fill_(forced, math.inf)
    return ranked


def _select_kept(call: _Call, blk: _Block, ranked: torch.Tensor, f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's candidate columns (B, Hkv, G*C, take), take = min(width, columns), and which of them
    it keeps: its forced keys (ranked +inf) and its k best others, never a hidden one."""
    b, hkv, g = call.shape
    take = min(call.width, ranked.shape[-1])
    # causality: a row ranks its explicit columns up to its own position only
    row_end = (f + blk.p0 - blk.ws + 1 + torch.arange(blk.c, device=call.device)).repeat(b * hkv * g)
    # with nothing forced, every kept key is one of the k best: their order does not matter
    ranked_rows = topk_rows(ranked.flatten(0, -2), take, row_end, sorted=call.forced_any)
    sel, idx = (t.view(*ranked.shape[:-1], take) for t in ranked_rows)
    is_forced = sel == math.inf
    keep = (sel > -math.inf) & (is_forced | ((~is_forced).cumsum(-1) <= call.k))
    return idx, keep


def _plain_block(
    qb: torch.Tensor,
    k_all: torch.Tensor,
    v_all: torch.Tensor,
    indexes: KeyIndexes,
    k: int,
    scale: float,
    ws: int,
    p0: int,
    p1: int,
) -> torch.Tensor:
    """One block of `retrieval_attention` without mask, forced keys or gradients: queries qb
    (B, Hkv, R, D), R = G*C at positions p0..p1-1 (row-major in (G, C)), keys and values (B, Hkv, L, E)
    fp32. Each query's k best of (its index top-k, its k best explicit keys ws..its position) get one
    softmax: the same keys as the general path. Returns (B, Hkv, R, Dv)."""
    b, hkv, r, d = qb.shape
    c = p1 - p0
    ret, ret_s = indexes.search(qb, k)  # (B, Hkv, R, k'), scores None when returned unsearched
    if ret_s is None:  # k' may be 0 (an empty index): the tensors below are then empty
        ret_s = _scores_at(k_all, ret, qb).masked_fill(ret < 0, -math.inf)
    row_end = (p0 - ws + 1 + torch.arange(c, device=qb.device)).repeat(b * hkv * (r // c))  # causal
    ret_s, ret = ret_s.reshape(b * hkv * r, -1), ret.reshape(b * hkv * r, -1)
    explicit = k_all[:, :, ws:p1].reshape(b * hkv, p1 - ws, d)
    # each row's k best of its retrieved keys (the seeds) and its explicit keys, as positions
    vals, pos, _ = scores_topk(qb.reshape(b * hkv, r, d), explicit, k, row_end, seeds=(ret_s, ret), offset=ws)
    p = masked_softmax(vals * scale)
    return _weighted_rows(v_all, pos.view(b, hkv, r, -1), p.view(b, hkv, r, -1))


class Recall(NamedTuple):
    """`recall_at_k`'s result: the share of the exact top-k keys kept, and of their softmax mass."""

    plain: float
    weighted: float


def recall_at_k(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    k: int,
    options: Mapping[str, Any],
    n_queries: int = 512,
    seed: int = 0,
    sink_tokens: int = 0,
) -> Recall:
    """Recall@k of the faiss selection against exact top-k, causal, no window.

    Shapes as in `retrieval_attention` (no mask). Averaged over `n_queries` query positions drawn
    (fixed seed) among those whose block searches an approximate index (for ivf, once it holds its
    39 * nlist training keys): a diagnostic of the index, not inflated by exactly scored blocks.
    Returns `Recall(plain, weighted)`: the share of each query's exact top-k keys that the faiss
    selection kept, and the share of their softmax mass (scale d^-1/2), where a missed key counts by
    its attention weight (a missed top-1 key can cost more than many missed tail keys).
    With `sink_tokens`, the first keys are sinks as in the backend (always kept, never indexed):
    the exact top-k is then taken among the other keys, while the softmax weights still span all.
    """
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    offset, bs = lk - lq, options["block_size"]
    needed = TRAIN_POINTS_PER_LIST * resolve_nlist(options["nlist"], lk) if options["index"] == "ivf" else 1
    needed += sink_tokens  # the sinks are never indexed
    first = max(bs, -(-(needed - offset) // bs) * bs)  # the first block start with that many keys before it
    if lq <= first:
        raise ValueError(f"No query of these {lq} searches an approximate index; use a longer sequence.")
    with torch.no_grad():
        _, kept = retrieval_attention(
            query, key, key, k=k, options=options, sink_tokens=sink_tokens, return_positions=True
        )
        gen = torch.Generator().manual_seed(seed)
        rows = first + torch.randperm(lq - first, generator=gen)[:n_queries].sort().values  # (R,)
        q = query[:, :, rows].float().view(b, hkv, hq // hkv * len(rows), d)  # (B, Hkv, G*R, D)
        s = (q @ key.float().transpose(-1, -2)).view(b, hq, len(rows), lk)  # (B, Hq, R, Lk)
        s.masked_fill_(torch.arange(lk) > (rows + offset).unsqueeze(-1), -math.inf)
        weights = torch.softmax(s * d**-0.5, -1)  # over every visible key, sinks included
        s[..., :sink_tokens] = -math.inf  # the top-k is among the indexed keys
        exact = s.topk(min(k, lk), dim=-1).indices  # (B, Hq, R, k)
        sel = kept[:, :, rows]  # (B, Hq, R, width)
        hits = (exact.unsqueeze(-1) == sel.unsqueeze(-2)).any(-1)  # (B, Hq, R, k)
        valid = torch.gather(s, -1, exact) > -math.inf  # queries with fewer than k keys
        p = weights.gather(-1, exact) * valid  # (B, Hq, R, k), 0 where not valid
    return Recall(float(hits[valid].float().mean()), float((p * hits).sum() / p.sum()))
