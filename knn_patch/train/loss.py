"""Causal LM negative log-likelihood from the final hidden states, a chunk of positions at a time.

Full fp32 logits cost L x V x 4 bytes: 34 GB for 32,768 tokens of Gemma 3's 262,144-token
vocabulary, and cross-entropy's log-softmax doubles that. Here the model runs with
`logits_to_keep=1`, so its own head projects only the last position. A forward hook on the decoder
keeps the final hidden states (B, L, D). Each chunk of positions then goes through the model's output
embedding, the family's post-processing of logits (`postprocess`) and cross-entropy. Under autograd
each chunk is checkpointed: the backward recomputes that chunk's logits rather than keeping them, so
memory stays O(chunk x V) both ways.

The model still projects the last position itself, and that position checks the head on every call.
If a family's CausalLM forward does something to its logits that `postprocess` does not know, the
call raises instead of returning a wrong score.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from torch.utils.checkpoint import checkpoint
from transformers import PretrainedConfig
from transformers.utils import logging

logger = logging.get_logger("knn_patch")

METHODS = ("chunked", "full")

# Logits elements per chunk: 2**25 fp32 values are 128 MB, e.g. 128 positions of a 262k vocabulary or
# 682 of SmolLM2's 49k. A few buffers of that size (the logits, their fp32 copy, the log-softmax) are all
# the loss adds to the hidden states.
LOGITS_BUDGET = 2**25

# model_type -> what its CausalLM forward does to `lm_head(hidden)` before any softcapping, as in
# transformers 5.25. The attribute name alone cannot tell: granite divides by `logits_scaling` where
# hyperclovax multiplies by it. Each uses the forward's own operation, so the rounding is the same.
_SCALES: dict[str, Callable[[torch.Tensor, PretrainedConfig], torch.Tensor]] = {
    **dict.fromkeys(
        ("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared", "granitemoehybrid"),
        lambda logits, config: logits / config.logits_scaling,
    ),
    "hyperclovax": lambda logits, config: logits * config.logits_scaling,
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe"), lambda logits, config: logits * config.logit_scale),
    "falcon_h1": lambda logits, config: logits * config.lm_head_multiplier,
}


def postprocess(logits: torch.Tensor, config: PretrainedConfig) -> torch.Tensor:
    """What the family's CausalLM forward does to the output embedding's logits: a scale (`_SCALES`),
    then `final_logit_softcapping` if set (gemma2, gemma3, ...)."""
    scale = _SCALES.get(config.model_type)
    if scale is not None:
        logits = scale(logits, config)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:  # the forward's three operations, in its order
        logits = logits / cap
        logits = torch.tanh(logits)
        logits = logits * cap
    return logits


def causal_lm_nll(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    first_scored: int = 1,
    *,
    method: str = "chunked",
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed NLL (nats, a 0-d fp32 tensor, differentiable under autograd) and count of the tokens at
    positions >= first_scored of every row of `input_ids` (B, L), each predicted from the tokens before it.

    `model` is a transformers causal LM, possibly wrapped (peft, DDP). method="chunked" never holds
    more than `chunk_size` positions of logits (default: `LOGITS_BUDGET // V`). method="full" asks the
    model for all (B, L, V) logits, as transformers' own loss does. It is the reference, and the
    fallback where the output embedding is sharded outside the forward (FSDP).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid: use one of {METHODS}.")
    if not 1 <= first_scored < input_ids.shape[1]:
        raise ValueError(f"first_scored must be in [1, {input_ids.shape[1] - 1}], got {first_scored}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    targets = input_ids[:, first_scored:].flatten()  # (B * n,)
    lm = _causal_lm(model)
    head = lm.get_output_embeddings()
    if method == "chunked" and _sharded(model, head):
        logger.warning_once(
            "knn_patch: the output embedding is sharded (FSDP), so the loss uses the model's full "
            "logits; their memory grows with sequence length x vocabulary."
        )
        method = "full"
    if method == "full":
        logits = model(input_ids=input_ids, use_cache=False).logits[:, first_scored - 1 : -1]  # (B, n, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets, reduction="sum"), targets.numel()

    _check_supported(lm, head)
    with _final_hidden_states(lm) as captured:
        out = model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    if len(captured) != 1:
        raise NotImplementedError(
            f"{type(lm).__name__}'s decoder ran {len(captured)} times in one forward; the chunked loss "
            "needs its single output. Use method='full'."
        )
    hidden, autocast = captured[0]  # (B, L, D): the output embedding's input
    size = chunk_size or max(1, LOGITS_BUDGET // out.logits.shape[-1])
    grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in head.parameters())
    )
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    with autocast:  # the head runs in the precision the model's forward ran it in
        _check_head(lm, head, hidden[:, -1], out.logits[:, -1])
        hidden = hidden[:, first_scored - 1 : -1].flatten(0, 1)  # (B * n, D): position t predicts t + 1
        for h, t in zip(hidden.split(size), targets.split(size), strict=True):
            if grad:  # keep only the chunk's input; the backward recomputes its (size, V) logits
                total = total + checkpoint(_chunk_nll, head, lm.config, h, t, use_reentrant=False)
            else:
                total = total + _chunk_nll(head, lm.config, h, t)
    return total, targets.numel()


def _chunk_nll(
    head: torch.nn.Module, config: PretrainedConfig, hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    logits = postprocess(head(hidden), config).float()  # (n, V)
    return F.cross_entropy(logits, targets, reduction="sum")


def _causal_lm(model: Any) -> Any:
    """The transformers model under Accelerate's wrappers (DDP, FSDP1, compile) and a peft PeftModel."""
    model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(type(model), "get_base_model") else model


def _sharded(model: torch.nn.Module, head: torch.nn.Module | None) -> bool:
    """Whether the output embedding's weights are sharded outside the forward (FSDP2 DTensors, FSDP1)."""
    if head is None or not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in head.parameters()) or any(
        isinstance(m, FullyShardedDataParallel) for m in model.modules()
    )


def _check_supported(lm: Any, head: torch.nn.Module | None) -> None:
    name = type(lm).__name__
    if head is None:
        raise NotImplementedError(f"{name} has no output embedding; the chunked loss needs one.")
    if "logits_to_keep" not in inspect.signature(lm.forward).parameters:
        raise NotImplementedError(
            f"{name}.forward takes no `logits_to_keep`, so it would compute every position's logits "
            "anyway. Use method='full'."
        )
    if lm.get_decoder() is lm:
        raise NotImplementedError(
            f"{name} has no separate decoder whose output feeds its head. Use method='full'."
        )


@contextlib.contextmanager
def _final_hidden_states(lm: Any) -> Iterator[list[tuple[torch.Tensor, torch.autocast]]]:
    """Collect the decoder's output hidden states (B, L, D) during a forward of `lm`, with the autocast
    state the forward ran under: a wrapper such as Accelerate's mixed precision may have set it inside
    the forward only, and the head must be recomputed in the same precision."""
    captured: list[tuple[torch.Tensor, torch.autocast]] = []

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        device = output[0].device.type
        autocast = torch.autocast(
            device, dtype=torch.get_autocast_dtype(device), enabled=torch.is_autocast_enabled(device)
        )
        captured.append((output[0], autocast))

    handle = lm.get_decoder().register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@torch.no_grad()
def _check_head(lm: Any, head: torch.nn.Module, hidden: torch.Tensor, expected: torch.Tensor) -> None:
    """Raise unless the output embedding and `postprocess` applied to `hidden` (B, D) give the model's own
    logits `expected` (B, V), to a few units in the last place of the less precise dtype."""
    try:
        ours = postprocess(head(hidden), lm.config)
    except RuntimeError:  # e.g. the head expects another width than the decoder's output
        ours = None
    if ours is not None and ours.shape == expected.shape:
        eps = max(torch.finfo(ours.dtype).eps, torch.finfo(expected.dtype).eps)
        tolerance = max(4 * eps, 1e-4) * max(1.0, expected.abs().max().item())
        error = (ours.float() - expected.float()).abs().max().item()
        if error <= tolerance:
            return
        found = f"differ by up to {error:.3g} (tolerance {tolerance:.3g})"
    else:
        found = "cannot be computed from the decoder's output"
    raise NotImplementedError(
        f"The output embedding applied to the decoder's output does not reproduce the logits of "
        f"{type(lm).__name__} (model_type {lm.config.model_type!r}): they {found}. Its forward "
        "post-processes logits in a way knn_patch.train.loss.postprocess does not know. Add the family "
        "there, or use method='full'."
    )
