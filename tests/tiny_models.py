"""Tiny random models of many families, built from their configs: no download needed."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

_COMMON = dict(
    vocab_size=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

_FALCON = dict(
    vocab_size=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
)

# name -> config overrides (and `model_type` where the name is a variant of a family). Windows are
# small so that sliding-window masks really cut keys.
FAMILIES: dict[str, dict] = {
    "llama": _COMMON,
    "mistral": {**_COMMON, "sliding_window": 8},
    "mixtral": {**_COMMON, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    "qwen2": {**_COMMON, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
    "qwen3": {**_COMMON, "head_dim": 8},
    "gpt2": dict(
        vocab_size=128, bos_token_id=1, eos_token_id=2, n_embd=32, n_layer=2, n_head=4, n_positions=256
    ),
    "gpt_neox": {**_COMMON, "num_key_value_heads": 4, "rotary_pct": 0.5},
    "phi3": _COMMON,
    "gemma2": {
        **_COMMON,
        "head_dim": 8,
        "sliding_window": 8,
        "attn_logit_softcapping": 20.0,
        "final_logit_softcapping": 10.0,
    },
    "gemma3_text": {
        **_COMMON,
        "head_dim": 8,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "olmo2": {**_COMMON},
    "starcoder2": {**_COMMON, "sliding_window": 8},
    "qwen3_moe": {
        **_COMMON,
        "head_dim": 8,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
    },
    "phi": {**_COMMON, "num_key_value_heads": 4},
    "granite": _COMMON,
    "smollm3": _COMMON,
    # multi-query attention (one KV head), parallel attention and MLP
    "falcon": _FALCON,
    # Falcon-40B/180B's layout: grouped KV heads and two layer norms
    "falcon_gqa": {**_FALCON, "model_type": "falcon", "num_kv_heads": 2, "new_decoder_architecture": True},
    "opt": dict(
        vocab_size=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=32,
    ),
}

# softcapped scores are not supported by SDPA: the dense reference for those families is eager
DENSE_REFERENCE = {"gemma2": "eager"}


def model_type(family: str) -> str:
    return FAMILIES[family].get("model_type", family)


def tiny_model(
    family: str, attn_implementation: str | None = None, seed: int = 0, **overrides
) -> torch.nn.Module:
    spec = {**FAMILIES[family], **overrides}
    config = AutoConfig.for_model(spec.pop("model_type", family), **spec)
    torch.manual_seed(seed)
    impl = attn_implementation or DENSE_REFERENCE.get(family, "sdpa")
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl, dtype=torch.float32)
    return model.eval()
