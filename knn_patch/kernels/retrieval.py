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
    b, hq, lq, d = query.shape
    hkv, lk, dv = key.shape[1], key.shape[2], value.shape[-1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}).")
    if sink_tokens < 0 or local_window < 0:
        raise ValueError(f"sink_tokens ({sink_tokens}) and local_window ({local_window}) must be >= 0.")
    g, offset, device = hq // hkv, lk - lq, query.device
    scale = d**-0.5 if scale is None else scale
    bs = options["block_size"]
    mask = group_mask(attention_mask, hq, hkv, lq, lk)  # (B|1, 1|Hkv, 1|G, Lq, Lk) or None
    if mask is not None:
        valid = mask.flatten(1, 3).any(1)  # (B|1, Lk): keys some query may see
        is_sink = valid & (valid.cumsum(-1) <= sink_tokens)  # (B|1, Lk): the first visible keys
        n_sinks = int(is_sink.sum(-1).max()) if sink_tokens else 0
        sink_pos = torch.sort(torch.where(is_sink, torch.arange(lk, device=device), lk), -1).values
        sink_pos = torch.where(sink_pos < lk, sink_pos, -1)[:, :n_sinks]  # (B|1, s): -1 past a row's sinks
        index_valid = (valid & ~is_sink).cpu()  # padding and sinks are never indexed
    else:  # plain causal: the sinks are positions 0..s-1, and nothing O(Lk) is built (decode steps)
        is_sink, n_sinks, index_valid = None, min(sink_tokens, lk), None
        sink_pos = torch.arange(n_sinks, device=device).view(1, n_sinks)
    if indexes is None:
        opts = dict(options) if lq >= bs else {**options, "index": "flat"}
        indexes = KeyIndexes(key, options=opts)

    acc = torch.promote_types(query.dtype, torch.float32)  # fp32 scores; float64 kept for gradcheck
    # the search's fp32 inner products stand for the retrieved keys' scores unless q or k needs a
    # gradient (the search is not differentiable) or the scores are float64: then those keys are
    # gathered and rescored
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    rescore = needs_grad or acc != torch.float32
    width = k + sink_tokens + local_window
    forced_any = bool(sink_tokens or local_window)  # then `keep` below needs the candidates sorted
    # Without a mask, forced keys, gradients or extras, a block needs each query's k best explicit keys
    # only: the compiled `scores_topk` selects them without writing the (rows, explicit keys) scores
    # out, and a softmax over the 2k candidates follows.
    plain = mask is None and not forced_any and not rescore and softcap is None and not dropout
    plain = plain and not return_positions and fused_available(device, acc)
    outs, kept = [], []
    with torch.autocast(device_type=device.type, enabled=False):
        q_all = query.to(acc).view(b, hkv, g, lq, d)  # the heads of one KV group together (a view)
        k_all, v_all = key.to(acc), value.to(acc)
        for q0 in range(0, lq, bs):
            q1 = min(q0 + bs, lq)
            c, p0, p1 = q1 - q0, offset + q0, offset + q1
            ws = max(0, p0 - local_window + 1) if local_window else p0
            if ws - indexes.seen >= options["sync_every"]:  # keys join the index in batches
                indexes.sync(key, ws, index_valid, first=n_sinks if mask is None else 0)
            ws = indexes.seen  # keys from here on (at most sync_every - 1 beyond the window) are explicit
            qb = q_all[:, :, :, q0:q1].reshape(b, hkv, g * c, d)  # (B, Hkv, G*C, D)
            if plain:
                out = _plain_block(qb, k_all, v_all, indexes, k, scale, ws, p0, p1)
                outs.append(out.view(b, hkv, g, c, dv))
                continue

            # front columns: the sinks before ws and the retrieved keys, all before any query's window
            ret, ret_s = indexes.search(qb, k)  # (B, Hkv, G*C, k'), k' = 0 while the index is empty
            to_gather, front_pos, parts_s = [], [], []
            if n_sinks:
                sp = torch.where(sink_pos < ws, sink_pos, -1).expand(b, n_sinks)
                to_gather.append(sp.view(b, 1, 1, n_sinks).expand(b, hkv, g * c, n_sinks))
            if ret.shape[-1] and (ret_s is None or rescore):
                to_gather.append(ret)  # (B, Hkv, G*C, k')
            if to_gather:  # sinks (and retrieved keys when rescoring): gathered, then scored exactly
                gathered = torch.cat(to_gather, -1)
                front_pos.append(gathered)
                parts_s.append(_scores_at(k_all, gathered, qb))  # (B, Hkv, G*C, t)
            if ret.shape[-1] and ret_s is not None and not rescore:  # the search's own inner products
                front_pos.append(ret)
                parts_s.append(ret_s)
            fpos = torch.cat(front_pos, -1) if front_pos else None  # (B, Hkv, G*C, F)
            f = 0 if fpos is None else fpos.shape[-1]
            # then the explicit columns, positions ws..p1-1
            parts_s.append(qb @ k_all[:, :, ws:p1].transpose(-1, -2))  # (B, Hkv, G*C, p1 - ws)
            s = torch.cat(parts_s, -1) * scale  # (B, Hkv, G*C, F + p1 - ws)
            if softcap is not None:
                s = torch.tanh(s / softcap) * softcap

            # ranking: -inf where not visible, +inf where forced (sinks, window), else the score
            ranked = s.detach().clone()
            if f:
                vis = fpos >= 0
                at = _mask_at(mask, fpos, q0, c, g)
                if at is not None:
                    vis = vis & at
                ranked[..., :f].masked_fill_(~vis, -math.inf)
                ranked[..., :n_sinks].masked_fill_(vis[..., :n_sinks], math.inf)  # the sink columns
            vis, forced = _explicit_masks(mask, is_sink, q0, p0, ws, p1, n_sinks, local_window, device)
            explicit = ranked[..., f:].unflatten(2, (g, c))  # (B, Hkv, G, C, p1 - ws), a view
            if vis is not None:
                explicit.masked_fill_(~vis, -math.inf)
            if forced is not None:
                explicit.masked_fill_(forced, math.inf)
            take = min(width, ranked.shape[-1])
            # causality: a row ranks its explicit columns up to its own position only
            row_end = (f + p0 - ws + 1 + torch.arange(c, device=device)).repeat(b * hkv * g)
            # with nothing forced, every kept key is one of the k best: their order does not matter
            ranked_rows = topk_rows(ranked.flatten(0, -2), take, row_end, sorted=forced_any)
            sel, idx = (t.view(*ranked.shape[:-1], take) for t in ranked_rows)
            is_forced = sel == math.inf
            keep = (sel > -math.inf) & (is_forced | ((~is_forced).cumsum(-1) <= k))

            vals = s.gather(-1, idx).masked_fill(~keep, -math.inf)
            p = masked_softmax(vals)
            if dropout > 0:
                p = torch.nn.functional.dropout(p, dropout)
            sel_pos = idx + (ws - f)  # (B, Hkv, G*C, take): explicit column -> position
            if f:
                sel_pos = torch.where(idx < f, fpos.gather(-1, idx.clamp_max(f - 1)), sel_pos)
            out = _weighted_rows(v_all, sel_pos, p)  # (B, Hkv, G*C, Dv)
            outs.append(out.view(b, hkv, g, c, dv))
            if return_positions:
                kept_pos = torch.full((b, hkv, g * c, width), -1, dtype=torch.long, device=device)
                kept_pos[..., :take] = torch.where(keep, sel_pos, -1)
                kept.append(kept_pos.view(b, hkv, g, c, width))
    out = torch.cat(outs, 3).view(b, hq, lq, dv).to(query.dtype)  # (B, Hkv, G, Lq, Dv) -> (B, Hq, Lq, Dv)
    positions = torch.cat(kept, 3).view(b, hq, lq, width) if return_positions else None
    return out, positions


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
